package e2e

import (
	"context"
	"net/http"
	"net/netip"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
)

// The tests here run stickylb as it runs in a pod (POD_NAMESPACE and POD_IP
// set), with the test playing the kubelet: it creates the replica's Pod and
// Node objects and flips the pod's Ready condition.

// replicaPod creates the Pod object of a stickylb replica on node, Ready,
// with IP ip.
func replicaPod(t *testing.T, ns, name, node string, ip netip.Addr) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app.kubernetes.io/name": "stickylb"}},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "manager", Image: "stickylb"}}},
	}
	if err := k8s.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	p.Status.PodIP = ip.String()
	setPodReady(t, p, true)
	return p
}

// setPodReady sets the pod's IP and Ready condition, as the kubelet does.
func setPodReady(t *testing.T, p *corev1.Pod, ready bool) {
	t.Helper()
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var cur corev1.Pod
		if err := k8s.Get(context.Background(), client.ObjectKeyFromObject(p), &cur); err != nil {
			return err
		}
		cur.Status.Phase = corev1.PodRunning
		cur.Status.PodIP = p.Status.PodIP
		cur.Status.PodIPs = []corev1.PodIP{{IP: p.Status.PodIP}}
		cur.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: status}}
		return k8s.Status().Update(context.Background(), &cur)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// clusterStickylb runs stickylb as the replica of pod ns/podName with IP
// bind, leader-elected on a Lease in ns.
func clusterStickylb(t *testing.T, ns, podName string, bind netip.Addr, args ...string) *process {
	t.Helper()
	return startStickylbWith(t, bind.String(), []string{"POD_NAMESPACE=" + ns, "POD_NAME=" + podName, "POD_IP=" + bind.String()},
		append([]string{"--leader-elect", "--leader-election-namespace", ns}, args...)...)
}

func (p *process) ready() bool {
	resp, err := httpClient.Get("http://" + p.health + "/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// exitCode waits for the process to exit and returns its exit status.
func (p *process) exitCode(t *testing.T, within time.Duration) int {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(within):
		t.Fatalf("stickylb on %s still running %v on", p.bind, within)
	}
	return p.cmd.ProcessState.ExitCode()
}

// logsInOrder checks that the process logged each of lines, in this order.
func logsInOrder(t *testing.T, p *process, lines ...string) {
	t.Helper()
	out := p.logs.String()
	at := 0
	for _, l := range lines {
		i := strings.Index(out[at:], l)
		if i < 0 {
			t.Errorf("stickylb did not log %q (after the previous step); logs:\n%s", l, tail(p.logs, 40))
			return
		}
		at += i + len(l)
	}
}

// TestSIGTERMLeavesFrontendsBeforeClosing is a rolling restart of one
// replica that is not deleted (the harder case: only its readiness takes it
// out): on SIGTERM it turns not ready but keeps serving; it is the leader,
// so its own controller takes it out of the frontend once the "kubelet"
// marks it not Ready; only then, after --shutdown-delay, does it stop
// accepting and exit.
func TestSIGTERMLeavesFrontendsBeforeClosing(t *testing.T) {
	ns := namespace(t, "e2e-shutdown")
	ctx := context.Background()
	const backendPort = 9520
	testbackend.StartAt(t, 1, backendPort, netns.BackendIP)
	podIP := netip.MustParseAddr("10.1.9.1")
	nodeName := "e2e-shutdown-node"
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName, Labels: map[string]string{corev1.LabelTopologyZone: "zone-a"}}}
	if err := k8s.Create(ctx, node); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(ctx, node) })
	pod := replicaPod(t, ns, "stickylb-0", nodeName, podIP)

	port := testbackend.FreePort(t, podIP)
	rule := &lbv1alpha1.LoadBalancerRule{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "web"},
		Spec: lbv1alpha1.LoadBalancerRuleSpec{
			Frontend:           lbv1alpha1.Frontend{Name: "public", Port: lbv1alpha1.PortNumber(port), ServiceType: lbv1alpha1.ServiceTypeNodePort},
			BackendPool:        lbv1alpha1.BackendPool{Addresses: []string{netns.BackendIP(0).String()}},
			BackendPort:        backendPort,
			SessionPersistence: lbv1alpha1.SessionPersistenceClientIP,
		},
	}
	if err := k8s.Create(ctx, rule); err != nil {
		t.Fatal(err)
	}
	p := clusterStickylb(t, ns, pod.Name, podIP, "--shutdown-timeout=20s", "--shutdown-delay=1s", "--drain-timeout=2s")
	waitReady(t, ns, "web")
	p.waitServing(t, port)

	// The frontend's endpoint is the pod, on its node, in its zone: what
	// kube-proxy needs for externalTrafficPolicy: Local.
	key := client.ObjectKey{Namespace: ns, Name: "stickylb-public"}
	want := []discoveryv1.Endpoint{{
		Addresses:  []string{podIP.String()},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
		NodeName:   ptr.To(nodeName), Zone: ptr.To("zone-a"),
		TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: pod.Name, UID: pod.UID},
	}}
	var slice discoveryv1.EndpointSlice
	testbackend.Eventually(t, 20*time.Second, "the frontend EndpointSlice lists the pod with its node and zone", func() bool {
		return k8s.Get(ctx, key, &slice) == nil && reflect.DeepEqual(slice.Endpoints, want)
	})
	var svc corev1.Service
	if err := k8s.Get(ctx, key, &svc); err != nil || svc.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal {
		t.Errorf("frontend Service: externalTrafficPolicy %q (err %v), want Local", svc.Spec.ExternalTrafficPolicy, err)
	}

	front := p.frontend(port)
	_, held, err := testbackend.BackendOf(testbackend.ClientIP(0), front)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()

	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	testbackend.Eventually(t, 2*time.Second, "/readyz fails once SIGTERM arrives", func() bool { return !p.ready() })
	// Still listed: the replica keeps serving, new connections and old.
	time.Sleep(1500 * time.Millisecond)
	if p.hasExited() {
		t.Fatalf("exited while the frontend still lists it:\n%s", tail(p.logs, 30))
	}
	if name, c, err := testbackend.BackendOf(testbackend.ClientIP(1), front); err != nil || name == "" {
		t.Errorf("a new connection while still listed: %q, %v", name, err)
	} else {
		c.Close()
	}
	if err := echo(held, "after SIGTERM"); err != nil {
		t.Errorf("established connection after SIGTERM: %v", err)
	}
	if err := k8s.Get(ctx, key, &slice); err != nil || len(slice.Endpoints) != 1 {
		t.Errorf("the frontend no longer lists the replica before the kubelet said it was not Ready: %+v (err %v)", slice.Endpoints, err)
	}

	// The kubelet sees /readyz fail: the pod turns not Ready, the leader
	// (this replica) takes it out of the frontend.
	notReady := time.Now()
	setPodReady(t, pod, false)
	testbackend.Eventually(t, 10*time.Second, "the frontend lists no endpoint", func() bool {
		return k8s.Get(ctx, key, &slice) == nil && len(slice.Endpoints) == 0
	})
	if code := p.exitCode(t, 15*time.Second); code != 0 {
		t.Errorf("exit code %d after a graceful shutdown, want 0", code)
	}
	if took := time.Since(notReady); took < time.Second {
		t.Errorf("exited %v after the pod turned not Ready, before --shutdown-delay (1s) passed", took)
	}
	logsInOrder(t, p,
		"step 1/4: readiness fails; still accepting connections",
		"step 2/4: no frontend EndpointSlice lists this replica",
		"step 3/4: --shutdown-delay passed",
		"step 4/4: manager stopped",
	)
}

// TestSIGTERMShutdownTimeoutAndSecondSignal: a frontend slice nobody
// updates holds the replica until --shutdown-timeout; a second signal ends
// the wait at once.
func TestSIGTERMShutdownTimeoutAndSecondSignal(t *testing.T) {
	ns := namespace(t, "e2e-shutdown-timeout")
	ctx := context.Background()
	stale := func(ip netip.Addr) {
		// Written by hand, as by a leader that is gone: no frontend Service,
		// so no controller ever changes it.
		s := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "stale-" + strings.ReplaceAll(ip.String(), ".", "-"),
				Labels: map[string]string{"lb.stickylb.io/frontend": "stale", discoveryv1.LabelServiceName: "stickylb-stale"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints:   endpointList(readyEndpoints(ip)),
		}
		if err := k8s.Create(ctx, s); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("timeout", func(t *testing.T) {
		ip := netip.MustParseAddr("10.1.9.2")
		stale(ip)
		p := clusterStickylb(t, ns, "stickylb-timeout", ip, "--shutdown-timeout=2s", "--shutdown-delay=500ms", "--drain-timeout=1s")
		start := time.Now()
		if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if code := p.exitCode(t, 15*time.Second); code != 0 {
			t.Errorf("exit code %d, want 0", code)
		}
		if took := time.Since(start); took < 2500*time.Millisecond {
			t.Errorf("exited %v after SIGTERM, before --shutdown-timeout + --shutdown-delay (2.5s)", took)
		}
		logsInOrder(t, p, "step 1/4", "step 2/4: --shutdown-timeout passed", "stale-10-1-9-2", "step 3/4", "step 4/4")
	})

	t.Run("second signal", func(t *testing.T) {
		ip := netip.MustParseAddr("10.1.9.3")
		stale(ip)
		p := clusterStickylb(t, ns, "stickylb-second-signal", ip, "--shutdown-timeout=60s", "--drain-timeout=1s")
		if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		testbackend.Eventually(t, 5*time.Second, "step 1 logged", func() bool { return strings.Contains(p.logs.String(), "step 1/4") })
		time.Sleep(200 * time.Millisecond)
		if p.hasExited() {
			t.Fatal("exited while a frontend lists it")
		}
		start := time.Now()
		if err := p.cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		if code := p.exitCode(t, 3*time.Second); code == 0 {
			t.Error("exit code 0 after a second signal, want non-zero")
		}
		t.Logf("exited %v after the second signal", time.Since(start))
		logsInOrder(t, p, "step 1/4", "second signal: exiting at once")
	})
}
