package e2e

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"strings"
	"testing"
	"time"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
)

// statusOutput is the part of `kubectl stickylb status -o json` the test reads.
type statusOutput struct {
	Rules []struct {
		Rule       string `json:"rule"`
		Conditions []struct {
			Type, Status, Reason string
		} `json:"conditions"`
		Frontend []string `json:"frontend"`
		Backends []struct {
			Address string  `json:"address"`
			Ready   bool    `json:"ready"`
			Probe   string  `json:"probe"`
			Share   float64 `json:"share"`
			Pinned  []int   `json:"pinned"`
			Flows   int     `json:"flows"`
		} `json:"backends"`
		Replicas []struct {
			Replica    string `json:"replica"`
			State      string `json:"state"`
			Reason     string `json:"reason"`
			Healthy    int    `json:"healthy"`
			ProbedDown int32  `json:"probedDown"`
			Pins       int    `json:"pins"`
		} `json:"replicas"`
	} `json:"rules"`
	Replicas []struct {
		Replica  string `json:"replica"`
		Reported bool   `json:"reported"`
		Fresh    bool   `json:"fresh"`
		Error    string `json:"error"`
	} `json:"replicas"`
}

func condition(conds []struct{ Type, Status, Reason string }, t string) string {
	for _, c := range conds {
		if c.Type == t {
			return c.Status + "/" + c.Reason
		}
	}
	return "absent"
}

// `kubectl stickylb status` shows a Ready rule (its backends' shares, pins
// and flows as the replicas hold them), a rule refused for a port conflict,
// and a rule whose every backend fails its probe, as both replicas and the
// API server see them.
func TestKubectlStickylbStatus(t *testing.T) {
	ns := namespace(t, "e2e-status")
	const backendPort, healthPort, deadHealthPort, clients = 9516, 9517, 9518, 60
	servers := testbackend.StartAt(t, 3, backendPort, netns.BackendIP)
	for _, s := range servers {
		s.ServeHealth(t, healthPort)
	}
	ips := backendIPs(3)
	newBackendPool(t, ns, "web", backendPort, readyEndpoints(ips...))
	newBackendPool(t, ns, "dead", backendPort, readyEndpoints(ips...))
	debugA := testbackend.FreePort(t, loopback1)
	debugB := testbackend.FreePort(t, loopback2)
	start := func(bind string, debug uint16) *process {
		return startStickylbWith(t, bind, nil, "--leader-elect", "--leader-election-namespace", "default", "--drain-timeout", "2s",
			"--debug-bind-address", fmt.Sprintf("%s:%d", bind, debug))
	}
	a, b := start("127.0.0.1", debugA), start("127.0.0.2", debugB)
	replicas := fmt.Sprintf("127.0.0.1:%d,127.0.0.2:%d", debugA, debugB)
	probe := func(port int) string {
		return fmt.Sprintf("  probe:\n    protocol: HTTP\n    port: %d\n    requestPath: /healthz\n    intervalInSeconds: 5\n", port)
	}
	port := testbackend.FreePort(t, loopback1, loopback2)
	deadPort := testbackend.FreePort(t, loopback1, loopback2)
	mustKubectl(t, ruleYAML(ns, "web", port, "web", backendPort)+probe(healthPort), "apply", "-f", "-")
	waitReady(t, ns, "web")
	mustKubectl(t, ruleYAML(ns, "web-2", port, "web", backendPort), "apply", "-f", "-")
	mustKubectl(t, ruleYAML(ns, "dead", deadPort, "dead", backendPort)+probe(deadHealthPort), "apply", "-f", "-")
	waitStatus(t, ns, "web-2", 30*time.Second, "Accepted=False", func(r *lbv1alpha1.LoadBalancerRule) bool {
		return len(r.Status.Conditions) > 0 && r.Status.Conditions[0].Status == "False"
	})
	waitStatus(t, ns, "dead", 60*time.Second, "every backend probed down", func(r *lbv1alpha1.LoadBalancerRule) bool {
		return r.Status.Backends.Ready == 3 && r.Status.Backends.Healthy == 0
	})
	a.waitServing(t, port)
	b.waitServing(t, port)

	// Clients through replica A only: its pins, and one open connection.
	reached := pinsFrom(t, a.frontend(port), 0, clients)
	perBackend := map[string]int{}
	for _, r := range reached {
		perBackend[r] += 1
	}
	name, open, err := testbackend.BackendOf(testbackend.ClientIP(clients), a.frontend(port))
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	perBackend[name]++

	var st statusOutput
	var raw string
	// In name order: dead, web, web-2 (the newer rule on web's port loses
	// it; at the same creation second, the later name does).
	webFlows := func() (n int) {
		for _, be := range st.Rules[1].Backends {
			n += be.Flows
		}
		return n
	}
	testbackend.Eventually(t, 30*time.Second, "both replicas report the dead rule's backends down, and only the open connection counts", func() bool {
		raw, err = kubectlStickylb(t, "status", "-n", ns, "--replicas", replicas, "--stickylb-namespace", "default", "-o", "json")
		if err != nil {
			t.Fatal(err)
		}
		st = statusOutput{}
		if err := json.Unmarshal([]byte(raw), &st); err != nil {
			t.Fatalf("-o json: %v\n%s", err, raw)
		}
		if len(st.Rules) != 3 {
			t.Fatalf("%d rules, want dead, web and web-2:\n%s", len(st.Rules), raw)
		}
		d := st.Rules[0]
		return len(d.Replicas) >= 2 && d.Replicas[0].ProbedDown == 3 && d.Replicas[1].ProbedDown == 3 && webFlows() == 1
	})
	rules := map[string]int{}
	for i, r := range st.Rules {
		rules[strings.TrimPrefix(r.Rule, ns+"/")] = i
	}
	web, clash, dead := st.Rules[rules["web"]], st.Rules[rules["web-2"]], st.Rules[rules["dead"]]
	ours := func(replica string) bool { return replica == "127.0.0.1" || replica == "127.0.0.2" }

	// The Ready rule.
	if c := condition(web.Conditions, "Ready"); !strings.HasPrefix(c, "True/") {
		t.Errorf("web: Ready %s", c)
	}
	if len(web.Frontend) == 0 {
		t.Errorf("web: no frontend address")
	}
	if len(web.Backends) != 3 {
		t.Fatalf("web: %d backends, want 3:\n%s", len(web.Backends), raw)
	}
	var shares float64
	for _, be := range web.Backends {
		host := netip.MustParseAddrPort(be.Address).Addr().String()
		if !be.Ready || be.Probe != "up" || math.Abs(be.Share-1.0/3) > 0.01 {
			t.Errorf("web backend %+v: want ready, probe up, a third of the table", be)
		}
		shares += be.Share
		if len(be.Pinned) < 2 || be.Pinned[0] != perBackend[host] {
			t.Errorf("web backend %s: pinned %v on the replicas; %d clients reached it through replica 1", be.Address, be.Pinned, perBackend[host])
		}
	}
	if math.Abs(shares-1) > 1e-6 {
		t.Errorf("web: shares add up to %v", shares)
	}
	for _, r := range web.Replicas {
		if ours(r.Replica) && (r.State != "serving" || r.Healthy != 3) {
			t.Errorf("web on %s: %+v", r.Replica, r)
		}
		if r.Replica == "127.0.0.1" && r.Pins != clients+1 {
			t.Errorf("web on replica 1: %d pins, want %d", r.Pins, clients+1)
		}
	}

	// The rule refused for its port: not accepted, served by no replica.
	if c := condition(clash.Conditions, "Accepted"); c != "False/"+string(lbv1alpha1.ReasonPortConflict) {
		t.Errorf("web-2: Accepted %s", c)
	}
	for _, r := range clash.Replicas {
		if ours(r.Replica) && r.State != "not serving" {
			t.Errorf("web-2 on %s: %+v", r.Replica, r)
		}
	}

	// The rule with no healthy backend.
	if c := condition(dead.Conditions, "Ready"); c != "False/"+string(lbv1alpha1.ReasonNoHealthyBackends) {
		t.Errorf("dead: Ready %s", c)
	}
	for _, be := range dead.Backends {
		if be.Probe != "down" || be.Share != 0 {
			t.Errorf("dead backend %+v: want probe down, no share", be)
		}
	}
	for _, r := range dead.Replicas {
		if ours(r.Replica) && (r.State != "refusing" || r.Healthy != 0 || r.ProbedDown != 3) {
			t.Errorf("dead on %s: %+v", r.Replica, r)
		}
	}
	for _, r := range st.Replicas {
		if ours(r.Replica) && (!r.Reported || !r.Fresh || r.Error != "") {
			t.Errorf("replica %+v: want a fresh report and an answer", r)
		}
	}

	// The text form, for people: one rule.
	out, err := kubectlStickylb(t, "status", "web", "-n", ns, "--replicas", replicas, "--stickylb-namespace", "default")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl stickylb status web -n %s:\n%s", ns, out)
	for _, want := range []string{"rule", ns + "/web", "BACKEND", "SHARE", "PINNED", "REPLICA", "serving", "33.3%"} {
		if !strings.Contains(out, want) {
			t.Errorf("text output lacks %q", want)
		}
	}
	out, err = kubectlStickylb(t, "status", "dead", "-n", ns, "--replicas", replicas, "--stickylb-namespace", "default")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl stickylb status dead -n %s:\n%s", ns, out)
	if !strings.Contains(out, string(lbv1alpha1.ReasonNoHealthyBackends)) {
		t.Errorf("the dead rule's text lacks %s", lbv1alpha1.ReasonNoHealthyBackends)
	}
}
