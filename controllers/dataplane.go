package controllers

import (
	"context"
	"maps"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/dataplane/proxy"
	"github.com/stickylb/stickylb/dataplane/snapshot"
	"github.com/stickylb/stickylb/dataplane/translate"
)

// +kubebuilder:rbac:groups=core,resources=services,verbs=get;list;watch
// +kubebuilder:rbac:groups=discovery.k8s.io,resources=endpointslices,verbs=get;list;watch

// DataplaneState is what this replica's dataplane serves, for the controller
// role to report as status.
type DataplaneState struct {
	// Version of the snapshot applied.
	Version uint64
	// Results of translation, per rule.
	Results map[types.NamespacedName]translate.Result
	// Generations are the rule generations the snapshot was built from.
	Generations map[types.NamespacedName]int64
	// ListenErrors holds the rules whose frontend could not be opened.
	ListenErrors map[types.NamespacedName]string
}

// Dataplane is the dataplane role, run by every replica: it watches rules,
// Services and EndpointSlices, translates them with one pure function and
// applies the snapshot to the local proxy.
type Dataplane struct {
	Client client.Client
	Proxy  *proxy.Proxy
	// Bind is the address every frontend listens on (the pod IP).
	Bind netip.Addr
	Log  logr.Logger

	// changed tells the controller role which rules' status may have
	// changed; pending coalesces them so that none is ever dropped.
	changed   chan event.GenericEvent
	pendingMu sync.Mutex
	pending   map[types.NamespacedName]struct{}
	wake      chan struct{}
	state     atomic.Pointer[DataplaneState]

	mu       sync.Mutex // serialises reconciles
	version  uint64
	lastSnap *snapshot.Snapshot
	// serving is set once a snapshot built from synced caches is applied.
	serving atomic.Bool
}

// NewDataplane returns the dataplane role for p.
func NewDataplane(c client.Client, p *proxy.Proxy, bind netip.Addr, log logr.Logger) *Dataplane {
	d := &Dataplane{Client: c, Proxy: p, Bind: bind, Log: log, changed: make(chan event.GenericEvent),
		pending: map[types.NamespacedName]struct{}{}, wake: make(chan struct{}, 1)}
	d.state.Store(&DataplaneState{})
	return d
}

// Serving reports whether the proxy serves a snapshot built from synced
// caches: from the first successful reconcile on (the controller starts
// reconciling only once its caches have synced).
func (d *Dataplane) Serving() bool { return d.serving.Load() }

// State is the latest state the dataplane applied.
func (d *Dataplane) State() *DataplaneState { return d.state.Load() }

// Changes are rules whose dataplane state changed; the controller role watches them.
func (d *Dataplane) Changes() <-chan event.GenericEvent { return d.changed }

// HealthChanged is the proxy's OnHealthChange hook: a probe transition
// changes a rule's healthy count.
func (d *Dataplane) HealthChanged(rule string) {
	ns, name, _ := cutName(rule)
	d.notify(types.NamespacedName{Namespace: ns, Name: name})
}

// notify queues key for the controller role. It never blocks: probe
// goroutines call it.
func (d *Dataplane) notify(key types.NamespacedName) {
	d.pendingMu.Lock()
	d.pending[key] = struct{}{}
	d.pendingMu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// forward hands the pending rules to the controller role until ctx ends.
func (d *Dataplane) forward(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-d.wake:
		}
		d.pendingMu.Lock()
		keys := d.pending
		d.pending = map[types.NamespacedName]struct{}{}
		d.pendingMu.Unlock()
		for key := range keys {
			r := &lbv1alpha1.LoadBalancerRule{}
			r.Namespace, r.Name = key.Namespace, key.Name
			select {
			case d.changed <- event.GenericEvent{Object: r}:
			case <-ctx.Done():
				return nil
			}
		}
	}
}

// everything is the one request the dataplane reconciles: the whole world.
var everything = reconcile.Request{NamespacedName: types.NamespacedName{Name: "snapshot"}}

// SetupWithManager runs the role on every replica, leader or not.
func (d *Dataplane) SetupWithManager(mgr ctrl.Manager) error {
	all := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request {
		return []reconcile.Request{everything}
	})
	notLeaderElected := false
	if err := mgr.Add(manager.RunnableFunc(d.forward)); err != nil {
		return err
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("dataplane").
		WithOptions(controller.Options{NeedLeaderElection: &notLeaderElected, MaxConcurrentReconciles: 1}).
		// Status writes and our own frontends change no snapshot.
		Watches(&lbv1alpha1.LoadBalancerRule{}, all, builder.WithPredicates(predicate.GenerationChangedPredicate{})).
		Watches(&corev1.Service{}, all, builder.WithPredicates(notFrontend)).
		Watches(&discoveryv1.EndpointSlice{}, all, builder.WithPredicates(notFrontend)).
		// One reconcile at start even when there is no object at all, so the
		// replica becomes Serving (ready) in an empty cluster too.
		WatchesRawSource(source.Func(func(_ context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
			q.Add(everything)
			return nil
		})).
		Complete(d)
}

// notFrontend skips the frontend Services and EndpointSlices the controller
// role writes: no rule's backends are there.
var notFrontend = predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetLabels()[LabelFrontend] == "" })

// Reconcile rebuilds and applies the snapshot.
func (d *Dataplane) Reconcile(ctx context.Context, _ reconcile.Request) (reconcile.Result, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var rules lbv1alpha1.LoadBalancerRuleList
	if err := d.Client.List(ctx, &rules, client.UnsafeDisableDeepCopy); err != nil {
		return reconcile.Result{}, err
	}
	var services corev1.ServiceList
	if err := d.Client.List(ctx, &services, client.UnsafeDisableDeepCopy); err != nil {
		return reconcile.Result{}, err
	}
	var slices discoveryv1.EndpointSliceList
	if err := d.Client.List(ctx, &slices, client.UnsafeDisableDeepCopy); err != nil {
		return reconcile.Result{}, err
	}
	snap, results := translate.Translate(translate.Input{
		Rules: rules.Items, Services: services.Items, Slices: slices.Items,
		Bind: d.Bind, Version: d.version + 1,
	})
	prev := d.State()
	next := &DataplaneState{
		Version:      d.version,
		Results:      results,
		Generations:  make(map[types.NamespacedName]int64, len(rules.Items)),
		ListenErrors: map[types.NamespacedName]string{},
	}
	for i := range rules.Items {
		r := &rules.Items[i]
		next.Generations[types.NamespacedName{Namespace: r.Namespace, Name: r.Name}] = r.Generation
	}
	if d.lastSnap == nil || !sameRules(d.lastSnap, &snap) || len(prev.ListenErrors) > 0 {
		failed, err := d.Proxy.Apply(&snap)
		if err != nil {
			return reconcile.Result{}, err
		}
		d.version = snap.Version
		d.lastSnap = &snap
		next.Version = snap.Version
		for name, err := range failed {
			ns, n, _ := cutName(name)
			next.ListenErrors[types.NamespacedName{Namespace: ns, Name: n}] = err.Error()
		}
		d.Log.V(1).Info("snapshot applied", "version", snap.Version, "rules", len(snap.Rules), "failed", len(failed))
		if !d.serving.Swap(true) {
			d.Log.Info("serving: first snapshot applied", "version", snap.Version, "rules", len(snap.Rules))
		}
	} else {
		next.ListenErrors = prev.ListenErrors
	}
	d.state.Store(next)
	var res reconcile.Result
	if len(next.ListenErrors) > 0 {
		// A frontend port may free up without any object changing.
		res.RequeueAfter = 5 * time.Second
	}
	for key := range unionKeys(prev.Generations, next.Generations) {
		if prev.Generations[key] != next.Generations[key] ||
			!reflect.DeepEqual(prev.Results[key], next.Results[key]) ||
			prev.ListenErrors[key] != next.ListenErrors[key] {
			d.notify(key)
		}
	}
	return res, nil
}

// sameRules reports whether two snapshots serve the same rules (versions aside).
func sameRules(a, b *snapshot.Snapshot) bool { return reflect.DeepEqual(a.Rules, b.Rules) }

func unionKeys[V any](a, b map[types.NamespacedName]V) map[types.NamespacedName]struct{} {
	out := make(map[types.NamespacedName]struct{}, len(a)+len(b))
	for k := range maps.Keys(a) {
		out[k] = struct{}{}
	}
	for k := range maps.Keys(b) {
		out[k] = struct{}{}
	}
	return out
}

// cutName splits "namespace/name".
func cutName(s string) (namespace, name string, ok bool) { return strings.Cut(s, "/") }
