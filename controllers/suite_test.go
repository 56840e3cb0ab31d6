package controllers

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/dataplane/proxy"
	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
	"github.com/stickylb/stickylb/internal/testenv"
)

// The suite runs the real manager in-process against a real API server, with
// the dataplane serving on 127.0.0.1 as a local run does.

var (
	k8s        client.Client
	dataplane  *Dataplane
	dpProxy    *proxy.Proxy
	restConfig *rest.Config
	testScheme = runtime.NewScheme()
)

func TestMain(m *testing.M) {
	// EndpointSlices may not list loopback addresses: backends live on
	// 10.1.0.0/16 inside a network namespace of the test's own.
	netns.Enter()
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is not set: run these tests with `make test`")
		os.Exit(1)
	}
	utilruntime.Must(clientgoscheme.AddToScheme(testScheme))
	utilruntime.Must(lbv1alpha1.AddToScheme(testScheme))
	env := &envtest.Environment{CRDDirectoryPaths: []string{filepath.Join("..", "config", "crd", "bases")}, ErrorIfCRDPathMissing: true}
	netns.ConfigureAPIServer(env)
	cfg, err := testenv.Start(env)
	if err != nil {
		fmt.Fprintln(os.Stderr, "start envtest:", err)
		os.Exit(1)
	}
	restConfig = cfg
	code := run(m, cfg)
	_ = env.Stop()
	os.Exit(code)
}

func run(m *testing.M, cfg *rest.Config) int {
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{Scheme: testScheme, Cache: cache.Options{DefaultTransform: cache.TransformStripManagedFields()}, Metrics: metricsserver.Options{BindAddress: "0"}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	bind := netip.MustParseAddr("127.0.0.1")
	var dp *Dataplane
	dpProxy, err = proxy.New(proxy.Options{OnHealthChange: func(rule string) { dp.HealthChanged(rule) }})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	dp = NewDataplane(mgr.GetClient(), dpProxy, bind, logr.Discard())
	dataplane = dp
	rr := &RuleReconciler{
		Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("stickylb"), Dataplane: dp, Healthy: dpProxy.Healthy,
		DataplaneEndpoints: func(context.Context) ([]DataplaneEndpoint, error) { return []DataplaneEndpoint{{Address: bind}}, nil }, Local: true,
	}
	if err := dp.SetupWithManager(mgr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := rr.SetupWithManager(mgr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	k8s, err = client.New(cfg, client.Options{Scheme: testScheme})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	code := m.Run()
	cancel()
	<-done
	sctx, scancel := context.WithTimeout(context.Background(), time.Second)
	defer scancel()
	_ = dpProxy.Shutdown(sctx)
	return code
}

var nsCounter atomic.Int32

func freePort(t *testing.T) int32 { return int32(testbackend.FreePort(t)) }

// namespace creates a namespace for one test.
func namespace(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("t%d", nsCounter.Add(1))
	if err := k8s.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		t.Fatal(err)
	}
	return name
}

func newRule(ns, name, frontend string, port int32, service string) *lbv1alpha1.LoadBalancerRule {
	return &lbv1alpha1.LoadBalancerRule{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: lbv1alpha1.LoadBalancerRuleSpec{
			Frontend:           lbv1alpha1.Frontend{Name: frontend, Port: lbv1alpha1.PortNumber(port)},
			BackendPool:        lbv1alpha1.BackendPool{ServiceName: service},
			BackendPort:        9401,
			SessionPersistence: lbv1alpha1.SessionPersistenceClientIP,
		},
	}
}

// backendService creates a Service and an EndpointSlice listing addrs.
func backendService(t *testing.T, ns, name string, addrs ...string) *discoveryv1.EndpointSlice {
	t.Helper()
	ctx := context.Background()
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 9401, Protocol: corev1.ProtocolTCP}}}}
	if err := k8s.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To[int32](9401), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for _, a := range addrs {
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{a}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
	}
	if err := k8s.Create(ctx, slice); err != nil {
		t.Fatal(err)
	}
	return slice
}

// waitFor polls the rule until check passes, and returns it.
func waitFor(t *testing.T, ns, name, what string, check func(*lbv1alpha1.LoadBalancerRule) bool) *lbv1alpha1.LoadBalancerRule {
	t.Helper()
	var r lbv1alpha1.LoadBalancerRule
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &r)
		if err == nil && check(&r) {
			return &r
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s/%s: %s: not within 20s; status %+v (err %v)", ns, name, what, r.Status, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// hasCondition checks a condition's status and reason at the rule's current generation.
func hasCondition(t lbv1alpha1.ConditionType, status metav1.ConditionStatus, reason lbv1alpha1.ConditionReason) func(*lbv1alpha1.LoadBalancerRule) bool {
	return func(r *lbv1alpha1.LoadBalancerRule) bool {
		c := meta.FindStatusCondition(r.Status.Conditions, string(t))
		return c != nil && c.Status == status && c.Reason == string(reason) && c.ObservedGeneration == r.Generation &&
			r.Status.ObservedGeneration == r.Generation
	}
}

func all(checks ...func(*lbv1alpha1.LoadBalancerRule) bool) func(*lbv1alpha1.LoadBalancerRule) bool {
	return func(r *lbv1alpha1.LoadBalancerRule) bool {
		for _, c := range checks {
			if !c(r) {
				return false
			}
		}
		return true
	}
}
