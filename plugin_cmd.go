package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/remotecommand"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
)

// pluginName is the name kubectl finds the plugin by: the stickylb binary
// installed (or linked) as kubectl-stickylb answers `kubectl stickylb`.
const pluginName = "kubectl-stickylb"

const pluginUsage = `kubectl stickylb: where a client goes, and how each rule is served, on every replica.

  kubectl stickylb where RULE CLIENT_IP [--protocol tcp|udp] [-n NAMESPACE] [-o text|json]
  kubectl stickylb status [RULE | -A] [-n NAMESPACE] [-o text|json]

The answers come from each stickylb replica itself (through kubectl exec), so
they are what the dataplane does: pins, probe-down backends and terminating
endpoints included. Needs pods/exec on the stickylb pods, and reading the
rules, EndpointSlices and the replicas' report Leases.
`

// runPlugin is `kubectl stickylb ...`.
func runPlugin(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, pluginUsage)
		return 2
	}
	switch args[0] {
	case "where":
		return pluginWhere(args[1:], stdout, stderr)
	case "status":
		return pluginStatus(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "kubectl stickylb: unknown command %q\n\n%s", args[0], pluginUsage)
	return 2
}

// parseInterspersed parses flags wherever they are among the arguments, as
// kubectl does, and returns the others in order.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return positional, nil
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// pluginOptions are the flags every subcommand takes.
type pluginOptions struct {
	namespace, output    string
	replicas             string
	stickylbNS, selector string
	kubeconfig, context  string
	timeout              time.Duration
}

// bindPluginFlags declares the common flags on fs.
func bindPluginFlags(fs *flag.FlagSet, o *pluginOptions) {
	for _, name := range []string{"namespace", "n"} {
		fs.StringVar(&o.namespace, name, "", "namespace of the rule (default: the kubeconfig context's)")
	}
	for _, name := range []string{"output", "o"} {
		fs.StringVar(&o.output, name, "text", "text or json")
	}
	fs.StringVar(&o.replicas, "replicas", "", "HOST:PORT,... of the replicas' debug endpoints, to ask them directly (outside a cluster); default: kubectl exec into each stickylb pod")
	fs.StringVar(&o.stickylbNS, "stickylb-namespace", "stickylb-system", "namespace of the stickylb pods (and of their report Leases)")
	fs.StringVar(&o.selector, "selector", "app.kubernetes.io/name=stickylb", "labels of the stickylb pods")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
	fs.StringVar(&o.context, "context", "", "kubeconfig context")
	fs.DurationVar(&o.timeout, "request-timeout", 30*time.Second, "give up after this long")
}

// check validates the common flags.
func (o *pluginOptions) check(cmd string, stderr io.Writer) bool {
	if o.output != "text" && o.output != "json" {
		fmt.Fprintf(stderr, "kubectl stickylb %s: --output %q: want text or json\n", cmd, o.output)
		return false
	}
	return true
}

// connect loads the kubeconfig: the client, its rest config and the
// namespace rules are looked up in.
func (o *pluginOptions) connect() (client.Client, *rest.Config, string, error) {
	loader := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(
		&clientcmd.ClientConfigLoadingRules{ExplicitPath: o.kubeconfig, Precedence: clientcmd.NewDefaultClientConfigLoadingRules().Precedence},
		&clientcmd.ConfigOverrides{CurrentContext: o.context})
	cfg, err := loader.ClientConfig()
	if err != nil {
		return nil, nil, "", err
	}
	ns := o.namespace
	if ns == "" {
		if ns, _, err = loader.Namespace(); err != nil {
			return nil, nil, "", err
		}
	}
	c, err := client.New(cfg, client.Options{Scheme: newScheme()})
	if err != nil {
		return nil, nil, "", err
	}
	return c, cfg, ns, nil
}

// whereOptions are the flags of `kubectl stickylb where`.
type whereOptions struct {
	pluginOptions
	protocol string
}

// whereResult is the plugin's answer (its --output json).
type whereResult struct {
	Rule     string `json:"rule"`
	Client   string `json:"client"`
	Protocol string `json:"protocol"`
	// Backend and Next are the consensus when the replicas agree, else
	// the first replica's answer.
	Backend           *backendRef     `json:"backend,omitempty"`
	Next              []backendRef    `json:"next"`
	Pinned            bool            `json:"pinned"`
	Since             *time.Time      `json:"since,omitempty"`
	OverridesTable    bool            `json:"overridesTable,omitempty"`
	TablePick         string          `json:"tablePick,omitempty"`
	ProbeDownFallback bool            `json:"probeDownFallback,omitempty"`
	Agree             bool            `json:"agree"`
	Replicas          []replicaAnswer `json:"replicas"`
}

// backendRef is a backend address with its pod and node, when the pool is a
// Service whose EndpointSlices name them.
type backendRef struct {
	Address string `json:"address"`
	Pod     string `json:"pod,omitempty"`
	Node    string `json:"node,omitempty"`
}

func pluginWhere(args []string, stdout, stderr io.Writer) int {
	var o whereOptions
	fs := flag.NewFlagSet("kubectl stickylb where", flag.ContinueOnError)
	fs.SetOutput(stderr)
	bindPluginFlags(fs, &o.pluginOptions)
	fs.StringVar(&o.protocol, "protocol", "tcp", "tcp or udp")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return 2
	}
	if len(pos) != 2 {
		fmt.Fprintf(stderr, "kubectl stickylb where: want RULE CLIENT_IP, got %q\n", pos)
		return 2
	}
	if !o.pluginOptions.check("where", stderr) {
		return 2
	}
	client, err := netip.ParseAddr(pos[1])
	if err != nil {
		fmt.Fprintf(stderr, "kubectl stickylb where: CLIENT_IP %q: not an IP address\n", pos[1])
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	res, err := where(ctx, o, pos[0], client.Unmap())
	if err != nil {
		fmt.Fprintf(stderr, "kubectl stickylb where: %v\n", err)
		return 1
	}
	if o.output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(res)
	} else {
		printWhere(stdout, res)
	}
	if !res.Agree {
		return 3
	}
	return 0
}

func where(ctx context.Context, o whereOptions, name string, ip netip.Addr) (*whereResult, error) {
	c, cfg, ns, err := o.connect()
	if err != nil {
		return nil, err
	}
	var rule lbv1alpha1.LoadBalancerRule
	if err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &rule); err != nil {
		return nil, err
	}
	key := ns + "/" + name
	var answers []replicaAnswer
	if o.replicas != "" {
		for _, addr := range strings.Split(o.replicas, ",") {
			answers = append(answers, askReplica(ctx, strings.TrimSpace(addr), key, ip, o.protocol))
		}
	} else {
		outs, err := execReplicas(ctx, cfg, o.pluginOptions, "--rule", key, "--client", ip.String(), "--protocol", o.protocol)
		if err != nil {
			return nil, err
		}
		for _, out := range outs {
			var a replicaAnswer
			if err := out.decode(&a); err != nil {
				a = replicaAnswer{Error: err.Error()}
			}
			if a.Replica != out.pod {
				a.Replica = out.pod + " (" + out.podIP + ")"
			}
			answers = append(answers, a)
		}
	}
	if len(answers) == 0 {
		return nil, fmt.Errorf("no stickylb replica found (pods %q in %s)", o.selector, o.stickylbNS)
	}
	refs := backendRefs(ctx, c, &rule)
	res := &whereResult{Rule: key, Client: ip.String(), Protocol: strings.ToUpper(o.protocol), Replicas: answers, Agree: true, Next: []backendRef{}}
	// The replicas agree when they send the client to the same backends;
	// a pin made through one replica is held by the others only where it
	// differs from the table, so the pin is told from whichever holds it.
	first := answers[0]
	for _, a := range answers {
		if a.Error != "" || first.Error != "" || !slices.Equal(a.Backends, first.Backends) {
			res.Agree = false
		}
	}
	if first.Error != "" {
		return res, nil
	}
	for _, a := range answers {
		if a.Pinned && slices.Equal(a.Backends, first.Backends) && (!first.Pinned || a.Since.Before(first.Since)) {
			first.Pinned, first.Since, first.Overrides = true, a.Since, a.Overrides
		}
	}
	for i, b := range first.Backends {
		ref := refs[b]
		ref.Address = b
		if i == 0 {
			res.Backend = &ref
		} else {
			res.Next = append(res.Next, ref)
		}
	}
	res.Pinned, res.OverridesTable, res.TablePick, res.ProbeDownFallback = first.Pinned, first.Overrides, first.TablePick, first.ProbeDownFallback
	if first.Pinned {
		since := first.Since
		res.Since = &since
	}
	return res, nil
}

// execOutput is what `stickylb where-local` printed in one pod.
type execOutput struct {
	pod, podIP     string
	stdout, stderr bytes.Buffer
	err            error
}

// decode reads the JSON answer, or explains why there is none.
func (e *execOutput) decode(v any) error {
	if err := json.Unmarshal(e.stdout.Bytes(), v); err != nil {
		return errors.New(strings.TrimSpace(fmt.Sprint(errors.Join(e.err, errors.New(e.stderr.String())))))
	}
	return nil
}

// execReplicas runs `stickylb where-local ARGS` in every running stickylb pod.
func execReplicas(ctx context.Context, cfg *rest.Config, o pluginOptions, args ...string) ([]*execOutput, error) {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	pods, err := cs.CoreV1().Pods(o.stickylbNS).List(ctx, metav1.ListOptions{LabelSelector: o.selector})
	if err != nil {
		return nil, err
	}
	var out []*execOutput
	for _, pod := range pods.Items {
		if pod.Status.Phase != corev1.PodRunning || pod.DeletionTimestamp != nil {
			continue
		}
		req := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(pod.Namespace).Name(pod.Name).SubResource("exec").
			VersionedParams(&corev1.PodExecOptions{
				Container: "manager",
				Command:   append([]string{"/stickylb", "where-local"}, args...),
				Stdout:    true, Stderr: true,
			}, scheme.ParameterCodec)
		exec, err := remotecommand.NewSPDYExecutor(cfg, "POST", req.URL())
		if err != nil {
			return nil, err
		}
		e := &execOutput{pod: pod.Name, podIP: pod.Status.PodIP}
		e.err = exec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &e.stdout, Stderr: &e.stderr})
		out = append(out, e)
	}
	return out, nil
}

// backendRefs maps the rule's backend addresses to their pods and nodes.
func backendRefs(ctx context.Context, c client.Client, rule *lbv1alpha1.LoadBalancerRule) map[string]backendRef {
	out := map[string]backendRef{}
	eps, _ := sliceEndpoints(ctx, c, rule)
	for addr, e := range eps {
		out[addr] = e.backendRef
	}
	return out
}

// sliceEndpoint is a backend as the EndpointSlices of the rule's Service
// show it.
type sliceEndpoint struct {
	backendRef
	Ready, Serving, Terminating bool
}

// sliceEndpoints reads the endpoints of the rule's Service by backend
// address (none for a pool of addresses).
func sliceEndpoints(ctx context.Context, c client.Client, rule *lbv1alpha1.LoadBalancerRule) (map[string]sliceEndpoint, error) {
	out := map[string]sliceEndpoint{}
	svc := rule.Spec.BackendPool.ServiceName
	if svc == "" {
		return out, nil
	}
	var slices discoveryv1.EndpointSliceList
	if err := c.List(ctx, &slices, client.InNamespace(rule.Namespace), client.MatchingLabels{discoveryv1.LabelServiceName: svc}); err != nil {
		return out, err
	}
	port := rule.Spec.BackendPort
	for _, s := range slices.Items {
		for _, e := range s.Endpoints {
			var se sliceEndpoint
			if e.TargetRef != nil && e.TargetRef.Kind == "Pod" {
				se.Pod = e.TargetRef.Name
			}
			if e.NodeName != nil {
				se.Node = *e.NodeName
			}
			// Unset conditions mean ready and serving, as the API documents.
			se.Ready = e.Conditions.Ready == nil || *e.Conditions.Ready
			se.Serving = e.Conditions.Serving == nil || *e.Conditions.Serving
			se.Terminating = e.Conditions.Terminating != nil && *e.Conditions.Terminating
			for _, a := range e.Addresses {
				if ip, err := netip.ParseAddr(a); err == nil {
					addr := netip.AddrPortFrom(ip, uint16(port)).String()
					se.Address = addr
					out[addr] = se
				}
			}
		}
	}
	return out, nil
}

func (b backendRef) String() string {
	s := b.Address
	switch {
	case b.Pod != "" && b.Node != "":
		s += "  pod " + b.Pod + " on " + b.Node
	case b.Pod != "":
		s += "  pod " + b.Pod
	}
	return s
}

func printWhere(w io.Writer, r *whereResult) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "rule\t%s, client %s, %s\n", r.Rule, r.Client, r.Protocol)
	switch {
	case r.Backend == nil && len(r.Replicas) > 0 && r.Replicas[0].Error != "":
		fmt.Fprintf(tw, "backend\tunknown: %s\n", r.Replicas[0].Error)
	case r.Backend == nil:
		fmt.Fprintf(tw, "backend\tnone: the rule takes no new flows (no backend is ready and healthy)\n")
	default:
		fmt.Fprintf(tw, "backend\t%s\n", r.Backend)
		for i, n := range r.Next {
			label := ""
			if i == 0 {
				label = "if it fails"
			}
			fmt.Fprintf(tw, "%s\t%s\n", label, n)
		}
		switch {
		case r.Pinned && r.OverridesTable:
			fmt.Fprintf(tw, "pinned\tsince %s; the table alone would pick %s\n", r.Since.Format(time.RFC3339), r.TablePick)
		case r.Pinned:
			fmt.Fprintf(tw, "pinned\tsince %s (the table picks the same)\n", r.Since.Format(time.RFC3339))
		default:
			fmt.Fprintf(tw, "pinned\tno: the table's pick (a first flow pins it)\n")
		}
		if r.ProbeDownFallback {
			fmt.Fprintf(tw, "note\tevery backend fails its probe: AllProbedUp sends flows to them anyway\n")
		}
	}
	if r.Agree {
		names := make([]string, len(r.Replicas))
		for i, a := range r.Replicas {
			names[i] = a.Replica
		}
		fmt.Fprintf(tw, "replicas\t%d of %d agree: %s\n", len(r.Replicas), len(r.Replicas), strings.Join(names, ", "))
	} else {
		fmt.Fprintf(tw, "replicas\tDISAGREE\n")
		for _, a := range r.Replicas {
			switch {
			case a.Error != "":
				fmt.Fprintf(tw, "  %s\terror: %s\n", a.Replica, a.Error)
			default:
				fmt.Fprintf(tw, "  %s\t%s (pinned %v)\n", a.Replica, strings.Join(a.Backends, ", "), a.Pinned)
			}
		}
	}
	_ = tw.Flush()
}
