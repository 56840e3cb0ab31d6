// Command demo shows sticky sessions end to end with nothing installed: a
// local control plane (the real kube-apiserver and etcd), the stickylb
// manager, three backends behind a Service, and a ClientIP rule applied with
// kubectl. With -dev it keeps everything running for you to try kubectl.
//
// It runs in a network namespace of its own: Kubernetes refuses loopback
// addresses in EndpointSlices, so the backends use 10.1.1.x there, and no
// packet leaves the machine.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
	"github.com/stickylb/stickylb/internal/testenv"
)

const (
	backendPort = 9000
	clients     = 12
)

var frontend = netip.MustParseAddrPort("127.0.0.1:8080")

// tools are the binaries the demo runs, from KUBEBUILDER_ASSETS: envtest
// starts kube-apiserver and etcd, and the demo runs kubectl (and -dev tells
// you to). Every path to one goes through tool, so this is the whole list:
// `make demo` and `make dev` build exactly these (DEMO_TOOLS in the Makefile),
// and tools_test.go fails when the two differ.
var tools = []string{"kube-apiserver", "etcd", "kubectl"}

// tool returns the path of one of tools in the assets directory.
func tool(assets, name string) string {
	if !slices.Contains(tools, name) {
		panic(fmt.Sprintf("the demo runs %s, which is not in tools: add it there and to DEMO_TOOLS in the Makefile", name))
	}
	return filepath.Join(assets, name)
}

func main() {
	dev := flag.Bool("dev", false, "keep the control plane, manager and backends running until interrupted")
	bin := flag.String("stickylb", "bin/stickylb", "the stickylb binary")
	flag.Parse()
	netns.Enter()
	if err := run(*dev, *bin); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }

func run(dev bool, bin string) error {
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		return fmt.Errorf("KUBEBUILDER_ASSETS is not set: run `make demo`")
	}
	for _, t := range tools {
		if _, err := os.Stat(tool(assets, t)); err != nil {
			return fmt.Errorf("%s is not in KUBEBUILDER_ASSETS (%s): run `make demo`", t, assets)
		}
	}
	step("starting a local control plane (kube-apiserver and etcd from %s)", assets)
	env := &envtest.Environment{CRDDirectoryPaths: []string{"config/crd/bases"}, ErrorIfCRDPathMissing: true}
	env.ControlPlane.GetAPIServer().Path = tool(assets, "kube-apiserver")
	env.ControlPlane.Etcd = &envtest.Etcd{Path: tool(assets, "etcd")}
	netns.ConfigureAPIServer(env)
	if _, err := testenv.Start(env); err != nil {
		return err
	}
	defer func() { _ = env.Stop() }()
	dir, err := os.MkdirTemp("", "stickylb-demo")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	kubeconfig, adminConfig, err := testenv.AdminKubeconfig(env, "demo", dir)
	if err != nil {
		return err
	}
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	k8s, err := client.New(adminConfig, client.Options{Scheme: scheme})
	if err != nil {
		return err
	}
	kubectl := func(args ...string) (string, error) {
		out, err := exec.Command(tool(assets, "kubectl"), append([]string{"--kubeconfig", kubeconfig}, args...)...).CombinedOutput()
		return string(out), err
	}

	step("starting the stickylb manager (dataplane on %s)", frontend.Addr())
	logFile := filepath.Join(dir, "stickylb.log")
	logs, err := os.Create(logFile)
	if err != nil {
		return err
	}
	mgr := exec.Command(bin, "--kubeconfig", kubeconfig, "--dataplane-bind-address", frontend.Addr().String(),
		"--metrics-bind-address", "127.0.0.1:18080", "--health-probe-bind-address", "127.0.0.1:18081", "--drain-timeout", "1s")
	mgr.Stdout, mgr.Stderr = logs, logs
	if err := mgr.Start(); err != nil {
		return err
	}
	defer func() {
		_ = mgr.Process.Signal(syscall.SIGTERM)
		_ = mgr.Wait()
	}()

	step("starting 3 backends on 10.1.1.1-3:%d, their Service and EndpointSlice", backendPort)
	var backends []*testbackend.Server
	for i := range 3 {
		b, err := testbackend.Listen(netns.BackendIP(i).String(), backendPort)
		if err != nil {
			return err
		}
		defer b.Stop()
		backends = append(backends, b)
	}
	ctx := context.Background()
	if err := k8s.Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: backendPort}}}}); err != nil {
		return err
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To[int32](backendPort)}},
	}
	for _, b := range backends {
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{b.Name}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
	}
	if err := k8s.Create(ctx, slice); err != nil {
		return err
	}

	step("kubectl apply -f hack/demo/web.yaml")
	if out, err := kubectl("apply", "-f", "hack/demo/web.yaml"); err != nil {
		return fmt.Errorf("kubectl apply: %v\n%s", err, out)
	} else {
		fmt.Print(out)
	}
	step("kubectl wait --for=condition=Ready lbr/web")
	if out, err := kubectl("wait", "--for=condition=Ready", "lbr/web", "--timeout=60s"); err != nil {
		logsOut, _ := os.ReadFile(logFile)
		return fmt.Errorf("kubectl wait: %v\n%s\nmanager log:\n%s", err, out, logsOut)
	} else {
		fmt.Print(out)
	}
	out, _ := kubectl("get", "lbr")
	fmt.Print(out)

	if dev {
		step("running. In another terminal, enter the demo's network namespace:")
		fmt.Printf("    nsenter --net=/proc/%d/ns/net bash\n    export KUBECONFIG=%s\n    %s get lbr\n", os.Getpid(), kubeconfig, tool(assets, "kubectl"))
		fmt.Printf("  clients connect to %s from any 127.0.0.0/8 source; manager log: %s\n  Ctrl-C stops everything.\n", frontend, logFile)
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
		<-sig
		return nil
	}

	step("%d clients connect twice each: every client keeps its backend", clients)
	first, err := pins()
	if err != nil {
		return err
	}
	second, err := pins()
	if err != nil {
		return err
	}
	fmt.Printf("    %-12s %-10s %-10s\n", "client", "1st", "2nd")
	for i := range first {
		mark := "pinned"
		if first[i] != second[i] {
			mark = "MOVED"
		}
		fmt.Printf("    %-12s %-10s %-10s %s\n", testbackend.ClientIP(i), first[i], second[i], mark)
		if first[i] != second[i] {
			return fmt.Errorf("client %s moved without a pool change", testbackend.ClientIP(i))
		}
	}

	gone := backends[1].Name
	step("taking backend %s out of the EndpointSlice: only its clients move", gone)
	slice.Endpoints = slices.DeleteFunc(slice.Endpoints, func(e discoveryv1.Endpoint) bool { return e.Addresses[0] == gone })
	if err := k8s.Update(ctx, slice); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	var after []string
	for {
		if after, err = pins(); err != nil {
			return err
		}
		if !slices.Contains(after, gone) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Printf("    %-12s %-10s %-10s\n", "client", "before", "after")
	moved := 0
	for i := range first {
		mark := "kept"
		if first[i] != after[i] {
			mark = "moved"
			moved++
			if first[i] != gone {
				return fmt.Errorf("client %s moved from %s though that backend stayed", testbackend.ClientIP(i), first[i])
			}
		} else if first[i] == gone {
			return fmt.Errorf("client %s still on removed backend %s", testbackend.ClientIP(i), gone)
		}
		fmt.Printf("    %-12s %-10s %-10s %s\n", testbackend.ClientIP(i), first[i], after[i], mark)
	}
	step("done: %d of %d clients moved, all of them from %s; every other client kept its backend", moved, clients, gone)
	out, _ = kubectl("get", "lbr")
	fmt.Print(out)
	return nil
}

// pins connects once from each client and returns the backend each reached.
func pins() ([]string, error) {
	out := make([]string, clients)
	for i := range out {
		name, c, err := testbackend.BackendOf(testbackend.ClientIP(i), frontend)
		if err != nil {
			return nil, err
		}
		c.Close()
		out[i] = name
	}
	return out, nil
}
