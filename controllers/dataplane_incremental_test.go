package controllers

import (
	"context"
	"reflect"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/dataplane/translate"
)

// TestDataplaneIncrementalMatchesFullTranslation changes rules, Services and
// EndpointSlices in the ways that feed one another (a slice moving to
// another Service, a Service going, a rule taking another's port, the
// holder of a port going) and checks after each step that what the
// dataplane serves, built incrementally from the changes it was told of,
// is what a full translation of the cache gives.
func TestDataplaneIncrementalMatchesFullTranslation(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	key := func(name string) types.NamespacedName { return types.NamespacedName{Namespace: ns, Name: name} }
	backendService(t, ns, "a", "10.1.7.1", "10.1.7.2")
	backendService(t, ns, "b", "10.1.7.11")
	a2 := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: "a-2", Labels: map[string]string{discoveryv1.LabelServiceName: "a"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{ep("10.1.7.3", ptr.To(true)), ep("10.1.7.1", ptr.To(false))},
	}
	create := func(o client.Object) {
		t.Helper()
		if err := k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		inCache(t, o)
	}
	remove := func(o client.Object) {
		t.Helper()
		if err := k8s.Delete(ctx, o); err != nil {
			t.Fatal(err)
		}
		goneFromCache(t, o)
	}
	create(a2)
	p1, p2 := freePort(t), freePort(t)
	create(newRule(ns, "r1", "default", p1, "a"))
	matchesFullTranslation(t, "r1 alone")
	// r2 and r3 are younger than r1 (creationTimestamp has seconds).
	time.Sleep(1100 * time.Millisecond)
	create(newRule(ns, "r2", "default", p1, "b")) // loses p1 to r1
	create(newRule(ns, "r3", "default", p2, "c")) // no Service c yet
	matchesFullTranslation(t, "rules created")

	modify(t, &discoveryv1.EndpointSlice{}, key("a-1"), func(o client.Object) {
		o.(*discoveryv1.EndpointSlice).Endpoints = []discoveryv1.Endpoint{
			ep("10.1.7.1", ptr.To(false)), ep("10.1.7.2", ptr.To(true)), ep("10.1.7.4", nil)}
	})
	matchesFullTranslation(t, "a-1 changed")

	remove(a2)
	backendService(t, ns, "c", "10.1.7.21")
	inCache(t, &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "c-1"}})
	matchesFullTranslation(t, "a-2 deleted, c created")

	modify(t, &discoveryv1.EndpointSlice{}, key("b-1"), func(o client.Object) {
		o.GetLabels()[discoveryv1.LabelServiceName] = "a" // b-1 now adds to a
	})
	matchesFullTranslation(t, "b-1 moved to Service a")

	remove(&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "c"}})
	modify(t, &lbv1alpha1.LoadBalancerRule{}, key("r3"), func(o client.Object) {
		o.(*lbv1alpha1.LoadBalancerRule).Spec.Frontend.Port = lbv1alpha1.PortNumber(p1)
	})
	matchesFullTranslation(t, "Service c deleted, r3 moved to p1")

	// The rule controller's finalizer holds r1 a moment.
	remove(&lbv1alpha1.LoadBalancerRule{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "r1"}})
	matchesFullTranslation(t, "r1, the holder of p1, deleted")
	if res := dataplane.State().Results[key("r2")]; !res.Accepted {
		t.Errorf("r2 should hold p1 once r1 is gone: %+v", res)
	}
}

// inCache waits until the dataplane's cache holds o at its resourceVersion
// or a later one (o's own when it is empty: the latest).
func inCache(t *testing.T, o client.Object) {
	t.Helper()
	want := resourceVersion(o.GetResourceVersion())
	if want == 0 {
		cur := o.DeepCopyObject().(client.Object)
		if err := k8s.Get(context.Background(), client.ObjectKeyFromObject(o), cur); err != nil {
			t.Fatal(err)
		}
		want = resourceVersion(cur.GetResourceVersion())
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := o.DeepCopyObject().(client.Object)
		if err := dataplane.Client.Get(context.Background(), client.ObjectKeyFromObject(o), got); err == nil && resourceVersion(got.GetResourceVersion()) >= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cache never saw %s/%s at %d", o.GetNamespace(), o.GetName(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// goneFromCache waits until the dataplane's cache no longer holds o.
func goneFromCache(t *testing.T, o client.Object) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := dataplane.Client.Get(context.Background(), client.ObjectKeyFromObject(o), o.DeepCopyObject().(client.Object))
		if apierrors.IsNotFound(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s/%s still in the cache after 20s (err %v)", o.GetNamespace(), o.GetName(), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// modify applies change to the object at key.
func modify(t *testing.T, o client.Object, key types.NamespacedName, change func(client.Object)) {
	t.Helper()
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := k8s.Get(context.Background(), key, o); err != nil {
			return err
		}
		change(o)
		return k8s.Update(context.Background(), o)
	}); err != nil {
		t.Fatal(err)
	}
	inCache(t, o)
}

// matchesFullTranslation waits until the dataplane serves what a full
// translation of its cache gives, results and generations included.
func matchesFullTranslation(t *testing.T, step string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		diff := fullTranslationDiff()
		if diff == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the dataplane's snapshot is not what a full translation gives after 20s: %s", step, diff)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func fullTranslationDiff() string {
	d := dataplane
	d.mu.Lock()
	defer d.mu.Unlock()
	ctx := context.Background()
	var rules lbv1alpha1.LoadBalancerRuleList
	var services corev1.ServiceList
	var epSlices discoveryv1.EndpointSliceList
	for _, l := range []client.ObjectList{&rules, &services, &epSlices} {
		if err := d.Client.List(ctx, l); err != nil {
			return err.Error()
		}
	}
	snap, results := translate.Translate(translate.Input{Rules: rules.Items, Services: services.Items, Slices: epSlices.Items, Bind: d.Bind})
	state := d.State()
	gens := map[types.NamespacedName]int64{}
	for _, r := range rules.Items {
		gens[client.ObjectKeyFromObject(&r)] = r.Generation
	}
	switch {
	case d.lastSnap == nil:
		return "no snapshot applied"
	case !reflect.DeepEqual(snap.Rules, d.lastSnap.Rules):
		return "the snapshot's rules differ"
	case !reflect.DeepEqual(results, state.Results):
		return "the results differ"
	case !reflect.DeepEqual(gens, state.Generations):
		return "the generations differ"
	}
	return ""
}
