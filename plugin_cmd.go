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

const pluginUsage = `kubectl stickylb: where a client goes, on every replica.

  kubectl stickylb where RULE CLIENT_IP [--protocol tcp|udp] [-n NAMESPACE] [-o text|json]

The answer comes from each stickylb replica itself (through kubectl exec), so
it is what the dataplane does: pins, probe-down backends and terminating
endpoints included. Needs pods/exec on the stickylb pods.
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
	}
	fmt.Fprintf(stderr, "kubectl stickylb: unknown command %q\n\n%s", args[0], pluginUsage)
	return 2
}

// whereOptions are the flags of `kubectl stickylb where`.
type whereOptions struct {
	namespace, protocol, output string
	replicas                    string
	stickylbNS, selector        string
	kubeconfig, context         string
	timeout                     time.Duration
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
	for _, name := range []string{"namespace", "n"} {
		fs.StringVar(&o.namespace, name, "", "namespace of the rule (default: the kubeconfig context's)")
	}
	for _, name := range []string{"output", "o"} {
		fs.StringVar(&o.output, name, "text", "text or json")
	}
	fs.StringVar(&o.protocol, "protocol", "tcp", "tcp or udp")
	fs.StringVar(&o.replicas, "replicas", "", "HOST:PORT,... of the replicas' where endpoints, to ask them directly (outside a cluster); default: kubectl exec into each stickylb pod")
	fs.StringVar(&o.stickylbNS, "stickylb-namespace", "stickylb-system", "namespace of the stickylb pods")
	fs.StringVar(&o.selector, "selector", "app.kubernetes.io/name=stickylb", "labels of the stickylb pods")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
	fs.StringVar(&o.context, "context", "", "kubeconfig context")
	fs.DurationVar(&o.timeout, "request-timeout", 30*time.Second, "give up after this long")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return 2
	}
	if len(pos) != 2 {
		fmt.Fprintf(stderr, "kubectl stickylb where: want RULE CLIENT_IP, got %q\n", pos)
		return 2
	}
	if o.output != "text" && o.output != "json" {
		fmt.Fprintf(stderr, "kubectl stickylb where: --output %q: want text or json\n", o.output)
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
	loader := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(
		&clientcmd.ClientConfigLoadingRules{ExplicitPath: o.kubeconfig, Precedence: clientcmd.NewDefaultClientConfigLoadingRules().Precedence},
		&clientcmd.ConfigOverrides{CurrentContext: o.context})
	cfg, err := loader.ClientConfig()
	if err != nil {
		return nil, err
	}
	ns := o.namespace
	if ns == "" {
		if ns, _, err = loader.Namespace(); err != nil {
			return nil, err
		}
	}
	c, err := client.New(cfg, client.Options{Scheme: newScheme()})
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
	} else if answers, err = execReplicas(ctx, cfg, o, key, ip); err != nil {
		return nil, err
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

// execReplicas runs `stickylb where-local` in every running stickylb pod.
func execReplicas(ctx context.Context, cfg *rest.Config, o whereOptions, rule string, ip netip.Addr) ([]replicaAnswer, error) {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	pods, err := cs.CoreV1().Pods(o.stickylbNS).List(ctx, metav1.ListOptions{LabelSelector: o.selector})
	if err != nil {
		return nil, err
	}
	var out []replicaAnswer
	for _, pod := range pods.Items {
		if pod.Status.Phase != corev1.PodRunning || pod.DeletionTimestamp != nil {
			continue
		}
		req := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(pod.Namespace).Name(pod.Name).SubResource("exec").
			VersionedParams(&corev1.PodExecOptions{
				Container: "manager",
				Command:   []string{"/stickylb", "where-local", "--rule", rule, "--client", ip.String(), "--protocol", o.protocol},
				Stdout:    true, Stderr: true,
			}, scheme.ParameterCodec)
		exec, err := remotecommand.NewSPDYExecutor(cfg, "POST", req.URL())
		if err != nil {
			return nil, err
		}
		var stdout, stderr bytes.Buffer
		runErr := exec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr})
		var a replicaAnswer
		if err := json.Unmarshal(stdout.Bytes(), &a); err != nil {
			a = replicaAnswer{Error: strings.TrimSpace(fmt.Sprint(errors.Join(runErr, errors.New(stderr.String()))))}
		}
		if a.Replica == "" || a.Replica != pod.Name {
			a.Replica = pod.Name + " (" + pod.Status.PodIP + ")"
		}
		out = append(out, a)
	}
	return out, nil
}

// backendRefs maps the rule's backend addresses to their pods and nodes.
func backendRefs(ctx context.Context, c client.Client, rule *lbv1alpha1.LoadBalancerRule) map[string]backendRef {
	out := map[string]backendRef{}
	svc := rule.Spec.BackendPool.ServiceName
	if svc == "" {
		return out
	}
	var slices discoveryv1.EndpointSliceList
	if err := c.List(ctx, &slices, client.InNamespace(rule.Namespace), client.MatchingLabels{discoveryv1.LabelServiceName: svc}); err != nil {
		return out
	}
	port := rule.Spec.BackendPort
	for _, s := range slices.Items {
		for _, e := range s.Endpoints {
			ref := backendRef{}
			if e.TargetRef != nil && e.TargetRef.Kind == "Pod" {
				ref.Pod = e.TargetRef.Name
			}
			if e.NodeName != nil {
				ref.Node = *e.NodeName
			}
			for _, a := range e.Addresses {
				if ip, err := netip.ParseAddr(a); err == nil {
					out[netip.AddrPortFrom(ip, uint16(port)).String()] = ref
				}
			}
		}
	}
	return out
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
