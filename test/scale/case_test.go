package scale

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/uuid"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/testenv"
)

const (
	// firstPort..firstPort+maxRules-1 are the rules' frontend ports: below
	// the ephemeral range (32768 up), so no client socket of the API
	// server, etcd or the manager holds one.
	firstPort = 20000
	maxRules  = 12000
	// rulesPerFrontend: a frontend EndpointSlice holds at most 100 ports.
	rulesPerFrontend = 50
	backendPort      = 8080
	// workers is how many requests the benchmark has in flight while it
	// writes objects.
	workers = 32
	// changes is how many single EndpointSlice changes are timed: half
	// remove the endpoint a client's table picks, half put it back.
	changes       = 100
	changeTimeout = time.Minute
	// whereClient is the client address whose pick the changes move.
	whereClient = "198.51.100.7"
)

// readyTimeout bounds the wait for every rule to be Ready: generous, so that
// a slow build reports its time rather than failing.
func readyTimeout(rules int) time.Duration {
	return 3*time.Minute + time.Duration(rules)*120*time.Millisecond
}

// benchScale is one case: rules × endpoints, one stickylb process.
func benchScale(b *testing.B, s size) {
	ctx := context.Background()
	ns := "scale-" + s.String()
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		b.Fatal(err)
	}
	name := func(i int) string { return fmt.Sprintf("r%05d", i) }
	b.Cleanup(func() { deleteAll(b, ns) })

	// The backends exist first, as in a cluster that adopts stickylb.
	start := time.Now()
	slicesByRule := make([]*discoveryv1.EndpointSlice, s.rules)
	if err := parallel(s.rules, workers, func(i int) error {
		es, err := createBackend(ctx, ns, name(i), i, s.endpoints)
		slicesByRule[i] = es
		return err
	}); err != nil {
		b.Fatal(err)
	}
	b.Logf("%s: created %d Services and EndpointSlices (%d endpoints) in %.1f s", s, s.rules, s.rules*s.endpoints, time.Since(start).Seconds())

	p := startStickylb(b)
	start = time.Now()
	p.waitReady(b, 5*time.Minute)
	b.Logf("stickylb ready (caches synced) %.1f s after its start", time.Since(p.started).Seconds())
	time.Sleep(3 * time.Second)
	before := p.measure(b)
	before.live = p.liveHeap(b, "")

	// Count Ready rules from a watch of our own, not by listing them.
	ready := watchReady(b, ns, s.rules)
	var allReady, created time.Duration
	for b.Loop() {
		start := time.Now()
		if err := parallel(s.rules, workers, func(i int) error {
			return k8s.Create(ctx, newRule(ns, name(i), i))
		}); err != nil {
			b.Fatal(err)
		}
		created = time.Since(start)
		select {
		case <-ready.all:
			allReady = ready.at().Sub(start)
		case <-time.After(readyTimeout(s.rules) - created):
			b.Fatalf("%d of %d rules Ready after %s; the others: %v", ready.count(), s.rules, time.Since(start).Round(time.Second), ready.why())
		case <-p.exited:
			b.Fatalf("stickylb exited: %v\n%s", p.cmd.ProcessState, p.tail(40))
		}
		if b.N > 1 {
			b.Fatal("one iteration only: run with -benchtime=1x")
		}
	}
	b.Logf("created %d rules in %.1f s; all Ready %.1f s after the first was created", s.rules, created.Seconds(), allReady.Seconds())
	after := p.measure(b)
	time.Sleep(5 * time.Second)
	settled := p.measure(b)
	profile := ""
	if *profFlag != "" {
		profile = filepath.Join(*profFlag, s.String()+"-heap.pb.gz")
	}
	settled.live = p.liveHeap(b, profile)

	lat := timeChanges(b, p, ns, name, slicesByRule, s.rules)

	b.ReportMetric(allReady.Seconds(), "all-ready-s")
	b.ReportMetric(created.Seconds(), "create-s")
	b.ReportMetric(mib(after.rss), "rss-MiB")
	b.ReportMetric(mib(settled.hwm), "peak-MiB")
	b.ReportMetric(mib(after.heap), "heap-MiB")
	b.ReportMetric(mib(before.rss), "rss-before-MiB")
	b.ReportMetric(mib(settled.live), "live-MiB")
	b.ReportMetric(mib(before.live), "live-before-MiB")
	n := float64(s.rules)
	b.ReportMetric(float64(settled.live-min(settled.live, before.live))/1024/n, "live-KiB/rule")
	b.ReportMetric(float64(settled.rss-min(settled.rss, before.rss))/1024/n, "rss-KiB/rule")
	b.ReportMetric(float64(settled.heap-min(settled.heap, before.heap))/1024/n, "heap-KiB/rule")
	b.ReportMetric(float64(settled.series-before.series)/n, "series/rule")
	b.ReportMetric(float64(settled.fds-before.fds)/n, "fds/rule")
	if len(lat) > 0 {
		b.ReportMetric(ms(percentile(lat, 50)), "p50-ms")
		b.ReportMetric(ms(percentile(lat, 99)), "p99-ms")
	}

	b.Logf("stickylb memory: before the rules RSS %.0f MiB, heap in use %.0f MiB, %.0f MiB after a GC (Services and EndpointSlices cached); all Ready: RSS %.0f MiB, heap %.0f MiB; 5 s later: RSS %.0f MiB, heap %.0f MiB, %.0f MiB after a GC; peak RSS %.0f MiB",
		mib(before.rss), mib(before.heap), mib(before.live), mib(after.rss), mib(after.heap), mib(settled.rss), mib(settled.heap), mib(settled.live), mib(settled.hwm))
	b.Logf("per rule (5 s later minus before the rules, / %d): RSS %.1f KiB, heap %.1f KiB (%.1f KiB after a GC), %.2f metric series, %.2f fds (%.2f sockets)",
		s.rules, float64(settled.rss-min(settled.rss, before.rss))/1024/n, float64(settled.heap-min(settled.heap, before.heap))/1024/n,
		float64(settled.live-min(settled.live, before.live))/1024/n,
		float64(settled.series-before.series)/n, float64(settled.fds-before.fds)/n, float64(settled.sockets-before.sockets)/n)
	b.Logf("metric series with a rule label, by family: %s", settled.byFamily())
	b.Logf("scrape: %d series, %.1f MiB of text before the rules; %d series, %.1f MiB after",
		before.series, mib(uint64(before.scrapeBytes)), settled.series, mib(uint64(settled.scrapeBytes)))
	if len(lat) > 0 {
		b.Logf("%d EndpointSlice changes at %s: min %.1f ms, p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms", len(lat), s,
			ms(lat[0]), ms(percentile(lat, 50)), ms(percentile(lat, 90)), ms(percentile(lat, 99)), ms(lat[len(lat)-1]))
	}
}

// ---- objects ----

// backendIP is endpoint j of rule i: distinct across rules (no two pools
// are the same), in 10.20.0.0/12, away from the service and netns ranges.
func backendIP(i, j, perRule int) string {
	k := i*perRule + j
	return fmt.Sprintf("10.%d.%d.%d", 20+k/62500, 1+k/250%250, 1+k%250)
}

// createBackend creates rule i's Service and its EndpointSlice as a cluster
// has them: the Service applied with kubectl (so it carries the
// last-applied annotation), the slice written by the EndpointSlice
// controller (owner reference, managed-by label, trigger-time annotation,
// and per endpoint its pod, node and zone).
func createBackend(ctx context.Context, ns, name string, i, endpoints int) (*discoveryv1.EndpointSlice, error) {
	svc := &corev1.Service{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Service"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": name, "tier": "backend"}},
		Spec: corev1.ServiceSpec{
			// Headless: 10,000 cluster IPs are not the point here.
			ClusterIP: corev1.ClusterIPNone,
			Selector:  map[string]string{"app": name},
			Ports:     []corev1.ServicePort{{Name: "http", Port: backendPort, TargetPort: intstr.FromInt32(backendPort), Protocol: corev1.ProtocolTCP}},
		},
	}
	applied, err := json.Marshal(svc)
	if err != nil {
		return nil, err
	}
	svc.Annotations = map[string]string{"kubectl.kubernetes.io/last-applied-configuration": string(applied) + "\n"}
	if err := k8s.Create(ctx, svc); err != nil {
		return nil, err
	}
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns, Name: name + "-x7k2q",
			Labels: map[string]string{
				discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: "endpointslice-controller.k8s.io",
				"app": name, "tier": "backend", "service.kubernetes.io/headless": "",
			},
			Annotations: map[string]string{"endpoints.kubernetes.io/last-change-trigger-time": time.Now().UTC().Format(time.RFC3339)},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Service", Name: name, UID: svc.UID,
				Controller: ptr.To(true), BlockOwnerDeletion: ptr.To(true)}},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](backendPort), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for j := range endpoints {
		es.Endpoints = append(es.Endpoints, endpoint(ns, name, backendIP(i, j, endpoints), j))
	}
	if err := k8s.Create(ctx, es); err != nil {
		return nil, err
	}
	return es, nil
}

func endpoint(ns, svc, ip string, j int) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{ip},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
		TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: fmt.Sprintf("%s-6d8f9c7b5d-%05d", svc, j),
			UID: types.UID(uuid.NewUUID())},
		NodeName: ptr.To(fmt.Sprintf("node-%03d", j%50)),
		Zone:     ptr.To([]string{"zone-a", "zone-b", "zone-c"}[j%3]),
	}
}

func newRule(ns, name string, i int) *lbv1alpha1.LoadBalancerRule {
	return &lbv1alpha1.LoadBalancerRule{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: lbv1alpha1.LoadBalancerRuleSpec{
			Frontend:    lbv1alpha1.Frontend{Name: fmt.Sprintf("f%03d", i/rulesPerFrontend), Port: lbv1alpha1.PortNumber(firstPort + i)},
			BackendPool: lbv1alpha1.BackendPool{ServiceName: name},
			BackendPort: backendPort,
			// What stickylb is for; and the where endpoint answers only
			// for rules that pin a client to one backend.
			SessionPersistence: lbv1alpha1.SessionPersistenceClientIP,
		},
	}
}

// deleteAll deletes the case's objects, one collection call per kind: a
// namespace is never emptied without kube-controller-manager.
func deleteAll(b *testing.B, ns string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for _, o := range []client.Object{&lbv1alpha1.LoadBalancerRule{}, &discoveryv1.EndpointSlice{}, &corev1.Service{}} {
		if err := k8s.DeleteAllOf(ctx, o, client.InNamespace(ns)); err != nil {
			b.Logf("cleanup: delete %T in %s: %v", o, ns, err)
		}
	}
}

// parallel runs f(0..n-1) on w goroutines and returns the first error.
func parallel(n, w int, f func(i int) error) error {
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for range w {
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

// ---- Ready, from a watch ----

type readyWatch struct {
	n   int
	all chan struct{}

	mu      sync.Mutex
	ready   map[string]bool
	reasons map[string]string
	allAt   time.Time
}

// watchReady watches the namespace's rules and closes all once n of them
// are Ready at their generation.
func watchReady(b *testing.B, ns string, n int) *readyWatch {
	w := &readyWatch{n: n, all: make(chan struct{}), ready: map[string]bool{}, reasons: map[string]string{}}
	c, err := cache.New(restConfig, cache.Options{Scheme: scheme, DefaultNamespaces: map[string]cache.Config{ns: {}},
		DefaultTransform: cache.TransformStripManagedFields()})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	inf, err := c.GetInformer(ctx, &lbv1alpha1.LoadBalancerRule{})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { w.seen(o) },
		UpdateFunc: func(_, o any) { w.seen(o) },
	}); err != nil {
		b.Fatal(err)
	}
	go func() { _ = c.Start(ctx) }()
	if !c.WaitForCacheSync(ctx) {
		b.Fatal("the benchmark's rule cache never synced")
	}
	return w
}

func (w *readyWatch) seen(o any) {
	r, ok := o.(*lbv1alpha1.LoadBalancerRule)
	if !ok {
		return
	}
	c := meta.FindStatusCondition(r.Status.Conditions, string(lbv1alpha1.ConditionReady))
	ok = c != nil && c.Status == metav1.ConditionTrue && c.ObservedGeneration == r.Generation
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ready[r.Name] = ok
	switch {
	case c == nil:
		w.reasons[r.Name] = "no Ready condition"
	case c.ObservedGeneration != r.Generation:
		w.reasons[r.Name] = "Ready of an older generation"
	default:
		w.reasons[r.Name] = c.Reason
	}
	if ok && w.allAt.IsZero() && w.countLocked() == w.n {
		w.allAt = time.Now()
		close(w.all)
	}
}

func (w *readyWatch) countLocked() int {
	n := 0
	for _, ok := range w.ready {
		if ok {
			n++
		}
	}
	return n
}

func (w *readyWatch) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.countLocked()
}

func (w *readyWatch) at() time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.allAt
}

func (w *readyWatch) why() map[string]int {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := map[string]int{"not seen yet": w.n - len(w.ready)}
	for name, ok := range w.ready {
		if !ok {
			out[w.reasons[name]]++
		}
	}
	return out
}

// ---- the stickylb process ----

type process struct {
	cmd     *exec.Cmd
	started time.Time
	metrics string
	health  string
	debug   string
	pprof   string
	logPath string
	exited  chan struct{}
	http    *http.Client
}

// startStickylb runs the binary as the manager and dataplane of a local
// install (no POD_NAMESPACE), serving on 127.0.0.1; its log goes to a file.
func startStickylb(b *testing.B) *process {
	p := &process{metrics: testenv.FreeAddr(b), health: testenv.FreeAddr(b), debug: testenv.FreeAddr(b), pprof: testenv.FreeAddr(b),
		logPath: filepath.Join(workDir, "stickylb-"+strings.ReplaceAll(b.Name(), "/", "_")+".log"),
		exited:  make(chan struct{}), http: &http.Client{Timeout: 30 * time.Second}}
	logf, err := os.Create(p.logPath)
	if err != nil {
		b.Fatal(err)
	}
	p.cmd = exec.Command(stickylb,
		"--kubeconfig", kubeconfig,
		"--dataplane-bind-address", "127.0.0.1",
		"--metrics-bind-address", p.metrics,
		"--health-probe-bind-address", p.health,
		"--debug-bind-address", p.debug,
		"--pprof-bind-address", p.pprof,
		"--leader-elect", "--leader-election-namespace", "default",
		"--drain-timeout", "2s")
	p.cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "POD_NAMESPACE=") || strings.HasPrefix(kv, "POD_IP=") || strings.HasPrefix(kv, "KUBECONFIG=") ||
			strings.HasPrefix(kv, "GOMEMLIMIT=") || strings.HasPrefix(kv, "GOGC=")
	})
	if *memLimitFlag != "" {
		p.cmd.Env = append(p.cmd.Env, "GOMEMLIMIT="+*memLimitFlag)
	}
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	p.started = time.Now()
	go func() { _ = p.cmd.Wait(); logf.Close(); close(p.exited) }()
	b.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(30 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		if b.Failed() {
			b.Logf("stickylb logged (last 60 lines):\n%s", p.tail(60))
		}
	})
	return p
}

func (p *process) waitReady(b *testing.B, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-p.exited:
			b.Fatalf("stickylb exited: %v\n%s", p.cmd.ProcessState, p.tail(40))
		default:
		}
		if resp, err := p.http.Get("http://" + p.health + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.Fatalf("stickylb not ready after %s\n%s", timeout, p.tail(40))
}

func (p *process) tail(n int) string {
	raw, _ := os.ReadFile(p.logPath)
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// liveHeap has the process collect its garbage (asking for a heap profile
// after a GC), then reads its heap in use: what is live, and what it
// fragments. It writes the profile to path, if any.
func (p *process) liveHeap(b *testing.B, path string) uint64 {
	resp, err := p.http.Get("http://" + p.pprof + "/debug/pprof/heap?gc=1")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("%s: %s", resp.Status, raw)
	}
	if err == nil && path != "" {
		err = os.WriteFile(path, raw, 0o644)
	}
	if err != nil {
		b.Fatalf("heap profile: %v", err)
	}
	if path != "" {
		b.Logf("heap profile: %s", path)
	}
	return p.measure(b).heap
}

// where asks the process's where endpoint for the client's first backend.
func (p *process) where(rule string) (string, error) {
	resp, err := p.http.Get("http://" + p.debug + "/where?" + url.Values{"rule": {rule}, "client": {whereClient}}.Encode())
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var a struct {
		Backends []string `json:"backends"`
		Error    string   `json:"error"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&a); err != nil {
		return "", err
	}
	if a.Error != "" {
		return "", fmt.Errorf("%s", a.Error)
	}
	if len(a.Backends) == 0 {
		return "", nil
	}
	return a.Backends[0], nil
}

// ---- slice → dataplane ----

// timeChanges times single EndpointSlice changes on rules spread over the
// case: for each, the endpoint the where endpoint names for whereClient is
// removed (timed until the dataplane picks another), then put back (timed
// until it picks it again: the table depends only on the pool).
func timeChanges(b *testing.B, p *process, ns string, name func(int) string, bySlice []*discoveryv1.EndpointSlice, rules int) []time.Duration {
	ctx := context.Background()
	var lat []time.Duration
	for k := range changes / 2 {
		i := k * rules / (changes / 2)
		key := ns + "/" + name(i)
		es := bySlice[i]
		first, err := p.where(key)
		if err != nil || first == "" {
			b.Fatalf("where %s: %q, %v", key, first, err)
		}
		ip, _, _ := strings.Cut(first, ":")
		j := slices.IndexFunc(es.Endpoints, func(e discoveryv1.Endpoint) bool { return e.Addresses[0] == ip })
		if j < 0 {
			b.Fatalf("where %s names %s, which is not in its EndpointSlice", key, first)
		}
		removed := es.Endpoints[j]
		es.Endpoints = slices.Delete(es.Endpoints, j, j+1)
		lat = append(lat, change(b, p, ctx, es, key, func(got string) bool { return got != "" && got != first }))
		es.Endpoints = slices.Insert(es.Endpoints, j, removed)
		lat = append(lat, change(b, p, ctx, es, key, func(got string) bool { return got == first }))
	}
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	return lat
}

func change(b *testing.B, p *process, ctx context.Context, es *discoveryv1.EndpointSlice, key string, done func(string) bool) time.Duration {
	start := time.Now()
	if err := k8s.Update(ctx, es); err != nil {
		b.Fatalf("update %s: %v", es.Name, err)
	}
	var got string
	var err error
	for time.Since(start) < changeTimeout {
		if got, err = p.where(key); err == nil && done(got) {
			return time.Since(start)
		}
		time.Sleep(time.Millisecond)
	}
	b.Fatalf("%s: after %s the dataplane still answers %q (%v)", key, changeTimeout, got, err)
	return 0
}

func percentile(sorted []time.Duration, pct int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := (len(sorted)*pct + 99) / 100
	return sorted[max(i, 1)-1]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func mib(n uint64) float64 { return float64(n) / (1 << 20) }
