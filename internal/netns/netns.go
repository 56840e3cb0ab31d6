// Package netns runs a test binary inside a network namespace of its own, so
// tests can use addresses outside 127.0.0.0/8 (which the API server refuses
// in EndpointSlices) while no packet can leave the machine.
package netns

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"

	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// marker tells the re-executed binary that it already runs in its namespace.
const marker = "STICKYLB_TEST_NETNS"

// Backends is routed to the loopback interface inside the namespace: every
// address in it is local, as 127.0.0.0/8 is.
var Backends = netip.MustParsePrefix("10.1.0.0/16")

// BackendIP returns the i-th backend address, 10.1.1.1 upwards.
func BackendIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 1, byte(1 + i/250), byte(1 + i%250)})
}

// Enter re-runs the current test binary inside a new network namespace and
// exits with its status; in that re-run it sets up the namespace and
// returns. Call it first in TestMain. It needs root (or CAP_SYS_ADMIN) and
// iproute2's ip.
func Enter() {
	if os.Getenv(marker) != "" {
		if err := setup(); err != nil {
			fmt.Fprintln(os.Stderr, "netns:", err)
			os.Exit(1)
		}
		return
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "netns:", err)
		os.Exit(1)
	}
	cmd := exec.Command("unshare", append([]string{"--net", "--", self}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), marker+"=1")
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			os.Exit(ee.ExitCode())
		}
		fmt.Fprintf(os.Stderr, "netns: unshare --net (needs root and util-linux): %v\n", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func setup() error {
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"route", "add", "local", Backends.String(), "dev", "lo"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %v: %v: %s", args, err, out)
		}
	}
	return nil
}

// APIServerAddress is the address kube-apiserver advertises inside the
// namespace, which has no interface it could pick one from.
var APIServerAddress = netip.MustParseAddr("10.1.0.1")

// ConfigureAPIServer makes env's kube-apiserver start inside the namespace.
func ConfigureAPIServer(env *envtest.Environment) {
	env.ControlPlane.GetAPIServer().Configure().Set("advertise-address", APIServerAddress.String())
}
