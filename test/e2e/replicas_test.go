package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
)

// programmed waits until the rule's Programmed condition, for its current
// generation, satisfies want, and returns it.
func programmed(t *testing.T, ns, name string, within time.Duration, what string, want func(*metav1.Condition) bool) *metav1.Condition {
	t.Helper()
	var c *metav1.Condition
	testbackend.Eventually(t, within, what, func() bool {
		r := rule(t, ns, name)
		c = meta.FindStatusCondition(r.Status.Conditions, string(lbv1alpha1.ConditionProgrammed))
		return c != nil && c.ObservedGeneration == r.Generation && want(c)
	})
	return c
}

// A port taken on the second replica's address: the rule is not Programmed,
// and says which replica cannot serve it and why; freed, it turns Programmed
// without a restart. Stopped, a replica no longer counts.
func TestProgrammedNamesTheReplicaThatCannotListen(t *testing.T) {
	ns := namespace(t, "e2e-listen-failed")
	const backendPort = 9508
	testbackend.StartAt(t, 2, backendPort, netns.BackendIP)
	newBackendPool(t, ns, "web", backendPort, readyEndpoints(backendIPs(2)...))
	a, b := startPair(t)
	port := testbackend.FreePort(t, loopback1, loopback2)
	squatter, err := net.Listen("tcp", netip.AddrPortFrom(loopback2, port).String())
	if err != nil {
		t.Fatal(err)
	}
	defer squatter.Close()
	applyRule(t, ns, "web", port, "web", backendPort)

	c := programmed(t, ns, "web", 30*time.Second, "Programmed=False, ListenFailed", func(c *metav1.Condition) bool {
		return c.Status == metav1.ConditionFalse && c.Reason == string(lbv1alpha1.ReasonListenFailed)
	})
	if !strings.HasPrefix(c.Message, "1 of 2 replicas cannot serve: "+b.bind+": ") || !strings.Contains(c.Message, "address already in use") {
		t.Errorf("message %q does not name replica %s and its error", c.Message, b.bind)
	}
	if r := rule(t, ns, "web"); meta.IsStatusConditionTrue(r.Status.Conditions, string(lbv1alpha1.ConditionReady)) {
		t.Errorf("Ready while replica %s cannot serve: %+v", b.bind, r.Status.Conditions)
	}
	a.waitServing(t, port)

	squatter.Close()
	start := time.Now()
	programmed(t, ns, "web", 30*time.Second, "Programmed once the port is free", func(c *metav1.Condition) bool {
		return c.Status == metav1.ConditionTrue
	})
	t.Logf("Programmed %v after the port was freed", time.Since(start).Round(100*time.Millisecond))
	b.waitServing(t, port)

	// The second replica fails again; stopped, it stops counting.
	// A port free on both addresses (port+1 may be some connection's on
	// the first, which then fails too), held on the second only.
	port2 := testbackend.FreePort(t, loopback1, loopback2)
	squatter2, err := net.Listen("tcp", netip.AddrPortFrom(loopback2, port2).String())
	if err != nil {
		t.Fatal(err)
	}
	defer squatter2.Close()
	mustKubectl(t, "", "-n", ns, "patch", "lbr", "web", "--type=merge", "-p", fmt.Sprintf(`{"spec":{"frontend":{"port":%d}}}`, port2))
	programmed(t, ns, "web", 30*time.Second, "ListenFailed on the new port", func(c *metav1.Condition) bool {
		return c.Reason == string(lbv1alpha1.ReasonListenFailed) && strings.Contains(c.Message, b.bind)
	})
	b.stop(t)
	c = programmed(t, ns, "web", 30*time.Second, "Programmed once the failing replica stopped", func(c *metav1.Condition) bool {
		return c.Status == metav1.ConditionTrue
	})
	if c.Message != "1 of 1 replicas serve generation 2" {
		t.Errorf("message %q, want only the remaining replica counted", c.Message)
	}
}

// A replica that has not applied a rule's generation (frozen with SIGSTOP)
// keeps the rule Pending, named; kubectl wait --for=condition=Ready returns
// only once both replicas accept connections.
func TestReadyWaitsForEveryReplica(t *testing.T) {
	ns := namespace(t, "e2e-every-replica")
	const backendPort = 9509
	testbackend.StartAt(t, 2, backendPort, netns.BackendIP)
	newBackendPool(t, ns, "web", backendPort, readyEndpoints(backendIPs(2)...))
	a, b := startPair(t)
	port := testbackend.FreePort(t, loopback1, loopback2)

	if err := b.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			_ = b.cmd.Process.Signal(syscall.SIGCONT)
		}
	}()
	applyRule(t, ns, "web", port, "web", backendPort)
	// Replica 1 catches up at once; replica 2 stays named.
	programmed(t, ns, "web", 30*time.Second, "Pending, naming only the frozen replica", func(c *metav1.Condition) bool {
		return c.Status == metav1.ConditionFalse && c.Reason == string(lbv1alpha1.ReasonPending) &&
			c.Message == "1 of 2 replicas have not applied generation 1: "+b.bind
	})
	time.Sleep(2 * time.Second)
	if c := meta.FindStatusCondition(rule(t, ns, "web").Status.Conditions, string(lbv1alpha1.ConditionProgrammed)); c.Status != metav1.ConditionFalse {
		t.Fatalf("Programmed while replica %s is frozen: %+v", b.bind, c)
	}
	if _, err := kubectl(t, "", "-n", ns, "wait", "--for=condition=Ready", "lbr/web", "--timeout=3s"); err == nil {
		t.Fatalf("kubectl wait returned while replica %s had not applied the rule", b.bind)
	}
	a.waitServing(t, port)

	if err := b.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	resumed = true
	waitReady(t, ns, "web")
	// At once, with no retry: both replicas accept.
	for _, p := range []*process{a, b} {
		_, conn, err := testbackend.BackendOf(testbackend.ClientIP(0), p.frontend(port))
		if err != nil {
			t.Errorf("kubectl wait returned, but replica %s does not serve: %v", p.bind, err)
			continue
		}
		conn.Close()
	}
	if c := programmed(t, ns, "web", 10*time.Second, "Programmed", func(c *metav1.Condition) bool { return c.Status == metav1.ConditionTrue }); c.Message != "2 of 2 replicas serve generation 1" {
		t.Errorf("message %q", c.Message)
	}
}
