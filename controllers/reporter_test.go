package controllers

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/util/retry"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/dataplane/translate"
)

func TestReportLeaseName(t *testing.T) {
	for _, tc := range []struct{ replica, want string }{
		{"127.0.0.2", "stickylb-dataplane-127-0-0-2"},
		{"fd00::1", "stickylb-dataplane-fd00--1"},
		{"::1", "stickylb-dataplane-1"},
		{"10.244.0.7", "stickylb-dataplane-10-244-0-7"},
		{"stickylb-5d9c-x2x", "stickylb-dataplane-stickylb-5d9c-x2x"},
		{"Node_A.example", "stickylb-dataplane-node-a-example"},
		{strings.Repeat("a", 300), ""},
	} {
		got := ReportLeaseName(tc.replica)
		if tc.want != "" && got != tc.want {
			t.Errorf("ReportLeaseName(%q) = %q, want %q", tc.replica, got, tc.want)
		}
		if errs := validation.IsDNS1123Subdomain(got); len(errs) > 0 {
			t.Errorf("ReportLeaseName(%q) = %q: not a valid Lease name: %v", tc.replica, got, errs)
		}
	}
	if ReportLeaseName("127.0.0.2") == ReportLeaseName("127.0.0.3") {
		t.Error("two addresses share a Lease")
	}
}

// TestReportContent builds a report from a dataplane state, without an API
// server: listen errors become Failed, probed-down backends Down.
func TestReportContent(t *testing.T) {
	d := NewDataplane(nil, nil, netip.Addr{}, logr.Discard())
	a, b, c := types.NamespacedName{Namespace: "ns", Name: "a"}, types.NamespacedName{Namespace: "ns", Name: "b"}, types.NamespacedName{Namespace: "ns", Name: "c"}
	d.state.Store(&DataplaneState{
		Version: 7,
		Results: map[types.NamespacedName]translate.Result{
			a: {Accepted: true, Total: 4, Ready: 3},
			b: {Accepted: true, Total: 2, Ready: 2},
			c: {Accepted: false, Total: 2, Ready: 2},
		},
		ListenErrors: map[types.NamespacedName]string{c: "listen tcp 127.0.0.1:80: bind: address already in use"},
	})
	d.cov.applied(42)
	down := map[string]int{"ns/a": 2, "ns/b": 0, "ns/c": 0}
	r := &Reporter{Dataplane: d, Replica: "r1", Address: "127.0.0.1", ProbedDown: func(rule string) (int, bool) {
		n, ok := down[rule]
		return n, ok
	}}
	got := r.Report()
	want := &Report{Replica: "r1", Address: "127.0.0.1", Snapshot: 7, Covered: 42,
		Failed: map[string]string{"ns/c": "listen tcp 127.0.0.1:80: bind: address already in use"},
		Down:   map[string]int32{"ns/a": 2}}
	if got.encode() != want.encode() {
		t.Errorf("report = %s, want %s", got.encode(), want.encode())
	}
	// The annotation round-trips.
	l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{annotationReport: got.encode()}}}
	if back, err := decodeReport(l); err != nil || back.encode() != want.encode() {
		t.Errorf("decodeReport = %+v, %v", back, err)
	}
}

// TestCoveredFollowsTheSnapshot: a generation change is covered only once
// the snapshot that serves it is applied; a status-only update is covered
// at once, without any reconcile.
func TestCoveredFollowsTheSnapshot(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	backendService(t, ns, "backend", "10.1.0.1")
	rule := newRule(ns, "web", "default", freePort(t), "backend")
	if err := k8s.Create(ctx, rule); err != nil {
		t.Fatal(err)
	}
	key := client.ObjectKeyFromObject(rule)
	waitCovered(t, rule.ResourceVersion)
	if g := dataplane.State().Generations[key]; g != rule.Generation {
		t.Fatalf("covered, but the state serves generation %d, want %d", g, rule.Generation)
	}

	// Hold the dataplane's reconciles: a new generation waits, and so do the
	// status writes that follow it (the rule controller's).
	dataplane.mu.Lock()
	held := true
	defer func() {
		if held {
			dataplane.mu.Unlock()
		}
	}()
	before := dataplane.Covered()
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := k8s.Get(ctx, key, rule); err != nil {
			return err
		}
		rule.Spec.IdleTimeoutInMinutes++
		return k8s.Update(ctx, rule)
	}); err != nil {
		t.Fatal(err)
	}
	changed := resourceVersion(rule.ResourceVersion)
	waitInCache(t, key, rule.ResourceVersion)
	// A status write after the change, as the rule controller makes.
	statusWrite(t, key)
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		if c := dataplane.Covered(); c >= changed {
			t.Fatalf("covered = %d reached the new generation's version %d before any reconcile applied it", c, changed)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if c := dataplane.Covered(); c < before {
		t.Fatalf("covered went back from %d to %d", before, c)
	}
	dataplane.mu.Unlock()
	held = false
	var latest lbv1alpha1.LoadBalancerRule
	if err := k8s.Get(ctx, key, &latest); err != nil {
		t.Fatal(err)
	}
	// Covered passes the change, and the status writes after it too.
	waitCovered(t, latest.ResourceVersion)
	if g := dataplane.State().Generations[key]; g != rule.Generation {
		t.Fatalf("covered, but the state serves generation %d, want %d", g, rule.Generation)
	}

	// A status-only update, while no reconcile can run: covered at once,
	// and the snapshot is the same one.
	waitSettled(t)
	dataplane.mu.Lock()
	held = true
	version := dataplane.State().Version
	rv := statusWrite(t, key)
	waitCovered(t, rv)
	if v := dataplane.State().Version; v != version {
		t.Errorf("snapshot version %d -> %d for a status-only update", version, v)
	}
	dataplane.mu.Unlock()
	held = false
}

// statusWrite writes the rule's status (which the rule controller puts
// back later: another status-only update) and returns its resourceVersion.
func statusWrite(t *testing.T, key client.ObjectKey) string {
	t.Helper()
	var r lbv1alpha1.LoadBalancerRule
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := k8s.Get(context.Background(), key, &r); err != nil {
			return err
		}
		r.Status.Backends.Total += 1000
		return k8s.Status().Update(context.Background(), &r)
	}); err != nil {
		t.Fatal(err)
	}
	return r.ResourceVersion
}

// touch makes an update of the rule that keeps its generation (an
// annotation, which nothing puts back) and returns its resourceVersion.
func touch(t *testing.T, key client.ObjectKey) string {
	t.Helper()
	var r lbv1alpha1.LoadBalancerRule
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := k8s.Get(context.Background(), key, &r); err != nil {
			return err
		}
		if r.Annotations == nil {
			r.Annotations = map[string]string{}
		}
		r.Annotations["test.stickylb.io/touched"] = time.Now().Format(time.RFC3339Nano)
		return k8s.Update(context.Background(), &r)
	}); err != nil {
		t.Fatal(err)
	}
	return r.ResourceVersion
}

// waitCovered waits until the suite's dataplane covers rv.
func waitCovered(t *testing.T, rv string) {
	t.Helper()
	want := resourceVersion(rv)
	deadline := time.Now().Add(20 * time.Second)
	for dataplane.Covered() < want {
		if time.Now().After(deadline) {
			t.Fatalf("covered = %d, not %d within 20s", dataplane.Covered(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitInCache waits until the manager's cache holds the rule at rv.
func waitInCache(t *testing.T, key client.ObjectKey, rv string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var got lbv1alpha1.LoadBalancerRule
		if err := dataplane.Client.Get(context.Background(), key, &got); err == nil && resourceVersion(got.ResourceVersion) >= resourceVersion(rv) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cache never saw %s at %s", key, rv)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitSettled waits until no generation change waits for a reconcile.
func waitSettled(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		dataplane.cov.mu.Lock()
		settled := dataplane.cov.dirty <= dataplane.cov.covered
		dataplane.cov.mu.Unlock()
		if settled {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("generation changes still wait for a reconcile after 20s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startReporter runs a Reporter for the suite's dataplane until the test ends.
func startReporter(t *testing.T, ns, replica string, interval, heartbeat time.Duration) *Reporter {
	t.Helper()
	r := &Reporter{
		Client: k8s, Reader: k8s, Dataplane: dataplane, ProbedDown: dpProxy.ProbedDown,
		Replica: replica, Namespace: ns, Address: "127.0.0.1",
		Interval: interval, Heartbeat: heartbeat, Log: logr.Discard(),
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return r
}

// reportLease reads a replica's Lease and its report.
func reportLease(ns, replica string) (*coordinationv1.Lease, *Report, error) {
	var l coordinationv1.Lease
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: ReportLeaseName(replica)}, &l); err != nil {
		return nil, nil, err
	}
	rep, err := decodeReport(&l)
	return &l, rep, err
}

// waitReport waits until the replica's report passes check.
func waitReport(t *testing.T, ns, replica, what string, check func(*coordinationv1.Lease, *Report) bool) (*coordinationv1.Lease, *Report) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		l, rep, err := reportLease(ns, replica)
		if err == nil && check(l, rep) {
			return l, rep
		}
		if time.Now().After(deadline) {
			var got string
			if rep != nil {
				got = rep.encode()
			}
			t.Fatalf("report of %s: %s: not within 20s; report %s (err %v)", replica, what, got, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestReporterPublishes(t *testing.T) {
	ns := namespace(t)
	start := time.Now()
	startReporter(t, ns, "127.0.0.1", time.Second, time.Minute)
	l, rep := waitReport(t, ns, "127.0.0.1", "covers what the dataplane covers", func(_ *coordinationv1.Lease, rep *Report) bool {
		return rep.Covered == dataplane.Covered() && rep.Snapshot == dataplane.State().Version
	})
	if l.Name != "stickylb-dataplane-127-0-0-1" || l.Labels[LabelReport] != "true" {
		t.Errorf("lease %s, labels %v: want stickylb-dataplane-127-0-0-1 labelled %s=true", l.Name, l.Labels, LabelReport)
	}
	if ptr.Deref(l.Spec.HolderIdentity, "") != "127.0.0.1" || ptr.Deref(l.Spec.LeaseDurationSeconds, 0) != int32(ReportLeaseDuration/time.Second) {
		t.Errorf("holder %v, duration %v: want 127.0.0.1 and ReportLeaseDuration", ptr.Deref(l.Spec.HolderIdentity, ""), ptr.Deref(l.Spec.LeaseDurationSeconds, 0))
	}
	if l.Spec.RenewTime == nil || l.Spec.RenewTime.Time.Before(start.Add(-time.Second)) {
		t.Errorf("renewTime %v, want set at the write", l.Spec.RenewTime)
	}
	if rep.Replica != "127.0.0.1" || rep.Address != "127.0.0.1" || rep.Snapshot == 0 || rep.Covered == 0 {
		t.Errorf("report %s: want replica and address 127.0.0.1, a snapshot and a covered version", rep.encode())
	}
	var raw map[string]any
	if err := json.Unmarshal([]byte(l.Annotations[annotationReport]), &raw); err != nil {
		t.Errorf("annotation %q: %v", l.Annotations[annotationReport], err)
	}
}

// leaseWrites counts the writes of a Lease from now on, as a watch sees them.
type leaseWrites struct {
	mu    sync.Mutex
	at    []time.Time
	lease []*coordinationv1.Lease
}

func watchLease(t *testing.T, ns, name string) *leaseWrites {
	t.Helper()
	wc, err := client.NewWithWatch(restConfig, client.Options{Scheme: testScheme})
	if err != nil {
		t.Fatal(err)
	}
	var cur coordinationv1.Lease
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &cur); err != nil {
		t.Fatal(err)
	}
	var list coordinationv1.LeaseList
	w, err := wc.Watch(context.Background(), &list, client.InNamespace(ns),
		client.MatchingFields{"metadata.name": name}, &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: cur.ResourceVersion}})
	if err != nil {
		t.Fatal(err)
	}
	lw := &leaseWrites{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range w.ResultChan() {
			if ev.Type != watch.Modified && ev.Type != watch.Added {
				continue
			}
			lw.mu.Lock()
			lw.at = append(lw.at, time.Now())
			lw.lease = append(lw.lease, ev.Object.(*coordinationv1.Lease))
			lw.mu.Unlock()
		}
	}()
	t.Cleanup(func() { w.Stop(); <-done })
	return lw
}

func (lw *leaseWrites) snapshot() ([]time.Time, []*coordinationv1.Lease) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return append([]time.Time(nil), lw.at...), append([]*coordinationv1.Lease(nil), lw.lease...)
}

// waitQuiet waits until the Lease has not been written for quiet.
func (lw *leaseWrites) waitQuiet(t *testing.T, quiet time.Duration) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	since := time.Now()
	for {
		at, _ := lw.snapshot()
		last := since
		if len(at) > 0 && at[len(at)-1].After(last) {
			last = at[len(at)-1]
		}
		if time.Since(last) >= quiet {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the Lease is still written every so often after 30s: %d writes", len(at))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestReporterCoalescesABurst: 20 rule changes within a second make at
// most two writes: the first change at once, the rest together one
// --report-interval later.
func TestReporterCoalescesABurst(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	rule := newRule(ns, "burst", "default", freePort(t), "backend")
	if err := k8s.Create(ctx, rule); err != nil {
		t.Fatal(err)
	}
	key := client.ObjectKeyFromObject(rule)
	waitCovered(t, rule.ResourceVersion)
	const interval = time.Second
	replica := "burst-replica"
	startReporter(t, ns, replica, interval, time.Minute)
	waitReport(t, ns, replica, "published", func(*coordinationv1.Lease, *Report) bool { return true })

	for _, kind := range []string{"same generation", "generation"} {
		t.Run(kind, func(t *testing.T) {
			// The rule controller's status writes after the last test's
			// changes settle first.
			time.Sleep(2 * interval)
			waitSettled(t)
			lw := watchLease(t, ns, ReportLeaseName(replica))
			lw.waitQuiet(t, 2*interval)
			at0, _ := lw.snapshot()
			start := time.Now()
			var last string
			for i := range 20 {
				if kind == "same generation" {
					last = touch(t, key)
					continue
				}
				if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
					if err := k8s.Get(ctx, key, rule); err != nil {
						return err
					}
					rule.Spec.IdleTimeoutInMinutes = int32(4 + i%2 + 1)
					return k8s.Update(ctx, rule)
				}); err != nil {
					t.Fatal(err)
				}
				last = rule.ResourceVersion
			}
			took := time.Since(start)
			if took > interval {
				t.Logf("the 20 changes took %v, more than a second", took)
			}
			waitCovered(t, last)
			lw.waitQuiet(t, 2*interval)
			at, leases := lw.snapshot()
			at, leases = at[len(at0):], leases[len(at0):]
			t.Logf("%s: 20 changes in %v gave %d writes of the report", kind, took.Round(time.Millisecond), len(at))
			for i := 1; i < len(at); i++ {
				if gap := at[i].Sub(at[i-1]); gap < interval*8/10 {
					t.Errorf("writes %d and %d %v apart, less than the interval %v", i-1, i, gap, interval)
				}
			}
			if kind == "same generation" && took < interval && len(at) > 2 {
				t.Errorf("%d writes for 20 changes within a second, want at most 2", len(at))
			}
			if len(at) == 0 {
				t.Fatal("no write at all")
			}
			rep, err := decodeReport(leases[len(leases)-1])
			if err != nil {
				t.Fatal(err)
			}
			if rep.Covered < resourceVersion(last) {
				t.Errorf("the last write covers %d, not the last change (%s)", rep.Covered, last)
			}
		})
	}
}

// TestReporterHeartbeat: with nothing to say, the Lease is still renewed.
func TestReporterHeartbeat(t *testing.T) {
	ns := namespace(t)
	replica := "heartbeat-replica"
	startReporter(t, ns, replica, 100*time.Millisecond, time.Second)
	first, rep := waitReport(t, ns, replica, "published", func(*coordinationv1.Lease, *Report) bool { return true })
	l, _ := waitReport(t, ns, replica, "renewed twice", func(l *coordinationv1.Lease, _ *Report) bool {
		return l.Spec.RenewTime.Sub(first.Spec.RenewTime.Time) >= 1900*time.Millisecond
	})
	if !l.Spec.AcquireTime.Equal(first.Spec.AcquireTime) {
		t.Errorf("acquireTime moved from %v to %v", first.Spec.AcquireTime, l.Spec.AcquireTime)
	}
	if l.Spec.RenewTime.Sub(first.Spec.RenewTime.Time) > 5*time.Second {
		t.Errorf("renewTime %v after %v, want about a second apart", l.Spec.RenewTime, first.Spec.RenewTime)
	}
	_ = rep
}

// TestReporterFailed: a rule whose port is taken on the replica's address
// is reported Failed, and no longer once the port is free.
func TestReporterFailed(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := int32(taken.Addr().(*net.TCPAddr).Port)
	replica := "failed-replica"
	startReporter(t, ns, replica, 200*time.Millisecond, time.Minute)
	rule := newRule(ns, "taken", "default", port, "backend")
	if err := k8s.Create(ctx, rule); err != nil {
		t.Fatal(err)
	}
	name := ns + "/taken"
	_, rep := waitReport(t, ns, replica, name+" failed", func(_ *coordinationv1.Lease, rep *Report) bool { return rep.Failed[name] != "" })
	if msg := rep.Failed[name]; !strings.Contains(msg, fmt.Sprint(port)) || !strings.Contains(msg, "in use") {
		t.Errorf("failed[%s] = %q, want the listen error", name, msg)
	}
	taken.Close()
	// The dataplane tries again every 5s.
	waitReport(t, ns, replica, name+" no longer failed", func(_ *coordinationv1.Lease, rep *Report) bool { return rep.Failed[name] == "" })
}

// TestReporterLeave: Leave deletes the Lease, and nothing writes it again.
func TestReporterLeave(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	replica := "leaving-replica"
	r := startReporter(t, ns, replica, 100*time.Millisecond, 200*time.Millisecond)
	waitReport(t, ns, replica, "published", func(*coordinationv1.Lease, *Report) bool { return true })
	lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := r.Leave(lctx); err != nil {
		t.Fatal(err)
	}
	// A change, and heartbeats, would have written it again by now.
	rule := newRule(ns, "after-leave", "default", freePort(t), "backend")
	if err := k8s.Create(ctx, rule); err != nil {
		t.Fatal(err)
	}
	waitCovered(t, rule.ResourceVersion)
	time.Sleep(time.Second)
	if _, _, err := reportLease(ns, replica); !apierrors.IsNotFound(err) {
		t.Errorf("after Leave: %v, want the Lease gone", err)
	}
	if err := r.Leave(lctx); err != nil {
		t.Errorf("a second Leave: %v", err)
	}
}

// TestReporterLeavesOthersAlone: a Lease of the same name held by another
// replica is neither written nor deleted.
func TestReporterLeavesOthersAlone(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	replica := "127.0.0.9"
	other := &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ReportLeaseName(replica), Labels: map[string]string{LabelReport: "true"}},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: ptr.To("127-0-0-9")},
	}
	if err := k8s.Create(ctx, other); err != nil {
		t.Fatal(err)
	}
	r := startReporter(t, ns, replica, 100*time.Millisecond, 200*time.Millisecond)
	time.Sleep(time.Second)
	l, _, err := reportLease(ns, replica)
	if l == nil {
		t.Fatal(err)
	}
	if l.ResourceVersion != other.ResourceVersion {
		t.Errorf("another replica's Lease was written: %+v", l)
	}
	if err := r.Leave(ctx); err != nil {
		t.Errorf("Leave: %v", err)
	}
	if _, _, err := reportLease(ns, replica); apierrors.IsNotFound(err) {
		t.Error("Leave deleted another replica's Lease")
	}
}

// TestCoverageModel drives the coverage bookkeeping through random
// interleavings of what runs concurrently in the manager: the informer
// writing events into its cache, the dataplane's handler receiving them (in
// order, later), and reconciles that list the cache and apply. Covered must
// never pass a generation change no finished reconcile has applied, and
// must reach the last version once a reconcile follows the last event.
func TestCoverageModel(t *testing.T) {
	for seed := range int64(300) {
		rnd := rand.New(rand.NewPCG(uint64(seed), 0))
		d := NewDataplane(nil, nil, netip.Addr{}, logr.Discard())
		h := ruleEvents{d}
		q := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[reconcile.Request]())
		const n = 60
		gen := make([]bool, n+1) // gen[v]: the event at version v changes a generation
		for v := 1; v <= n; v++ {
			gen[v] = rnd.IntN(3) == 0
		}
		rule := func(v int, generation int64) *lbv1alpha1.LoadBalancerRule {
			r := &lbv1alpha1.LoadBalancerRule{}
			r.ResourceVersion, r.Generation = fmt.Sprint(v), generation
			return r
		}
		var (
			cached, delivered int // events in the cache, and handed to the handler
			generation        int64
			applied           int // the cache position the last finished reconcile listed
			running           bool
			start, listed     uint64
		)
		truth := func() uint64 {
			// Every change up to the first generation change that no
			// finished reconcile listed, exclusive, is served.
			for v := applied + 1; v <= delivered || v <= cached; v++ {
				if gen[v] {
					return uint64(v - 1)
				}
			}
			return ^uint64(0)
		}
		deliver := func() {
			delivered++
			v := delivered
			switch {
			case gen[v] && rnd.IntN(4) == 0:
				h.Delete(context.Background(), event.DeleteEvent{Object: rule(v, generation)}, q)
			case gen[v]:
				generation++
				h.Update(context.Background(), event.UpdateEvent{ObjectOld: rule(v-1, generation-1), ObjectNew: rule(v, generation)}, q)
			default:
				h.Update(context.Background(), event.UpdateEvent{ObjectOld: rule(v-1, generation), ObjectNew: rule(v, generation)}, q)
			}
		}
		finish := func() {
			d.cov.applied(max(start, listed))
			applied = int(listed)
			running = false
		}
		for delivered < n {
			switch rnd.IntN(4) {
			case 0:
				if cached < n {
					cached++
				}
			case 1:
				if delivered < cached {
					deliver()
				}
			case 2:
				if !running {
					// Read handled, then list: the cache may be ahead of the
					// handler, never behind.
					start = d.cov.reconcileStarts()
					listed, running = uint64(cached), true
				}
			case 3:
				if running {
					finish()
				}
			}
			if c := d.Covered(); c > truth() {
				t.Fatalf("seed %d: covered %d passes a generation change not applied (applied up to %d, cached %d, delivered %d)",
					seed, c, applied, cached, delivered)
			}
		}
		if running {
			finish()
		}
		if q.Len() == 0 && slices.Contains(gen[1:], true) {
			t.Fatalf("seed %d: generation changes queued no reconcile", seed)
		}
		start = d.cov.reconcileStarts()
		listed = uint64(cached)
		finish()
		if c := d.Covered(); c != n {
			t.Fatalf("seed %d: covered %d after a reconcile that followed every event, want %d", seed, c, n)
		}
	}
}
