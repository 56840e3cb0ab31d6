#!/usr/bin/env bash
# The host tools the tests and the demo need, installed from Debian when
# missing: unshare and nsenter (util-linux) and ip (iproute2) for the network
# namespaces; containerd, runc, the CNI plugins and iptables for the one-node
# cluster of test/cluster.
set -euo pipefail
missing=()
command -v unshare >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
command -v iptables >/dev/null || missing+=(iptables)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
	echo "host-tools: need ${missing[*]} (and root for network namespaces)" >&2
	exit 1
fi
echo "host-tools: installing ${missing[*]}" >&2
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
