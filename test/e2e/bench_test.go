package e2e

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/controllers"
	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
	"github.com/stickylb/stickylb/internal/testenv"
)

// Run it with:
//
//	KUBEBUILDER_ASSETS=$(make assets) go test -run=NONE -bench=StatusWritesUnderChurn -benchtime=1x -timeout 20m ./test/e2e/

const (
	churnRules = 1000
	// churnPools Services of churnPoolSize endpoints each back the rules,
	// churnRules/churnPools rules per Service.
	churnPools    = 20
	churnPoolSize = 10
	// churnRulesPerFrontend: a frontend's EndpointSlice holds at most 100
	// ports, so 1,000 rules cannot share one frontend; 20 frontends of 50.
	churnRulesPerFrontend = 50
	// churnFirstPort is where the search for free frontend ports starts:
	// below the ephemeral range (32768 up), so no client socket holds one.
	churnFirstPort   = 20000
	churnBackendPort = 9510
	churnWorkers     = 16
	churnFor         = 30 * time.Second
	churnEvery       = 100 * time.Millisecond
	// churnMinReady: a change never leaves a Service fewer ready endpoints,
	// so every rule stays Ready throughout.
	churnMinReady      = 5
	churnReadyTimeout  = 12 * time.Minute
	churnSettleTimeout = 3 * time.Minute
	churnPoll          = 500 * time.Millisecond
	// churnReportAnnotation is the annotation of a report Lease that holds
	// the report (controllers' annotationReport).
	churnReportAnnotation = "lb.stickylb.io/report"
	churnProgrammed       = "2 of 2 replicas serve generation 1"
)

var churnRuns atomic.Int32

// BenchmarkStatusWritesUnderChurn measures what per-replica status costs
// the API server at 1,000 rules × 2 replicas. Two stickylb processes
// (127.0.0.1 leads, 127.0.0.2 stands by) serve 1,000 rules, each on its own
// port, over 20 Services of 10 ready endpoints (50 rules per Service; the
// rules have no probe, so the backends need not run). Once every rule is
// Ready and Programmed by both replicas (ready-s, from the first create),
// one random endpoint of a random Service toggles its ready condition every
// 100 ms for 30 s, so each change alters ~50 rules' backend counts. Watches
// started before the churn count, per second of churn, the report Lease
// updates (report-writes/s, both replicas; each one's in the log) and the
// rule updates, i.e. status writes (status-writes/s), and record the largest
// report annotation (report-bytes-max) and Lease object as JSON
// (lease-bytes-max) seen. Afterwards every rule must be Ready, Programmed by
// both replicas, and show its Service's final ready count. One run of the
// scenario per call, whatever b.N: use -benchtime=1x.
func BenchmarkStatusWritesUnderChurn(b *testing.B) {
	// The suite's client is rate-limited on the client side (5 requests a
	// second): the benchmark writes and watches with one that is not.
	ctrllog.SetLogger(logr.Discard()) // no "SetLogger was never called" trace
	c := churnClient(b)
	ctx := context.Background()
	ports := churnFreePorts(b, churnRules, loopback1, loopback2)
	ns := churnNamespace(b, c, fmt.Sprintf("bench-status-%d", churnRuns.Add(1)))
	churnStartPair(b)

	// The backend pools.
	pools := make([]*discoveryv1.EndpointSlice, churnPools)
	ready := make([][]bool, churnPools) // what the churn last wrote
	for s := range pools {
		name := fmt.Sprintf("pool-%02d", s)
		ready[s] = make([]bool, churnPoolSize)
		addrs := make([]netip.Addr, churnPoolSize)
		for j := range addrs {
			ready[s][j] = true
			addrs[j] = netns.BackendIP(s*churnPoolSize + j)
		}
		svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone, // a cluster IP is scarce in envtest
				Ports: []corev1.ServicePort{{Port: churnBackendPort, Protocol: corev1.ProtocolTCP}}}}
		if err := c.Create(ctx, svc); err != nil {
			b.Fatal(err)
		}
		pools[s] = &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name + "-abcde", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Port: ptr.To(int32(churnBackendPort)), Protocol: ptr.To(corev1.ProtocolTCP)}},
			Endpoints:   endpointList(readyEndpoints(addrs...)),
		}
		if err := c.Create(ctx, pools[s]); err != nil {
			b.Fatal(err)
		}
	}

	// The rules, concurrently.
	start := time.Now()
	err := churnParallel(churnRules, churnWorkers, func(i int) error {
		return c.Create(ctx, &lbv1alpha1.LoadBalancerRule{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("r%04d", i)},
			Spec: lbv1alpha1.LoadBalancerRuleSpec{
				Frontend:           lbv1alpha1.Frontend{Name: fmt.Sprintf("f%02d", i/churnRulesPerFrontend), Port: lbv1alpha1.PortNumber(ports[i])},
				BackendPool:        lbv1alpha1.BackendPool{ServiceName: fmt.Sprintf("pool-%02d", i%churnPools)},
				BackendPort:        churnBackendPort,
				SessionPersistence: lbv1alpha1.SessionPersistenceClientIP,
			},
		})
	})
	if err != nil {
		b.Fatalf("create the rules: %v", err)
	}
	created := time.Since(start)
	b.Logf("created %d rules in %.1f s (%d workers)", churnRules, created.Seconds(), churnWorkers)
	churnWaitAll(b, c, ns, start, churnReadyTimeout, "Ready and Programmed ("+churnProgrammed+")", func(r *lbv1alpha1.LoadBalancerRule) string {
		return churnNotServed(r)
	})
	readyIn := time.Since(start)
	b.Logf("all %d rules Ready and Programmed %.1f s after the first create", churnRules, readyIn.Seconds())

	// The watches, before the churn.
	w := churnWatches(b, c, ns)

	// The churn.
	rnd := rand.New(rand.NewPCG(1, 2))
	ticker := time.NewTicker(churnEvery)
	churnStart := time.Now()
	w.setWindow(churnStart, time.Time{})
	changes := 0
	for time.Since(churnStart) < churnFor {
		<-ticker.C
		s, j := rnd.IntN(churnPools), rnd.IntN(churnPoolSize)
		if ready[s][j] && countTrue(ready[s]) <= churnMinReady {
			j = slices.Index(ready[s], false) // make one ready instead
		}
		ready[s][j] = !ready[s][j]
		if err := churnWriteSlice(ctx, c, pools[s], ready[s]); err != nil {
			b.Fatalf("change %d (%s): %v", changes, pools[s].Name, err)
		}
		changes++
	}
	ticker.Stop()
	churnEnd := time.Now()
	w.setWindow(churnStart, churnEnd)
	window := churnEnd.Sub(churnStart).Seconds()

	// Status must catch up with the last change, and stay Programmed.
	settled := churnWaitAll(b, c, ns, churnEnd, churnSettleTimeout, "Ready, Programmed and showing the final ready counts", func(r *lbv1alpha1.LoadBalancerRule) string {
		if why := churnNotServed(r); why != "" {
			return why
		}
		var s int
		if _, err := fmt.Sscanf(r.Spec.BackendPool.ServiceName, "pool-%d", &s); err != nil {
			return "unexpected Service " + r.Spec.BackendPool.ServiceName
		}
		n := int32(countTrue(ready[s]))
		if want := (lbv1alpha1.BackendCounts{Total: churnPoolSize, Ready: n, Healthy: n}); r.Status.Backends != want {
			return "backends not caught up"
		}
		return ""
	})
	// Writes still arriving after the settle are not counted; the window
	// ones are what the figures are.
	st := w.stop()

	reportRate := float64(st.reportWrites) / window
	statusRate := float64(st.statusWrites) / window
	b.ReportMetric(reportRate, "report-writes/s")
	b.ReportMetric(statusRate, "status-writes/s")
	b.ReportMetric(float64(st.maxAnnotation), "report-bytes-max")
	b.ReportMetric(float64(st.maxLease), "lease-bytes-max")
	b.ReportMetric(readyIn.Seconds(), "ready-s")

	perReplica := make([]string, 0, len(st.reportByReplica))
	for _, r := range slices.Sorted(maps.Keys(st.reportByReplica)) {
		perReplica = append(perReplica, fmt.Sprintf("%s %.2f/s", r, float64(st.reportByReplica[r])/window))
	}
	b.Logf("%d rules × 2 replicas: created in %.1f s, all Ready in %.1f s; churn %d EndpointSlice changes in %.1f s (%.1f/s): "+
		"report Lease writes %.2f/s (%s), rule status writes %.1f/s (%.1f per change; %d more until settled %.1f s after the churn); "+
		"largest report annotation %d B (at most %d rules down, %d failed in one report), largest Lease %d B",
		churnRules, created.Seconds(), readyIn.Seconds(), changes, window, float64(changes)/window,
		reportRate, strings.Join(perReplica, ", "), statusRate, float64(st.statusWrites)/float64(max(changes, 1)),
		st.statusAfter, settled.Seconds(), st.maxAnnotation, st.maxDown, st.maxFailed, st.maxLease)
}

// churnNotServed is why a rule is not Ready and Programmed by both replicas
// at generation 1, "" when it is.
func churnNotServed(r *lbv1alpha1.LoadBalancerRule) string {
	c := meta.FindStatusCondition(r.Status.Conditions, string(lbv1alpha1.ConditionProgrammed))
	switch {
	case c == nil:
		return "no Programmed condition"
	case c.ObservedGeneration != r.Generation || r.Generation != 1:
		return fmt.Sprintf("Programmed of generation %d, the rule at %d", c.ObservedGeneration, r.Generation)
	case c.Status != metav1.ConditionTrue || c.Message != churnProgrammed:
		return fmt.Sprintf("Programmed %s %s: %s", c.Status, c.Reason, c.Message)
	case !readyAt(r):
		if rc := meta.FindStatusCondition(r.Status.Conditions, string(lbv1alpha1.ConditionReady)); rc != nil {
			return fmt.Sprintf("Ready %s %s", rc.Status, rc.Reason)
		}
		return "no Ready condition"
	}
	return ""
}

// churnWaitAll lists the namespace's rules every churnPoll until there are
// churnRules and notOK says "" for each, and returns the time since start;
// it fails after timeout with a tally of why the others are not.
func churnWaitAll(b *testing.B, c client.Client, ns string, start time.Time, timeout time.Duration, what string, notOK func(*lbv1alpha1.LoadBalancerRule) string) time.Duration {
	b.Helper()
	lastLog := time.Now()
	for {
		var list lbv1alpha1.LoadBalancerRuleList
		err := c.List(context.Background(), &list, client.InNamespace(ns))
		why := map[string]int{}
		ok := 0
		if err == nil {
			for i := range list.Items {
				if w := notOK(&list.Items[i]); w != "" {
					why[w]++
				} else {
					ok++
				}
			}
			if n := len(list.Items); n < churnRules {
				why["not created"] += churnRules - n
			}
			if ok == churnRules {
				return time.Since(start)
			}
		}
		if time.Since(start) > timeout {
			b.Fatalf("%d of %d rules %s after %v (list error %v); the others: %s", ok, churnRules, what, timeout, err, tally(why))
		}
		if time.Since(lastLog) >= 30*time.Second {
			b.Logf("%.0f s: %d of %d rules %s; the others: %s", time.Since(start).Seconds(), ok, churnRules, what, tally(why))
			lastLog = time.Now()
		}
		time.Sleep(churnPoll)
	}
}

// tally prints counts by reason, most first, the first five.
func tally(why map[string]int) string {
	keys := slices.Collect(maps.Keys(why))
	slices.SortFunc(keys, func(a, b string) int { return cmp.Or(cmp.Compare(why[b], why[a]), cmp.Compare(a, b)) })
	var out []string
	for _, k := range keys[:min(5, len(keys))] {
		out = append(out, fmt.Sprintf("%d× %q", why[k], k))
	}
	return strings.Join(out, "; ")
}

func countTrue(bs []bool) int {
	n := 0
	for _, b := range bs {
		if b {
			n++
		}
	}
	return n
}

// churnWriteSlice sets the slice's endpoints' conditions to ready and
// updates it (slice keeps the stored object).
func churnWriteSlice(ctx context.Context, c client.Client, slice *discoveryv1.EndpointSlice, ready []bool) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		for j := range slice.Endpoints {
			c := &slice.Endpoints[j].Conditions
			c.Ready, c.Serving, c.Terminating = ptr.To(ready[j]), ptr.To(ready[j]), ptr.To(false)
		}
		err := c.Update(ctx, slice)
		if err != nil {
			if gerr := c.Get(ctx, client.ObjectKeyFromObject(slice), slice); gerr != nil {
				return gerr
			}
		}
		return err
	})
}

// ---- the watches ----

// churnCounts is what the watches saw.
type churnCounts struct {
	// reportWrites and statusWrites are the report Lease and rule updates
	// within the window; reportByReplica splits the former by holder.
	reportWrites, statusWrites int
	reportByReplica            map[string]int
	// statusAfter are the rule updates after the window.
	statusAfter int
	// maxAnnotation is the largest report annotation seen, maxLease the
	// largest report Lease (as JSON), in bytes.
	maxAnnotation, maxLease int
	// maxDown and maxFailed are the most rules one report named down
	// (its probes, or the proxy, see fewer healthy than ready) and failed.
	maxDown, maxFailed int
}

type churnWatcher struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	from, to time.Time // the window; to zero while it is open
	counts   churnCounts
}

func (w *churnWatcher) setWindow(from, to time.Time) {
	w.mu.Lock()
	w.from, w.to = from, to
	w.mu.Unlock()
}

// inWindow reports whether now is in the window, and whether after it.
func (w *churnWatcher) inWindow(now time.Time) (in, after bool) {
	if w.from.IsZero() || now.Before(w.from) {
		return false, false
	}
	if w.to.IsZero() || !now.After(w.to) {
		return true, false
	}
	return false, true
}

// stop ends the watches and returns what they saw.
func (w *churnWatcher) stop() churnCounts {
	w.cancel()
	w.wg.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.counts
}

// churnWatches watches the report Leases (every namespace) and the rules of
// ns, and counts their updates once a window is set.
func churnWatches(b *testing.B, wc client.WithWatch, ns string) *churnWatcher {
	ctx, cancel := context.WithCancel(context.Background())
	w := &churnWatcher{cancel: cancel, counts: churnCounts{reportByReplica: map[string]int{}}}
	b.Cleanup(func() { w.stop() }) // before the test ends, on every path

	leases := client.ListOptions{LabelSelector: labels.SelectorFromSet(labels.Set{controllers.LabelReport: "true"})}
	started := make(chan struct{}, 2)
	w.wg.Go(func() {
		churnWatch(ctx, b, wc, &coordinationv1.LeaseList{}, leases, started, func(t watch.EventType, o client.Object) {
			l, ok := o.(*coordinationv1.Lease)
			if !ok {
				return
			}
			raw, _ := json.Marshal(l)
			w.mu.Lock()
			defer w.mu.Unlock()
			w.counts.maxAnnotation = max(w.counts.maxAnnotation, len(l.Annotations[churnReportAnnotation]))
			w.counts.maxLease = max(w.counts.maxLease, len(raw))
			var rep controllers.Report
			if json.Unmarshal([]byte(l.Annotations[churnReportAnnotation]), &rep) == nil {
				w.counts.maxDown = max(w.counts.maxDown, len(rep.Down))
				w.counts.maxFailed = max(w.counts.maxFailed, len(rep.Failed))
			}
			if in, _ := w.inWindow(time.Now()); in && t == watch.Modified {
				w.counts.reportWrites++
				w.counts.reportByReplica[ptr.Deref(l.Spec.HolderIdentity, l.Name)]++
			}
		})
	})
	w.wg.Go(func() {
		churnWatch(ctx, b, wc, &lbv1alpha1.LoadBalancerRuleList{}, client.ListOptions{Namespace: ns}, started, func(t watch.EventType, _ client.Object) {
			if t != watch.Modified {
				return
			}
			w.mu.Lock()
			defer w.mu.Unlock()
			switch in, after := w.inWindow(time.Now()); {
			case in:
				w.counts.statusWrites++
			case after:
				w.counts.statusAfter++
			}
		})
	})
	for range 2 {
		select {
		case <-started:
		case <-time.After(30 * time.Second):
			b.Fatal("the watches did not start within 30 s")
		}
	}
	return w
}

// churnWatch watches list with opts until ctx ends, passing on every event's
// object; it watches again from the last resourceVersion when the server
// ends a watch. It signals started once the first watch is established.
func churnWatch(ctx context.Context, b *testing.B, c client.WithWatch, list client.ObjectList, opts client.ListOptions, started chan<- struct{}, on func(watch.EventType, client.Object)) {
	rv := ""
	first := true
	for ctx.Err() == nil {
		o := opts
		o.Raw = &metav1.ListOptions{ResourceVersion: rv}
		wi, err := c.Watch(ctx, list, &o)
		if err != nil {
			if ctx.Err() == nil {
				b.Logf("watch %T: %v; again", list, err)
				time.Sleep(100 * time.Millisecond)
			}
			continue
		}
		if first {
			started <- struct{}{}
			first = false
		}
	events:
		for {
			select {
			case <-ctx.Done():
				break events
			case ev, ok := <-wi.ResultChan():
				if !ok {
					break events
				}
				if ev.Type == watch.Error {
					b.Logf("watch %T: %v; again from the current state (updates in between are not counted)", list, ev.Object)
					rv = ""
					break events
				}
				obj, ok := ev.Object.(client.Object)
				if !ok {
					continue
				}
				rv = obj.GetResourceVersion()
				if ev.Type != watch.Bookmark {
					on(ev.Type, obj)
				}
			}
		}
		wi.Stop()
	}
}

// ---- setup ----

// churnClient is a client of the suite's API server, as admin, without
// client-side rate limiting.
func churnClient(b *testing.B) client.WithWatch {
	b.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		b.Fatal(err)
	}
	cfg.QPS, cfg.Burst = -1, 0 // no client-side limiter
	c, err := client.NewWithWatch(cfg, client.Options{Scheme: k8s.Scheme()})
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// churnFreePorts returns n ports from churnFirstPort up that are free for
// TCP and UDP on every one of ips.
func churnFreePorts(b *testing.B, n int, ips ...netip.Addr) []uint16 {
	b.Helper()
	var out []uint16
	for p := churnFirstPort; p < 32768 && len(out) < n; p++ {
		if churnPortFree(uint16(p), ips) {
			out = append(out, uint16(p))
		}
	}
	if len(out) < n {
		b.Fatalf("only %d free ports in %d-32767, want %d", len(out), churnFirstPort, n)
	}
	return out
}

func churnPortFree(port uint16, ips []netip.Addr) bool {
	for _, ip := range ips {
		addr := netip.AddrPortFrom(ip, port).String()
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return false
		}
		l.Close()
		u, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		u.Close()
	}
	return true
}

// churnNamespace creates the namespace; at the end (after the replicas
// stopped) its rules, Services and EndpointSlices are deleted, as the
// namespace helper does for rules.
func churnNamespace(b *testing.B, c client.Client, name string) string {
	b.Helper()
	ctx := context.Background()
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		if err := c.DeleteAllOf(ctx, &lbv1alpha1.LoadBalancerRule{}, client.InNamespace(name)); err != nil {
			b.Errorf("delete the rules of %s: %v", name, err)
		}
		// The frontends' Services hold cluster IPs, of which envtest has few.
		var svcs corev1.ServiceList
		if err := c.List(ctx, &svcs, client.InNamespace(name)); err != nil {
			b.Errorf("list the Services of %s: %v", name, err)
		}
		for i := range svcs.Items {
			if err := c.Delete(ctx, &svcs.Items[i]); client.IgnoreNotFound(err) != nil {
				b.Errorf("delete Service %s/%s: %v", name, svcs.Items[i].Name, err)
			}
		}
		if err := c.DeleteAllOf(ctx, &discoveryv1.EndpointSlice{}, client.InNamespace(name)); err != nil {
			b.Errorf("delete the EndpointSlices of %s: %v", name, err)
		}
	})
	return name
}

// churnStartPair is startPair for a benchmark: stickylb on 127.0.0.1, which
// leads, then on 127.0.0.2, which stands by.
func churnStartPair(b *testing.B) {
	b.Helper()
	a := churnStickylb(b, "127.0.0.1")
	testbackend.Eventually(b, 30*time.Second, "stickylb on 127.0.0.1 leads", func() bool { return a.leaderStatus() == 1 })
	s := churnStickylb(b, "127.0.0.2")
	testbackend.Eventually(b, 10*time.Second, "stickylb on 127.0.0.2 reports itself a standby", func() bool { return s.leaderStatus() == 0 })
	if st := a.leaderStatus(); st != 1 {
		b.Fatalf("127.0.0.1 leader status %v after the second replica started", st)
	}
}

// churnStickylb is startStickylb for a benchmark: stickylb in local mode
// serving on bind, until the benchmark's cleanup stops it.
func churnStickylb(b *testing.B, bind string) *process {
	b.Helper()
	p := &process{bind: bind, metrics: testenv.FreeAddr(b), health: testenv.FreeAddr(b), logs: &testenv.Output{}, exited: make(chan struct{})}
	p.cmd = exec.Command(stickylb,
		"--kubeconfig", kubeconfig,
		"--dataplane-bind-address", bind,
		"--metrics-bind-address", p.metrics,
		"--health-probe-bind-address", p.health,
		"--leader-elect", "--leader-election-namespace", "default", "--drain-timeout", "2s")
	p.cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "POD_NAMESPACE=") || strings.HasPrefix(kv, "POD_IP=") || strings.HasPrefix(kv, "KUBECONFIG=")
	})
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	if err := p.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	b.Cleanup(func() {
		if !p.hasExited() {
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.exited:
			case <-time.After(15 * time.Second):
				b.Errorf("stickylb on %s did not exit within 15s of SIGTERM; killing it", bind)
				p.kill()
			}
		}
		if b.Failed() {
			b.Logf("stickylb on %s logged (last 100 lines):\n%s", bind, tail(p.logs, 100))
		}
	})
	testbackend.Eventually(b, 30*time.Second, "stickylb on "+bind+" answers /readyz", func() bool {
		if p.hasExited() {
			b.Fatalf("stickylb on %s exited: %v\n%s", bind, p.cmd.ProcessState, tail(p.logs, 50))
		}
		resp, err := httpClient.Get("http://" + p.health + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return p
}

// churnParallel runs f(0..n-1) on workers goroutines and returns the first
// error.
func churnParallel(n, workers int, f func(i int) error) error {
	var (
		next    atomic.Int64
		wg      sync.WaitGroup
		mu      sync.Mutex
		firstEr error
	)
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					mu.Lock()
					if firstEr == nil {
						firstEr = fmt.Errorf("%d: %w", i, err)
					}
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	return firstEr
}
