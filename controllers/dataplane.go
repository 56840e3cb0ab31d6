package controllers

import (
	"context"
	"maps"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/manager"
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
// Services and EndpointSlices, translates them and applies the snapshot to
// the local proxy.
//
// Translation is incremental (translate.Incremental): the event handlers
// note which objects changed, and a Reconcile reads only those from the
// cache and translates again only the rules they feed. The first Reconcile
// lists everything.
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
	// inc holds every rule, Service and EndpointSlice translated so far;
	// nil until the first Reconcile has listed them. generations are the
	// rules' generations (shared with the state published: copied on change).
	inc         *translate.Incremental
	generations map[types.NamespacedName]int64
	// changes are the objects changed since the last Reconcile took them.
	changes changeSet
	// serving is set once a snapshot built from synced caches is applied.
	serving atomic.Bool

	// cov tracks Covered; see coverage.
	cov coverage

	// subscribers are woken when what a Report says may have changed.
	subsMu      sync.Mutex
	subscribers map[chan struct{}]struct{}
}

// coverage tracks up to which LoadBalancerRule resourceVersion the applied
// snapshot is complete (Dataplane.Covered).
//
// Why it is right. One event handler (ruleEvents) sees the rule informer's
// events in the order of the watch, which is resourceVersion order, and the
// informer writes each event into its cache before it hands it to any
// handler. So:
//
//   - handled, the highest version the handler has seen, is in the cache:
//     a Reconcile that reads handled before it lists the rules lists a cache
//     that holds every change at or below it. Once it has applied what it
//     listed, every change up to max(handled at its start, the highest
//     version it listed) is served (a listed version is in the cache, and
//     the cache holds a prefix of the watch). Versions the handler sees
//     while that Reconcile runs may or may not be in what it listed: they
//     wait for the next one.
//   - A generation-changing event (add, delete, new generation) at or below
//     covered is already served; above it, it is waiting (dirty is the
//     highest one waiting) and the handler enqueues a Reconcile itself, after
//     recording it: that Reconcile starts after, reads handled >= its
//     version, and so covers it. Nothing waits for a Reconcile that nobody
//     queued.
//   - A status-only update (same generation: no snapshot change) at version
//     v is served as soon as every generation-changing event before it is:
//     those all reached the handler before it. With none waiting (dirty <=
//     covered) covered becomes v at once; otherwise v is held back (held)
//     and folded in by the first Reconcile after which none is waiting.
//
// Only the maximum of the waiting and held-back versions is kept: that may
// hold back a status update a little longer than needed, never too little.
// A delete the informer missed (DeleteStateUnknown) carries an older
// version; it still enqueues a Reconcile and never raises covered itself.
type coverage struct {
	mu      sync.Mutex
	covered uint64 // every rule change at or below it is served
	handled uint64 // the highest version the rule handler has seen
	dirty   uint64 // the highest generation-changing version not yet known served
	held    uint64 // the highest status-only version held back behind dirty
}

// NewDataplane returns the dataplane role for p.
func NewDataplane(c client.Client, p *proxy.Proxy, bind netip.Addr, log logr.Logger) *Dataplane {
	d := &Dataplane{Client: c, Proxy: p, Bind: bind, Log: log, changed: make(chan event.GenericEvent),
		pending: map[types.NamespacedName]struct{}{}, wake: make(chan struct{}, 1),
		subscribers: map[chan struct{}]struct{}{}, generations: map[types.NamespacedName]int64{}}
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
	d.publish()
}

// Covered is the highest LoadBalancerRule resourceVersion up to which the
// applied snapshot is complete: every rule change the API server made at or
// below it is served (status-only changes need no snapshot). 0 until the
// first snapshot is applied.
func (d *Dataplane) Covered() uint64 {
	d.cov.mu.Lock()
	defer d.cov.mu.Unlock()
	return d.cov.covered
}

// Subscribe returns a channel that receives (coalesced, never blocking the
// sender) whenever what a Report says may have changed: Covered, the
// snapshot version, the listen errors, a probe transition. cancel stops it.
func (d *Dataplane) Subscribe() (changed <-chan struct{}, cancel func()) {
	c := make(chan struct{}, 1)
	d.subsMu.Lock()
	d.subscribers[c] = struct{}{}
	d.subsMu.Unlock()
	return c, func() {
		d.subsMu.Lock()
		delete(d.subscribers, c)
		d.subsMu.Unlock()
	}
}

// publish wakes the subscribers.
func (d *Dataplane) publish() {
	d.subsMu.Lock()
	defer d.subsMu.Unlock()
	for c := range d.subscribers {
		select {
		case c <- struct{}{}:
		default:
		}
	}
}

// ruleEvents is the dataplane's one handler of LoadBalancerRule events: it
// enqueues a Reconcile for generation-changing events only (status writes
// change no snapshot) and keeps coverage (see there) in step.
type ruleEvents struct{ d *Dataplane }

type ruleQueue = workqueue.TypedRateLimitingInterface[reconcile.Request]

func (h ruleEvents) Create(_ context.Context, e event.CreateEvent, q ruleQueue) {
	h.generationChanged(e.Object, q)
}

func (h ruleEvents) Update(_ context.Context, e event.UpdateEvent, q ruleQueue) {
	if e.ObjectOld == nil || e.ObjectNew == nil || e.ObjectOld.GetGeneration() != e.ObjectNew.GetGeneration() {
		h.generationChanged(e.ObjectNew, q)
		return
	}
	h.statusOnly(e.ObjectNew)
}

func (h ruleEvents) Delete(_ context.Context, e event.DeleteEvent, q ruleQueue) {
	h.generationChanged(e.Object, q)
}

func (h ruleEvents) Generic(_ context.Context, e event.GenericEvent, q ruleQueue) {
	h.generationChanged(e.Object, q)
}

func objectVersion(o client.Object) uint64 {
	if o == nil {
		return 0
	}
	return resourceVersion(o.GetResourceVersion())
}

// generationChanged records a change the snapshot must take in, then
// enqueues the Reconcile that will (in this order: see coverage). The rule
// is noted as changed before handled moves: a Reconcile that reads handled
// at or above v finds the rule among the changes it takes.
func (h ruleEvents) generationChanged(o client.Object, q ruleQueue) {
	if o != nil {
		h.d.changes.add(kindRule, client.ObjectKeyFromObject(o))
	}
	v := objectVersion(o)
	c := &h.d.cov
	c.mu.Lock()
	c.handled = max(c.handled, v)
	if v > c.covered {
		c.dirty = max(c.dirty, v)
	}
	c.mu.Unlock()
	q.Add(everything)
}

// statusOnly covers a change no snapshot takes in, at once when no
// generation-changing event is waiting, else once they are served.
func (h ruleEvents) statusOnly(o client.Object) {
	v := objectVersion(o)
	c := &h.d.cov
	c.mu.Lock()
	c.handled = max(c.handled, v)
	advanced := false
	if c.dirty <= c.covered {
		if v > c.covered {
			c.covered, advanced = v, true
		}
	} else {
		c.held = max(c.held, v)
	}
	c.mu.Unlock()
	if advanced {
		h.d.publish()
	}
}

// reconcileStarts reads, before a Reconcile lists the rules, the version
// that Reconcile will cover once it has applied what it lists.
func (c *coverage) reconcileStarts() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.handled
}

// applied records that the snapshot applied serves every rule change up to
// v, and folds in the held-back status updates when nothing waits any more.
// It reports whether covered grew.
func (c *coverage) applied(v uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	before := c.covered
	c.covered = max(c.covered, v)
	if c.dirty <= c.covered {
		c.covered = max(c.covered, c.held)
		c.held = 0
	}
	return c.covered != before
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

// everything is the one request the dataplane reconciles: the snapshot. What
// changed is in Dataplane.changes.
var everything = reconcile.Request{NamespacedName: types.NamespacedName{Name: "snapshot"}}

// SetupWithManager runs the role on every replica, leader or not.
func (d *Dataplane) SetupWithManager(mgr ctrl.Manager) error {
	notLeaderElected := false
	if err := mgr.Add(manager.RunnableFunc(d.forward)); err != nil {
		return err
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("dataplane").
		WithOptions(controller.Options{NeedLeaderElection: &notLeaderElected, MaxConcurrentReconciles: 1}).
		// Status writes change no snapshot: ruleEvents enqueues only
		// generation changes, and keeps Covered moving past status writes.
		Watches(&lbv1alpha1.LoadBalancerRule{}, ruleEvents{d}).
		// Every Service and EndpointSlice, as a list would return them
		// (our own frontends included, which change no rule's pool: they
		// cost a lookup each).
		Watches(&corev1.Service{}, objectEvents{d, kindService}).
		Watches(&discoveryv1.EndpointSlice{}, objectEvents{d, kindSlice}).
		// One reconcile at start even when there is no object at all, so the
		// replica becomes Serving (ready) in an empty cluster too.
		WatchesRawSource(source.Func(func(_ context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
			q.Add(everything)
			return nil
		})).
		Complete(d)
}

// Reconcile brings the snapshot up to date with the objects changed since
// the last one, and applies it.
func (d *Dataplane) Reconcile(ctx context.Context, _ reconcile.Request) (reconcile.Result, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	// Read before taking the changes: every rule change up to it is among
	// them (see generationChanged), or in what the first Reconcile lists.
	covers := d.cov.reconcileStarts()
	changes := d.changes.take()
	generations := d.generations
	loaded := d.inc == nil
	if loaded {
		listed, gens, err := d.load(ctx)
		if err != nil {
			d.changes.putBack(changes)
			return reconcile.Result{}, err
		}
		covers = max(covers, listed)
		generations = gens
	} else {
		var err error
		if generations, err = d.feed(ctx, changes); err != nil {
			d.changes.putBack(changes)
			return reconcile.Result{}, err
		}
	}
	snap, results, changedRules := d.inc.Build(d.version + 1)
	prev := d.State()
	next := &DataplaneState{
		Version:      d.version,
		Results:      results,
		Generations:  generations,
		ListenErrors: map[types.NamespacedName]string{},
	}
	if d.lastSnap == nil || !sameRules(d.lastSnap, &snap) || len(prev.ListenErrors) > 0 {
		failed, err := d.Proxy.Apply(&snap)
		if err != nil {
			// What this Build found changed would be lost: start again from
			// a full list, which reports every rule.
			d.inc = nil
			return reconcile.Result{}, err
		}
		d.version = snap.Version
		d.lastSnap = &snap
		next.Version = snap.Version
		for name, err := range failed {
			ns, n, _ := cutName(name)
			next.ListenErrors[types.NamespacedName{Namespace: ns, Name: n}] = err.Error()
		}
		d.Log.V(1).Info("snapshot applied", "version", snap.Version, "rules", len(snap.Rules),
			"changed", len(changedRules), "failed", len(failed))
		if !d.serving.Swap(true) {
			d.Log.Info("serving: first snapshot applied", "version", snap.Version, "rules", len(snap.Rules))
		}
	} else {
		next.ListenErrors = prev.ListenErrors
	}
	d.generations = generations
	d.state.Store(next)
	// What was listed is served (applied now, or unchanged).
	if d.cov.applied(covers) || next.Version != prev.Version || !maps.Equal(next.ListenErrors, prev.ListenErrors) {
		d.publish()
	}
	var res reconcile.Result
	if len(next.ListenErrors) > 0 {
		// A frontend port may free up without any object changing.
		res.RequeueAfter = 5 * time.Second
	}
	// The rules whose status may change: a new result or snapshot rule, a
	// new generation, a new listen error.
	for _, key := range changedRules {
		d.notify(key)
	}
	ruleKeys := changes[kindRule]
	if loaded {
		ruleKeys = unionKeys(prev.Generations, next.Generations)
	}
	for key := range ruleKeys {
		if prev.Generations[key] != next.Generations[key] {
			d.notify(key)
		}
	}
	for key := range unionKeys(prev.ListenErrors, next.ListenErrors) {
		if prev.ListenErrors[key] != next.ListenErrors[key] {
			d.notify(key)
		}
	}
	return res, nil
}

// load lists every rule, Service and EndpointSlice into a new Incremental.
// It returns the highest rule resourceVersion listed and the generations.
func (d *Dataplane) load(ctx context.Context) (uint64, map[types.NamespacedName]int64, error) {
	var rules lbv1alpha1.LoadBalancerRuleList
	if err := d.Client.List(ctx, &rules, client.UnsafeDisableDeepCopy); err != nil {
		return 0, nil, err
	}
	var services corev1.ServiceList
	if err := d.Client.List(ctx, &services, client.UnsafeDisableDeepCopy); err != nil {
		return 0, nil, err
	}
	var epSlices discoveryv1.EndpointSliceList
	if err := d.Client.List(ctx, &epSlices, client.UnsafeDisableDeepCopy); err != nil {
		return 0, nil, err
	}
	var listed uint64
	gens := make(map[types.NamespacedName]int64, len(rules.Items))
	for i := range rules.Items {
		r := &rules.Items[i]
		listed = max(listed, resourceVersion(r.ResourceVersion))
		gens[types.NamespacedName{Namespace: r.Namespace, Name: r.Name}] = r.Generation
	}
	inc := translate.NewIncremental(d.Bind)
	inc.Sync(translate.Input{Rules: rules.Items, Services: services.Items, Slices: epSlices.Items})
	d.inc = inc
	return listed, gens, nil
}

// feed reads the changed objects from the cache into d.inc, and returns
// the rules' generations (a copy when any changed).
func (d *Dataplane) feed(ctx context.Context, changes map[objectKind]map[types.NamespacedName]struct{}) (map[types.NamespacedName]int64, error) {
	gens := d.generations
	copied := false
	setGen := func(key types.NamespacedName, g int64, present bool) {
		if old, ok := gens[key]; ok == present && old == g {
			return
		}
		if !copied {
			gens, copied = maps.Clone(gens), true
		}
		if present {
			gens[key] = g
		} else {
			delete(gens, key)
		}
	}
	for key := range changes[kindRule] {
		r := &lbv1alpha1.LoadBalancerRule{}
		switch err := d.Client.Get(ctx, key, r, client.UnsafeDisableDeepCopy); {
		case apierrors.IsNotFound(err):
			d.inc.DeleteRule(key)
			setGen(key, 0, false)
		case err != nil:
			return nil, err
		default:
			d.inc.SetRule(r)
			setGen(key, r.Generation, true)
		}
	}
	for key := range changes[kindService] {
		s := &corev1.Service{}
		switch err := d.Client.Get(ctx, key, s, client.UnsafeDisableDeepCopy); {
		case apierrors.IsNotFound(err):
			d.inc.DeleteService(key.Namespace, key.Name)
		case err != nil:
			return nil, err
		default:
			d.inc.SetService(s)
		}
	}
	for key := range changes[kindSlice] {
		es := &discoveryv1.EndpointSlice{}
		switch err := d.Client.Get(ctx, key, es, client.UnsafeDisableDeepCopy); {
		case apierrors.IsNotFound(err):
			d.inc.DeleteSlice(key.Namespace, key.Name)
		case err != nil:
			return nil, err
		default:
			d.inc.SetSlice(es)
		}
	}
	return gens, nil
}

// sameRules reports whether two snapshots built by one Incremental serve
// the same rules (versions aside): it shares the rules of a snapshot it did
// not change.
func sameRules(a, b *snapshot.Snapshot) bool {
	return len(a.Rules) == len(b.Rules) && (len(a.Rules) == 0 || &a.Rules[0] == &b.Rules[0])
}

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
