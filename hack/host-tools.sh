#!/usr/bin/env bash
# The host tools the namespace-isolated tests and the demo need: unshare
# (util-linux) and ip (iproute2). Installed from Debian when missing.
set -euo pipefail
missing=()
command -v unshare >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
	echo "host-tools: need ${missing[*]} (and root for network namespaces)" >&2
	exit 1
fi
echo "host-tools: installing ${missing[*]}" >&2
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
