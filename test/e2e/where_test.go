package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
)

// whereAnswer is the part of `kubectl stickylb where -o json` the test reads.
type whereAnswer struct {
	Backend *struct {
		Address string `json:"address"`
	} `json:"backend"`
	Next     []struct{ Address string } `json:"next"`
	Pinned   bool                       `json:"pinned"`
	Agree    bool                       `json:"agree"`
	Replicas []struct {
		Replica  string   `json:"replica"`
		Backends []string `json:"backends"`
		Error    string   `json:"error"`
	} `json:"replicas"`
}

// kubectlStickylb runs `kubectl stickylb ARGS`: the real kubectl, finding
// the plugin (the stickylb binary as kubectl-stickylb) on its PATH.
func kubectlStickylb(t *testing.T, args ...string) (string, error) {
	t.Helper()
	dir := filepath.Join(workDir, "plugin")
	if _, err := os.Stat(filepath.Join(dir, "kubectl-stickylb")); err != nil {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(stickylb, filepath.Join(dir, "kubectl-stickylb")); err != nil && !os.IsExist(err) {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(kubectlBin, append([]string{"stickylb"}, args...)...)
	cmd.Env = append(os.Environ(), "PATH="+dir+string(os.PathListSeparator)+os.Getenv("PATH"), "KUBECONFIG="+kubeconfig)
	out, err := cmd.Output()
	if ee, ok := err.(*exec.ExitError); ok {
		err = fmt.Errorf("%w: %s", err, ee.Stderr)
	}
	return string(out), err
}

// `kubectl stickylb where` answers, for 200 clients, the backend their real
// connection reaches through each of two replicas: with a backend failing
// its probe, a terminating endpoint, and pins that override the table after
// the pool grew.
func TestKubectlStickylbWhere(t *testing.T) {
	ns := namespace(t, "e2e-where")
	const backendPort, healthPort, clients = 9514, 9515, 200
	servers := testbackend.StartAt(t, 6, backendPort, netns.BackendIP)
	for _, s := range servers {
		s.ServeHealth(t, healthPort)
	}
	ips := backendIPs(6)
	pool := newBackendPool(t, ns, "web", backendPort, readyEndpoints(ips[:5]...))
	key := peerKeyFile(t)
	debugA := testbackend.FreePort(t, loopback1)
	debugB := testbackend.FreePort(t, loopback2)
	start := func(bind string, debug uint16) *process {
		return startStickylbWith(t, bind, nil, "--leader-elect", "--leader-election-namespace", "default", "--drain-timeout", "2s",
			"--peers", "127.0.0.1:7946,127.0.0.2:7946", "--peer-key-file", key,
			"--debug-bind-address", fmt.Sprintf("%s:%d", bind, debug))
	}
	a, b := start("127.0.0.1", debugA), start("127.0.0.2", debugB)
	replicas := fmt.Sprintf("127.0.0.1:%d,127.0.0.2:%d", debugA, debugB)
	port := testbackend.FreePort(t, loopback1, loopback2)
	mustKubectl(t, ruleYAML(ns, "web", port, "web", backendPort)+fmt.Sprintf(`  probe:
    protocol: HTTP
    port: %d
    requestPath: /healthz
    intervalInSeconds: 5
`, healthPort), "apply", "-f", "-")
	waitReady(t, ns, "web")
	a.waitServing(t, port)
	b.waitServing(t, port)

	// Pins first, then a sixth endpoint (some pins now override the table),
	// a backend that fails its probe and one that terminates.
	pinsFrom(t, a.frontend(port), 0, clients)
	servers[2].Healthy.Store(false)
	pool.set(t, []endpoint{{addr: ips[0], ready: true}, {addr: ips[1], ready: true}, {addr: ips[2], ready: true},
		{addr: ips[3], ready: true, terminating: true}, {addr: ips[4], ready: true}, {addr: ips[5], ready: true}})
	waitStatus(t, ns, "web", 30*time.Second, "one backend probed down, one terminating", func(r *lbv1alpha1.LoadBalancerRule) bool {
		return r.Status.Backends.Ready == 5 && r.Status.Backends.Healthy == 4
	})
	// Each replica probes for itself: wait until both see the backend down.
	for _, p := range []*process{a, b} {
		testbackend.Eventually(t, 30*time.Second, p.bind+" sees "+ips[2].String()+" probed down", func() bool {
			v, ok := p.metric("stickylb_health_probe_status", fmt.Sprintf(`backend="%s:%d",rule="%s/web"`, ips[2], backendPort, ns))
			return ok && v == 0
		})
	}
	waitPinsLearned(t, a, b, ns+"/web")
	waitPinsLearned(t, b, a, ns+"/web")

	answers := make([]whereAnswer, clients)
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	sem := make(chan struct{}, 8)
	for i := range clients {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			out, err := kubectlStickylb(t, "where", "web", testbackend.ClientIP(i).String(), "-n", ns, "--replicas", replicas, "-o", "json")
			if ee := (*exec.ExitError)(nil); errors.As(err, &ee) && ee.ExitCode() == 3 {
				err = nil // the replicas disagree: the answer says how
			}
			if err == nil {
				err = json.Unmarshal([]byte(out), &answers[i])
			}
			if err != nil {
				errs <- fmt.Errorf("client %s: %v", testbackend.ClientIP(i), err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	viaA := pinsFrom(t, a.frontend(port), 0, clients)
	viaB := pinsFrom(t, b.frontend(port), 0, clients)
	pinned, down, terminating := 0, ips[2].String(), ips[3].String()
	for i, ans := range answers {
		if !ans.Agree || len(ans.Replicas) != 2 || ans.Backend == nil {
			t.Errorf("client %s: %+v", testbackend.ClientIP(i), ans)
			continue
		}
		got := netip.MustParseAddrPort(ans.Backend.Address).Addr().String()
		if got != viaA[i] || got != viaB[i] {
			t.Errorf("client %s: where says %s; its connections reached %s through replica 1 and %s through replica 2", testbackend.ClientIP(i), got, viaA[i], viaB[i])
		}
		if got == down || got == terminating {
			t.Errorf("client %s sent to %s, which takes no new flows", testbackend.ClientIP(i), got)
		}
		if ans.Pinned {
			pinned++
		}
	}
	if pinned < clients/2 {
		t.Errorf("only %d of %d clients pinned", pinned, clients)
	}

	// The text form, for people.
	out, err := kubectlStickylb(t, "where", "web", testbackend.ClientIP(0).String(), "-n", ns, "--replicas", replicas)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl stickylb where web %s -n %s:\n%s", testbackend.ClientIP(0), ns, out)
	for _, want := range []string{"backend", "pinned", "2 of 2 agree"} {
		if !strings.Contains(out, want) {
			t.Errorf("text output lacks %q", want)
		}
	}
}
