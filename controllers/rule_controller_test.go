package controllers

import (
	"context"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
)

const (
	T = metav1.ConditionTrue
	F = metav1.ConditionFalse
)

var localAddrs = []netip.Addr{netip.MustParseAddr("127.0.0.1")}

func addrPort(port int32) netip.AddrPort { return netip.AddrPortFrom(localAddrs[0], uint16(port)) }

func itoa(p int32) string { return strconv.Itoa(int(p)) }

func TestBackendNotFoundUntilTheServiceAppears(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	port := freePort(t)
	if err := k8s.Create(ctx, newRule(ns, "web", "public", port, "web")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ns, "web", "BackendNotFound", all(
		hasCondition(lbv1alpha1.ConditionAccepted, T, lbv1alpha1.ReasonAccepted),
		hasCondition(lbv1alpha1.ConditionResolvedRefs, F, lbv1alpha1.ReasonBackendNotFound),
		hasCondition(lbv1alpha1.ConditionProgrammed, T, lbv1alpha1.ReasonProgrammed),
		hasCondition(lbv1alpha1.ConditionReady, F, lbv1alpha1.ReasonRefsNotResolved),
	))

	testbackend.StartAt(t, 2, 9401, netns.BackendIP)
	backendService(t, ns, "web", "10.1.1.1", "10.1.1.2")
	r := waitFor(t, ns, "web", "Ready", all(
		hasCondition(lbv1alpha1.ConditionResolvedRefs, T, lbv1alpha1.ReasonResolvedRefs),
		hasCondition(lbv1alpha1.ConditionReady, T, lbv1alpha1.ReasonReady),
	))
	if r.Status.Backends != (lbv1alpha1.BackendCounts{Total: 2, Ready: 2, Healthy: 2}) {
		t.Errorf("backends = %+v, want 2/2/2", r.Status.Backends)
	}
	if len(r.Status.Frontend.Addresses) < 2 || r.Status.Frontend.Addresses[0] != "127.0.0.1" {
		t.Errorf("frontend addresses = %v, want the bind address and the Service's cluster IP", r.Status.Frontend.Addresses)
	}
	// And the dataplane really serves it.
	front := testbackend.MustBackendOf(t, testbackend.ClientIP(0), addrPort(port))
	if front != "10.1.1.1" && front != "10.1.1.2" {
		t.Errorf("served by %q", front)
	}
}

func TestPortConflictOlderRuleWins(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	port := freePort(t)
	// Ready endpoints, none healthy for the refused rule: its first status
	// has counts 2, 2 and 0, all of which must reach the API server.
	backendService(t, ns, "svc", "10.1.0.1", "10.1.0.2")
	older := newRule(ns, "zz-older", "a", port, "svc")
	if err := k8s.Create(ctx, older); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ns, "zz-older", "Accepted", hasCondition(lbv1alpha1.ConditionAccepted, T, lbv1alpha1.ReasonAccepted))
	time.Sleep(1100 * time.Millisecond) // creationTimestamp has one-second resolution
	if err := k8s.Create(ctx, newRule(ns, "aa-newer", "b", port, "svc")); err != nil {
		t.Fatal(err)
	}
	r := waitFor(t, ns, "aa-newer", "PortConflict", all(
		hasCondition(lbv1alpha1.ConditionAccepted, F, lbv1alpha1.ReasonPortConflict),
		hasCondition(lbv1alpha1.ConditionProgrammed, F, lbv1alpha1.ReasonPending),
		hasCondition(lbv1alpha1.ConditionReady, F, lbv1alpha1.ReasonNotAccepted),
	))
	msg := meta.FindStatusCondition(r.Status.Conditions, string(lbv1alpha1.ConditionAccepted)).Message
	if !strings.Contains(msg, ns+"/zz-older") {
		t.Errorf("PortConflict message %q does not name the winner", msg)
	}
	if len(r.Status.Frontend.Addresses) != 0 {
		t.Errorf("a rule that is not accepted reports frontend addresses %v", r.Status.Frontend.Addresses)
	}
	if b := r.Status.Backends; b.Total != 2 || b.Ready != 2 || b.Healthy != 0 {
		t.Errorf("the refused rule counts %+v, want 2 total, 2 ready, 0 healthy", b)
	}
	// The winner is unaffected; delete it and the other takes the port.
	waitFor(t, ns, "zz-older", "still Accepted", hasCondition(lbv1alpha1.ConditionAccepted, T, lbv1alpha1.ReasonAccepted))
	if err := k8s.Delete(ctx, older); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ns, "aa-newer", "Accepted after the older rule went", all(
		hasCondition(lbv1alpha1.ConditionAccepted, T, lbv1alpha1.ReasonAccepted),
		hasCondition(lbv1alpha1.ConditionProgrammed, T, lbv1alpha1.ReasonProgrammed),
	))
}

func TestSpecChangeBumpsObservedGeneration(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	rule := newRule(ns, "web", "public", freePort(t), "missing")
	if err := k8s.Create(ctx, rule); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ns, "web", "generation 1", hasCondition(lbv1alpha1.ConditionProgrammed, T, lbv1alpha1.ReasonProgrammed))
	r := waitFor(t, ns, "web", "got", func(*lbv1alpha1.LoadBalancerRule) bool { return true })
	r.Spec.IdleTimeoutInMinutes = 30
	if err := k8s.Update(ctx, r); err != nil {
		t.Fatal(err)
	}
	r = waitFor(t, ns, "web", "generation 2", all(
		func(r *lbv1alpha1.LoadBalancerRule) bool { return r.Generation == 2 },
		hasCondition(lbv1alpha1.ConditionAccepted, T, lbv1alpha1.ReasonAccepted),
		hasCondition(lbv1alpha1.ConditionProgrammed, T, lbv1alpha1.ReasonProgrammed),
	))
	for _, c := range r.Status.Conditions {
		if c.ObservedGeneration != 2 {
			t.Errorf("%s observedGeneration = %d, want 2", c.Type, c.ObservedGeneration)
		}
	}
}

func TestFrontendServiceSharedUpdatedAndRemoved(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	p1, p2 := freePort(t), freePort(t)
	a := newRule(ns, "a", "shared", p1, "svc")
	b := newRule(ns, "b", "shared", p2, "svc")
	b.Spec.Protocol = lbv1alpha1.ProtocolAll
	for _, r := range []*lbv1alpha1.LoadBalancerRule{a, b} {
		if err := k8s.Create(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	key := types.NamespacedName{Namespace: ns, Name: FrontendServiceName("shared")}
	svc := waitService(t, key, "both rules' ports", func(s *corev1.Service) bool { return len(s.Spec.Ports) == 3 })
	var names []string
	for _, p := range svc.Spec.Ports {
		names = append(names, p.Name)
	}
	want := []string{"tcp-" + itoa(p1), "tcp-" + itoa(p2), "udp-" + itoa(p2)}
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Errorf("ports %v, want %v", names, want)
	}
	if len(svc.OwnerReferences) != 2 || svc.Spec.Selector != nil || svc.Spec.Type != corev1.ServiceTypeClusterIP {
		t.Errorf("frontend Service: owners %v, selector %v, type %s", svc.OwnerReferences, svc.Spec.Selector, svc.Spec.Type)
	}
	// The slice is written after the Service.
	var slice discoveryv1.EndpointSlice
	deadline := time.Now().Add(20 * time.Second)
	for k8s.Get(ctx, key, &slice) != nil || len(slice.Ports) != 3 {
		if time.Now().After(deadline) {
			t.Fatalf("frontend EndpointSlice with 3 ports: not within 20s (have %+v)", slice.Ports)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if slice.Labels[discoveryv1.LabelServiceName] != key.Name || slice.Labels[discoveryv1.LabelManagedBy] != managedBy {
		t.Errorf("frontend EndpointSlice labels %v", slice.Labels)
	}

	// Updated: rule a moves to another port and to NodePort.
	p3 := freePort(t)
	cur := waitFor(t, ns, "a", "got", func(*lbv1alpha1.LoadBalancerRule) bool { return true })
	cur.Spec.Frontend.Port = lbv1alpha1.PortNumber(p3)
	if err := k8s.Update(ctx, cur); err != nil {
		t.Fatal(err)
	}
	waitService(t, key, "port moved", func(s *corev1.Service) bool {
		return slices.ContainsFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Port == p3 }) &&
			!slices.ContainsFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Port == p1 })
	})

	// Removed: the Service stays while one rule is left, and goes with the last.
	if err := k8s.Delete(ctx, cur); err != nil {
		t.Fatal(err)
	}
	waitService(t, key, "one rule left", func(s *corev1.Service) bool { return len(s.Spec.Ports) == 2 && len(s.OwnerReferences) == 1 })
	if err := k8s.Delete(ctx, b); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(20 * time.Second)
	for {
		errSvc := k8s.Get(ctx, key, &corev1.Service{})
		errSlice := k8s.Get(ctx, key, &discoveryv1.EndpointSlice{})
		if apierrors.IsNotFound(errSvc) && apierrors.IsNotFound(errSlice) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("frontend not removed with its last rule: service %v, slice %v", errSvc, errSlice)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// countingClient counts the writes a reconciler makes.
type countingClient struct {
	client.Client
	writes atomic.Int32
}

func (c *countingClient) Create(ctx context.Context, o client.Object, opts ...client.CreateOption) error {
	c.writes.Add(1)
	return c.Client.Create(ctx, o, opts...)
}

func (c *countingClient) Update(ctx context.Context, o client.Object, opts ...client.UpdateOption) error {
	c.writes.Add(1)
	return c.Client.Update(ctx, o, opts...)
}

func (c *countingClient) Patch(ctx context.Context, o client.Object, p client.Patch, opts ...client.PatchOption) error {
	c.writes.Add(1)
	return c.Client.Patch(ctx, o, p, opts...)
}

func (c *countingClient) Delete(ctx context.Context, o client.Object, opts ...client.DeleteOption) error {
	c.writes.Add(1)
	return c.Client.Delete(ctx, o, opts...)
}

func (c *countingClient) Status() client.SubResourceWriter {
	return &countingStatus{SubResourceWriter: c.Client.Status(), writes: &c.writes}
}

type countingStatus struct {
	client.SubResourceWriter
	writes *atomic.Int32
}

func (s *countingStatus) Update(ctx context.Context, o client.Object, opts ...client.SubResourceUpdateOption) error {
	s.writes.Add(1)
	return s.SubResourceWriter.Update(ctx, o, opts...)
}

func (s *countingStatus) Patch(ctx context.Context, o client.Object, p client.Patch, opts ...client.SubResourcePatchOption) error {
	s.writes.Add(1)
	return s.SubResourceWriter.Patch(ctx, o, p, opts...)
}

func TestReconcileWithNothingChangedWritesNothing(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	testbackend.StartAt(t, 1, 9402, netns.BackendIP)
	r := newRule(ns, "web", "public", freePort(t), "web")
	r.Spec.BackendPort = 9402
	if err := k8s.Create(ctx, r); err != nil {
		t.Fatal(err)
	}
	backendService(t, ns, "web", "10.1.1.1")
	waitFor(t, ns, "web", "Ready", hasCondition(lbv1alpha1.ConditionReady, T, lbv1alpha1.ReasonReady))

	counting := &countingClient{Client: k8s}
	rr := &RuleReconciler{Client: counting, Dataplane: dataplane, Healthy: dpProxy.Healthy, Local: true,
		DataplaneEndpoints: func(context.Context) ([]DataplaneEndpoint, error) {
			return []DataplaneEndpoint{{Address: localAddrs[0]}}, nil
		}}
	req := reconcile.Request{NamespacedName: types.NamespacedName{Namespace: ns, Name: "web"}}
	for range 3 {
		if _, err := rr.Reconcile(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	if n := counting.writes.Load(); n != 0 {
		t.Errorf("3 reconciles of an up-to-date rule wrote %d times, want 0", n)
	}
	// A real change is written (once).
	cur := waitFor(t, ns, "web", "got", func(*lbv1alpha1.LoadBalancerRule) bool { return true })
	cur.Spec.IdleTimeoutInMinutes = 20
	if err := counting.Update(ctx, cur); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ns, "web", "generation 2 Ready", hasCondition(lbv1alpha1.ConditionReady, T, lbv1alpha1.ReasonReady))
	counting.writes.Store(0)
	if _, err := rr.Reconcile(ctx, req); err != nil {
		t.Fatal(err)
	}
	if n := counting.writes.Load(); n != 0 {
		t.Errorf("a reconcile after the manager caught up wrote %d times", n)
	}
}

func waitService(t *testing.T, key types.NamespacedName, what string, check func(*corev1.Service) bool) *corev1.Service {
	t.Helper()
	var s corev1.Service
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := k8s.Get(context.Background(), key, &s)
		if err == nil && check(&s) {
			return &s
		}
		if time.Now().After(deadline) {
			t.Fatalf("Service %s: %s: not within 20s (err %v, spec %+v)", key, what, err, s.Spec)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
