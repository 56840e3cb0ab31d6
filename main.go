// Command stickylb is the LoadBalancerRule controller and its L4 dataplane.
//
//	stickylb [flags]               run the manager (controller and dataplane roles)
//	stickylb proxy --rules FILE    run the dataplane alone from a file of rules
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
)

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
	probeAddr        string
	leaderElect      bool
	leaderElectionNS string
	leaderElectionID string
	zap              zap.Options
}

func parseManagerFlags(args []string) (*managerOptions, *flag.FlagSet, error) {
	o := &managerOptions{zap: zap.Options{Development: false}}
	fs := flag.NewFlagSet("stickylb", flag.ContinueOnError)
	fs.StringVar(&o.metricsAddr, "metrics-bind-address", ":8080",
		"address the Prometheus metrics endpoint binds to; \"0\" disables it")
	fs.StringVar(&o.probeAddr, "health-probe-bind-address", ":8081",
		"address the /healthz and /readyz endpoints bind to")
	fs.BoolVar(&o.leaderElect, "leader-elect", false,
		"elect one replica to run the controller role (write status, own frontends)")
	fs.StringVar(&o.leaderElectionNS, "leader-election-namespace", "",
		"namespace of the leader-election Lease (default: the pod's namespace)")
	fs.StringVar(&o.leaderElectionID, "leader-election-id", "stickylb.lb.stickylb.io",
		"name of the leader-election Lease")
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
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  newScheme(),
		Metrics:                 metricsserver.Options{BindAddress: o.metricsAddr},
		HealthProbeBindAddress:  o.probeAddr,
		LeaderElection:          o.leaderElect,
		LeaderElectionID:        o.leaderElectionID,
		LeaderElectionNamespace: o.leaderElectionNS,
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
	log.Info("starting manager", "leaderElect", o.leaderElect)
	if err := mgr.Start(ctrl.SetupSignalHandler()); err != nil {
		log.Error(err, "manager stopped")
		return 1
	}
	return 0
}
