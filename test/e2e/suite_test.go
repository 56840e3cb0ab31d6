// Package e2e tests the whole system: a real kube-apiserver and etcd, the
// real stickylb binary run as separate processes, the real kubectl, and real
// TCP traffic from many client addresses to backends named in
// EndpointSlices.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
	"github.com/stickylb/stickylb/internal/testenv"
)

// leaseName is the leader-election Lease stickylb uses by default.
const leaseName = "stickylb.lb.stickylb.io"

var (
	k8s        client.Client
	kubeconfig string // admin kubeconfig file, for kubectl and stickylb
	kubectlBin string
	stickylb   string // the binary under test
	workDir    string
)

func TestMain(m *testing.M) {
	// EndpointSlices may not list loopback addresses: backends live on
	// 10.1.0.0/16 inside a network namespace of the suite's own, and every
	// process (API server, etcd, stickylb, kubectl) runs in it as a child.
	netns.Enter()
	os.Exit(run(m))
}

func run(m *testing.M) int {
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is not set: run the e2e tests with `make test` (or KUBEBUILDER_ASSETS=$(make assets))")
		return 1
	}
	kubectlBin = filepath.Join(assets, "kubectl")
	var err error
	if workDir, err = os.MkdirTemp("", "stickylb-e2e"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(workDir)

	// Build the binary while the control plane starts.
	stickylb = filepath.Join(workDir, "stickylb")
	built := make(chan error, 1)
	go func() {
		cmd := exec.Command("go", "build", "-o", stickylb, "github.com/stickylb/stickylb")
		cmd.Dir = filepath.Join("..", "..")
		if out, err := cmd.CombinedOutput(); err != nil {
			built <- fmt.Errorf("go build: %v\n%s", err, out)
			return
		}
		built <- nil
	}()

	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(lbv1alpha1.AddToScheme(scheme))
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	netns.ConfigureAPIServer(env)
	if _, err := testenv.Start(env); err != nil {
		fmt.Fprintln(os.Stderr, "start envtest:", err)
		return 1
	}
	defer func() { _ = env.Stop() }()

	kc, adminConfig, err := testenv.AdminKubeconfig(env, "e2e", workDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "admin kubeconfig:", err)
		return 1
	}
	kubeconfig = kc
	if k8s, err = client.New(adminConfig, client.Options{Scheme: scheme}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := <-built; err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

// ---- stickylb processes ----

// process is one stickylb manager run as a child process.
type process struct {
	bind    string
	cmd     *exec.Cmd
	metrics string // host:port of /metrics
	health  string // host:port of /readyz
	logs    *testenv.Output
	exited  chan struct{}
}

// startStickylb runs `stickylb` in local mode (no POD_NAMESPACE) serving on
// bind, and waits until it answers /readyz. The test's cleanup stops it
// (SIGTERM, then SIGKILL) and waits for it to exit, so no process outlives
// its test to serve the next test's ports.
func startStickylb(t *testing.T, bind string) *process {
	t.Helper()
	return startStickylbWith(t, bind, nil, "--leader-elect", "--leader-election-namespace", "default", "--drain-timeout", "2s")
}

// startStickylbWith runs `stickylb` serving on bind with env added to the
// test's environment (POD_NAMESPACE makes it run as in a cluster) and args.
func startStickylbWith(t *testing.T, bind string, env []string, args ...string) *process {
	t.Helper()
	p := &process{bind: bind, metrics: testenv.FreeAddr(t), health: testenv.FreeAddr(t), logs: &testenv.Output{}, exited: make(chan struct{})}
	p.cmd = exec.Command(stickylb, append([]string{
		"--kubeconfig", kubeconfig,
		"--dataplane-bind-address", bind,
		"--metrics-bind-address", p.metrics,
		"--health-probe-bind-address", p.health,
	}, args...)...)
	p.cmd.Env = append(slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "POD_NAMESPACE=") || strings.HasPrefix(kv, "POD_IP=") || strings.HasPrefix(kv, "KUBECONFIG=")
	}), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		p.stop(t)
		if t.Failed() {
			t.Logf("stickylb on %s logged (last 150 lines):\n%s", bind, tail(p.logs, 150))
		}
	})
	testbackend.Eventually(t, 30*time.Second, "stickylb on "+bind+" answers /readyz", func() bool {
		if p.hasExited() {
			t.Fatalf("stickylb on %s exited: %v\n%s", bind, p.cmd.ProcessState, tail(p.logs, 50))
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

func (p *process) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// stop ends the process gracefully (it releases its lease), or kills it
// when it does not exit in time.
func (p *process) stop(t *testing.T) {
	if p.hasExited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		t.Errorf("stickylb on %s did not exit within 15s of SIGTERM; killing it", p.bind)
		p.kill()
	}
}

// kill ends the process with SIGKILL: it cannot release its lease.
func (p *process) kill() {
	_ = p.cmd.Process.Kill()
	<-p.exited
}

var httpClient = &http.Client{Timeout: 3 * time.Second}

// metric returns the value of the first sample of name whose labels contain
// labels ("" for any), and whether there was one.
func (p *process) metric(name, labels string) (float64, bool) {
	resp, err := httpClient.Get("http://" + p.metrics + "/metrics")
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, name)
		if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '{') || !strings.Contains(rest, labels) {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		return v, err == nil
	}
	return 0, false
}

// snapshotVersion is the configuration version the process's dataplane serves.
func (p *process) snapshotVersion(t *testing.T) float64 {
	t.Helper()
	v, ok := p.metric("stickylb_snapshot_version", "")
	if !ok {
		t.Fatalf("stickylb on %s: no stickylb_snapshot_version on /metrics", p.bind)
	}
	return v
}

// waitSnapshotAfter waits until the dataplane serves a snapshot newer than v.
func (p *process) waitSnapshotAfter(t *testing.T, v float64) {
	t.Helper()
	testbackend.Eventually(t, 20*time.Second, fmt.Sprintf("stickylb on %s applies a snapshot after version %v", p.bind, v), func() bool {
		cur, ok := p.metric("stickylb_snapshot_version", "")
		return ok && cur > v
	})
}

// leaderStatus is leader_election_master_status for stickylb's lease: 1 on
// the leader, 0 on a standby, -1 when the gauge is missing.
func (p *process) leaderStatus() float64 {
	v, ok := p.metric("leader_election_master_status", `name="`+leaseName+`"`)
	if !ok {
		return -1
	}
	return v
}

func (p *process) frontend(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr(p.bind), port)
}

// waitServing waits until the process accepts on port and relays to a backend.
func (p *process) waitServing(t *testing.T, port uint16) {
	t.Helper()
	testbackend.Eventually(t, 20*time.Second, fmt.Sprintf("stickylb on %s serves port %d", p.bind, port), func() bool {
		name, c, err := testbackend.BackendOf(testbackend.ClientIP(0), p.frontend(port))
		if err == nil {
			c.Close()
		}
		return err == nil && name != ""
	})
}

// tail is the last n lines of a child's output.
func tail(out *testenv.Output, n int) string {
	lines := strings.Split(strings.TrimRight(out.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ---- kubectl ----

// kubectl runs the real kubectl against the suite's API server.
func kubectl(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	args = append([]string{"--kubeconfig", kubeconfig, "--cache-dir", filepath.Join(workDir, "kubectl-cache")}, args...)
	cmd := exec.Command(kubectlBin, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("kubectl %s: %v: %s%s", strings.Join(args[4:], " "), err, errOut.String(), out.String())
	}
	return out.String(), err
}

func mustKubectl(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	out, err := kubectl(t, stdin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// ruleYAML is a ClientIP rule over the Service pool, for kubectl apply.
func ruleYAML(ns, name string, port uint16, service string, backendPort uint16) string {
	return fmt.Sprintf(`apiVersion: lb.stickylb.io/v1alpha1
kind: LoadBalancerRule
metadata:
  name: %s
  namespace: %s
spec:
  frontend:
    port: %d
  backendPool:
    serviceName: %s
  backendPort: %d
  sessionPersistence: ClientIP
`, name, ns, port, service, backendPort)
}

// applyRule creates the rule with kubectl apply.
func applyRule(t *testing.T, ns, name string, port uint16, service string, backendPort uint16) {
	t.Helper()
	out := mustKubectl(t, ruleYAML(ns, name, port, service, backendPort), "apply", "-f", "-")
	if !strings.Contains(out, "loadbalancerrule.lb.stickylb.io/"+name) {
		t.Fatalf("kubectl apply printed %q", out)
	}
}

// waitReady runs kubectl wait --for=condition=Ready on the rule.
func waitReady(t *testing.T, ns, name string) {
	t.Helper()
	mustKubectl(t, "", "-n", ns, "wait", "--for=condition=Ready", "lbr/"+name, "--timeout=60s")
}

// ---- cluster objects ----

// namespace creates a namespace (fixed names keep the flow hashes, and so
// the pinning, the same from run to run). Its rules are deleted when the
// test ends, so a later stickylb process does not serve them.
func namespace(t *testing.T, name string) string {
	t.Helper()
	ctx := context.Background()
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := k8s.DeleteAllOf(ctx, &lbv1alpha1.LoadBalancerRule{}, client.InNamespace(name)); err != nil {
			t.Errorf("delete the rules of %s: %v", name, err)
		}
	})
	return name
}

// endpoint is one EndpointSlice endpoint.
type endpoint struct {
	addr  netip.Addr
	ready bool
	// terminating: the pod is going away; it still serves (as during a
	// rollout) but takes no new clients.
	terminating bool
}

func readyEndpoints(addrs ...netip.Addr) []endpoint {
	out := make([]endpoint, len(addrs))
	for i, a := range addrs {
		out[i] = endpoint{addr: a, ready: true}
	}
	return out
}

// backendPool is a Service without selector and the EndpointSlice the test
// writes for it, as the EndpointSlice controller would for pods.
type backendPool struct {
	ns, name string
	port     uint16
}

func newBackendPool(t *testing.T, ns, name string, port uint16, eps []endpoint) *backendPool {
	t.Helper()
	ctx := context.Background()
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: int32(port), Protocol: corev1.ProtocolTCP}}}}
	if err := k8s.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name + "-abcde", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To(int32(port)), Protocol: ptr.To(corev1.ProtocolTCP)}},
		Endpoints:   endpointList(eps),
	}
	if err := k8s.Create(ctx, slice); err != nil {
		t.Fatal(err)
	}
	return &backendPool{ns: ns, name: name, port: port}
}

func endpointList(eps []endpoint) []discoveryv1.Endpoint {
	out := []discoveryv1.Endpoint{}
	for _, e := range eps {
		out = append(out, discoveryv1.Endpoint{
			Addresses: []string{e.addr.String()},
			Conditions: discoveryv1.EndpointConditions{
				Ready: ptr.To(e.ready && !e.terminating), Serving: ptr.To(e.ready), Terminating: ptr.To(e.terminating),
			},
		})
	}
	return out
}

// set replaces the slice's endpoints.
func (p *backendPool) set(t *testing.T, eps []endpoint) {
	t.Helper()
	ctx := context.Background()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var slice discoveryv1.EndpointSlice
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: p.ns, Name: p.name + "-abcde"}, &slice); err != nil {
			return err
		}
		slice.Endpoints = endpointList(eps)
		return k8s.Update(ctx, &slice)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// rule reads a rule.
func rule(t *testing.T, ns, name string) *lbv1alpha1.LoadBalancerRule {
	t.Helper()
	var r lbv1alpha1.LoadBalancerRule
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &r); err != nil {
		t.Fatal(err)
	}
	return &r
}

// waitStatus polls the rule until check passes and returns it; on timeout
// it fails with the last status seen.
func waitStatus(t *testing.T, ns, name string, timeout time.Duration, what string, check func(*lbv1alpha1.LoadBalancerRule) bool) *lbv1alpha1.LoadBalancerRule {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var r lbv1alpha1.LoadBalancerRule
		err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &r)
		if err == nil && check(&r) {
			return &r
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s/%s: %s: not within %v; status %+v (err %v)", ns, name, what, timeout, r.Status, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readyAt reports whether the rule's Ready condition is True for its current generation.
func readyAt(r *lbv1alpha1.LoadBalancerRule) bool {
	c := meta.FindStatusCondition(r.Status.Conditions, string(lbv1alpha1.ConditionReady))
	return c != nil && c.Status == metav1.ConditionTrue && c.ObservedGeneration == r.Generation
}

// ---- traffic ----

// backendIPs are netns.BackendIP(0 … n-1).
func backendIPs(n int) []netip.Addr {
	out := make([]netip.Addr, n)
	for i := range out {
		out[i] = netns.BackendIP(i)
	}
	return out
}

// pins opens one new connection from each of n clients (ClientIP(0) …) to
// front, several at a time, and returns the backend each reached.
func pins(t *testing.T, front netip.AddrPort, n int) []string {
	t.Helper()
	return pinsFrom(t, front, 0, n)
}

// pinsFrom is pins for the n clients from ClientIP(from) on.
func pinsFrom(t *testing.T, front netip.AddrPort, from, n int) []string {
	t.Helper()
	out := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	next := make(chan int)
	for range 8 {
		wg.Go(func() {
			for i := range next {
				name, c, err := testbackend.BackendOf(testbackend.ClientIP(from+i), front)
				if err == nil {
					c.Close()
				}
				out[i], errs[i] = name, err
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("connections to %s: %v", front, err)
	}
	return out
}

// spread counts clients per backend.
func spread(pinned []string) map[string]int {
	out := map[string]int{}
	for _, b := range pinned {
		out[b]++
	}
	return out
}

// echo sends a line on an established connection and checks it comes back.
func echo(c net.Conn, line string) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer func() { _ = c.SetDeadline(time.Time{}) }()
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(got) != line {
		return fmt.Errorf("echo %q came back as %q", line, got)
	}
	return nil
}

// ---- ports ----

// loopback1 and loopback2 are the two replicas' bind addresses: a rule's
// port must be free on both.
var (
	loopback1 = netip.MustParseAddr("127.0.0.1")
	loopback2 = netip.MustParseAddr("127.0.0.2")
)
