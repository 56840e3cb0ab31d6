package controllers

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/dataplane/translate"
)

// putReport writes a replica's report Lease as the reporter would, renewed
// at renewed.
func putReport(t *testing.T, ns string, r Report, renewed time.Time) *coordinationv1.Lease {
	t.Helper()
	ctx := context.Background()
	l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ReportLeaseName(r.Replica),
		Labels: map[string]string{LabelReport: "true"}, Annotations: map[string]string{annotationReport: r.encode()}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(r.Replica), LeaseDurationSeconds: ptr.To[int32](30),
			RenewTime: &metav1.MicroTime{Time: renewed}}}
	var cur coordinationv1.Lease
	if err := k8s.Get(ctx, types.NamespacedName{Namespace: ns, Name: l.Name}, &cur); err == nil {
		cur.Annotations, cur.Spec = l.Annotations, l.Spec
		if err := k8s.Update(ctx, &cur); err != nil {
			t.Fatal(err)
		}
		return &cur
	}
	if err := k8s.Create(ctx, l); err != nil {
		t.Fatal(err)
	}
	return l
}

func reportNamespace(t *testing.T) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "reports-"}}
	if err := k8s.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	return ns.Name
}

// serving polls until the view, read through the API server, gives want.
func servingEventually(t *testing.T, v *Replicas, key types.NamespacedName, gen int64, rv string, want func(Serving) bool) Serving {
	t.Helper()
	var s Serving
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if s, err = v.Serving(context.Background(), key, gen, rv); err == nil && want(s) {
			return s
		}
	}
	t.Fatalf("Serving(%s, generation %d, rv %s) = %+v, %v", key, gen, rv, s, err)
	return s
}

func TestReplicasProgrammedSpeaksForEveryReplica(t *testing.T) {
	ns := reportNamespace(t)
	v := NewReplicas(k8s, ns, nil)
	rule := types.NamespacedName{Namespace: "web", Name: "app"}
	now := time.Now()
	putReport(t, ns, Report{Replica: "10.1.0.1", Address: "10.1.0.1", Covered: 100}, now)
	putReport(t, ns, Report{Replica: "10.1.0.2", Address: "10.1.0.2", Covered: 100}, now)

	s := servingEventually(t, v, rule, 3, "100", func(s Serving) bool { return s.Replicas == 2 })
	if ok, reason, msg := s.programmed(3); !ok || msg != "2 of 2 replicas serve generation 3" {
		t.Errorf("both covered: %v %s %q", ok, reason, msg)
	}

	// A new generation, first seen at 150: replica 2 has not applied it.
	putReport(t, ns, Report{Replica: "10.1.0.1", Address: "10.1.0.1", Covered: 150}, now)
	s = servingEventually(t, v, rule, 4, "150", func(s Serving) bool { return len(s.Behind) == 1 })
	ok, reason, msg := s.programmed(4)
	if ok || reason != "Pending" || msg != "1 of 2 replicas have not applied generation 4: 10.1.0.2" {
		t.Errorf("replica 2 behind: %v %s %q", ok, reason, msg)
	}
	// The controller's own status write moves the rule to 160; what counts
	// is where generation 4 was first seen.
	putReport(t, ns, Report{Replica: "10.1.0.2", Address: "10.1.0.2", Covered: 155}, now)
	s = servingEventually(t, v, rule, 4, "160", func(s Serving) bool { return len(s.Behind) == 0 })
	if ok, _, _ := s.programmed(4); !ok {
		t.Errorf("both past the first sight of generation 4: %+v", s)
	}

	// Replica 2 cannot listen.
	putReport(t, ns, Report{Replica: "10.1.0.2", Address: "10.1.0.2", Covered: 160,
		Failed: map[string]string{"web/app": "listen tcp 10.1.0.2:80: bind: address already in use"}}, now)
	s = servingEventually(t, v, rule, 4, "160", func(s Serving) bool { return len(s.Failed) == 1 })
	ok, reason, msg = s.programmed(4)
	if ok || reason != "ListenFailed" || msg != "1 of 2 replicas cannot serve: 10.1.0.2: listen tcp 10.1.0.2:80: bind: address already in use" {
		t.Errorf("replica 2 cannot listen: %v %s %q", ok, reason, msg)
	}

	// Replica 2's probes see one backend down that replica 1 sees up.
	putReport(t, ns, Report{Replica: "10.1.0.2", Address: "10.1.0.2", Covered: 160, Down: map[string]int32{"web/app": 1}}, now)
	s = servingEventually(t, v, rule, 4, "160", func(s Serving) bool { return s.MaxDown == 1 })
	if !slices.Equal(s.DownOn, []string{"10.1.0.2"}) {
		t.Errorf("down on %v, want replica 2", s.DownOn)
	}

	// A report not renewed within its duration no longer counts (a crash).
	putReport(t, ns, Report{Replica: "10.1.0.2", Address: "10.1.0.2", Covered: 10}, now.Add(-time.Minute))
	s = servingEventually(t, v, rule, 4, "160", func(s Serving) bool { return s.Replicas == 1 })
	if ok, _, msg := s.programmed(4); !ok || !strings.HasPrefix(msg, "1 of 1") {
		t.Errorf("after replica 2 expired: %v %q", ok, msg)
	}
}

func TestReplicasInAClusterAreTheFrontendEndpoints(t *testing.T) {
	ns := reportNamespace(t)
	endpoints := []DataplaneEndpoint{
		{Address: netip.MustParseAddr("10.244.0.7"), Pod: &corev1.ObjectReference{Name: "stickylb-a"}},
		{Address: netip.MustParseAddr("10.244.0.8"), Pod: &corev1.ObjectReference{Name: "stickylb-b"}},
	}
	v := NewReplicas(k8s, ns, func(context.Context) ([]DataplaneEndpoint, error) { return endpoints, nil })
	rule := types.NamespacedName{Namespace: "web", Name: "app"}
	putReport(t, ns, Report{Replica: "stickylb-a", Address: "10.244.0.7", Covered: 50}, time.Now())
	// A report of a pod that is no endpoint (terminating, not ready) does not count.
	putReport(t, ns, Report{Replica: "stickylb-old", Address: "10.244.0.5", Covered: 1}, time.Now())
	s := servingEventually(t, v, rule, 1, "40", func(s Serving) bool { return len(s.Behind) == 1 })
	if ok, _, msg := s.programmed(1); ok || msg != "1 of 2 replicas have not applied generation 1: 10.244.0.8 (stickylb-b): no report yet" {
		t.Errorf("stickylb-b has not reported: %v %q", ok, msg)
	}
	putReport(t, ns, Report{Replica: "stickylb-b", Address: "10.244.0.8", Covered: 45}, time.Now())
	s = servingEventually(t, v, rule, 1, "40", func(s Serving) bool { return len(s.Behind) == 0 })
	if ok, _, msg := s.programmed(1); !ok || msg != "2 of 2 replicas serve generation 1" {
		t.Errorf("%v %q", ok, msg)
	}
}

func TestReportChangedReevaluatesOnlyWhatItMust(t *testing.T) {
	v := NewReplicas(k8s, "unused", nil)
	waiting := types.NamespacedName{Namespace: "a", Name: "waiting"}
	v.waiting[waiting] = struct{}{}
	l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: ReportLeaseName("r1"),
		Annotations: map[string]string{annotationReport: (&Report{Replica: "r1", Covered: 5,
			Failed: map[string]string{"b/failed": "listen: in use"}}).encode()}}}
	got := v.ReportChanged(l, false)
	slices.SortFunc(got, func(x, y types.NamespacedName) int { return strings.Compare(x.String(), y.String()) })
	want := []types.NamespacedName{waiting, {Namespace: "b", Name: "failed"}}
	if !slices.Equal(got, want) {
		t.Errorf("first report: %v, want %v", got, want)
	}
	if got := v.ReportChanged(l, false); len(got) != 0 {
		t.Errorf("a heartbeat (same report) re-evaluates %v, want nothing", got)
	}
	if got := v.ReportChanged(l, true); !slices.Contains(got, (types.NamespacedName{Namespace: "b", Name: "failed"})) {
		t.Errorf("a deleted report must re-evaluate the rules it named: %v", got)
	}
}

func TestReportLeaseNames(t *testing.T) {
	for in, want := range map[string]string{
		"stickylb-5d9c-x2x": "stickylb-dataplane-stickylb-5d9c-x2x",
		"127.0.0.2":         "stickylb-dataplane-127-0-0-2",
		"fd00::1":           "stickylb-dataplane-fd00--1",
	} {
		if got := ReportLeaseName(in); got != want {
			t.Errorf("ReportLeaseName(%q) = %q, want %q", in, got, want)
		}
	}
}

// When replicas disagree on a backend's probe, status reports the lowest
// healthy count and says which replicas see it down.
func TestStatusReportsTheLowestHealthyCount(t *testing.T) {
	r := &RuleReconciler{Healthy: func(string) (int, bool) { return 4, true }}
	rule := &lbv1alpha1.LoadBalancerRule{ObjectMeta: metav1.ObjectMeta{Namespace: "web", Name: "app", Generation: 2}}
	res := translate.Result{Accepted: true, ResolvedRefs: true, Total: 4, Ready: 4}
	st := r.desiredStatus(rule, res, "", &Serving{Replicas: 2, MaxDown: 1, DownOn: []string{"10.1.0.2"}})
	if st.Backends.Healthy != 3 {
		t.Errorf("healthy %d, want the lowest count, 3", st.Backends.Healthy)
	}
	c := meta.FindStatusCondition(st.Conditions, string(lbv1alpha1.ConditionReady))
	if want := "3 of 4 backends healthy (the lowest count of 2 replicas: 10.1.0.2 see 1 down that others see up)"; c == nil || c.Message != want {
		t.Errorf("Ready %+v, want message %q", c, want)
	}
	// Every replica sees it down: nothing to point at.
	st = r.desiredStatus(rule, res, "", &Serving{Replicas: 2, MaxDown: 1, DownOn: []string{"10.1.0.1", "10.1.0.2"}})
	if c := meta.FindStatusCondition(st.Conditions, string(lbv1alpha1.ConditionReady)); c.Message != "3 of 4 backends healthy" {
		t.Errorf("all agree: message %q", c.Message)
	}
}
