package controllers

import (
	"context"
	"net/netip"
	"reflect"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
)

func podRef(ns, name string, uid types.UID) *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: name, UID: uid}
}

var readyConditions = discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)}

func TestDesiredFrontendEndpoints(t *testing.T) {
	rules := []*lbv1alpha1.LoadBalancerRule{newRule("ns", "web", "public", 80, "web")}
	for _, tc := range []struct {
		name     string
		in       []DataplaneEndpoint
		wantType discoveryv1.AddressType
		want     []discoveryv1.Endpoint
	}{{
		name:     "replica on a node with a zone",
		in:       []DataplaneEndpoint{{Address: netip.MustParseAddr("10.0.0.5"), NodeName: "node-a", Zone: "zone-1", Pod: podRef("lb", "stickylb-0", "uid-0")}},
		wantType: discoveryv1.AddressTypeIPv4,
		want: []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.5"}, Conditions: readyConditions,
			NodeName: ptr.To("node-a"), Zone: ptr.To("zone-1"), TargetRef: podRef("lb", "stickylb-0", "uid-0")}},
	}, {
		name:     "node without a zone label",
		in:       []DataplaneEndpoint{{Address: netip.MustParseAddr("10.0.0.6"), NodeName: "node-b", Pod: podRef("lb", "stickylb-1", "uid-1")}},
		wantType: discoveryv1.AddressTypeIPv4,
		want: []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.6"}, Conditions: readyConditions,
			NodeName: ptr.To("node-b"), TargetRef: podRef("lb", "stickylb-1", "uid-1")}},
	}, {
		name: "sorted by address, whatever order the pods come in",
		in: []DataplaneEndpoint{
			{Address: netip.MustParseAddr("10.0.0.10"), NodeName: "n2", Pod: podRef("lb", "b", "ub")},
			{Address: netip.MustParseAddr("10.0.0.9"), NodeName: "n1", Zone: "z", Pod: podRef("lb", "a", "ua")},
		},
		wantType: discoveryv1.AddressTypeIPv4,
		want: []discoveryv1.Endpoint{
			{Addresses: []string{"10.0.0.9"}, Conditions: readyConditions, NodeName: ptr.To("n1"), Zone: ptr.To("z"), TargetRef: podRef("lb", "a", "ua")},
			{Addresses: []string{"10.0.0.10"}, Conditions: readyConditions, NodeName: ptr.To("n2"), TargetRef: podRef("lb", "b", "ub")},
		},
	}, {
		name:     "IPv6 pod",
		in:       []DataplaneEndpoint{{Address: netip.MustParseAddr("fd00::7"), NodeName: "node-a", Pod: podRef("lb", "stickylb-0", "uid-0")}},
		wantType: discoveryv1.AddressTypeIPv6,
		want: []discoveryv1.Endpoint{{Addresses: []string{"fd00::7"}, Conditions: readyConditions,
			NodeName: ptr.To("node-a"), TargetRef: podRef("lb", "stickylb-0", "uid-0")}},
	}, {
		name:     "outside a cluster: loopback is no endpoint",
		in:       []DataplaneEndpoint{{Address: netip.MustParseAddr("127.0.0.1")}},
		wantType: discoveryv1.AddressTypeIPv4,
		want:     []discoveryv1.Endpoint{},
	}, {
		name:     "outside a cluster on a routable address: no node, no pod",
		in:       []DataplaneEndpoint{{Address: netip.MustParseAddr("192.0.2.1")}},
		wantType: discoveryv1.AddressTypeIPv4,
		want:     []discoveryv1.Endpoint{{Addresses: []string{"192.0.2.1"}, Conditions: readyConditions}},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			in := append([]DataplaneEndpoint(nil), tc.in...)
			_, slice := desiredFrontend("ns", "public", rules, tc.in)
			if slice.AddressType != tc.wantType {
				t.Errorf("addressType = %s, want %s", slice.AddressType, tc.wantType)
			}
			if !reflect.DeepEqual(slice.Endpoints, tc.want) {
				t.Errorf("endpoints:\n got %+v\nwant %+v", slice.Endpoints, tc.want)
			}
			if !reflect.DeepEqual(in, tc.in) {
				t.Error("desiredFrontend changed its input")
			}
		})
	}
}

func TestTrimNodeKeepsOnlyTheZone(t *testing.T) {
	n := NodeMetadata()
	n.Name, n.UID, n.ResourceVersion = "node-a", "uid-a", "42"
	n.Labels = map[string]string{corev1.LabelTopologyZone: "zone-1", "kubernetes.io/hostname": "node-a", "big": "label"}
	n.Annotations = map[string]string{"node.alpha.kubernetes.io/ttl": "0"}
	n.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}
	out, err := TrimNode(n)
	if err != nil {
		t.Fatal(err)
	}
	got := out.(*metav1.PartialObjectMetadata)
	want := NodeMetadata()
	want.Name, want.UID, want.ResourceVersion = "node-a", "uid-a", "42"
	want.Labels = map[string]string{corev1.LabelTopologyZone: "zone-1"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("TrimNode = %+v, want %+v", got, want)
	}
	n.Labels = map[string]string{"other": "x"}
	out, _ = TrimNode(n)
	if l := out.(*metav1.PartialObjectMetadata).Labels; l != nil {
		t.Errorf("a node without a zone keeps labels %v", l)
	}
	if out, _ := TrimNode("not a node"); out != "not a node" {
		t.Errorf("TrimNode changed an object that is no metadata: %v", out)
	}
}

// dataplanePod creates a pod of the dataplane on node with IP ip, ready or
// not, as the kubelet would report it.
func dataplanePod(t *testing.T, ns, name, node, ip string, ready bool) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app.kubernetes.io/name": "stickylb"}},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "manager", Image: "stickylb"}}},
	}
	if err := k8s.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: status}}}
	if err := k8s.Status().Update(ctx, p); err != nil {
		t.Fatal(err)
	}
	return p
}

func node(t *testing.T, name string, labels map[string]string) {
	t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	if err := k8s.Create(context.Background(), n); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), n) })
}

// TestReadyPodEndpoints reads pods and (the metadata of) nodes through the
// manager's cache, as the controller role does.
func TestReadyPodEndpoints(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	node(t, ns+"-node-a", map[string]string{corev1.LabelTopologyZone: "zone-1", "kubernetes.io/hostname": "a"})
	node(t, ns+"-node-b", nil)

	a := dataplanePod(t, ns, "stickylb-a", ns+"-node-a", "10.2.0.1", true)
	b := dataplanePod(t, ns, "stickylb-b", ns+"-node-b", "10.2.0.2", true)
	c := dataplanePod(t, ns, "stickylb-c", ns+"-node-a", "10.2.0.3", true)
	gone := dataplanePod(t, ns, "stickylb-gone", ns+"-node-gone", "10.2.0.4", true) // its node is deleted
	dataplanePod(t, ns, "stickylb-notready", ns+"-node-a", "10.2.0.5", false)
	// Deleted, kept by a finalizer as the kubelet keeps a terminating pod.
	deleting := dataplanePod(t, ns, "stickylb-deleting", ns+"-node-a", "10.2.0.6", true)
	deleting.Finalizers = []string{"test.stickylb.io/hold"}
	if err := k8s.Update(ctx, deleting); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Delete(ctx, deleting); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		var p corev1.Pod
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(deleting), &p); err == nil {
			p.Finalizers = nil
			_ = k8s.Update(ctx, &p)
		}
	})
	// Not a dataplane pod.
	other := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "other", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{NodeName: ns + "-node-a", Containers: []corev1.Container{{Name: "c", Image: "web"}}}}
	if err := k8s.Create(ctx, other); err != nil {
		t.Fatal(err)
	}

	want := map[string]DataplaneEndpoint{
		"10.2.0.1": {Address: netip.MustParseAddr("10.2.0.1"), NodeName: ns + "-node-a", Zone: "zone-1", Pod: podRef(ns, a.Name, a.UID)},
		"10.2.0.2": {Address: netip.MustParseAddr("10.2.0.2"), NodeName: ns + "-node-b", Pod: podRef(ns, b.Name, b.UID)},
		"10.2.0.3": {Address: netip.MustParseAddr("10.2.0.3"), NodeName: ns + "-node-a", Zone: "zone-1", Pod: podRef(ns, c.Name, c.UID)},
		"10.2.0.4": {Address: netip.MustParseAddr("10.2.0.4"), NodeName: ns + "-node-gone", Pod: podRef(ns, gone.Name, gone.UID)},
	}
	list := ReadyPodEndpoints(dataplane.Client, ns, labels.SelectorFromSet(labels.Set{"app.kubernetes.io/name": "stickylb"}))
	var got map[string]DataplaneEndpoint
	deadline := time.Now().Add(20 * time.Second)
	for {
		eps, err := list(ctx)
		if err != nil {
			t.Fatal(err)
		}
		got = map[string]DataplaneEndpoint{}
		for _, e := range eps {
			got[e.Address.String()] = e
		}
		if reflect.DeepEqual(got, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ReadyPodEndpoints:\n got %+v\nwant %+v", got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// The frontend's EndpointSlice carries node, zone and pod of each.
	var eps []DataplaneEndpoint
	for _, e := range got {
		eps = append(eps, e)
	}
	rule := newRule(ns, "web", "public", 80, "web")
	rule.UID = "rule-uid"
	svc, slice := desiredFrontend(ns, "public", []*lbv1alpha1.LoadBalancerRule{rule}, eps)
	wantSlice := []discoveryv1.Endpoint{
		{Addresses: []string{"10.2.0.1"}, Conditions: readyConditions, NodeName: ptr.To(ns + "-node-a"), Zone: ptr.To("zone-1"), TargetRef: podRef(ns, a.Name, a.UID)},
		{Addresses: []string{"10.2.0.2"}, Conditions: readyConditions, NodeName: ptr.To(ns + "-node-b"), TargetRef: podRef(ns, b.Name, b.UID)},
		{Addresses: []string{"10.2.0.3"}, Conditions: readyConditions, NodeName: ptr.To(ns + "-node-a"), Zone: ptr.To("zone-1"), TargetRef: podRef(ns, c.Name, c.UID)},
		{Addresses: []string{"10.2.0.4"}, Conditions: readyConditions, NodeName: ptr.To(ns + "-node-gone"), TargetRef: podRef(ns, gone.Name, gone.UID)},
	}
	if !reflect.DeepEqual(slice.Endpoints, wantSlice) {
		t.Errorf("frontend endpoints:\n got %+v\nwant %+v", slice.Endpoints, wantSlice)
	}
	// The API server stores the slice as it is, and applying it again
	// writes nothing. (Without its frontend label the Service is no
	// business of the suite's controller, which would delete a frontend
	// whose rule does not exist.)
	delete(svc.Labels, LabelFrontend)
	if _, err := applyFrontend(ctx, k8s, ns, "public", svc, slice); err != nil {
		t.Fatalf("apply the frontend: %v", err)
	}
	var stored discoveryv1.EndpointSlice
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: FrontendServiceName("public")}, &stored); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(stored.Endpoints, wantSlice) {
		t.Errorf("stored frontend endpoints:\n got %+v\nwant %+v", stored.Endpoints, wantSlice)
	}
	counting := &countingClient{Client: k8s}
	if _, err := applyFrontend(ctx, counting, ns, "public", svc, slice); err != nil {
		t.Fatal(err)
	}
	if n := counting.writes.Load(); n != 0 {
		t.Errorf("applying the same frontend again wrote %d times", n)
	}
}
