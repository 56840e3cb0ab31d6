package controllers

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
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
	"github.com/stickylb/stickylb/dataplane/translate"
)

// +kubebuilder:rbac:groups=core,resources=pods,verbs=get;list;watch,namespace=stickylb-system

// RuleReconciler is the controller role (leader-elected): it owns each
// rule's conditions, backend counts and frontend, from this replica's
// dataplane state.
type RuleReconciler struct {
	Client    client.Client
	Recorder  record.EventRecorder
	Dataplane *Dataplane
	// Healthy reports a served rule's healthy backend count.
	Healthy func(rule string) (int, bool)
	// DataplaneEndpoints lists the ready dataplane replicas, the endpoints
	// of every frontend (ReadyPodEndpoints in a cluster).
	DataplaneEndpoints func(ctx context.Context) ([]DataplaneEndpoint, error)
	// Local is set when the manager runs outside a cluster: the dataplane's
	// bind address is then the frontend address reported.
	Local bool
	// Replicas, when set, makes Programmed and the healthy count speak for
	// every dataplane replica that counts (their reports), not only this one.
	Replicas *Replicas

	// frontendIndexed: SetupWithManager indexed the manager's cache by
	// frontend (indexFrontend), and Client reads from that cache.
	frontendIndexed bool
}

// indexFrontend indexes rules by the name of their frontend, so that a
// frontend's sync reads its own rules rather than every rule of its
// namespace (at 10,000 rules in one namespace, each reconcile copied them
// all).
const indexFrontend = "lb.stickylb.io/frontend"

// ruleWorkers is how many rules reconcile at once.
const ruleWorkers = 8

// SetupWithManager watches rules, the dataplane's changes and the frontend
// Services it owns.
func (r *RuleReconciler) SetupWithManager(mgr ctrl.Manager, extra ...func(*ctrl.Builder) *ctrl.Builder) error {
	if err := mgr.GetFieldIndexer().IndexField(context.Background(), &lbv1alpha1.LoadBalancerRule{}, indexFrontend,
		func(o client.Object) []string {
			if r, ok := o.(*lbv1alpha1.LoadBalancerRule); ok {
				return []string{frontendOf(r)}
			}
			return nil
		}); err != nil {
		return err
	}
	r.frontendIndexed = true
	b := ctrl.NewControllerManagedBy(mgr).
		Named("loadbalancerrule").
		// Each reconcile mostly waits on the API server (a status patch, an
		// event): with 10,000 rules queued one at a time, a process used a
		// third of one CPU. Rules sharing a frontend may sync its Service
		// at once; the loser's conflict is retried.
		WithOptions(controller.Options{MaxConcurrentReconciles: ruleWorkers}).
		For(&lbv1alpha1.LoadBalancerRule{}).
		WatchesRawSource(source.Channel(r.Dataplane.Changes(), &handler.EnqueueRequestForObject{})).
		Watches(&corev1.Service{}, handler.EnqueueRequestsFromMapFunc(r.rulesOfFrontendService))
	if r.Replicas != nil {
		b = b.WatchesRawSource(source.Channel(r.Replicas.Changes(), &handler.EnqueueRequestForObject{})).
			Watches(&coordinationv1.Lease{}, r.Replicas.handler(), builder.WithPredicates(isReport))
		if err := mgr.Add(manager.RunnableFunc(r.Replicas.Expire)); err != nil {
			return err
		}
	}
	for _, e := range extra {
		b = e(b)
	}
	return b.Complete(r)
}

// rulesOfFrontendService maps a frontend Service to the rules that own it.
func (r *RuleReconciler) rulesOfFrontendService(_ context.Context, o client.Object) []reconcile.Request {
	if o.GetLabels()[LabelFrontend] == "" {
		return nil
	}
	var out []reconcile.Request
	for _, ref := range o.GetOwnerReferences() {
		if ref.Kind == "LoadBalancerRule" {
			out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: o.GetNamespace(), Name: ref.Name}})
		}
	}
	return out
}

// Reconcile brings one rule's frontend and status up to date.
func (r *RuleReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var rule lbv1alpha1.LoadBalancerRule
	err := r.Client.Get(ctx, req.NamespacedName, &rule)
	if apierrors.IsNotFound(err) {
		if r.Replicas != nil {
			r.Replicas.Forget(req.NamespacedName)
		}
		// A deleted rule may leave a frontend with no rule; tidy the namespace.
		return reconcile.Result{}, r.syncFrontends(ctx, req.Namespace, "")
	}
	if err != nil {
		return reconcile.Result{}, err
	}
	state := r.Dataplane.State()
	if state.Generations[req.NamespacedName] != rule.Generation {
		// The dataplane has not translated this generation yet; it notifies
		// us when it has.
		return reconcile.Result{}, nil
	}
	svc, err := r.syncFrontend(ctx, rule.Namespace, frontendOf(&rule))
	if err != nil {
		return reconcile.Result{}, err
	}
	res := state.Results[req.NamespacedName]
	var serving *Serving
	if r.Replicas != nil && res.Accepted {
		s, err := r.Replicas.Serving(ctx, req.NamespacedName, rule.Generation, rule.ResourceVersion)
		if err != nil {
			return reconcile.Result{}, err
		}
		serving = &s
	}
	status := r.desiredStatus(&rule, res, state.ListenErrors[req.NamespacedName], serving)
	status.Frontend.Addresses = frontendAddresses(svc, r.Dataplane.Bind, r.Local)
	if !res.Accepted {
		status.Frontend.Addresses = nil
	}
	if equality.Semantic.DeepEqual(status, rule.Status) {
		return reconcile.Result{}, nil
	}
	r.recordTransitions(&rule, status)
	orig := rule.DeepCopy()
	// A merge patch leaves out every field whose value equals the one read,
	// and a status never written reads as zero counts: a first status with
	// a count of 0 (a rule refused for its port, whose endpoints are ready
	// but none healthy) would reach the API server without it and be
	// refused as incomplete. Counts no status can hold make the patch carry
	// all three, every time.
	orig.Status.Backends = lbv1alpha1.BackendCounts{Total: -1, Ready: -1, Healthy: -1}
	rule.Status = status
	if err := r.Client.Status().Patch(ctx, &rule, client.MergeFrom(orig)); err != nil {
		return reconcile.Result{}, fmt.Errorf("patch status: %w", err)
	}
	return reconcile.Result{}, nil
}

// desiredStatus computes the rule's status for its current generation, from
// this replica's translation and what every replica serves (serving; nil
// when only this replica counts).
func (r *RuleReconciler) desiredStatus(rule *lbv1alpha1.LoadBalancerRule, res translate.Result, listenErr string, serving *Serving) lbv1alpha1.LoadBalancerRuleStatus {
	st := *rule.Status.DeepCopy()
	st.ObservedGeneration = rule.Generation
	set := func(t lbv1alpha1.ConditionType, ok bool, reason lbv1alpha1.ConditionReason, msg string) {
		status := metav1.ConditionFalse
		if ok {
			status = metav1.ConditionTrue
		}
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{
			Type: string(t), Status: status, Reason: string(reason), Message: msg, ObservedGeneration: rule.Generation,
		})
	}

	switch {
	case res.Invalid != "":
		set(lbv1alpha1.ConditionAccepted, false, lbv1alpha1.ReasonInvalidSpec, res.Invalid)
	case !res.Accepted:
		set(lbv1alpha1.ConditionAccepted, false, lbv1alpha1.ReasonPortConflict,
			fmt.Sprintf("%s is held by the older rule %s", res.ConflictOn, res.ConflictWith))
	default:
		set(lbv1alpha1.ConditionAccepted, true, lbv1alpha1.ReasonAccepted, "the rule holds its frontend port")
	}

	if rule.Spec.BackendPool.ServiceName != "" && !res.ResolvedRefs {
		set(lbv1alpha1.ConditionResolvedRefs, false, lbv1alpha1.ReasonBackendNotFound,
			fmt.Sprintf("Service %s/%s not found", rule.Namespace, rule.Spec.BackendPool.ServiceName))
	} else {
		set(lbv1alpha1.ConditionResolvedRefs, true, lbv1alpha1.ReasonResolvedRefs, "the backend pool resolves")
	}

	healthy, served := 0, false
	if res.Accepted && r.Healthy != nil {
		healthy, served = r.Healthy(rule.Namespace + "/" + rule.Name)
	}
	healthyNote := ""
	switch {
	case !res.Accepted:
		set(lbv1alpha1.ConditionProgrammed, false, lbv1alpha1.ReasonPending, "not programmed: the rule is not accepted")
	case serving != nil:
		ok, reason, msg := serving.programmed(rule.Generation)
		set(lbv1alpha1.ConditionProgrammed, ok, lbv1alpha1.ConditionReason(reason), msg)
		// The lowest healthy count any replica sees is what a client may get.
		if low := res.Ready - serving.MaxDown; serving.MaxDown > 0 && (!served || int32(healthy) > low) {
			healthy, served = int(max(low, 0)), true
		}
		if serving.MaxDown > 0 && len(serving.DownOn) < serving.Replicas {
			healthyNote = fmt.Sprintf(" (the lowest count of %d replicas: %s see %d down that others see up)",
				serving.Replicas, strings.Join(serving.DownOn, ", "), serving.MaxDown)
		}
	case listenErr != "":
		set(lbv1alpha1.ConditionProgrammed, false, lbv1alpha1.ReasonListenFailed, listenErr)
	case !served:
		set(lbv1alpha1.ConditionProgrammed, false, lbv1alpha1.ReasonPending, "the dataplane has not applied this generation yet")
	default:
		set(lbv1alpha1.ConditionProgrammed, true, lbv1alpha1.ReasonProgrammed, "the dataplane serves this generation")
	}

	st.Backends = lbv1alpha1.BackendCounts{Total: res.Total, Ready: res.Ready, Healthy: int32(healthy)}
	ready := func(t lbv1alpha1.ConditionType) bool { return meta.IsStatusConditionTrue(st.Conditions, string(t)) }
	switch {
	case !ready(lbv1alpha1.ConditionAccepted):
		set(lbv1alpha1.ConditionReady, false, lbv1alpha1.ReasonNotAccepted, "the rule is not accepted")
	case !ready(lbv1alpha1.ConditionResolvedRefs):
		set(lbv1alpha1.ConditionReady, false, lbv1alpha1.ReasonRefsNotResolved, "the backend Service does not exist")
	case !ready(lbv1alpha1.ConditionProgrammed):
		set(lbv1alpha1.ConditionReady, false, lbv1alpha1.ReasonNotProgrammed, "the dataplane does not serve this generation")
	case healthy == 0:
		set(lbv1alpha1.ConditionReady, false, lbv1alpha1.ReasonNoHealthyBackends,
			fmt.Sprintf("none of %d backends is ready and passing its probe%s", res.Total, healthyNote))
	default:
		set(lbv1alpha1.ConditionReady, true, lbv1alpha1.ReasonReady, fmt.Sprintf("%d of %d backends healthy%s", healthy, res.Total, healthyNote))
	}
	slices.SortFunc(st.Conditions, func(a, b metav1.Condition) int { return cmp.Compare(conditionOrder(a.Type), conditionOrder(b.Type)) })
	return st
}

func conditionOrder(t string) int {
	return slices.Index([]lbv1alpha1.ConditionType{lbv1alpha1.ConditionAccepted, lbv1alpha1.ConditionResolvedRefs,
		lbv1alpha1.ConditionProgrammed, lbv1alpha1.ConditionReady}, lbv1alpha1.ConditionType(t))
}

// recordTransitions emits an Event for every condition whose status changes.
func (r *RuleReconciler) recordTransitions(rule *lbv1alpha1.LoadBalancerRule, next lbv1alpha1.LoadBalancerRuleStatus) {
	if r.Recorder == nil {
		return
	}
	for _, c := range next.Conditions {
		old := meta.FindStatusCondition(rule.Status.Conditions, c.Type)
		if old != nil && old.Status == c.Status && old.Reason == c.Reason {
			continue
		}
		kind := corev1.EventTypeNormal
		if c.Status != metav1.ConditionTrue {
			kind = corev1.EventTypeWarning
		}
		r.Recorder.Eventf(rule, kind, c.Reason, "%s=%s: %s", c.Type, c.Status, c.Message)
	}
}

// syncFrontend makes one frontend's Service and EndpointSlice match its
// accepted rules.
func (r *RuleReconciler) syncFrontend(ctx context.Context, namespace, frontend string) (*corev1.Service, error) {
	var rules lbv1alpha1.LoadBalancerRuleList
	opts := []client.ListOption{client.InNamespace(namespace), client.UnsafeDisableDeepCopy}
	if r.frontendIndexed {
		opts = append(opts, client.MatchingFields{indexFrontend: frontend})
	}
	if err := r.Client.List(ctx, &rules, opts...); err != nil {
		return nil, err
	}
	state := r.Dataplane.State()
	var on []*lbv1alpha1.LoadBalancerRule
	for i := range rules.Items {
		rule := &rules.Items[i]
		key := types.NamespacedName{Namespace: rule.Namespace, Name: rule.Name}
		if frontendOf(rule) == frontend && rule.DeletionTimestamp == nil && state.Results[key].Accepted {
			on = append(on, rule)
		}
	}
	slices.SortFunc(on, func(a, b *lbv1alpha1.LoadBalancerRule) int {
		if c := a.CreationTimestamp.Compare(b.CreationTimestamp.Time); c != 0 {
			return c
		}
		return cmp.Compare(a.Name, b.Name)
	})
	endpoints, err := r.DataplaneEndpoints(ctx)
	if err != nil {
		return nil, err
	}
	svc, slice := desiredFrontend(namespace, frontend, on, endpoints)
	return applyFrontend(ctx, r.Client, namespace, frontend, svc, slice)
}

// syncFrontends syncs every frontend Service in the namespace (except skip).
func (r *RuleReconciler) syncFrontends(ctx context.Context, namespace, skip string) error {
	var svcs corev1.ServiceList
	sel, _ := labels.Parse(LabelFrontend)
	if err := r.Client.List(ctx, &svcs, client.InNamespace(namespace), client.MatchingLabelsSelector{Selector: sel}); err != nil {
		return err
	}
	for _, s := range svcs.Items {
		if f := s.Labels[LabelFrontend]; f != skip {
			if _, err := r.syncFrontend(ctx, namespace, f); err != nil {
				return err
			}
		}
	}
	return nil
}

// WatchDataplanePods adds, in a cluster, the watches the frontends'
// endpoints depend on: the dataplane pods (readiness, deletion, IP, node)
// and the zone label of Nodes (metadata only).
func (r *RuleReconciler) WatchDataplanePods(b *ctrl.Builder) *ctrl.Builder {
	return b.Watches(&corev1.Pod{}, handler.EnqueueRequestsFromMapFunc(r.allRules)).
		WatchesMetadata(&corev1.Node{}, handler.EnqueueRequestsFromMapFunc(r.allRules), builder.WithPredicates(zoneChanged))
}

// zoneChanged passes Node updates that change the zone label. A node's
// arrival or departure reaches the frontends through its pods' events.
var zoneChanged = predicate.Funcs{
	CreateFunc:  func(event.CreateEvent) bool { return false },
	DeleteFunc:  func(event.DeleteEvent) bool { return false },
	GenericFunc: func(event.GenericEvent) bool { return false },
	UpdateFunc: func(e event.UpdateEvent) bool {
		return e.ObjectOld.GetLabels()[corev1.LabelTopologyZone] != e.ObjectNew.GetLabels()[corev1.LabelTopologyZone]
	},
}

// allRules maps any event (a dataplane pod changing) to every rule.
func (r *RuleReconciler) allRules(ctx context.Context, _ client.Object) []reconcile.Request {
	var rules lbv1alpha1.LoadBalancerRuleList
	if err := r.Client.List(ctx, &rules); err != nil {
		return nil
	}
	out := make([]reconcile.Request, len(rules.Items))
	for i := range rules.Items {
		out[i] = reconcile.Request{NamespacedName: types.NamespacedName{Namespace: rules.Items[i].Namespace, Name: rules.Items[i].Name}}
	}
	return out
}
