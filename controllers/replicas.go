package controllers

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
)

// Replicas is the controller role's view of every dataplane replica that
// counts for a rule's status, built from their Reports. In a cluster the
// replicas that count are the frontends' endpoints (the ready stickylb
// pods); outside one, every manager whose report Lease is fresh.
type Replicas struct {
	Client client.Reader
	// Namespace holds the report Leases.
	Namespace string
	// Endpoints lists the frontends' endpoints; nil outside a cluster.
	Endpoints func(ctx context.Context) ([]DataplaneEndpoint, error)
	// Now is the clock (time.Now when nil).
	Now func() time.Time

	mu sync.Mutex
	// since is, per rule, the generation the controller last saw and the
	// resourceVersion at which it first saw it: a replica whose report
	// covers that version serves that generation.
	since map[types.NamespacedName]generationSeen
	// waiting are the rules some replica has not caught up with, or that a
	// report names; a changed report re-evaluates only these.
	waiting map[types.NamespacedName]struct{}
	// reports are the last reports seen, by Lease name.
	reports map[string]*Report
	changed chan event.GenericEvent
}

type generationSeen struct {
	generation int64
	rv         uint64
}

// replica is one replica that counts, and its report (nil before its first).
type replica struct {
	name, address string
	report        *Report
}

func (r replica) String() string {
	if r.name == "" || r.name == r.address {
		return r.address
	}
	return fmt.Sprintf("%s (%s)", r.address, r.name)
}

// NewReplicas returns the view; run Watch to follow the reports.
func NewReplicas(c client.Reader, namespace string, endpoints func(context.Context) ([]DataplaneEndpoint, error)) *Replicas {
	return &Replicas{Client: c, Namespace: namespace, Endpoints: endpoints,
		since: map[types.NamespacedName]generationSeen{}, waiting: map[types.NamespacedName]struct{}{},
		reports: map[string]*Report{}, changed: make(chan event.GenericEvent)}
}

// Changes are the rules whose status a changed report may change.
func (v *Replicas) Changes() <-chan event.GenericEvent { return v.changed }

// handler turns report Lease events into the rules to reconcile.
func (v *Replicas) handler() handler.EventHandler {
	enqueue := func(q workqueue.TypedRateLimitingInterface[reconcile.Request], keys []types.NamespacedName) {
		for _, k := range keys {
			q.Add(reconcile.Request{NamespacedName: k})
		}
	}
	return handler.Funcs{
		CreateFunc: func(_ context.Context, e event.CreateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			if l, ok := e.Object.(*coordinationv1.Lease); ok {
				enqueue(q, v.ReportChanged(l, false))
			}
		},
		UpdateFunc: func(_ context.Context, e event.UpdateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			if l, ok := e.ObjectNew.(*coordinationv1.Lease); ok {
				enqueue(q, v.ReportChanged(l, false))
			}
		},
		DeleteFunc: func(_ context.Context, e event.DeleteEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			if l, ok := e.Object.(*coordinationv1.Lease); ok {
				enqueue(q, v.ReportChanged(l, true))
			}
		},
	}
}

// isReport passes the replicas' report Leases only.
var isReport = predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetLabels()[LabelReport] == "true" })

// ruleObject is a rule named by key, for events.
func ruleObject(k types.NamespacedName) *lbv1alpha1.LoadBalancerRule {
	r := &lbv1alpha1.LoadBalancerRule{}
	r.Namespace, r.Name = k.Namespace, k.Name
	return r
}

// ReportChanged records a report Lease's new content and returns the rules
// to re-evaluate: those waiting, and those the old or the new report names.
// A report that did not change (a heartbeat) re-evaluates nothing.
func (v *Replicas) ReportChanged(l *coordinationv1.Lease, deleted bool) []types.NamespacedName {
	var next *Report
	if !deleted {
		next, _ = decodeReport(l)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	prev := v.reports[l.Name]
	if next == nil {
		delete(v.reports, l.Name)
	} else {
		v.reports[l.Name] = next
	}
	if prev != nil && next != nil && reflect.DeepEqual(prev, next) {
		return nil
	}
	keys := maps.Clone(v.waiting)
	for _, r := range []*Report{prev, next} {
		if r == nil {
			continue
		}
		for k := range r.Failed {
			keys[keyOf(k)] = struct{}{}
		}
		for k := range r.Down {
			keys[keyOf(k)] = struct{}{}
		}
	}
	return slices.Collect(maps.Keys(keys))
}

func (v *Replicas) send(ctx context.Context, k types.NamespacedName) {
	select {
	case v.changed <- event.GenericEvent{Object: ruleObject(k)}:
	case <-ctx.Done():
	}
}

// Expire re-evaluates every waiting rule now and then, for the replicas
// outside a cluster whose report expired without a word (a crash).
func (v *Replicas) Expire(ctx context.Context) error {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if v.Endpoints != nil {
			continue // in a cluster, the pods' readiness says who counts
		}
		v.mu.Lock()
		keys := maps.Clone(v.waiting)
		v.mu.Unlock()
		for k := range keys {
			v.send(ctx, k)
		}
	}
}

// counted lists the replicas that count now, with their reports.
func (v *Replicas) counted(ctx context.Context) ([]replica, error) {
	now := time.Now()
	if v.Now != nil {
		now = v.Now()
	}
	reports, err := ReadReports(ctx, v.Client, v.Namespace, now)
	if err != nil {
		return nil, err
	}
	byName := map[string]*Report{}
	var fresh []replica
	for i := range reports {
		rep := &reports[i].Report
		byName[rep.Replica] = rep
		if reports[i].Fresh {
			fresh = append(fresh, replica{name: rep.Replica, address: rep.Address, report: rep})
		}
	}
	var out []replica
	if v.Endpoints == nil {
		out = fresh
	} else {
		eps, err := v.Endpoints(ctx)
		if err != nil {
			return nil, err
		}
		for _, ep := range eps {
			r := replica{address: ep.Address.String()}
			if ep.Pod != nil {
				r.name = ep.Pod.Name
			}
			r.report = byName[r.name]
			out = append(out, r)
		}
	}
	slices.SortFunc(out, func(a, b replica) int { return cmp.Compare(a.address, b.address) })
	return out, nil
}

// Serving is what every counted replica serves of one rule.
type Serving struct {
	// Replicas is how many count.
	Replicas int
	// Behind names the replicas that have not applied the rule's generation
	// (or not reported at all); Failed, those that cannot serve it, with why.
	Behind []string
	Failed []string
	// MaxDown is the most ready backends any replica's probes see down, and
	// DownOn names the replicas that see that many.
	MaxDown int32
	DownOn  []string
}

// Serving evaluates a rule: key at generation, whose object the cache shows
// at resourceVersion rv.
func (v *Replicas) Serving(ctx context.Context, key types.NamespacedName, generation int64, rv string) (Serving, error) {
	reps, err := v.counted(ctx)
	if err != nil {
		return Serving{}, err
	}
	v.mu.Lock()
	seen, ok := v.since[key]
	if !ok || seen.generation != generation {
		// The first sight of this generation: the change that made it is at
		// or before this version (later ones are only status writes).
		seen = generationSeen{generation: generation, rv: resourceVersion(rv)}
		v.since[key] = seen
	}
	v.mu.Unlock()

	name := key.String()
	s := Serving{Replicas: len(reps)}
	for _, r := range reps {
		switch {
		case r.report == nil:
			s.Behind = append(s.Behind, r.String()+": no report yet")
		case r.report.Failed[name] != "":
			s.Failed = append(s.Failed, r.String()+": "+r.report.Failed[name])
		case r.report.Covered < seen.rv:
			s.Behind = append(s.Behind, r.String())
		}
		if r.report == nil {
			continue
		}
		switch d := r.report.Down[name]; {
		case d > s.MaxDown:
			s.MaxDown, s.DownOn = d, []string{r.String()}
		case d > 0 && d == s.MaxDown:
			s.DownOn = append(s.DownOn, r.String())
		}
	}
	v.mu.Lock()
	if len(s.Behind) > 0 || len(s.Failed) > 0 || s.MaxDown > 0 {
		v.waiting[key] = struct{}{}
	} else {
		delete(v.waiting, key)
	}
	v.mu.Unlock()
	return s, nil
}

// Forget drops what the view holds of a deleted rule.
func (v *Replicas) Forget(key types.NamespacedName) {
	v.mu.Lock()
	delete(v.since, key)
	delete(v.waiting, key)
	v.mu.Unlock()
}

// programmed is the Programmed condition for s.
func (s Serving) programmed(generation int64) (bool, string, string) {
	switch {
	case len(s.Failed) > 0:
		return false, "ListenFailed", fmt.Sprintf("%d of %d replicas cannot serve: %s", len(s.Failed), s.Replicas, strings.Join(s.Failed, "; "))
	case s.Replicas == 0:
		return false, "Pending", "no dataplane replica is ready"
	case len(s.Behind) > 0:
		return false, "Pending", fmt.Sprintf("%d of %d replicas have not applied generation %d: %s", len(s.Behind), s.Replicas, generation, strings.Join(s.Behind, ", "))
	}
	return true, "Programmed", fmt.Sprintf("%d of %d replicas serve generation %d", s.Replicas, s.Replicas, generation)
}

func keyOf(s string) types.NamespacedName {
	ns, name, _ := cutName(s)
	return types.NamespacedName{Namespace: ns, Name: name}
}
