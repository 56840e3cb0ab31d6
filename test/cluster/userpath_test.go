package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/cluster"
)

const (
	release   = "stickylb"
	systemNS  = "stickylb-system"
	appNS     = "web"
	ruleName  = "web"
	leaseName = "stickylb.lb.stickylb.io"
	// frontendService is the Service the controller makes for the rule's
	// (default) frontend.
	frontendService = "stickylb-default"
)

// backends is a Deployment of the backend image behind a Service, in a
// namespace that enforces the restricted Pod Security Standard, and the rule
// that balances over it: TCP and UDP, ClientIP, an HTTP probe.
const backends = `apiVersion: v1
kind: Namespace
metadata:
  name: web
  labels:
    pod-security.kubernetes.io/enforce: restricted
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  namespace: web
spec:
  replicas: 5
  selector:
    matchLabels: {app: echo}
  template:
    metadata:
      labels: {app: echo}
    spec:
      terminationGracePeriodSeconds: 30
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: echo
        image: %s
        imagePullPolicy: Never
        args: ["-port=8080", "-health-port=8081", "-shutdown-delay=5s"]
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        ports:
        - {containerPort: 8080, protocol: TCP}
        - {containerPort: 8080, protocol: UDP}
        - {containerPort: 8081, protocol: TCP}
        readinessProbe:
          httpGet: {path: /healthz, port: 8081}
          periodSeconds: 2
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: web
spec:
  selector: {app: echo}
  ports:
  - {name: tcp, port: 8080, protocol: TCP}
  - {name: udp, port: 8080, protocol: UDP}
`

const rule = `apiVersion: lb.stickylb.io/v1alpha1
kind: LoadBalancerRule
metadata:
  name: web
  namespace: web
spec:
  frontend:
    port: 80
    serviceType: NodePort
  backendPool:
    serviceName: echo
  backendPort: 8080
  protocol: All
  sessionPersistence: ClientIP
  probe:
    protocol: HTTP
    port: 8081
    requestPath: /healthz
    intervalInSeconds: 5
`

// frontend is where clients reach the rule: its ClusterIP and its NodePorts
// (TCP and UDP) on the node.
type frontend struct {
	ClusterIP        netip.Addr
	NodePortTCP      netip.AddrPort
	NodePortUDP      netip.AddrPort
	ClusterIPPort    netip.AddrPort
	NodePortsTargets []netip.AddrPort
}

// TestUserPath is one story, step by step, as a user lives it; a step runs
// only when the ones before it passed.
func TestUserPath(t *testing.T) {
	k8s := newClient(t)
	var fe frontend
	var report []string
	steps := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"helm install into a restricted namespace", func(t *testing.T) {
			kubectl(t, "", "create", "namespace", systemNS)
			kubectl(t, "", "label", "namespace", systemNS, "pod-security.kubernetes.io/enforce=restricted",
				"pod-security.kubernetes.io/warn=restricted")
			start := time.Now()
			helm(t, "install", release, "../../charts/stickylb", "-n", systemNS, "--wait", "--timeout", "3m")
			pods := stickylbPods(t, k8s)
			if len(pods) != 2 {
				t.Fatalf("%d stickylb pods, want 2", len(pods))
			}
			for _, p := range pods {
				if p.Status.Phase != corev1.PodRunning || !podReady(&p) {
					t.Errorf("pod %s: %s, ready %v", p.Name, p.Status.Phase, podReady(&p))
				}
			}
			t.Logf("helm install: both replicas Running and Ready after %v", time.Since(start).Round(time.Second))
			noRestarts(t, k8s)
		}},
		{"backends and an All ClientIP rule with an HTTP probe", func(t *testing.T) {
			kubectl(t, fmt.Sprintf(backends, images.Backend.Ref), "apply", "-f", "-")
			kubectl(t, "", "-n", appNS, "rollout", "status", "deployment/echo", "--timeout=3m")
			kubectl(t, rule, "apply", "-f", "-")
			start := time.Now()
			kubectl(t, "", "-n", appNS, "wait", "--for=condition=Ready", "lbr/"+ruleName, "--timeout=2m")
			t.Logf("kubectl wait --for=condition=Ready: %v", time.Since(start).Round(time.Millisecond))
			fe = frontendOf(t, k8s)
			// Like any Service, the frontend carries traffic once kube-proxy
			// has programmed it, a moment after the controller wrote it.
			since := time.Now()
			eventually(t, 30*time.Second, "the frontend answers through kube-proxy", func() error {
				for _, to := range []netip.AddrPort{fe.ClusterIPPort, fe.NodePortTCP} {
					if _, err := ask("tcp", cluster.ClientIP(0), to, time.Second); err != nil {
						return err
					}
				}
				for _, to := range []netip.AddrPort{fe.ClusterIPPort, fe.NodePortUDP} {
					if _, err := ask("udp", cluster.ClientIP(0), to, time.Second); err != nil {
						return err
					}
				}
				return nil
			})
			t.Logf("ClusterIP and NodePort answer %v after Ready", time.Since(since).Round(time.Millisecond))
			var r lbv1alpha1.LoadBalancerRule
			get(t, k8s, appNS, ruleName, &r)
			if !slices.Contains(r.Status.Frontend.Addresses, fe.ClusterIP.String()) {
				t.Errorf("status.frontend.addresses %v does not hold the frontend Service's ClusterIP %s", r.Status.Frontend.Addresses, fe.ClusterIP)
			}
			if r.Status.Backends.Healthy != 5 {
				t.Errorf("status.backends %+v, want 5 healthy", r.Status.Backends)
			}
		}},
		{"clients stick to one pod through ClusterIP, NodePort and every replica", func(t *testing.T) {
			stickyEverywhere(t, k8s, fe, 4)
		}},
		{"Programmed speaks for both stickylb pods", func(t *testing.T) {
			var r lbv1alpha1.LoadBalancerRule
			get(t, k8s, appNS, ruleName, &r)
			if c := meta.FindStatusCondition(r.Status.Conditions, string(lbv1alpha1.ConditionProgrammed)); c == nil || c.Message != "2 of 2 replicas serve generation 1" {
				t.Errorf("Programmed %+v, want both replicas counted", c)
			}
			// Another rule, on a port a process of one stickylb pod holds.
			pod := stickylbPods(t, k8s)[1]
			at := addrPort(t, pod.Status.PodIP, 81)
			l, err := listenInPod(pod.Name, at)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			other := strings.NewReplacer("name: web\n  namespace", "name: web-81\n  namespace", "    port: 80\n", "    port: 81\n").Replace(rule)
			kubectl(t, other, "apply", "-f", "-")
			defer kubectl(t, "", "-n", appNS, "delete", "lbr", "web-81")
			var c *metav1.Condition
			eventually(t, time.Minute, "ListenFailed naming the pod", func() error {
				get(t, k8s, appNS, "web-81", &r)
				c = meta.FindStatusCondition(r.Status.Conditions, string(lbv1alpha1.ConditionProgrammed))
				if c == nil || c.Reason != string(lbv1alpha1.ReasonListenFailed) {
					return fmt.Errorf("Programmed %+v", c)
				}
				return nil
			})
			want := fmt.Sprintf("1 of 2 replicas cannot serve: %s (%s): ", pod.Status.PodIP, pod.Name)
			if !strings.HasPrefix(c.Message, want) || !strings.Contains(c.Message, "address already in use") {
				t.Errorf("message %q, want it to start %q and say why", c.Message, want)
			}
			if meta.IsStatusConditionTrue(r.Status.Conditions, string(lbv1alpha1.ConditionReady)) {
				t.Errorf("Ready while %s cannot serve", pod.Name)
			}
			l.Close()
			start := time.Now()
			eventually(t, time.Minute, "Programmed once the port is free", func() error {
				get(t, k8s, appNS, "web-81", &r)
				if c := meta.FindStatusCondition(r.Status.Conditions, string(lbv1alpha1.ConditionReady)); c == nil || c.Status != metav1.ConditionTrue {
					return fmt.Errorf("Ready %+v", c)
				}
				return nil
			})
			t.Logf("web-81 Ready %v after the port was freed", time.Since(start).Round(100*time.Millisecond))
			for _, p := range stickylbPods(t, k8s) {
				if _, err := askTCP(cluster.ClientIP(0), addrPort(t, p.Status.PodIP, 81)); err != nil {
					t.Errorf("Ready, but %s does not serve port 81: %v", p.Name, err)
				}
			}
		}},
		{"scale the backends 5 to 7 to 4 under load: pinned clients stay", func(t *testing.T) {
			const clients = 200
			before := pinnedBackends(t, k8s, fe, 0, clients)
			l := startLoad(fe.targets(), 3, 1)
			kubectl(t, "", "-n", appNS, "scale", "deployment/echo", "--replicas=7")
			waitHealthy(t, k8s, 7)
			// Every pinned client, through the ClusterIP and through each
			// stickylb pod, is still on its pod; new clients reach the new pods.
			after := pinnedBackends(t, k8s, fe, 0, clients)
			var moved []string
			for i := range before {
				if after[i] != before[i] {
					moved = append(moved, fmt.Sprintf("%s: %s, then %s", cluster.ClientIP(i), before[i], after[i]))
				}
			}
			if len(moved) > 0 {
				t.Errorf("scaling 5 to 7 moved %d of %d pinned clients: %v", len(moved), clients, moved[:min(len(moved), 5)])
			}
			fresh := pinnedBackends(t, k8s, fe, clients, clients)
			old := map[string]bool{}
			for _, b := range before {
				old[b] = true
			}
			toNew := 0
			for _, b := range fresh {
				if !old[b] {
					toNew++
				}
			}
			t.Logf("scale 5 to 7: %d of %d pinned clients moved; %d of %d new clients went to the 2 new pods", len(moved), clients, toNew, clients)
			if toNew < clients/8 {
				t.Errorf("only %d of %d new clients reached the 2 new pods", toNew, clients)
			}
			kubectl(t, "", "-n", appNS, "scale", "deployment/echo", "--replicas=4")
			waitHealthy(t, k8s, 4)
			waitPods(t, k8s, appNS, "app=echo", 4)
			report = append(report, expectNoFailures(t, "scale 5→7→4", l.stop()))
			// Scaled down to 4: the clients of the pods that remain stay on them.
			remain := map[string]bool{}
			var pods corev1.PodList
			if err := k8s.List(context.Background(), &pods, client.InNamespace(appNS), client.MatchingLabels{"app": "echo"}); err != nil {
				t.Fatal(err)
			}
			for _, p := range pods.Items {
				remain[p.Name] = true
			}
			down := pinnedBackends(t, k8s, fe, 0, 2*clients)
			all := append(append([]string(nil), before...), fresh...)
			stayed, shouldStay := 0, 0
			for i := range all {
				if !remain[all[i]] {
					continue
				}
				shouldStay++
				if down[i] == all[i] {
					stayed++
				} else if shouldStay-stayed <= 5 {
					t.Errorf("scaling 7 to 4 moved %s off %s, which remains, to %s", cluster.ClientIP(i), all[i], down[i])
				}
			}
			t.Logf("scale 7 to 4: %d of the %d clients of the remaining pods stayed", stayed, shouldStay)
			noRestarts(t, k8s)
		}},
		{"rolling update of the backends under load", func(t *testing.T) {
			l := startLoad(fe.targets(), 3, 1)
			kubectl(t, "", "-n", appNS, "set", "env", "deployment/echo", "ROLLOUT=2")
			kubectl(t, "", "-n", appNS, "rollout", "status", "deployment/echo", "--timeout=5m")
			waitPods(t, k8s, appNS, "app=echo", 4)
			waitHealthy(t, k8s, 4)
			report = append(report, expectNoFailures(t, "backend rolling update", l.stop()))
			noRestarts(t, k8s)
		}},
		{"rollout restart of stickylb under load", func(t *testing.T) {
			l := startLoad(fe.targets(), 3, 1)
			kubectl(t, "", "-n", systemNS, "rollout", "restart", "deployment/"+release)
			kubectl(t, "", "-n", systemNS, "rollout", "status", "deployment/"+release, "--timeout=5m")
			waitPods(t, k8s, systemNS, "app.kubernetes.io/name=stickylb", 2)
			report = append(report, expectNoFailures(t, "stickylb rollout restart", l.stop()))
			// Each new pod found a running one among the pods it watches,
			// and learned its pins before it turned ready.
			for _, p := range stickylbPods(t, k8s) {
				if logs := kubectl(t, "", "-n", systemNS, "logs", p.Name); !strings.Contains(logs, "joined the peers: their pins are merged") {
					t.Errorf("pod %s did not join its peers:\n%s", p.Name, logs)
				}
			}
			noRestarts(t, k8s)
		}},
		{"helm upgrade that changes a value, under load", func(t *testing.T) {
			l := startLoad(fe.targets(), 3, 1)
			helm(t, "upgrade", release, "../../charts/stickylb", "-n", systemNS, "--reuse-values",
				"--set", "podAnnotations.example\\.com/upgraded=yes", "--wait", "--timeout", "5m")
			waitPods(t, k8s, systemNS, "app.kubernetes.io/name=stickylb", 2)
			for _, p := range stickylbPods(t, k8s) {
				if p.Annotations["example.com/upgraded"] != "yes" {
					t.Errorf("pod %s does not run the upgraded template", p.Name)
				}
			}
			report = append(report, expectNoFailures(t, "helm upgrade", l.stop()))
			noRestarts(t, k8s)
		}},
		{"delete the leader under load", func(t *testing.T) {
			leader := leaderPod(t, k8s)
			l := startLoad(fe.targets(), 3, 1)
			w := startStatusWatch(t, k8s)
			time.Sleep(2 * time.Second)
			start := time.Now()
			kubectl(t, "", "-n", systemNS, "delete", "pod", leader, "--wait=false")
			var next string
			eventually(t, 2*time.Minute, "a new leader", func() error {
				if next = leaderPod(t, k8s); next == leader {
					return fmt.Errorf("%s still holds the Lease", leader)
				}
				return nil
			})
			leaseMoved := time.Since(start)
			kubectl(t, "", "-n", systemNS, "rollout", "status", "deployment/"+release, "--timeout=5m")
			waitPods(t, k8s, systemNS, "app.kubernetes.io/name=stickylb", 2)
			time.Sleep(2 * time.Second)
			lag := w.stop(t)
			res := l.stop()
			line := expectNoFailures(t, "delete the leader", res) +
				fmt.Sprintf("; Lease with %s after %v; status never more than %v behind a spec change",
					next, leaseMoved.Round(100*time.Millisecond), lag.Round(100*time.Millisecond))
			t.Log(line)
			report = append(report, line)
			// Released on shutdown, the Lease moves at once; waited out, it
			// would take its 15 s duration.
			if lag > 10*time.Second {
				t.Errorf("status went unwritten for %v while the leader changed", lag)
			}
			noRestarts(t, k8s)
		}},
		{"clients still stick after all of it", func(t *testing.T) {
			// Pins do not rebalance: after the backends rolled one pod at a
			// time, the pod that came last may hold none of these clients.
			// Two pods at least still shows kube-proxy kept their addresses.
			stickyEverywhere(t, k8s, fe, 2)
		}},
		{"kubectl stickylb where, through kubectl exec into each replica, names the pod a client reaches", func(t *testing.T) {
			const clients = 20
			reached := pinnedBackends(t, k8s, fe, 0, clients)
			for i := range clients {
				out := kubectlStickylb(t, "where", ruleName, cluster.ClientIP(i).String(), "-n", appNS, "-o", "json")
				var ans struct {
					Backend  struct{ Pod string }
					Agree    bool
					Replicas []struct{ Replica string }
				}
				if err := json.Unmarshal([]byte(out), &ans); err != nil {
					t.Fatalf("%v: %s", err, out)
				}
				if !ans.Agree || len(ans.Replicas) != 2 || ans.Backend.Pod != reached[i] {
					t.Errorf("client %s reached %s; kubectl stickylb where says %s", cluster.ClientIP(i), reached[i], out)
				}
			}
			t.Logf("kubectl stickylb where %s %s -n %s:\n%s", ruleName, cluster.ClientIP(0), appNS,
				kubectlStickylb(t, "where", ruleName, cluster.ClientIP(0).String(), "-n", appNS))
		}},
		{"kubectl stickylb status, through kubectl exec into each replica, shows the rule served by both, its pods and their shares", func(t *testing.T) {
			out := kubectlStickylb(t, "status", ruleName, "-n", appNS, "-o", "json")
			var st struct {
				Rules []struct {
					Conditions []struct{ Type, Status string }
					Backends   []struct {
						Address, Pod, Node, Probe string
						Ready, Terminating        bool
						Share                     float64
					}
					Replicas []struct{ Replica, State string }
				}
			}
			if err := json.Unmarshal([]byte(out), &st); err != nil || len(st.Rules) != 1 {
				t.Fatalf("%v: %s", err, out)
			}
			r := st.Rules[0]
			serving, shares, ready := 0, 0.0, 0
			for _, rep := range r.Replicas {
				if rep.State == "serving" {
					serving++
				}
			}
			for _, b := range r.Backends {
				if b.Pod == "" || b.Node == "" {
					t.Errorf("backend %s: no pod or node named", b.Address)
				}
				if b.Ready && !b.Terminating {
					ready++
					if b.Probe != "up" || b.Share == 0 {
						t.Errorf("ready backend %+v: want probe up and a share of the table", b)
					}
				}
				shares += b.Share
			}
			if serving != 2 || ready == 0 || math.Abs(shares-1) > 1e-6 {
				t.Errorf("%d replicas serving (want 2), %d ready backends, shares add up to %v: %s", serving, ready, shares, out)
			}
			t.Logf("kubectl stickylb status %s -n %s:\n%s", ruleName, appNS, kubectlStickylb(t, "status", ruleName, "-n", appNS))
		}},
		{"a crashed replica leaves the frontend as fast as Kubernetes drops it", func(t *testing.T) {
			// The standby's process is killed outright. Kubernetes' own
			// EndpointSlice of the chart's metrics Service, which selects the
			// same pods, says when Kubernetes stops counting it; the
			// frontend's slice must not list it for longer.
			leader := leaderPod(t, k8s)
			var victim corev1.Pod
			for _, p := range stickylbPods(t, k8s) {
				if p.Name != leader {
					victim = p
				}
			}
			pid, err := podProcess(victim.Name)
			if err != nil {
				t.Fatal(err)
			}
			l := startLoad(fe.targets(), 3, 1)
			time.Sleep(time.Second)
			killed := time.Now()
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			var frontendDropped, kubernetesDropped time.Duration
			eventually(t, time.Minute, "both slices drop the crashed replica", func() error {
				if frontendDropped == 0 && !listsReady(t, k8s, appNS, frontendService, victim.Status.PodIP) {
					frontendDropped = time.Since(killed)
				}
				if kubernetesDropped == 0 && !listsReady(t, k8s, systemNS, release+"-metrics", victim.Status.PodIP) {
					kubernetesDropped = time.Since(killed)
				}
				if frontendDropped == 0 || kubernetesDropped == 0 {
					return fmt.Errorf("frontend dropped after %v, Kubernetes after %v", frontendDropped, kubernetesDropped)
				}
				return nil
			})
			// kubelet restarts the container; once Ready it serves again.
			eventually(t, 2*time.Minute, "the restarted replica back in the frontend", func() error {
				if !listsReady(t, k8s, appNS, frontendService, victim.Status.PodIP) {
					return fmt.Errorf("not listed yet")
				}
				return nil
			})
			back := time.Since(killed)
			res := l.stop()
			line := fmt.Sprintf("crash of %s: the frontend dropped it after %v, Kubernetes' own EndpointSlice after %v; back after %v; load %v",
				victim.Name, frontendDropped.Round(time.Millisecond), kubernetesDropped.Round(time.Millisecond), back.Round(100*time.Millisecond), res)
			t.Log(line)
			report = append(report, line)
			if frontendDropped > kubernetesDropped+time.Second {
				t.Errorf("the frontend listed the crashed replica %v longer than Kubernetes did", frontendDropped-kubernetesDropped)
			}
		}},
		{"helm uninstall keeps the CRD and the rules; the frontend refuses clients", func(t *testing.T) {
			start := time.Now()
			helm(t, "uninstall", release, "-n", systemNS, "--wait", "--timeout", "3m")
			waitPods(t, k8s, systemNS, "app.kubernetes.io/instance="+release, 0)
			t.Logf("helm uninstall: %v", time.Since(start).Round(time.Second))
			kubectl(t, "", "get", "crd", "loadbalancerrules.lb.stickylb.io")
			var r lbv1alpha1.LoadBalancerRule
			get(t, k8s, appNS, ruleName, &r)
			// The rule's frontend Service stays (the rule owns it, and keeps its
			// ClusterIP and node ports for a reinstall), with no endpoint left.
			var slice discoveryv1.EndpointSlice
			get(t, k8s, appNS, frontendService, &slice)
			if len(slice.Endpoints) != 0 {
				t.Errorf("the frontend EndpointSlice still lists %d endpoints after the uninstall: %+v", len(slice.Endpoints), slice.Endpoints)
			}
			eventually(t, 10*time.Second, "kube-proxy refuses the frontend's clients", func() error {
				for _, p := range []struct {
					network string
					to      netip.AddrPort
				}{{"tcp", fe.ClusterIPPort}, {"tcp", fe.NodePortTCP}, {"udp", fe.ClusterIPPort}, {"udp", fe.NodePortUDP}} {
					if _, err := ask(p.network, cluster.ClientIP(0), p.to, 2*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
						return fmt.Errorf("%s %s: %v, want connection refused", p.network, p.to, err)
					}
				}
				return nil
			})
			out := kubectl(t, "", "-n", systemNS, "get", "jobs,serviceaccounts,roles,rolebindings", "-o", "name")
			if strings.Contains(out, "scale-down") {
				t.Errorf("the uninstall hook left objects behind:\n%s", out)
			}
		}},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.run) {
			t.Fatalf("step %q failed; the steps after it depend on it", s.name)
		}
	}
	t.Log("what each operation did to new connections:\n\t" + strings.Join(report, "\n\t"))
}

// statusWatch changes the rule's spec every half second and measures how
// long each change waits for the controller to report it in status: the
// longest wait is how long the rule went without a leader.
type statusWatch struct {
	cancel context.CancelFunc
	done   chan time.Duration
}

func startStatusWatch(t *testing.T, c client.Client) *statusWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &statusWatch{cancel: cancel, done: make(chan time.Duration, 1)}
	go func() {
		patched := map[int64]time.Time{} // generation -> when it was made
		var worst time.Duration
		next := time.Now()
		timeout := int32(4)
		for ctx.Err() == nil {
			if time.Now().After(next) {
				timeout = 4 + (timeout-3)%90
				var r lbv1alpha1.LoadBalancerRule
				if err := c.Get(ctx, client.ObjectKey{Namespace: appNS, Name: ruleName}, &r); err == nil {
					orig := r.DeepCopy()
					r.Spec.IdleTimeoutInMinutes = timeout
					at := time.Now()
					if err := c.Patch(ctx, &r, client.MergeFrom(orig)); err == nil {
						patched[r.Generation] = at
					}
				}
				next = time.Now().Add(500 * time.Millisecond)
			}
			var r lbv1alpha1.LoadBalancerRule
			if err := c.Get(ctx, client.ObjectKey{Namespace: appNS, Name: ruleName}, &r); err == nil {
				for g, at := range patched {
					if g <= r.Status.ObservedGeneration {
						worst = max(worst, time.Since(at))
						delete(patched, g)
					}
				}
			}
			// A change still unreported counts for as long as it has waited.
			for _, at := range patched {
				worst = max(worst, time.Since(at))
			}
			time.Sleep(50 * time.Millisecond)
		}
		w.done <- worst
	}()
	return w
}

func (w *statusWatch) stop(t *testing.T) time.Duration {
	w.cancel()
	return <-w.done
}

func (f frontend) targets() []netip.AddrPort {
	return []netip.AddrPort{f.ClusterIPPort, f.NodePortTCP}
}

func newClient(t testing.TB) client.Client {
	t.Helper()
	s := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(s))
	utilruntime.Must(lbv1alpha1.AddToScheme(s))
	c, err := client.New(kc.Config, client.Options{Scheme: s})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func get(t testing.TB, c client.Client, ns, name string, obj client.Object) {
	t.Helper()
	if err := c.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, obj); err != nil {
		t.Fatal(err)
	}
}

// frontendOf reads the frontend Service the controller made.
func frontendOf(t testing.TB, c client.Client) frontend {
	t.Helper()
	var svc corev1.Service
	get(t, c, appNS, frontendService, &svc)
	var f frontend
	var err error
	if f.ClusterIP, err = netip.ParseAddr(svc.Spec.ClusterIP); err != nil {
		t.Fatalf("frontend Service %s has no ClusterIP: %v", frontendService, err)
	}
	f.ClusterIPPort = netip.AddrPortFrom(f.ClusterIP, 80)
	for _, p := range svc.Spec.Ports {
		if p.Port != 80 || p.NodePort == 0 {
			continue
		}
		ap := netip.AddrPortFrom(cluster.NodeIP, uint16(p.NodePort))
		if p.Protocol == corev1.ProtocolTCP {
			f.NodePortTCP = ap
		} else {
			f.NodePortUDP = ap
		}
	}
	if !f.NodePortTCP.IsValid() || !f.NodePortUDP.IsValid() {
		t.Fatalf("frontend Service %s has no TCP and UDP node ports: %+v", frontendService, svc.Spec.Ports)
	}
	return f
}

// stickyEverywhere sends 200 clients, each several times over TCP and UDP,
// through the ClusterIP, the NodePorts and straight to each stickylb pod,
// and checks each sees one backend pod only, and that they spread over at
// least minPods pods.
func stickyEverywhere(t *testing.T, c client.Client, fe frontend, minPods int) {
	type path struct {
		name string
		tcp  bool
		to   netip.AddrPort
	}
	paths := []path{
		{"ClusterIP/TCP", true, fe.ClusterIPPort}, {"ClusterIP/UDP", false, fe.ClusterIPPort},
		{"NodePort/TCP", true, fe.NodePortTCP}, {"NodePort/UDP", false, fe.NodePortUDP},
	}
	for _, p := range stickylbPods(t, c) {
		ip := addrPort(t, p.Status.PodIP, 80)
		paths = append(paths, path{p.Name + "/TCP", true, ip}, path{p.Name + "/UDP", false, ip})
	}
	const clients, rounds = 200, 3
	seen := make([]map[string][]string, clients) // backend -> the paths that led there
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	sem := make(chan struct{}, 16)
	for i := range clients {
		seen[i] = map[string][]string{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			src := cluster.ClientIP(i)
			for range rounds {
				for _, p := range paths {
					ask := askUDP
					if p.tcp {
						ask = askTCP
					}
					name, err := ask(src, p.to)
					if err != nil {
						errs <- fmt.Errorf("client %s via %s: %w", src, p.name, err)
						return
					}
					seen[i][name] = append(seen[i][name], p.name)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	pods := map[string]int{}
	moved := 0
	for i, s := range seen {
		if len(s) > 1 {
			moved++
			if moved <= 5 {
				t.Errorf("client %s reached %d backend pods: %v", cluster.ClientIP(i), len(s), s)
			}
		}
		for name := range s {
			pods[name]++
		}
	}
	if moved > 0 {
		t.Errorf("%d of %d clients reached more than one backend pod", moved, clients)
	}
	t.Logf("%d clients × %d rounds × %d paths: clients per backend pod %v", clients, rounds, len(paths), pods)
	if len(pods) < minPods {
		t.Errorf("the clients reached %d backend pods, want at least %d: kube-proxy may have hidden their addresses", len(pods), minPods)
	}
}

// kubectlStickylb runs `kubectl stickylb ARGS` with the real kubectl, which
// finds the plugin (the stickylb binary as kubectl-stickylb) on its PATH.
func kubectlStickylb(t *testing.T, args ...string) string {
	t.Helper()
	dir := filepath.Join(workDir, "plugin")
	plugin := filepath.Join(dir, "kubectl-stickylb")
	if _, err := os.Stat(plugin); err != nil {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("go", "build", "-o", plugin, "../..").CombinedOutput()
		if err != nil {
			t.Fatalf("build the plugin: %v: %s", err, out)
		}
	}
	cmd := exec.Command(kubectlPath(), append([]string{"stickylb"}, args...)...)
	cmd.Env = append(os.Environ(), "PATH="+dir+string(os.PathListSeparator)+os.Getenv("PATH"), "KUBECONFIG="+kc.Kubeconfig)
	out, err := cmd.Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("kubectl stickylb %s: %v: %s%s", strings.Join(args, " "), err, stderr, out)
	}
	return string(out)
}

// pinnedBackends asks each of n clients from cluster.ClientIP(from) on for
// its backend pod over TCP through the ClusterIP and straight through each
// stickylb pod, and over UDP through the ClusterIP. The paths must agree;
// it returns the pod each client reached.
func pinnedBackends(t *testing.T, c client.Client, fe frontend, from, n int) []string {
	t.Helper()
	type path struct {
		name string
		ask  func(netip.Addr, netip.AddrPort) (string, error)
		to   netip.AddrPort
	}
	paths := []path{{"ClusterIP/TCP", askTCP, fe.ClusterIPPort}, {"ClusterIP/UDP", askUDP, fe.ClusterIPPort}}
	for _, p := range stickylbPods(t, c) {
		paths = append(paths, path{p.Name + "/TCP", askTCP, addrPort(t, p.Status.PodIP, 80)})
	}
	out := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range n {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			src := cluster.ClientIP(from + i)
			for _, p := range paths {
				name, err := p.ask(src, p.to)
				switch {
				case err != nil:
					errs[i] = fmt.Errorf("client %s via %s: %w", src, p.name, err)
					return
				case out[i] == "":
					out[i] = name
				case name != out[i]:
					errs[i] = fmt.Errorf("client %s reached %s via %s and %s via %s", src, out[i], paths[0].name, name, p.name)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return out
}

// expectNoFailures fails the test when the load saw a refused or failed new
// connection, and returns the line for the report.
func expectNoFailures(t *testing.T, op string, r loadResult) string {
	t.Helper()
	line := fmt.Sprintf("%s: %v", op, r)
	t.Log(line)
	if r.TCP.Attempts < 100 || r.UDP.Attempts < 20 {
		t.Errorf("%s: the load made too few attempts to mean anything: %v", op, r)
	}
	if r.TCP.Refused+r.TCP.Failed+r.UDP.Refused+r.UDP.Failed > 0 {
		t.Errorf("%s: new connections refused or failed: %v", op, r)
	}
	return line
}

func stickylbPods(t testing.TB, c client.Client) []corev1.Pod {
	t.Helper()
	var pods corev1.PodList
	if err := c.List(context.Background(), &pods, client.InNamespace(systemNS), client.MatchingLabels{"app.kubernetes.io/name": "stickylb"}); err != nil {
		t.Fatal(err)
	}
	return pods.Items
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// noRestarts fails when any container of stickylb or of the backends restarted.
func noRestarts(t testing.TB, c client.Client) {
	t.Helper()
	for _, ns := range []string{systemNS, appNS} {
		var pods corev1.PodList
		if err := c.List(context.Background(), &pods, client.InNamespace(ns)); err != nil {
			t.Fatal(err)
		}
		for _, p := range pods.Items {
			for _, s := range p.Status.ContainerStatuses {
				if s.RestartCount > 0 {
					t.Errorf("container %s/%s/%s restarted %d times (last state %+v)", ns, p.Name, s.Name, s.RestartCount, s.LastTerminationState)
					// What the container said before it ended.
					logs, err := toolErr(kubectlPath(), "", "-n", ns, "logs", "--previous", "--tail", "80", p.Name, "-c", s.Name)
					t.Logf("its previous logs (%v):\n%s", err, logs)
				}
			}
		}
	}
}

// listsReady reports whether the Service's EndpointSlices list ip as ready.
func listsReady(t testing.TB, c client.Client, ns, service, ip string) bool {
	t.Helper()
	var list discoveryv1.EndpointSliceList
	if err := c.List(context.Background(), &list, client.InNamespace(ns), client.MatchingLabels{discoveryv1.LabelServiceName: service}); err != nil {
		t.Fatal(err)
	}
	for _, s := range list.Items {
		for _, e := range s.Endpoints {
			if slices.Contains(e.Addresses, ip) && (e.Conditions.Ready == nil || *e.Conditions.Ready) {
				return true
			}
		}
	}
	return false
}

// waitHealthy waits until the rule counts n healthy backends.
func waitHealthy(t testing.TB, c client.Client, n int32) {
	t.Helper()
	eventually(t, 3*time.Minute, fmt.Sprintf("%d healthy backends", n), func() error {
		var r lbv1alpha1.LoadBalancerRule
		get(t, c, appNS, ruleName, &r)
		if r.Status.Backends.Healthy != n || r.Status.Backends.Ready != n {
			return fmt.Errorf("backends %+v", r.Status.Backends)
		}
		return nil
	})
}

// waitPods waits until exactly n pods match selector, none of them terminating.
func waitPods(t testing.TB, c client.Client, ns, selector string, n int) {
	t.Helper()
	eventually(t, 3*time.Minute, fmt.Sprintf("%d pods %s", n, selector), func() error {
		out, err := toolErr(kubectlPath(), "", "-n", ns, "get", "pods", "-l", selector, "-o", "name")
		if err != nil {
			return err
		}
		if got := len(strings.Fields(out)); got != n {
			return fmt.Errorf("%d pods", got)
		}
		return nil
	})
}

func kubectlPath() string { return assets + "/kubectl" }

// leaderPod is the pod that holds the controller's Lease.
func leaderPod(t testing.TB, c client.Client) string {
	t.Helper()
	var lease coordinationv1.Lease
	var holder string
	eventually(t, time.Minute, "a Lease holder", func() error {
		get(t, c, systemNS, leaseName, &lease)
		if lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity == "" {
			return fmt.Errorf("no holder")
		}
		holder, _, _ = strings.Cut(*lease.Spec.HolderIdentity, "_")
		return nil
	})
	return holder
}

func eventually(t testing.TB, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, timeout, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
