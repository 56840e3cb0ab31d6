// Command stickylb is the LoadBalancerRule controller and its L4 dataplane.
//
//	stickylb [flags]               run the manager (controller and dataplane roles)
//	stickylb proxy --rules FILE    run the dataplane alone from a file of rules
//	stickylb scale-down ...        the chart's pre-delete hook (scaledown_cmd.go)
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/logr"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
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
	"github.com/stickylb/stickylb/dataplane/peers"
	"github.com/stickylb/stickylb/dataplane/proxy"
)

// --metrics-secure checks each scraper's token and its permission to GET /metrics with the API server.
// +kubebuilder:rbac:groups=authentication.k8s.io,resources=tokenreviews,verbs=create
// +kubebuilder:rbac:groups=authorization.k8s.io,resources=subjectaccessreviews,verbs=create

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "proxy":
			os.Exit(runProxy(os.Args[2:]))
		case "scale-down":
			os.Exit(runScaleDown(os.Args[2:]))
		case "where-local":
			os.Exit(runWhereLocal(os.Args[2:]))
		}
	}
	if filepath.Base(os.Args[0]) == pluginName {
		os.Exit(runPlugin(os.Args[1:], os.Stdout, os.Stderr))
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
	shutdownTimeout  time.Duration
	shutdownDelay    time.Duration
	reportInterval   time.Duration
	limits           proxy.Options
	peer             peerOptions
	debugAddr        string
	pprofAddr        string
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
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 30*time.Second,
		"on SIGTERM, once the listeners are closed, how long established TCP connections may take to finish")
	fs.DurationVar(&o.shutdownTimeout, "shutdown-timeout", 20*time.Second,
		"on SIGTERM, how long to wait (still serving, no longer ready) until no frontend EndpointSlice lists this replica; skipped outside a cluster")
	fs.DurationVar(&o.shutdownDelay, "shutdown-delay", defaultShutdownDelay,
		"on SIGTERM, how long to go on serving once no frontend lists this replica, so kube-proxy on every node has caught up (default 0 outside a cluster)")
	fs.StringVar(&o.debugAddr, "debug-bind-address", "",
		"loopback IP:PORT where this replica answers `kubectl stickylb where` (asked through kubectl exec); \"0\" turns it off (default "+defaultDebugAddress+", or port 8082 on a loopback --dataplane-bind-address)")
	fs.StringVar(&o.pprofAddr, "pprof-bind-address", "0",
		"address Go's /debug/pprof endpoints bind to, for profiling; \"0\" (the default) turns them off")
	fs.DurationVar(&o.reportInterval, "report-interval", controllers.DefaultReportInterval,
		"least time between two writes of this replica's report Lease (what its dataplane serves, which rule status speaks for); changes in between are coalesced")
	bindLimitFlags(fs, &o.limits)
	bindPeerFlags(fs, &o.peer, "--dataplane-bind-address")
	// --kubeconfig is registered on the global flag set by controller-runtime.
	if f := flag.CommandLine.Lookup("kubeconfig"); f != nil {
		fs.Var(f.Value, f.Name, "path to a kubeconfig; only needed outside a cluster")
	}
	o.zap.BindFlags(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: stickylb [flags]\n       stickylb proxy --rules FILE [flags]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, fs, err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if o.podNamespace == "" && !set["shutdown-delay"] {
		// No kube-proxy to wait for outside a cluster.
		o.shutdownDelay = 0
	}
	return o, fs, nil
}

// defaultShutdownDelay is --shutdown-delay in a cluster.
const defaultShutdownDelay = 5 * time.Second

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
	applyMemoryLimit(log)

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
	if o.reportInterval <= 0 {
		log.Error(errors.New("must be positive"), "--report-interval", "value", o.reportInterval.String())
		return 2
	}
	local := o.podNamespace == ""
	leaderNS := o.leaderElectionNS
	if leaderNS == "" {
		leaderNS = o.podNamespace
	}
	replica, reportNS := reportIdentity(o, bind)
	// Managed fields are never read here; dropping them halves what the cache holds.
	cacheOpts := cache.Options{DefaultTransform: cache.TransformStripManagedFields(), ByObject: map[client.Object]cache.ByObject{
		// Only the replicas' report Leases, not every Lease in the cluster.
		// The leader-election Lease is not read through the cache:
		// controller-runtime's resource lock has a client of its own.
		&coordinationv1.Lease{}: {
			Namespaces: map[string]cache.Config{reportNS: {}},
			Label:      labels.SelectorFromSet(labels.Set{controllers.LabelReport: "true"}),
		},
		// Every Service and EndpointSlice may be a rule's backend: of those
		// the cache keeps only what translation reads (cachetrim.go).
		&corev1.Service{}:            {Transform: trimService},
		&discoveryv1.EndpointSlice{}: {Transform: trimEndpointSlice},
	}}
	if !local {
		// Only our own pods: the dataplane replicas.
		cacheOpts.ByObject[&corev1.Pod{}] = cache.ByObject{Namespaces: map[string]cache.Config{o.podNamespace: {}}, Label: selector}
		// Nodes are read as metadata only, for their zone label; the
		// cache keeps nothing else of them.
		cacheOpts.ByObject[controllers.NodeMetadata()] = cache.ByObject{Transform: controllers.TrimNode}
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
		PprofBindAddress:        o.pprofAddr,
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
	// Ready means serving: the dataplane applied a snapshot built from synced
	// caches, and the replica is not shutting down.
	readiness := controllers.NewReadiness(dp)
	if err := mgr.AddReadyzCheck("readyz", readiness.Check); err != nil {
		log.Error(err, "add ready check")
		return 1
	}
	// Replicas share the pins that differ from the Maglev table.
	pcfg, err := o.peer.config(bind)
	if err != nil {
		log.Error(err, "peers")
		return 2
	}
	pcfg.Name, pcfg.Registerer, pcfg.Log = replica, metrics.Registry, ctrl.Log.WithName("peers")
	if pcfg.Peers == nil && !local {
		pcfg.Peers = podPeers(mgr.GetClient(), o.podNamespace, selector, replica, pcfg.Bind.Port())
	}
	sharing, err := peers.New(pcfg, p)
	if err != nil {
		log.Error(err, "peers")
		return 2
	}
	if sharing.Enabled() {
		p.SetPinSync(sharing)
	}
	if err := mgr.Add(sharing); err != nil {
		log.Error(err, "set up the peers")
		return 1
	}
	// A new or restarted replica learns its peers' pins before it serves,
	// so that it sends their clients where they already go.
	if err := mgr.AddReadyzCheck("peers", func(*http.Request) error {
		if !sharing.Synced() {
			return errJoiningPeers
		}
		return nil
	}); err != nil {
		log.Error(err, "add ready check")
		return 1
	}
	// The dataplane role always runs, and reports what it serves: the
	// controller role (on whichever replica leads) counts every report.
	if err := dp.SetupWithManager(mgr); err != nil {
		log.Error(err, "set up the dataplane role")
		return 1
	}
	// Every replica publishes what its dataplane serves, for the controller
	// role's status to speak for every replica.
	reporter := &controllers.Reporter{
		Client: mgr.GetClient(), Reader: mgr.GetAPIReader(), Dataplane: dp, ProbedDown: p.ProbedDown,
		Replica: replica, Namespace: reportNS, Address: bind.String(), Interval: o.reportInterval,
		Log: ctrl.Log.WithName("report"),
	}
	if debug := debugAddress(o.debugAddr, bind); debug != "0" {
		if ap, err := netip.ParseAddrPort(debug); err != nil || !ap.Addr().IsLoopback() {
			log.Error(fmt.Errorf("%q: want a loopback IP:PORT", debug), "--debug-bind-address")
			return 1
		}
		if err := mgr.Add(&whereServer{addr: debug, replica: replica, proxy: p, log: ctrl.Log.WithName("where")}); err != nil {
			log.Error(err, "set up the where endpoint")
			return 1
		}
	}
	if err := mgr.Add(reporter); err != nil {
		log.Error(err, "set up the dataplane report")
		return 1
	}
	if o.runController {
		endpoints := controllers.ReadyPodEndpoints(mgr.GetClient(), o.podNamespace, selector)
		if local {
			endpoints = func(context.Context) ([]controllers.DataplaneEndpoint, error) {
				return []controllers.DataplaneEndpoint{{Address: bind}}, nil
			}
		}
		// Status speaks for every replica that counts: in a cluster the
		// frontends' endpoints, outside one every manager with a fresh report.
		counted := endpoints
		if local {
			counted = nil
		}
		rr := &controllers.RuleReconciler{
			Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("stickylb"), Dataplane: dp,
			Healthy: p.Healthy, DataplaneEndpoints: endpoints, Local: local,
			Replicas: controllers.NewReplicas(mgr.GetClient(), reportNS, counted),
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

	log.Info("starting manager", "leaderElect", o.leaderElect, "controller", o.runController, "bind", bind.String(), "local", local,
		"replica", replica, "report", reportNS+"/"+reporter.LeaseName(), "peerSync", sharing.Enabled(), "peerBind", pcfg.Bind.String())
	// The signals are ours, not ctrl.SetupSignalHandler's: the manager (and
	// with it the controller role and the leader Lease) must keep running
	// while this replica leaves the frontends.
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	mgrCtx, stopManager := context.WithCancel(context.Background())
	defer stopManager()
	stopped := make(chan struct{})
	var mgrErr error
	go func() {
		mgrErr = mgr.Start(mgrCtx)
		close(stopped)
	}()
	select {
	case <-stopped:
		// The manager ended on its own (an error, lost leadership): drain at once.
	case sig := <-signals:
		go func() {
			sig := <-signals
			ctrl.Log.WithName("shutdown").Info("second signal: exiting at once", "signal", sig.String())
			os.Exit(1)
		}()
		leaveFrontends(ctrl.Log.WithName("shutdown"), sig, o, mgr.GetClient(), readiness, bind, local, stopped)
	}
	// Step 4 begins: this replica stops serving, so it stops counting for
	// rule status first (a replica that is killed leaves its Lease to expire).
	leaveReports(ctrl.Log.WithName("shutdown"), reporter)
	stopManager()
	stopStart := time.Now()
	<-stopped
	managerStop := time.Since(stopStart)
	drainStart := time.Now()
	dctx, cancel := context.WithTimeout(context.Background(), o.drainTimeout)
	defer cancel()
	drainErr := p.Shutdown(dctx)
	ctrl.Log.WithName("shutdown").Info("step 4/4: manager stopped (a leader releases its Lease), listeners closed, connections drained",
		"took", time.Since(stopStart).Round(time.Millisecond).String(), "managerStop", managerStop.Round(time.Millisecond).String(),
		"drain", time.Since(drainStart).Round(time.Millisecond).String(), "drainTimedOut", drainErr != nil)
	if mgrErr != nil {
		log.Error(mgrErr, "manager stopped")
		return 1
	}
	return 0
}

// leaveFrontends runs the first three steps of a graceful shutdown, while
// the manager and the proxy go on: readiness fails; the replica waits until
// no frontend EndpointSlice lists it (the leader, maybe this replica, takes
// it out: its pod is deleted or not Ready), at most --shutdown-timeout; then
// it waits --shutdown-delay for kube-proxy on every node. It returns early
// if the manager stops.
func leaveFrontends(log logr.Logger, sig os.Signal, o *managerOptions, c client.Reader, readiness *controllers.Readiness,
	bind netip.Addr, local bool, stopped <-chan struct{}) {
	start := time.Now()
	readiness.Stop()
	log.Info("step 1/4: readiness fails; still accepting connections", "signal", sig.String(), "took", time.Since(start).String())

	start = time.Now()
	switch {
	case local:
		log.Info("step 2/4: skipped outside a cluster (no frontend EndpointSlice lists this replica)")
	case !bind.IsGlobalUnicast():
		log.Info("step 2/4: skipped: the dataplane address cannot be a frontend endpoint", "address", bind.String())
	default:
		ctx, cancel := context.WithTimeout(context.Background(), o.shutdownTimeout)
		go func() {
			select {
			case <-stopped:
				cancel()
			case <-ctx.Done():
			}
		}()
		listedIn, err := controllers.WaitUntilUnlisted(ctx, c, bind)
		cancel()
		took := time.Since(start).Round(time.Millisecond).String()
		switch {
		case err == nil:
			log.Info("step 2/4: no frontend EndpointSlice lists this replica", "address", bind.String(), "took", took)
		case isClosed(stopped):
			log.Info("step 2/4: the manager stopped while waiting", "took", took)
			return
		default:
			log.Info("step 2/4: --shutdown-timeout passed; frontends still list this replica, going on",
				"address", bind.String(), "listedIn", listedIn, "took", took)
		}
	}

	start = time.Now()
	t := time.NewTimer(o.shutdownDelay)
	defer t.Stop()
	select {
	case <-t.C:
		log.Info("step 3/4: --shutdown-delay passed (time for kube-proxy on every node to catch up)", "took", time.Since(start).Round(time.Millisecond).String())
	case <-stopped:
		log.Info("step 3/4: the manager stopped during --shutdown-delay", "took", time.Since(start).Round(time.Millisecond).String())
	}
}

// reportLeaveTimeout bounds the deletion of the report Lease on shutdown.
const reportLeaveTimeout = 3 * time.Second

// leaveReports stops the replica's reports and deletes its Lease, with a
// context of its own: the manager's may be gone already.
func leaveReports(log logr.Logger, reporter *controllers.Reporter) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), reportLeaveTimeout)
	defer cancel()
	took := func() string { return time.Since(start).Round(time.Millisecond).String() }
	if err := reporter.Leave(ctx); err != nil {
		log.Error(err, "step 4/4: could not delete the report Lease; it expires on its own",
			"lease", reporter.Namespace+"/"+reporter.LeaseName(), "took", took())
		return
	}
	log.Info("step 4/4: report Lease deleted: this replica no longer counts for rule status",
		"lease", reporter.Namespace+"/"+reporter.LeaseName(), "took", took())
}

// reportIdentity names this replica and the namespace of its report Lease:
// in a cluster its pod ($POD_NAME, else the hostname, which is the pod's
// name) in the pod's namespace; outside one its bind address, in
// --leader-election-namespace (or "default").
func reportIdentity(o *managerOptions, bind netip.Addr) (replica, namespace string) {
	if o.podNamespace == "" {
		namespace = o.leaderElectionNS
		if namespace == "" {
			namespace = "default"
		}
		return bind.String(), namespace
	}
	replica = os.Getenv("POD_NAME")
	if replica == "" {
		if h, err := os.Hostname(); err == nil && h != "" {
			replica = h
		} else {
			replica = bind.String()
		}
	}
	return replica, o.podNamespace
}

var errJoiningPeers = errors.New("joining the peers to learn their pins (at most --peer-join-timeout)")

// peerOptions are the flags of pin sharing, the same for the manager and
// `stickylb proxy`.
type peerOptions struct {
	peers       string
	bind        string
	keyFile     string
	joinTimeout time.Duration
}

func bindPeerFlags(fs *flag.FlagSet, o *peerOptions, dataplaneFlag string) {
	fs.StringVar(&o.peers, "peers", "",
		"comma-separated HOST:PORT of the replicas to share pins with (this replica may be among them); in a cluster, empty means the running pods of --dataplane-pod-selector")
	fs.StringVar(&o.bind, "peer-bind-address", "",
		fmt.Sprintf("IP:PORT this replica listens on for its peers, TCP and UDP; an empty IP (\":%d\") means the %s IP (default: that IP, port %d)", peers.DefaultPort, dataplaneFlag, peers.DefaultPort))
	fs.StringVar(&o.keyFile, "peer-key-file", "",
		"file holding the base64 of the 32-byte key every replica shares (AES-256-GCM: only holders may join or change pins); empty: this replica does not peer, and serves from the Maglev table and its own pins")
	fs.DurationVar(&o.joinTimeout, "peer-join-timeout", peers.DefaultJoinTimeout,
		"at start, how long to try to join the peers and learn their pins before serving without them")
}

// config turns the flags into a peers.Config, less the name, metrics and
// log; dataplane is the dataplane's bind address.
func (o *peerOptions) config(dataplane netip.Addr) (peers.Config, error) {
	cfg := peers.Config{JoinTimeout: o.joinTimeout}
	if o.joinTimeout <= 0 {
		return cfg, fmt.Errorf("--peer-join-timeout %v: must be positive", o.joinTimeout)
	}
	bind, err := peerBindAddress(o.bind, dataplane)
	if err != nil {
		return cfg, err
	}
	cfg.Bind = bind
	if o.keyFile != "" {
		if cfg.Key, err = peers.LoadKey(o.keyFile); err != nil {
			return cfg, err
		}
	}
	var static []string
	for _, p := range strings.Split(o.peers, ",") {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(p); err != nil {
			return cfg, fmt.Errorf("--peers: %q: want HOST:PORT: %w", p, err)
		}
		static = append(static, p)
	}
	if len(static) > 0 {
		cfg.Peers = func(context.Context) ([]string, error) { return static, nil }
	}
	return cfg, nil
}

// peerBindAddress parses --peer-bind-address: IP:PORT, or :PORT on the
// dataplane's IP, which is also the whole default (with the default port).
func peerBindAddress(flagValue string, dataplane netip.Addr) (netip.AddrPort, error) {
	if flagValue == "" {
		return netip.AddrPortFrom(dataplane, peers.DefaultPort), nil
	}
	host, port, err := net.SplitHostPort(flagValue)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("--peer-bind-address %q: want IP:PORT or :PORT: %w", flagValue, err)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return netip.AddrPort{}, fmt.Errorf("--peer-bind-address %q: bad port", flagValue)
	}
	ip := dataplane
	if host != "" {
		if ip, err = netip.ParseAddr(host); err != nil {
			return netip.AddrPort{}, fmt.Errorf("--peer-bind-address %q: want an IP address: %w", flagValue, err)
		}
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(n)), nil
}

// podPeers lists the peer addresses of the other dataplane replicas: the
// running pods of selector in namespace (ready or not, terminating or not:
// each still holds pins, and a new replica must learn them), but self, at
// this replica's peer port. c should be the manager's cache, which already
// watches these pods.
func podPeers(c client.Reader, namespace string, selector labels.Selector, self string, port uint16) func(context.Context) ([]string, error) {
	return func(ctx context.Context) ([]string, error) {
		var pods corev1.PodList
		if err := c.List(ctx, &pods, client.InNamespace(namespace), client.MatchingLabelsSelector{Selector: selector}); err != nil {
			return nil, err
		}
		var out []string
		for i := range pods.Items {
			p := &pods.Items[i]
			if p.Name == self || p.Status.Phase != corev1.PodRunning {
				continue
			}
			ip, err := netip.ParseAddr(p.Status.PodIP)
			if err != nil {
				continue
			}
			out = append(out, netip.AddrPortFrom(ip, port).String())
		}
		return out, nil
	}
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
