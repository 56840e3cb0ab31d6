package controllers

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/netns"
)

// The controller targets, measured against the suite's real manager
// and API server. Run them with `make bench`, or:
//
//	KUBEBUILDER_ASSETS=$(hack/test-binaries.sh | tail -1) \
//		go test -run=NONE -bench='EndpointSliceToDataplane|ThousandRulesReady' -benchtime=1x ./controllers/

const (
	// changesPerLoop is how many EndpointSlice changes one b.Loop iteration makes.
	changesPerLoop = 100
	// pollEvery is how often the proxy is asked whether it switched tables.
	pollEvery = 200 * time.Microsecond
	// changeTimeout fails a change the dataplane never picks up.
	changeTimeout = 10 * time.Second
)

// BenchmarkEndpointSliceToDataplane measures how long an EndpointSlice change
// written to the API server takes to reach the proxy: one rule over a Service
// of ~10 ready endpoints, 100 changes per iteration alternately adding a new
// endpoint and removing a random one, each timed from just before the Update
// until the proxy's pool (the one its Maglev table is built from) has the new
// number of healthy backends. The rule has no probe, so every ready endpoint
// counts as healthy and the backends need not run. ns/op is the time of 100
// changes; p50-ms and p99-ms are per change. Target: p99 < 200 ms.
func BenchmarkEndpointSliceToDataplane(b *testing.B) {
	quietControllerRuntime()
	ctx := context.Background()
	ns := benchNamespace(b, "bench-eps")
	const base = 10
	// Addresses well away from BenchmarkThousandRulesReady's.
	next := 60000
	addr := func() string { next++; return netns.BackendIP(next - 1).String() }
	var addrs []string
	for range base {
		addrs = append(addrs, addr())
	}
	slice, err := benchBackend(ctx, ns, "web", nil, addrs)
	if err != nil {
		b.Fatal(err)
	}
	rule := newRule(ns, "web", "web", freePortTB(b), "web")
	if err := k8s.Create(ctx, rule); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		deleteIgnoringNotFound(cctx, b, rule)
		waitUnserved(cctx, b, []string{ns + "/web"})
		deleteIgnoringNotFound(cctx, b, slice)
		deleteIgnoringNotFound(cctx, b, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "web"}})
	})
	key := ns + "/web"
	if _, err := waitHealthy(key, base, time.Now(), 30*time.Second); err != nil {
		b.Fatalf("the rule never got its first %d backends: %v", base, err)
	}

	rnd := rand.New(rand.NewPCG(1, 2))
	var lat []time.Duration
	for b.Loop() {
		for i := range changesPerLoop {
			if len(slice.Endpoints) <= base {
				slice.Endpoints = append(slice.Endpoints, readyEndpoint(addr()))
			} else {
				j := rnd.IntN(len(slice.Endpoints))
				slice.Endpoints = slices.Delete(slice.Endpoints, j, j+1)
			}
			want := len(slice.Endpoints)
			start := time.Now()
			if err := k8s.Update(ctx, slice); err != nil {
				b.Fatalf("change %d: %v", i, err)
			}
			d, err := waitHealthy(key, want, start, changeTimeout)
			if err != nil {
				b.Fatalf("change %d (%d endpoints): %v", i, want, err)
			}
			lat = append(lat, d)
		}
	}
	slices.Sort(lat)
	b.ReportMetric(ms(percentile(lat, 50)), "p50-ms")
	b.ReportMetric(ms(percentile(lat, 99)), "p99-ms")
	b.Logf("%d changes: min %.2f ms, p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms", len(lat),
		ms(lat[0]), ms(percentile(lat, 50)), ms(percentile(lat, 90)), ms(percentile(lat, 99)), ms(lat[len(lat)-1]))
}

const (
	thousandRules = 1000
	// rulesFirstPort..+999 is below the ephemeral port range (32768 up), so no
	// client socket of the API server, etcd or the manager can hold one.
	rulesFirstPort = 30000
	// endpointsPerRule is the size of every rule's backend Service.
	endpointsPerRule = 20
	// rulesPerFrontend: every frontend Service takes a cluster IP and envtest's
	// service CIDR is a /24, so 1,000 rules cannot have 1,000 frontends; an
	// EndpointSlice holds at most 100 ports, so one frontend cannot take them
	// all either. 20 frontends of 50 rules each.
	rulesPerFrontend = 50
	allReadyTimeout  = 3 * time.Minute
)

// BenchmarkThousandRulesReady creates 1,000 rules, each on its own port of
// 127.0.0.1 and over its own (headless) Service of 20 ready endpoints, and
// measures the time from the first rule's creation until all 1,000 report
// Ready=True at their generation (the Services and EndpointSlices exist
// beforehand). Then, after a GC, it reads the test process's RSS and Go heap
// in use: the manager and the proxy run in this process; kube-apiserver and
// etcd are separate processes and are not counted. Targets: all Ready within
// 60 s, RSS under 300 MiB. The rules and Services are deleted at the end.
func BenchmarkThousandRulesReady(b *testing.B) {
	quietControllerRuntime()
	ctx := context.Background()
	for p := rulesFirstPort; p < rulesFirstPort+thousandRules; p++ {
		if err := portFree(p); err != nil {
			b.Fatalf("ports %d-%d must be free on 127.0.0.1: %v", rulesFirstPort, rulesFirstPort+thousandRules-1, err)
		}
	}
	ns := benchNamespace(b, "bench-1k")
	name := func(i int) string { return fmt.Sprintf("r%04d", i) }
	backendLabels := map[string]string{"stickylb-bench": "backend"}
	b.Cleanup(func() { cleanupThousand(b, ns, name, backendLabels) })

	// The backends exist first; the clock measures the rules.
	if err := parallel(thousandRules, 8, func(i int) error {
		addrs := make([]string, endpointsPerRule)
		for j := range addrs {
			addrs[j] = netns.BackendIP(i*endpointsPerRule + j).String()
		}
		_, err := benchBackend(ctx, ns, name(i), backendLabels, addrs)
		return err
	}); err != nil {
		b.Fatal(err)
	}
	heap0, rss0 := memory()
	stats0 := reconcileStats()

	var elapsed time.Duration
	for b.Loop() {
		start := time.Now()
		if err := parallel(thousandRules, 8, func(i int) error {
			return k8s.Create(ctx, newRule(ns, name(i), fmt.Sprintf("f%02d", i/rulesPerFrontend), int32(rulesFirstPort+i), name(i)))
		}); err != nil {
			b.Fatal(err)
		}
		created := time.Since(start)
		for {
			ready, why, err := countReady(ctx, ns)
			if err == nil && ready == thousandRules {
				break
			}
			if time.Since(start) > allReadyTimeout {
				b.Fatalf("%d of %d rules Ready after %s (list error %v); the others: %v", ready, thousandRules, allReadyTimeout, err, why)
			}
			time.Sleep(200 * time.Millisecond)
		}
		elapsed = time.Since(start)
		b.Logf("created 1,000 rules in %.2f s; all Ready after %.2f s", created.Seconds(), elapsed.Seconds())
		for name, s := range reconcileStats() {
			s0 := stats0[name]
			b.Logf("  controller %s: %d reconciles (%d errors), %.2f s reconciling", name,
				s.count-s0.count, s.errors-s0.errors, s.seconds-s0.seconds)
		}
		if b.N > 1 {
			b.Fatal("one iteration only: run with -benchtime=1x")
		}
	}
	heap, rss := memory()
	b.ReportMetric(elapsed.Seconds(), "all-ready-s")
	b.ReportMetric(mib(rss), "rss-MiB")
	b.ReportMetric(mib(heap), "heap-MiB")
	b.Logf("RSS %.0f MiB (%.0f before the rules, peak %.0f), heap in use %.0f MiB (%.0f before); the test process only: manager, proxy, test client",
		mib(rss), mib(rss0), mib(vmStatus("VmHWM")), mib(heap), mib(heap0))
	// The controllers may still be busy when the last rule turns Ready, and
	// what they allocate during a GC counts as in use: show the settled figures too.
	time.Sleep(5 * time.Second)
	heap, rss = memory()
	b.Logf("5 s later: RSS %.0f MiB, heap in use %.0f MiB", mib(rss), mib(heap))
}

type reconcileStat struct {
	count, errors uint64
	seconds       float64
}

// reconcileStats reads controller-runtime's reconcile metrics, by controller.
func reconcileStats() map[string]reconcileStat {
	out := map[string]reconcileStat{}
	families, err := ctrlmetrics.Registry.Gather()
	if err != nil {
		return out
	}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			var name string
			for _, l := range m.GetLabel() {
				if l.GetName() == "controller" {
					name = l.GetValue()
				}
			}
			s := out[name]
			switch f.GetName() {
			case "controller_runtime_reconcile_errors_total":
				s.errors += uint64(m.GetCounter().GetValue())
			case "controller_runtime_reconcile_time_seconds":
				s.count += m.GetHistogram().GetSampleCount()
				s.seconds += m.GetHistogram().GetSampleSum()
			default:
				continue
			}
			out[name] = s
		}
	}
	return out
}

// quietControllerRuntime sets controller-runtime's logger to the one the
// suite implies (none), so that a run longer than 30 s does not print its
// "log.SetLogger(...) was never called" stack trace into the results.
func quietControllerRuntime() { ctrllog.SetLogger(logr.Discard()) }

// cleanupThousand deletes the benchmark's rules, waits until the proxy no
// longer serves them (their listeners are closed), then deletes the backends.
func cleanupThousand(b *testing.B, ns string, name func(int) string, backendLabels map[string]string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	if err := k8s.DeleteAllOf(ctx, &lbv1alpha1.LoadBalancerRule{}, client.InNamespace(ns)); err != nil {
		b.Errorf("cleanup: delete rules: %v", err)
	}
	keys := make([]string, thousandRules)
	for i := range keys {
		keys[i] = ns + "/" + name(i)
	}
	waitUnserved(ctx, b, keys)
	b.Logf("cleanup: the proxy stopped serving the deleted rules after %.2f s", time.Since(start).Seconds())
	if err := k8s.DeleteAllOf(ctx, &discoveryv1.EndpointSlice{}, client.InNamespace(ns), client.MatchingLabels(backendLabels)); err != nil {
		b.Errorf("cleanup: delete EndpointSlices: %v", err)
	}
	_ = parallel(thousandRules, 8, func(i int) error {
		deleteIgnoringNotFound(ctx, b, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name(i)}})
		return nil
	})
}

// countReady counts the namespace's rules that are Ready at their
// generation, and tallies the others' Ready reasons.
func countReady(ctx context.Context, ns string) (int, map[string]int, error) {
	var list lbv1alpha1.LoadBalancerRuleList
	if err := k8s.List(ctx, &list, client.InNamespace(ns)); err != nil {
		return 0, nil, err
	}
	ready, why := 0, map[string]int{}
	for i := range list.Items {
		r := &list.Items[i]
		c := meta.FindStatusCondition(r.Status.Conditions, string(lbv1alpha1.ConditionReady))
		switch {
		case c == nil:
			why["no Ready condition"]++
		case c.ObservedGeneration != r.Generation:
			why["Ready of an older generation"]++
		case c.Status != metav1.ConditionTrue:
			why[c.Reason]++
		default:
			ready++
		}
	}
	if n := len(list.Items); n < thousandRules {
		why["not created yet"] += thousandRules - n
	}
	return ready, why, nil
}

// waitHealthy polls the proxy every pollEvery until the rule's pool has want
// healthy backends, and returns the time since start.
func waitHealthy(rule string, want int, start time.Time, timeout time.Duration) (time.Duration, error) {
	for {
		h, ok := dpProxy.Healthy(rule)
		if ok && h == want {
			return time.Since(start), nil
		}
		if d := time.Since(start); d > timeout {
			return d, fmt.Errorf("after %s the proxy serves %v with %d healthy backends, want %d", timeout, ok, h, want)
		}
		time.Sleep(pollEvery)
	}
}

// waitUnserved waits until the proxy serves none of the rules.
func waitUnserved(ctx context.Context, b *testing.B, rules []string) {
	for {
		left := 0
		for _, r := range rules {
			if _, ok := dpProxy.Healthy(r); ok {
				left++
			}
		}
		if left == 0 {
			return
		}
		select {
		case <-ctx.Done():
			b.Errorf("cleanup: the proxy still serves %d of %d deleted rules", left, len(rules))
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func benchNamespace(b *testing.B, prefix string) string {
	b.Helper()
	name := fmt.Sprintf("%s-%d", prefix, nsCounter.Add(1))
	if err := k8s.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		b.Fatal(err)
	}
	return name
}

// benchBackend creates a headless Service (it takes no cluster IP: envtest
// has 254) and one EndpointSlice of ready endpoints at addrs.
func benchBackend(ctx context.Context, ns, name string, labels map[string]string, addrs []string) (*discoveryv1.EndpointSlice, error) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone,
			Ports: []corev1.ServicePort{{Port: 9401, Protocol: corev1.ProtocolTCP}}},
	}
	if err := k8s.Create(ctx, svc); err != nil {
		return nil, err
	}
	sliceLabels := map[string]string{discoveryv1.LabelServiceName: name}
	for k, v := range labels {
		sliceLabels[k] = v
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name + "-1", Labels: sliceLabels},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To[int32](9401), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for _, a := range addrs {
		slice.Endpoints = append(slice.Endpoints, readyEndpoint(a))
	}
	if err := k8s.Create(ctx, slice); err != nil {
		return nil, err
	}
	return slice, nil
}

func readyEndpoint(addr string) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}
}

func deleteIgnoringNotFound(ctx context.Context, b testing.TB, o client.Object) {
	if err := k8s.Delete(ctx, o); err != nil && !apierrors.IsNotFound(err) {
		b.Errorf("cleanup: delete %s/%s: %v", o.GetNamespace(), o.GetName(), err)
	}
}

// parallel runs f(0..n-1) on workers goroutines and returns the first error.
func parallel(n, workers int, f func(i int) error) error {
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					errOnce.Do(func() { firstErr = err })
					return
				}
			}
		})
	}
	wg.Wait()
	return firstErr
}

// freePortTB is freePort for benchmarks.
func freePortTB(b testing.TB) int32 {
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if portFree(port) == nil {
			return int32(port)
		}
	}
	b.Fatal("no free port")
	return 0
}

// portFree checks that port is free for TCP and UDP on 127.0.0.1.
func portFree(port int) error {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	l.Close()
	u, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	return u.Close()
}

// memory returns the Go heap in use and the process's RSS, after a GC.
func memory() (heapInuse, rss uint64) {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse, vmStatus("VmRSS")
}

// vmStatus reads a field of /proc/self/status, in bytes (0 when unknown).
func vmStatus(field string) uint64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		v, ok := strings.CutPrefix(s.Text(), field+":")
		if !ok {
			continue
		}
		kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return 0
		}
		return kb << 10
	}
	return 0
}

// percentile is the nearest-rank p-th percentile of sorted durations.
func percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := (len(sorted)*p + 99) / 100
	return sorted[max(i, 1)-1]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func mib(n uint64) float64 { return float64(n) / (1 << 20) }
