// Command stickylb is the LoadBalancerRule controller and its L4 dataplane.
//
//	stickylb [flags]               run the manager (controller and dataplane roles)
//	stickylb proxy --rules FILE    run the dataplane alone from a file of rules
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/controllers"
	"github.com/stickylb/stickylb/dataplane/proxy"
)

// --metrics-secure checks each scraper's token and its permission to GET /metrics with the API server.
// +kubebuilder:rbac:groups=authentication.k8s.io,resources=tokenreviews,verbs=create
// +kubebuilder:rbac:groups=authorization.k8s.io,resources=subjectaccessreviews,verbs=create

func main() {
	if len(os.Args) > 1 && os.Args[1] == "proxy" {
		os.Exit(runProxy(os.Args[2:]))
	}
	os.Exit(runManager(os.Args[1:]))
}

func newScheme() *runtime.Scheme {
	s := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(s))
	utilruntime.Must(lbv1alpha1.AddToScheme(s))
	return s
}

// managerOptions are the manager's command-line flags.
type managerOptions struct {
	metricsAddr      string
	metricsSecure    bool
	probeAddr        string
	leaderElect      bool
	leaderElectionNS string
	leaderElectionID string
	runController    bool
	bind             string
	podNamespace     string
	podSelector      string
	drainTimeout     time.Duration
	limits           proxy.Options
	zap              zap.Options
}

func parseManagerFlags(args []string) (*managerOptions, *flag.FlagSet, error) {
	o := &managerOptions{zap: zap.Options{Development: false}}
	fs := flag.NewFlagSet("stickylb", flag.ContinueOnError)
	fs.StringVar(&o.metricsAddr, "metrics-bind-address", ":8080",
		"address the Prometheus metrics endpoint binds to; \"0\" disables it")
	fs.BoolVar(&o.metricsSecure, "metrics-secure", false,
		"serve metrics over HTTPS (self-signed certificate) to callers the API server authenticates (TokenReview) and authorizes for GET /metrics (SubjectAccessReview); off serves plain HTTP")
	fs.StringVar(&o.probeAddr, "health-probe-bind-address", ":8081",
		"address the /healthz and /readyz endpoints bind to")
	fs.BoolVar(&o.leaderElect, "leader-elect", false,
		"elect one replica to run the controller role (write status, own frontends)")
	fs.StringVar(&o.leaderElectionNS, "leader-election-namespace", "",
		"namespace of the leader-election Lease (default: the pod's namespace)")
	fs.StringVar(&o.leaderElectionID, "leader-election-id", "stickylb.lb.stickylb.io",
		"name of the leader-election Lease")
	fs.BoolVar(&o.runController, "controller", true, "run the controller role (leader-elected): conditions, frontends, status; false makes a dataplane-only replica")
	fs.StringVar(&o.bind, "dataplane-bind-address", envOr("POD_IP", "0.0.0.0"),
		"address the dataplane listens on (default: $POD_IP); outside a cluster use 127.0.0.1, which is then reported as the frontend address")
	fs.StringVar(&o.podNamespace, "namespace", os.Getenv("POD_NAMESPACE"),
		"namespace of the stickylb pods (default: $POD_NAMESPACE); empty means running outside a cluster")
	fs.StringVar(&o.podSelector, "dataplane-pod-selector", "app.kubernetes.io/name=stickylb",
		"label selector of the dataplane pods whose IPs are each frontend's endpoints")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 30*time.Second, "on SIGTERM, how long established TCP connections may take to finish")
	bindLimitFlags(fs, &o.limits)
	// --kubeconfig is registered on the global flag set by controller-runtime.
	if f := flag.CommandLine.Lookup("kubeconfig"); f != nil {
		fs.Var(f.Value, f.Name, "path to a kubeconfig; only needed outside a cluster")
	}
	o.zap.BindFlags(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: stickylb [flags]\n       stickylb proxy --rules FILE [flags]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	return o, fs, fs.Parse(args)
}

func runManager(args []string) int {
	o, _, err := parseManagerFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return 2
	}
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&o.zap)))
	log := ctrl.Log.WithName("setup")

	cfg, err := ctrl.GetConfig()
	if err != nil {
		log.Error(err, "no Kubernetes configuration (use --kubeconfig outside a cluster)")
		return 1
	}
	bind, err := netip.ParseAddr(o.bind)
	if err != nil {
		log.Error(err, "--dataplane-bind-address")
		return 2
	}
	selector, err := labels.Parse(o.podSelector)
	if err != nil {
		log.Error(err, "--dataplane-pod-selector")
		return 2
	}
	local := o.podNamespace == ""
	leaderNS := o.leaderElectionNS
	if leaderNS == "" {
		leaderNS = o.podNamespace
	}
	// Managed fields are never read here; dropping them halves what the cache holds.
	cacheOpts := cache.Options{DefaultTransform: cache.TransformStripManagedFields()}
	if !local {
		// Only our own pods: the dataplane replicas.
		cacheOpts.ByObject = map[client.Object]cache.ByObject{
			&corev1.Pod{}: {Namespaces: map[string]cache.Config{o.podNamespace: {}}, Label: selector},
			// Nodes are read as metadata only, for their zone label; the
			// cache keeps nothing else of them.
			controllers.NodeMetadata(): {Transform: controllers.TrimNode},
		}
	}
	metricsOpts := metricsserver.Options{BindAddress: o.metricsAddr}
	if o.metricsSecure {
		metricsOpts.SecureServing = true
		metricsOpts.FilterProvider = filters.WithAuthenticationAndAuthorization
		// HTTP/1.1 only: HTTP/2 stream resets (CVE-2023-44487) are not worth
		// it for one scrape endpoint.
		metricsOpts.TLSOpts = []func(*tls.Config){func(c *tls.Config) { c.NextProtos = []string{"http/1.1"} }}
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  newScheme(),
		Cache:                   cacheOpts,
		Metrics:                 metricsOpts,
		HealthProbeBindAddress:  o.probeAddr,
		LeaderElection:          o.leaderElect,
		LeaderElectionID:        o.leaderElectionID,
		LeaderElectionNamespace: leaderNS,
		// Stepping down as soon as the context ends lets a standby take over at
		// once on rollout instead of waiting out the lease.
		LeaderElectionReleaseOnCancel: true,
	})
	if err != nil {
		log.Error(err, "create manager")
		return 1
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		log.Error(err, "add health check")
		return 1
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		log.Error(err, "add ready check")
		return 1
	}
	o.limits.Registerer = metrics.Registry
	o.limits.Log = ctrl.Log.WithName("dataplane")
	var dp *controllers.Dataplane
	o.limits.OnHealthChange = func(rule string) {
		if dp != nil {
			dp.HealthChanged(rule)
		}
	}
	p, err := proxy.New(o.limits)
	if err != nil {
		log.Error(err, "start the dataplane")
		return 1
	}
	dp = controllers.NewDataplane(mgr.GetClient(), p, bind, ctrl.Log.WithName("dataplane"))
	// The dataplane role always runs: the controller role reports what this
	// replica's dataplane serves (Programmed, healthy counts).
	if err := dp.SetupWithManager(mgr); err != nil {
		log.Error(err, "set up the dataplane role")
		return 1
	}
	if o.runController {
		endpoints := controllers.ReadyPodEndpoints(mgr.GetClient(), o.podNamespace, selector)
		if local {
			endpoints = func(context.Context) ([]controllers.DataplaneEndpoint, error) {
				return []controllers.DataplaneEndpoint{{Address: bind}}, nil
			}
		}
		rr := &controllers.RuleReconciler{
			Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("stickylb"), Dataplane: dp,
			Healthy: p.Healthy, DataplaneEndpoints: endpoints, Local: local,
		}
		var extra []func(*ctrl.Builder) *ctrl.Builder
		if !local {
			extra = append(extra, rr.WatchDataplanePods)
		}
		if err := rr.SetupWithManager(mgr, extra...); err != nil {
			log.Error(err, "set up the controller role")
			return 1
		}
	}

	log.Info("starting manager", "leaderElect", o.leaderElect, "controller", o.runController, "bind", bind.String(), "local", local)
	err = mgr.Start(ctrl.SetupSignalHandler())
	dctx, cancel := context.WithTimeout(context.Background(), o.drainTimeout)
	defer cancel()
	if derr := p.Shutdown(dctx); derr != nil {
		log.Info("drain timeout passed; remaining connections closed")
	}
	if err != nil {
		log.Error(err, "manager stopped")
		return 1
	}
	return 0
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
