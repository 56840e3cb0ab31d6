package cluster

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
)

// The addresses of the test network. The test binary's own network namespace
// plays the world outside the node: the clients live there, and a veth pair
// joins it to the node's namespace, where every cluster component runs.
var (
	// NodeIP is the node's InternalIP, on the node's side of the veth.
	NodeIP = netip.MustParseAddr("10.200.0.2")
	// gatewayIP is the clients' side of the veth, the node's default route.
	gatewayIP = netip.MustParseAddr("10.200.0.1")
	// Clients is routed to the clients' loopback: any address in it can be a
	// client's source address.
	Clients = netip.MustParsePrefix("10.201.0.0/16")
	// PodCIDR is the node's pod network (bridge CNI, host-local IPAM).
	PodCIDR = netip.MustParsePrefix("10.244.0.0/24")
	// clusterCIDR is what the controller-manager allocates node CIDRs from.
	clusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	// ServiceCIDR holds every ClusterIP.
	ServiceCIDR = netip.MustParsePrefix("10.96.0.0/16")
)

// nodeNetns is the network namespace of the node, under /run/netns.
const nodeNetns = "stickylb-node"

// ClientIP returns the i-th client address: 10.201.1.1 upwards, 250 per /24.
func ClientIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 201, byte(1 + i/250), byte(1 + i%250)})
}

// setupNetwork creates the node's network namespace and the veth to it.
func setupNetwork() error {
	node := []string{"netns", "exec", nodeNetns, "ip"}
	steps := [][]string{
		{"link", "set", "lo", "up"},
		{"netns", "add", nodeNetns},
		{"link", "add", "node0", "type", "veth", "peer", "name", "eth0", "netns", nodeNetns},
		{"addr", "add", gatewayIP.String() + "/24", "dev", "node0"},
		{"link", "set", "node0", "up"},
		{"route", "add", "local", Clients.String(), "dev", "lo"},
		{"route", "add", ServiceCIDR.String(), "via", NodeIP.String()},
		{"route", "add", clusterCIDR.String(), "via", NodeIP.String()},
		append(node, "link", "set", "lo", "up"),
		append(node, "addr", "add", NodeIP.String()+"/24", "dev", "eth0"),
		append(node, "link", "set", "eth0", "up"),
		append(node, "route", "add", "default", "via", gatewayIP.String()),
	}
	for _, args := range steps {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	// The node routes between its veth and the pod bridge.
	return inNode("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
}

// inNode runs a command in the node's network namespace.
func inNode(name string, args ...string) error {
	out, err := nodeCommand(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// nodeCommand is name run in the node's network namespace (and, like every
// process here, in the tests' mount and PID namespaces).
func nodeCommand(name string, args ...string) *exec.Cmd {
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + nodeNetns, "--", name}, args...)...)
	cmd.Env = os.Environ()
	return cmd
}
