// Package scale measures the real stickylb binary against a real
// kube-apiserver and etcd at the sizes: N rules, each with its own
// port, its own backend Service and one EndpointSlice of E ready endpoints.
//
// It reports the time until every rule is Ready, the manager's memory (RSS
// and peak from /proc, Go heap from its /metrics) before and after the
// rules, what each rule costs (RSS, heap, metric series, file descriptors),
// and how long a single EndpointSlice change takes to reach the dataplane at
// that size (p50/p99). Only a -bench run starts anything; `go test` alone
// runs nothing here.
//
//	KUBEBUILDER_ASSETS=$(hack/test-binaries.sh kube-apiserver etcd | tail -1) \
//		go test -run=NONE -bench=Scale -benchtime=1x -timeout=60m ./test/scale/ \
//		-scale=1000x100,10000x100
//
// make bench runs 1000x100; make bench-scale runs 10000x100.
package scale

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testenv"
)

var (
	sizesFlag    = flag.String("scale", "1000x100", "comma-separated RULESxENDPOINTS cases, each a sub-benchmark of BenchmarkScale")
	binFlag      = flag.String("stickylb", "", "the stickylb binary to measure (default: built from this module with CGO_ENABLED=0)")
	profFlag     = flag.String("heapprofile", "", "directory to write stickylb's heap profile into, once every rule is Ready (CASE-heap.pb.gz; go tool pprof -sample_index=inuse_space)")
	memLimitFlag = flag.String("gomemlimit", "", "GOMEMLIMIT for stickylb, as the chart's memory limit sets it (90% of the limit), e.g. 230MiB")
)

var (
	scheme     = runtime.NewScheme()
	restConfig *rest.Config // admin, high QPS
	k8s        client.Client
	kubeconfig string
	stickylb   string
	workDir    string
)

func TestMain(m *testing.M) {
	flag.Parse()
	if f := flag.Lookup("test.bench"); f == nil || f.Value.String() == "" {
		// No benchmark asked for: start nothing (make test runs every package).
		os.Exit(m.Run())
	}
	// The API server refuses loopback addresses in EndpointSlices, and
	// 10,000 frontend ports want a network of their own: the suite runs in
	// its own network namespace (root), as test/e2e does.
	netns.Enter()
	os.Exit(run(m))
}

func run(m *testing.M) int {
	// The benchmark's own rule cache logs nothing (and so no warning that
	// no logger was set).
	ctrllog.SetLogger(logr.Discard())
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(lbv1alpha1.AddToScheme(scheme))
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is not set: KUBEBUILDER_ASSETS=$(hack/test-binaries.sh kube-apiserver etcd | tail -1)")
		return 1
	}
	var err error
	if workDir, err = os.MkdirTemp("", "stickylb-scale"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(workDir)

	stickylb = *binFlag
	built := make(chan error, 1)
	if stickylb == "" {
		stickylb = filepath.Join(workDir, "stickylb")
		go func() {
			cmd := exec.Command("go", "build", "-trimpath", "-o", stickylb, "github.com/stickylb/stickylb")
			cmd.Dir = filepath.Join("..", "..")
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				built <- fmt.Errorf("go build: %v\n%s", err, out)
				return
			}
			built <- nil
		}()
	} else {
		if stickylb, err = filepath.Abs(stickylb); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		built <- nil
	}

	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	netns.ConfigureAPIServer(env)
	api := env.ControlPlane.GetAPIServer().Configure()
	// Room for a frontend Service (it takes a cluster IP) per 50 rules at
	// 10,000 rules and more; envtest's default is a /24.
	api.Set("service-cluster-ip-range", "10.0.0.0/16")
	// The benchmark's own clients write tens of thousands of objects at once.
	api.Set("max-requests-inflight", "1000")
	api.Set("max-mutating-requests-inflight", "500")
	if _, err := testenv.Start(env); err != nil {
		fmt.Fprintln(os.Stderr, "start envtest:", err)
		return 1
	}
	defer func() { _ = env.Stop() }()
	kc, cfg, err := testenv.AdminKubeconfig(env, "scale", workDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "admin kubeconfig:", err)
		return 1
	}
	kubeconfig = kc
	cfg.QPS, cfg.Burst = 5000, 10000
	restConfig = cfg
	if k8s, err = client.New(cfg, client.Options{Scheme: scheme}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := <-built; err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

// size is one case: rules × endpoints per rule.
type size struct{ rules, endpoints int }

func (s size) String() string { return fmt.Sprintf("%dx%d", s.rules, s.endpoints) }

func parseSizes(v string) ([]size, error) {
	var out []size
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		r, e, ok := strings.Cut(f, "x")
		nr, err1 := strconv.Atoi(r)
		ne, err2 := strconv.Atoi(e)
		if !ok || err1 != nil || err2 != nil || nr < 1 || ne < 1 || nr > maxRules || ne > 1000 {
			return nil, fmt.Errorf("-scale %q: want RULESxENDPOINTS, at most %dx1000", f, maxRules)
		}
		out = append(out, size{nr, ne})
	}
	return out, nil
}

// BenchmarkScale runs each -scale case against a fresh stickylb process.
func BenchmarkScale(b *testing.B) {
	sizes, err := parseSizes(*sizesFlag)
	if err != nil {
		b.Fatal(err)
	}
	for _, s := range sizes {
		b.Run(s.String(), func(b *testing.B) { benchScale(b, s) })
	}
}
