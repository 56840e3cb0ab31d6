package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/stickylb/stickylb/dataplane/peers"
	"github.com/stickylb/stickylb/dataplane/proxy"
	"github.com/stickylb/stickylb/dataplane/rulesfile"
	"github.com/stickylb/stickylb/dataplane/snapshot"
	"github.com/stickylb/stickylb/dataplane/translate"
)

// proxyOptions are the flags of `stickylb proxy`.
type proxyOptions struct {
	rules        string
	bind         string
	metricsAddr  string
	drainTimeout time.Duration
	limits       proxy.Options
	peer         peerOptions
	zap          zap.Options
}

// bindLimitFlags declares the dataplane's limits and socket options, shared
// by the manager and `stickylb proxy`.
func bindLimitFlags(fs *flag.FlagSet, o *proxy.Options) {
	fs.DurationVar(&o.DialTimeout, "dial-timeout", 5*time.Second, "timeout of one connection attempt to a backend (up to 3 backends are tried)")
	fs.IntVar(&o.MaxConnections, "max-connections", 100000, "cap on established TCP connections; past it new ones are reset")
	fs.IntVar(&o.MaxConnectionsPerClient, "max-connections-per-client", 1000, "cap on TCP connections from one client IP")
	fs.IntVar(&o.MaxUDPSessions, "max-udp-sessions", 65536, "cap on UDP sessions per frontend; past it datagrams of new clients are dropped")
	fs.IntVar(&o.MaxUDPSessionsPerClient, "max-udp-sessions-per-client", 256, "cap on UDP sessions (source ports) from one client IP")
	fs.IntVar(&o.MaxPins, "max-pins", 1000000, "cap on pinned clients (ClientIP, ClientIPProtocol) across all rules of this replica; past it new clients get the Maglev pick without a pin, and no active pin is evicted")
	fs.IntVar(&o.MaxPinsPerSource, "max-pins-per-source", 1024, "cap on pinned clients of one rule from one client network (an IPv4 /24, an IPv6 /64), so that a flood of addresses cannot fill --max-pins")
	fs.StringVar(&o.BackendCongestionControl, "backend-congestion-control", "cubic,reno",
		"TCP congestion control of connections to backends: the first algorithm of this comma-separated list that the kernel lets the process set; \"system\" is the node's default. A list the kernel refuses entirely stops the start")
	fs.StringVar(&o.FrontendCongestionControl, "frontend-congestion-control", "system",
		"TCP congestion control of client connections, chosen like --backend-congestion-control")
	fs.Var((*nearRTTFlag)(&o.NearClientRTT), "near-client-rtt",
		"clients whose smallest round-trip time is under this are as near as the backends: once a connection has sent its client 64 KiB, a near client keeps --backend-congestion-control and a far one switches to --frontend-congestion-control; 0 gives every client --frontend-congestion-control (default 1ms)")
}

// nearRTTFlag is --near-client-rtt: 0 on the command line turns the
// distinction off, which proxy.Options spells as a negative duration.
type nearRTTFlag time.Duration

func (f *nearRTTFlag) String() string {
	if f == nil || *f == 0 {
		return "1ms"
	}
	if *f < 0 {
		return "0s"
	}
	return time.Duration(*f).String()
}

func (f *nearRTTFlag) Set(s string) error {
	d, err := time.ParseDuration(s)
	switch {
	case err != nil:
		return err
	case d < 0:
		return fmt.Errorf("must not be negative")
	case d == 0:
		d = -1
	}
	*f = nearRTTFlag(d)
	return nil
}

// proxyFlags declares the flags of `stickylb proxy` into o.
func proxyFlags(o *proxyOptions) *flag.FlagSet {
	fs := flag.NewFlagSet("stickylb proxy", flag.ContinueOnError)
	fs.StringVar(&o.rules, "rules", "", "YAML file of LoadBalancerRule objects with IP-based pools (backendPool.addresses); required. Reloaded on SIGHUP and when the file changes; a bad file is refused and the last good one keeps serving")
	fs.StringVar(&o.bind, "bind-address", "127.0.0.1", "address every frontend listens on (0.0.0.0 or :: for all)")
	fs.StringVar(&o.metricsAddr, "metrics-bind-address", ":8080", "address of the Prometheus /metrics endpoint; \"0\" disables it")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 30*time.Second, "on SIGTERM, how long established TCP connections may take to finish before they are closed")
	bindLimitFlags(fs, &o.limits)
	bindPeerFlags(fs, &o.peer, "--bind-address")
	o.zap.BindFlags(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: stickylb proxy --rules FILE [flags]\n\nServes the rules of FILE without a cluster: the dataplane alone.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	return fs
}

func parseProxyFlags(args []string) (*proxyOptions, error) {
	o := &proxyOptions{}
	fs := proxyFlags(o)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if o.rules == "" {
		fs.Usage()
		return nil, errors.New("--rules is required")
	}
	return o, nil
}

func runProxy(args []string) int {
	o, err := parseProxyFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "stickylb proxy:", err)
		return 2
	}
	log := zap.New(zap.UseFlagOptions(&o.zap)).WithName("proxy")
	bind, err := netip.ParseAddr(o.bind)
	if err != nil {
		fmt.Fprintf(os.Stderr, "stickylb proxy: --bind-address: %v\n", err)
		return 2
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	o.limits.Registerer = reg
	o.limits.Log = log
	p, err := proxy.New(o.limits)
	if err != nil {
		log.Error(err, "start proxy")
		return 1
	}
	pcfg, err := o.peer.config(bind)
	if err != nil {
		fmt.Fprintf(os.Stderr, "stickylb proxy: %v\n", err)
		return 2
	}
	// Standalone proxies have no other name among their peers than their address.
	pcfg.Name = pcfg.Bind.String()
	if pcfg.Bind.Addr().IsUnspecified() {
		host, _ := os.Hostname()
		pcfg.Name = net.JoinHostPort(host, fmt.Sprint(pcfg.Bind.Port()))
	}
	pcfg.Registerer, pcfg.Log = reg, log.WithName("peers")
	sharing, err := peers.New(pcfg, p)
	if err != nil {
		log.Error(err, "peers")
		return 2
	}
	reloads := newReloadMetrics(reg)
	if o.metricsAddr != "0" {
		// Bind before serving traffic: a taken metrics port is a start-up error.
		ln, err := net.Listen("tcp", o.metricsAddr)
		if err != nil {
			fmt.Fprintf(os.Stderr, "stickylb proxy: --metrics-bind-address: %v\n", err)
			return 1
		}
		srv := &http.Server{Handler: promhttp.HandlerFor(reg, promhttp.HandlerOpts{}), ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// Learn the peers' pins before serving, as a manager's readiness waits for.
	peersDone := make(chan error, 1)
	if sharing.Enabled() {
		p.SetPinSync(sharing)
	}
	go func() { peersDone <- sharing.Start(ctx) }()
	for !sharing.Synced() {
		select {
		case err := <-peersDone:
			if err != nil {
				log.Error(err, "peers")
				return 1
			}
			return 0 // stopped before serving
		case <-time.After(20 * time.Millisecond):
		}
	}
	hup, events, stopWatch := watchRules(o.rules, log)
	defer stopWatch()
	ld := &loader{path: o.rules, bind: bind, proxy: p, log: log, metrics: reloads}
	if err := ld.load(); err != nil {
		fmt.Fprintf(os.Stderr, "stickylb proxy: %v\n", err)
		return 1
	}

	go ld.watch(ctx, hup, events)

	<-ctx.Done()
	log.Info("shutting down: draining connections", "timeout", o.drainTimeout)
	dctx, cancel := context.WithTimeout(context.Background(), o.drainTimeout)
	defer cancel()
	if err := p.Shutdown(dctx); err != nil {
		log.Info("drain timeout passed; remaining connections closed")
	}
	<-peersDone // it has said goodbye to its peers
	return 0
}

type reloadMetrics struct {
	success  prometheus.Gauge
	failures prometheus.Counter
}

func newReloadMetrics(reg prometheus.Registerer) *reloadMetrics {
	m := &reloadMetrics{
		success: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "stickylb", Name: "rules_file_last_load_success",
			Help: "1 when the last load of the rules file succeeded, 0 when it was refused and the previous rules are still served."}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "stickylb", Name: "rules_file_load_failures_total",
			Help: "Loads of the rules file that were refused."}),
	}
	reg.MustRegister(m.success, m.failures)
	return m
}

// loader reads the rules file and applies it to the proxy.
type loader struct {
	path    string
	bind    netip.Addr
	proxy   *proxy.Proxy
	log     logr.Logger
	metrics *reloadMetrics
	version uint64
	last    []byte
}

// load parses, validates and applies the file; on any error the proxy keeps
// serving what it had.
func (l *loader) load() error {
	data, err := os.ReadFile(l.path)
	if err != nil {
		return l.refuse(fmt.Errorf("read rules: %w", err))
	}
	if l.last != nil && string(data) == string(l.last) {
		return nil
	}
	rules, err := rulesfile.Parse(filepath.Base(l.path), data)
	if err != nil {
		return l.refuse(err)
	}
	snap, err := translate.FromRules(rules, l.bind, l.version+1)
	if err != nil {
		return l.refuse(err)
	}
	failed, err := l.proxy.Apply(&snap)
	if err != nil {
		return l.refuse(err)
	}
	l.version++
	l.last = data
	l.metrics.success.Set(1)
	for name, err := range failed {
		l.log.Error(err, "rule not served", "rule", name)
	}
	l.log.Info("rules loaded", "file", l.path, "version", l.version, "rules", len(rules), "listeners", listeners(&snap))
	return nil
}

func (l *loader) refuse(err error) error {
	l.metrics.success.Set(0)
	l.metrics.failures.Inc()
	return err
}

func listeners(s *snapshot.Snapshot) []string {
	var out []string
	for i := range s.Rules {
		for _, k := range s.Rules[i].Listeners() {
			out = append(out, s.Rules[i].Name+"="+k.String())
		}
	}
	return out
}

// watchRules subscribes to SIGHUP and to changes of the rules file's
// directory (not the file: editors and ConfigMap updates replace it by
// renaming). It runs before the first load, so that nothing slips in
// between; without a watcher, SIGHUP still works.
func watchRules(path string, log logr.Logger) (hup chan os.Signal, events <-chan fsnotify.Event, stop func()) {
	hup = make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	stop = func() { signal.Stop(hup) }
	w, err := fsnotify.NewWatcher()
	if err == nil {
		if err = w.Add(filepath.Dir(path)); err == nil {
			return hup, w.Events, func() { signal.Stop(hup); _ = w.Close() }
		}
		_ = w.Close()
	}
	log.Error(err, "cannot watch the rules file; reload with SIGHUP")
	return hup, nil, stop
}

// watch reloads on SIGHUP and when the file changes, until ctx ends.
func (l *loader) watch(ctx context.Context, hup <-chan os.Signal, events <-chan fsnotify.Event) {
	var debounce <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			l.reload("SIGHUP")
		case ev := <-events:
			if filepath.Base(ev.Name) == filepath.Base(l.path) || filepath.Base(ev.Name) == "..data" {
				debounce = time.After(100 * time.Millisecond)
			}
		case <-debounce:
			l.reload("file changed")
		}
	}
}

func (l *loader) reload(why string) {
	if err := l.load(); err != nil {
		l.log.Error(err, "rules refused; still serving the previous rules", "trigger", why, "version", l.version)
	}
}
