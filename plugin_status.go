package main

// `kubectl stickylb status [RULE]`: one screen per rule. What the API says
// (conditions, frontend addresses, the Service's endpoints), what each
// replica published in its report Lease (serving, probes down), and what
// each replica serves now (its listeners, each backend's probe state, share
// of the table, pinned clients and open flows), asked the same way as
// `where`: kubectl exec of `stickylb where-local --status` in every pod.

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/controllers"
	"github.com/stickylb/stickylb/dataplane/proxy"
)

// maxRulesAsked bounds the rules named on each replica's command line;
// beyond it a replica is asked for every rule it serves.
const maxRulesAsked = 64

// statusResult is `kubectl stickylb status -o json`.
type statusResult struct {
	Rules []ruleStatus `json:"rules"`
	// Replicas are the replicas asked, with what they answered as a whole.
	Replicas []replicaSummary `json:"replicas"`
}

// replicaSummary is one replica: its report Lease and whether it answered.
type replicaSummary struct {
	Replica string `json:"replica"`
	Address string `json:"address,omitempty"`
	// Snapshot is the configuration version it serves.
	Snapshot uint64 `json:"snapshot"`
	// Reported: it has a report Lease; Fresh: the Lease has not expired,
	// so the replica counts for the rules' status.
	Reported bool       `json:"reported"`
	Fresh    bool       `json:"fresh"`
	Renewed  *time.Time `json:"renewed,omitempty"`
	// Error is why it could not be asked, if it could not.
	Error string `json:"error,omitempty"`
}

// ruleStatus is one rule.
type ruleStatus struct {
	Rule               string                   `json:"rule"`
	Protocol           lbv1alpha1.Protocol      `json:"protocol"`
	Port               int32                    `json:"port"`
	Persistence        string                   `json:"sessionPersistence"`
	Generation         int64                    `json:"generation"`
	ObservedGeneration int64                    `json:"observedGeneration"`
	Conditions         []metav1.Condition       `json:"conditions"`
	Frontend           []string                 `json:"frontend"`
	Counts             lbv1alpha1.BackendCounts `json:"counts"`
	Backends           []backendStatus          `json:"backends"`
	Replicas           []replicaRuleStatus      `json:"replicas"`
}

// backendStatus is one backend of a rule, from the API and every replica.
type backendStatus struct {
	backendRef
	// Endpoint conditions (from the Service's EndpointSlices; a pool of
	// addresses is always ready).
	Ready       bool `json:"ready"`
	Terminating bool `json:"terminating,omitempty"`
	// Probe is up, down, unknown or none when every replica agrees, else
	// "down on R1, R2".
	Probe string `json:"probe"`
	// Share is its share of new clients (of the Maglev table), from the
	// first replica that serves the rule.
	Share float64 `json:"share"`
	// Pinned counts its pinned clients per replica, in Replicas' order.
	Pinned []int `json:"pinned"`
	// Flows is its open TCP connections and UDP sessions, all replicas.
	Flows int `json:"flows"`
}

// replicaRuleStatus is how one replica serves one rule.
type replicaRuleStatus struct {
	Replica string `json:"replica"`
	// State is serving; refusing (listening, but no backend takes new
	// flows); failed (it cannot listen); not serving (its snapshot does not
	// hold the rule); or unknown (it did not answer).
	State string `json:"state"`
	// Reason explains a state other than serving.
	Reason    string               `json:"reason,omitempty"`
	Listeners []proxy.ListenerView `json:"listeners,omitempty"`
	Healthy   int                  `json:"healthy"`
	// ProbedDown is what its report says its probes see down.
	ProbedDown int32 `json:"probedDown"`
	Pins       int   `json:"pins"`
}

// Replica states.
const (
	stateServing    = "serving"
	stateRefusing   = "refusing"
	stateFailed     = "failed"
	stateNotServing = "not serving"
	stateUnknown    = "unknown"
)

func pluginStatus(args []string, stdout, stderr io.Writer) int {
	var o pluginOptions
	var all bool
	fs := flag.NewFlagSet("kubectl stickylb status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	bindPluginFlags(fs, &o)
	for _, name := range []string{"all-namespaces", "A"} {
		fs.BoolVar(&all, name, false, "every rule of every namespace")
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return 2
	}
	if len(pos) > 1 || (all && len(pos) == 1) {
		fmt.Fprintf(stderr, "kubectl stickylb status: want at most one RULE (and not with -A), got %q\n", pos)
		return 2
	}
	if !o.check("status", stderr) {
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	name := ""
	if len(pos) == 1 {
		name = pos[0]
	}
	res, err := status(ctx, o, name, all)
	if err != nil {
		fmt.Fprintf(stderr, "kubectl stickylb status: %v\n", err)
		return 1
	}
	if o.output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(res)
	} else {
		printStatus(stdout, res)
	}
	return 0
}

func status(ctx context.Context, o pluginOptions, name string, all bool) (*statusResult, error) {
	c, cfg, ns, err := o.connect()
	if err != nil {
		return nil, err
	}
	var rules []lbv1alpha1.LoadBalancerRule
	if name != "" {
		var r lbv1alpha1.LoadBalancerRule
		if err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &r); err != nil {
			return nil, err
		}
		rules = append(rules, r)
	} else {
		var list lbv1alpha1.LoadBalancerRuleList
		var opts []client.ListOption
		if !all {
			opts = append(opts, client.InNamespace(ns))
		}
		if err := c.List(ctx, &list, opts...); err != nil {
			return nil, err
		}
		rules = list.Items
	}
	slices.SortFunc(rules, func(a, b lbv1alpha1.LoadBalancerRule) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	keys := make([]string, len(rules))
	for i := range rules {
		keys[i] = rules[i].Namespace + "/" + rules[i].Name
	}

	views, err := askReplicasStatus(ctx, cfg, o, keys)
	if err != nil {
		return nil, err
	}
	reports, err := controllers.ReadReports(ctx, c, o.stickylbNS, time.Now())
	if err != nil {
		return nil, fmt.Errorf("reading the replicas' reports in %s: %w", o.stickylbNS, err)
	}
	res := &statusResult{Rules: []ruleStatus{}, Replicas: summarize(views, reports)}
	for i := range rules {
		eps, err := sliceEndpoints(ctx, c, &rules[i])
		if err != nil {
			return nil, err
		}
		res.Rules = append(res.Rules, ruleOf(&rules[i], keys[i], eps, res.Replicas, views, reports))
	}
	return res, nil
}

// askReplicasStatus asks every replica about the rules.
func askReplicasStatus(ctx context.Context, cfg *rest.Config, o pluginOptions, rules []string) ([]replicaStatus, error) {
	asked := rules
	if len(asked) > maxRulesAsked {
		asked = nil // every rule the replica serves
	}
	var out []replicaStatus
	if o.replicas != "" {
		for _, addr := range strings.Split(o.replicas, ",") {
			out = append(out, askStatus(ctx, strings.TrimSpace(addr), asked))
		}
		return out, nil
	}
	args := []string{"--status"}
	for _, r := range asked {
		args = append(args, "--rule", r)
	}
	outs, err := execReplicas(ctx, cfg, o, args...)
	if err != nil {
		return nil, err
	}
	for _, e := range outs {
		var st replicaStatus
		if err := e.decode(&st); err != nil {
			st = replicaStatus{Error: err.Error()}
		}
		if st.Replica == "" {
			st.Replica = e.pod
		}
		out = append(out, st)
	}
	return out, nil
}

// summarize lists every replica: those asked and those that only have a
// report, by name.
func summarize(views []replicaStatus, reports []controllers.PublishedReport) []replicaSummary {
	var out []replicaSummary
	seen := map[string]int{}
	for _, v := range views {
		seen[v.Replica] = len(out)
		out = append(out, replicaSummary{Replica: v.Replica, Snapshot: v.Snapshot, Error: v.Error})
	}
	for _, r := range reports {
		i, ok := seen[r.Replica]
		if !ok {
			i = len(out)
			out = append(out, replicaSummary{Replica: r.Replica, Snapshot: r.Snapshot, Error: "not asked: no running pod answers to this name"})
		}
		renewed := r.Renewed
		out[i].Address, out[i].Reported, out[i].Fresh, out[i].Renewed = r.Address, true, r.Fresh, &renewed
	}
	return out
}

// ruleOf puts one rule's parts together.
func ruleOf(r *lbv1alpha1.LoadBalancerRule, key string, eps map[string]sliceEndpoint, replicas []replicaSummary,
	views []replicaStatus, reports []controllers.PublishedReport) ruleStatus {
	rs := ruleStatus{
		Rule: key, Protocol: r.Spec.Protocol, Port: int32(r.Spec.Frontend.Port), Persistence: string(r.Spec.SessionPersistence),
		Generation: r.Generation, ObservedGeneration: r.Status.ObservedGeneration,
		Conditions: r.Status.Conditions, Frontend: r.Status.Frontend.Addresses, Counts: r.Status.Backends,
		Backends: []backendStatus{}, Replicas: []replicaRuleStatus{},
	}
	if rs.Conditions == nil {
		rs.Conditions = []metav1.Condition{}
	}
	if rs.Frontend == nil {
		rs.Frontend = []string{}
	}
	byReplica := map[string]*proxy.RuleView{}
	for i := range views {
		for j := range views[i].Rules {
			if views[i].Rules[j].Rule == key {
				byReplica[views[i].Replica] = &views[i].Rules[j]
			}
		}
	}
	reportOf := map[string]*controllers.PublishedReport{}
	for i := range reports {
		reportOf[reports[i].Replica] = &reports[i]
	}

	// Backends: every address some replica serves, and every endpoint of
	// the Service (those not ready are in no replica's pool).
	index := map[string]int{}
	add := func(addr string) *backendStatus {
		if i, ok := index[addr]; ok {
			return &rs.Backends[i]
		}
		index[addr] = len(rs.Backends)
		b := backendStatus{backendRef: eps[addr].backendRef, Ready: true, Pinned: make([]int, len(replicas))}
		b.Address = addr
		if e, ok := eps[addr]; ok {
			b.Ready, b.Terminating = e.Ready, e.Terminating
		}
		rs.Backends = append(rs.Backends, b)
		return &rs.Backends[len(rs.Backends)-1]
	}
	probes := map[string]map[string][]string{} // backend -> probe state -> replicas
	shared := false                            // shares come from the first replica serving the rule
	for ri, rep := range replicas {
		v := byReplica[rep.Replica]
		if v == nil {
			continue
		}
		for _, bv := range v.Backends {
			b := add(bv.Address)
			b.Pinned[ri] = bv.Pinned
			b.Flows += bv.Flows
			if !shared {
				b.Share = bv.Share
			}
			if probes[bv.Address] == nil {
				probes[bv.Address] = map[string][]string{}
			}
			probes[bv.Address][bv.Probe] = append(probes[bv.Address][bv.Probe], rep.Replica)
		}
		shared = true
	}
	for _, addr := range sortedKeys(eps) {
		add(addr)
	}
	for i := range rs.Backends {
		b := &rs.Backends[i]
		b.Probe = probeSummary(probes[b.Address])
	}
	slices.SortFunc(rs.Backends, func(a, b backendStatus) int { return compareAddrs(a.Address, b.Address) })

	for _, rep := range replicas {
		st := replicaRuleStatus{Replica: rep.Replica, State: stateServing}
		if pr := reportOf[rep.Replica]; pr != nil {
			st.ProbedDown = pr.Down[key]
			if why, ok := pr.Failed[key]; ok {
				st.State, st.Reason = stateFailed, why
			}
		}
		switch v := byReplica[rep.Replica]; {
		case rep.Error != "":
			if st.State == stateServing {
				st.State, st.Reason = stateUnknown, rep.Error
			}
		case v == nil:
			if st.State == stateServing {
				st.State, st.Reason = stateNotServing, "the replica's snapshot does not hold the rule"
			}
		default:
			st.Listeners, st.Healthy, st.Pins = v.Listeners, v.Healthy, v.Pins
			for _, l := range v.Listeners {
				if !l.Open && st.State == stateServing {
					st.State, st.Reason = stateFailed, l.Address+" is not open"
				}
			}
			if st.State == stateServing && v.Healthy == 0 && !v.ProbeDownFallback {
				st.State, st.Reason = stateRefusing, "no backend takes new flows: none is ready and passing its probe"
			}
		}
		rs.Replicas = append(rs.Replicas, st)
	}
	return rs
}

// probeSummary is one backend's probe state over the replicas.
func probeSummary(byState map[string][]string) string {
	switch len(byState) {
	case 0:
		return "-"
	case 1:
		for s := range byState {
			return s
		}
	}
	if down := byState[proxy.ProbeDown]; len(down) > 0 {
		return "down on " + strings.Join(down, ", ")
	}
	return "mixed"
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.SortFunc(out, compareAddrs)
	return out
}

// compareAddrs orders IP:port strings numerically where they parse.
func compareAddrs(a, b string) int {
	pa, errA := netip.ParseAddrPort(a)
	pb, errB := netip.ParseAddrPort(b)
	if errA != nil || errB != nil {
		return cmp.Compare(a, b)
	}
	return pa.Compare(pb)
}

func printStatus(w io.Writer, res *statusResult) {
	if len(res.Rules) == 0 {
		fmt.Fprintln(w, "no rules")
	}
	for i, r := range res.Rules {
		if i > 0 {
			fmt.Fprintln(w)
		}
		printRule(w, r, res.Replicas)
	}
}

func printRule(w io.Writer, r ruleStatus, replicas []replicaSummary) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "rule\t%s: %s port %d, %s\n", r.Rule, r.Protocol, r.Port, r.Persistence)
	frontend := "none yet"
	if len(r.Frontend) > 0 {
		frontend = strings.Join(r.Frontend, ", ")
	}
	fmt.Fprintf(tw, "frontend\t%s\n", frontend)
	if r.ObservedGeneration != r.Generation {
		fmt.Fprintf(tw, "status\tof generation %d; the rule is at %d\n", r.ObservedGeneration, r.Generation)
	}
	for _, c := range r.Conditions {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Type, c.Status, c.Reason, c.Message)
	}
	fmt.Fprintf(tw, "backends\t%d total, %d ready, %d healthy\n", r.Counts.Total, r.Counts.Ready, r.Counts.Healthy)
	_ = tw.Flush()

	if len(r.Backends) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "BACKEND\tPOD\tNODE\tENDPOINT\tPROBE\tSHARE\tPINNED\tFLOWS")
		for _, b := range r.Backends {
			endpoint := "ready"
			switch {
			case b.Terminating:
				endpoint = "terminating"
			case !b.Ready:
				endpoint = "not ready"
			}
			pinned := make([]string, len(b.Pinned))
			for i, n := range b.Pinned {
				pinned[i] = strconv.Itoa(n)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%.1f%%\t%s\t%d\n", b.Address, dash(b.Pod), dash(b.Node), endpoint, b.Probe,
				100*b.Share, strings.Join(pinned, "/"), b.Flows)
		}
		_ = tw.Flush()
	}

	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "REPLICA\tSTATE\tSNAPSHOT\tLISTENERS\tHEALTHY\tPROBED DOWN\tPINS\tREASON")
	for i, st := range r.Replicas {
		var listeners []string
		for _, l := range st.Listeners {
			s := l.Address
			if !l.Open {
				s += " (closed)"
			}
			listeners = append(listeners, s)
		}
		snap := "-"
		if replicas[i].Snapshot != 0 {
			snap = strconv.FormatUint(replicas[i].Snapshot, 10)
		}
		report := st.Reason
		if replicas[i].Reported && !replicas[i].Fresh {
			report = strings.TrimPrefix(report+"; its report Lease expired", "; ")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", st.Replica, st.State, snap, dash(strings.Join(listeners, ", ")),
			st.Healthy, st.ProbedDown, st.Pins, dash(report))
	}
	_ = tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
