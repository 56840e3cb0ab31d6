#!/usr/bin/env bash
# Run after the tests: fails if the one-node cluster of test/cluster left
# anything on the host. Its processes, mounts, network namespaces, bridge and
# iptables rules live in namespaces that end with the test binary, and its
# pods' cgroups are under /stickylb-test-<pid> in each hierarchy; this checks
# that none of it survived.
set -euo pipefail
bad=0
if pgrep -af 'stickylb-cluster[0-9]' >/dev/null; then
	echo "leftovers: processes of the test cluster:" >&2
	pgrep -af 'stickylb-cluster[0-9]' >&2
	bad=1
fi
cg=$(find /sys/fs/cgroup -maxdepth 2 -name 'stickylb-test-*' 2>/dev/null || true)
if [ -n "$cg" ]; then
	echo "leftovers: cgroups of the test cluster:" >&2
	echo "$cg" >&2
	bad=1
fi
if grep -E 'stickylb-cluster|/var/lib/kubelet|/run/containerd|/run/netns/stickylb' /proc/self/mountinfo >&2; then
	echo "leftovers: mounts of the test cluster (above)" >&2
	bad=1
fi
if command -v iptables-save >/dev/null && iptables-save 2>/dev/null | grep -q 'KUBE-SVC\|stickylb-test'; then
	echo "leftovers: kube-proxy rules in the host's iptables" >&2
	bad=1
fi
exit $bad
