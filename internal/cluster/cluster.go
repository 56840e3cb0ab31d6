// Package cluster runs a real one-node Kubernetes cluster for tests: etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler, containerd with
// runc, kubelet, kube-proxy (iptables) and a bridge CNI, every process inside
// namespaces the test binary creates (see Enter), so that nothing it does
// reaches the host and everything ends with the tests.
//
// The binaries come from hack/test-binaries.sh (built from the Go module
// proxy at the versions in hack/versions.env); containerd, runc, the CNI
// plugins and iptables are Debian's (hack/host-tools.sh). No image is
// pulled: tests import OCI archives with ImportImage.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// NodeName is the one node's name.
const NodeName = "stickylb-node"

// Options say where the binaries are and which image is the pod sandbox.
type Options struct {
	// Assets holds kube-apiserver, etcd, kubelet, kube-proxy,
	// kube-controller-manager and kube-scheduler (KUBEBUILDER_ASSETS).
	Assets string
	// PauseImage is the reference of the pod sandbox image.
	PauseImage string
	// BeforeKubelet runs once containerd is up: it must import PauseImage
	// (and may import the other images) with ImportImage.
	BeforeKubelet func(context.Context, *Cluster) error
	// Dir is where configuration, keys and logs go.
	Dir string
}

// Cluster is a running one-node cluster.
type Cluster struct {
	opts Options
	// Kubeconfig is an admin (system:masters) kubeconfig, for kubectl and helm.
	Kubeconfig string
	// Config is the same admin identity for Go clients.
	Config *rest.Config
	// Client is a typed client as admin.
	Client kubernetes.Interface

	cgroup string
	mu     sync.Mutex
	procs  []*process
}

// process is a daemon of the cluster and its log file.
type process struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

// Start brings the cluster up: the node is Ready and the default
// ServiceAccount exists when it returns. On error, whatever started is
// stopped.
func Start(ctx context.Context, o Options) (_ *Cluster, err error) {
	if os.Getenv(stageEnv) != "test" {
		return nil, errors.New("cluster.Start needs cluster.Enter in TestMain")
	}
	c := &Cluster{opts: o, cgroup: os.Getenv(cgroupEnv)}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	for _, d := range []string{"pki", "logs", "etc"} {
		if err := os.MkdirAll(filepath.Join(o.Dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	if err := setupNetwork(); err != nil {
		return nil, err
	}
	if err := c.makeCgroupRoot(); err != nil {
		return nil, err
	}
	pki := filepath.Join(o.Dir, "pki")
	ca, err := newAuthority()
	if err != nil {
		return nil, err
	}
	caFile := filepath.Join(pki, "ca.crt")
	if err := os.WriteFile(caFile, ca.certPEM, 0o644); err != nil {
		return nil, err
	}
	serving, err := ca.issue("kube-apiserver", nil,
		[]net.IP{NodeIP.AsSlice(), serviceIP(1).AsSlice(), net.IPv4(127, 0, 0, 1)},
		[]string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost"})
	if err != nil {
		return nil, err
	}
	servingCert, servingKey, err := serving.write(pki, "apiserver")
	if err != nil {
		return nil, err
	}
	kubeletClient, err := ca.issue("kube-apiserver-kubelet-client", []string{"system:masters"}, nil, nil)
	if err != nil {
		return nil, err
	}
	kubeletClientCert, kubeletClientKey, err := kubeletClient.write(pki, "apiserver-kubelet-client")
	if err != nil {
		return nil, err
	}
	saKey, err := serviceAccountKey(pki)
	if err != nil {
		return nil, err
	}
	server := "https://" + netip.AddrPortFrom(NodeIP, 6443).String()
	kubeconfigs := map[string]string{}
	for _, id := range []struct{ name, user, group string }{
		{"admin", "stickylb-test-admin", "system:masters"},
		{"kubelet", "system:node:" + NodeName, "system:nodes"},
		{"controller-manager", "system:kube-controller-manager", ""},
		{"scheduler", "system:kube-scheduler", ""},
		{"kube-proxy", "system:kube-proxy", ""},
	} {
		var groups []string
		if id.group != "" {
			groups = []string{id.group}
		}
		if kubeconfigs[id.name], err = ca.kubeconfig(pki, id.name, server, id.user, groups...); err != nil {
			return nil, err
		}
	}
	c.Kubeconfig = kubeconfigs["admin"]
	if c.Config, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig); err != nil {
		return nil, err
	}
	c.Config.QPS, c.Config.Burst = 100, 200
	if c.Client, err = kubernetes.NewForConfig(c.Config); err != nil {
		return nil, err
	}

	bin := func(name string) string { return filepath.Join(o.Assets, name) }
	if err := c.start("etcd", bin("etcd"), "--data-dir=/var/lib/etcd", "--unsafe-no-fsync",
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--log-level=warn"); err != nil {
		return nil, err
	}
	if err := c.start("kube-apiserver", bin("kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=0.0.0.0", "--secure-port=6443", "--advertise-address="+NodeIP.String(),
		"--service-cluster-ip-range="+ServiceCIDR.String(),
		"--tls-cert-file="+servingCert, "--tls-private-key-file="+servingKey,
		"--client-ca-file="+caFile,
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+saKey, "--service-account-signing-key-file="+saKey,
		"--kubelet-client-certificate="+kubeletClientCert, "--kubelet-client-key="+kubeletClientKey,
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		"--allow-privileged=true"); err != nil {
		return nil, err
	}
	if err := c.waitAPIServer(ctx); err != nil {
		return nil, err
	}
	if err := c.start("kube-controller-manager", bin("kube-controller-manager"),
		"--kubeconfig="+kubeconfigs["controller-manager"],
		"--secure-port=0", "--leader-elect=false",
		"--service-account-private-key-file="+saKey, "--root-ca-file="+caFile,
		"--use-service-account-credentials=true",
		"--allocate-node-cidrs=true", "--cluster-cidr="+clusterCIDR.String(), "--node-cidr-mask-size=24",
		"--service-cluster-ip-range="+ServiceCIDR.String()); err != nil {
		return nil, err
	}
	schedulerConfig, err := writeFile(filepath.Join(o.Dir, "etc", "scheduler.yaml"), fmt.Sprintf(`apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: %s
leaderElection:
  leaderElect: false
`, kubeconfigs["scheduler"]))
	if err != nil {
		return nil, err
	}
	if err := c.start("kube-scheduler", bin("kube-scheduler"), "--config="+schedulerConfig, "--secure-port=0"); err != nil {
		return nil, err
	}

	if err := c.startContainerd(ctx); err != nil {
		return nil, err
	}
	if o.BeforeKubelet != nil {
		if err := o.BeforeKubelet(ctx, c); err != nil {
			return nil, err
		}
	}
	if err := c.startKubelet(kubeconfigs["kubelet"], caFile); err != nil {
		return nil, err
	}
	kubeProxyConfig, err := writeFile(filepath.Join(o.Dir, "etc", "kube-proxy.yaml"), fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: %s
clientConnection:
  kubeconfig: %s
# No clusterCIDR: traffic from outside the pod network to a ClusterIP keeps
# its source address, as on a cloud node that routes clients to pods.
clusterCIDR: ""
nodePortAddresses: ["%s/32"]
healthzBindAddress: %s:10256
metricsBindAddress: 127.0.0.1:10249
# nf_conntrack_max and its timeouts are host-wide: leave them alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
`, NodeName, kubeconfigs["kube-proxy"], NodeIP, NodeIP))
	if err != nil {
		return nil, err
	}
	if err := c.start("kube-proxy", bin("kube-proxy"), "--config="+kubeProxyConfig); err != nil {
		return nil, err
	}
	if err := c.waitReady(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// serviceIP is the i-th address of the service CIDR (1 is the API server's).
func serviceIP(i byte) netip.Addr {
	a := ServiceCIDR.Addr().As4()
	a[3] = i
	return netip.AddrFrom4(a)
}

func (c *Cluster) startContainerd(ctx context.Context) error {
	cniConf := filepath.Join(c.opts.Dir, "etc", "net.d")
	if err := os.MkdirAll(cniConf, 0o755); err != nil {
		return err
	}
	if _, err := writeFile(filepath.Join(cniConf, "10-stickylb.conflist"), fmt.Sprintf(`{
  "cniVersion": "0.4.0",
  "name": "stickylb-test",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "%s"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`, PodCIDR)); err != nil {
		return err
	}
	config, err := writeFile(filepath.Join(c.opts.Dir, "etc", "containerd.toml"), fmt.Sprintf(`version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "%s"

[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd-opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "%s"
  # No CAP_SYS_RESOURCE here: runc must not lower oom_score_adj.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "%s"
`, containerdSocket, c.opts.PauseImage, cniConf))
	if err != nil {
		return err
	}
	if err := c.start("containerd", "containerd", "--config="+config); err != nil {
		return err
	}
	return poll(ctx, 30*time.Second, "containerd", func() error {
		return exec.CommandContext(ctx, "ctr", "--address", containerdSocket, "version").Run()
	})
}

const containerdSocket = "/run/containerd/containerd.sock"

// ImportImage imports an image archive into containerd's Kubernetes namespace.
func (c *Cluster) ImportImage(ctx context.Context, archive string) error {
	out, err := exec.CommandContext(ctx, "ctr", "--address", containerdSocket, "-n", "k8s.io", "images", "import", archive).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images import %s: %v: %s", archive, err, out)
	}
	return nil
}

func (c *Cluster) startKubelet(kubeconfig, caFile string) error {
	config, err := writeFile(filepath.Join(c.opts.Dir, "etc", "kubelet.yaml"), fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://%s
imageServiceEndpoint: unix://%s
# This machine: cgroup v1 (hybrid), no systemd.
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupRoot: %s
failSwapOn: false
resolvConf: ""
address: %s
readOnlyPort: 0
podCIDR: %s
volumePluginDir: /var/lib/kubelet-plugins
protectKernelDefaults: false
# The images are imported, never pulled: nothing may collect them.
imageGCHighThresholdPercent: 100
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: %s
authorization:
  mode: Webhook
`, containerdSocket, containerdSocket, c.cgroup, NodeIP, PodCIDR, caFile))
	if err != nil {
		return err
	}
	return c.start("kubelet", filepath.Join(c.opts.Assets, "kubelet"),
		"--config="+config, "--kubeconfig="+kubeconfig,
		"--hostname-override="+NodeName, "--node-ip="+NodeIP.String(),
		"--root-dir=/var/lib/kubelet", "--cert-dir=/var/lib/kubelet/pki", "--v=1")
}

// makeCgroupRoot creates the cgroup kubelet puts every pod under, in each
// hierarchy, so that init can remove it whatever happens.
func (c *Cluster) makeCgroupRoot() error {
	if c.cgroup == "" {
		return errors.New("no cgroup name from cluster.Enter")
	}
	hierarchies, err := filepath.Glob("/sys/fs/cgroup/*")
	if err != nil {
		return err
	}
	for _, h := range hierarchies {
		if err := os.Mkdir(filepath.Join(h, c.cgroup), 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("create cgroup: %w", err)
		}
	}
	// A new v1 cpuset has no CPUs or memory nodes until given its parent's.
	for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
		v, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/cpuset", f))
		if err != nil {
			continue
		}
		if err := os.WriteFile(filepath.Join("/sys/fs/cgroup/cpuset", c.cgroup, f), v, 0o644); err != nil {
			return fmt.Errorf("cpuset %s: %w", f, err)
		}
	}
	return nil
}

// start runs a daemon in the node's network namespace, its output in a log.
func (c *Cluster) start(name, path string, args ...string) error {
	log := filepath.Join(c.opts.Dir, "logs", name+".log")
	f, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := nodeCommand(path, args...)
	cmd.Stdout, cmd.Stderr = f, f
	// Each daemon leads its own process group, so a stop reaches its children.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, log: log, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	return nil
}

// Exited names the daemons that have stopped, with their errors: a
// cluster that lost one is no longer what a test expects.
func (c *Cluster) Exited() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, p := range c.procs {
		select {
		case <-p.done:
			out = append(out, fmt.Sprintf("%s: %v", p.name, p.err))
		default:
		}
	}
	return out
}

// Log returns the last n bytes of a daemon's log.
func (c *Cluster) Log(name string, n int) string {
	b, err := os.ReadFile(filepath.Join(c.opts.Dir, "logs", name+".log"))
	if err != nil {
		return err.Error()
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// Stop stops the daemons, newest first (kubelet before containerd, the API
// server last). Pods and shims, which no daemon here waits for, die with the
// PID namespace when the tests end.
func (c *Cluster) Stop() {
	c.mu.Lock()
	procs := c.procs
	c.procs = nil
	c.mu.Unlock()
	for i := len(procs) - 1; i >= 0; i-- {
		p := procs[i]
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			// kube-apiserver ignores SIGTERM while watches are open.
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	}
}

func (c *Cluster) waitAPIServer(ctx context.Context) error {
	return poll(ctx, 60*time.Second, "kube-apiserver /readyz", func() error {
		if ex := c.Exited(); len(ex) > 0 {
			return stop(fmt.Errorf("exited: %s", strings.Join(ex, "; ")))
		}
		body, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("%w: %s", err, body)
		}
		return nil
	})
}

// waitReady waits for the node to be Ready and schedulable and for what
// pods need from the controller-manager: the default ServiceAccount and the
// root CA ConfigMap.
func (c *Cluster) waitReady(ctx context.Context) error {
	return poll(ctx, 120*time.Second, "node Ready", func() error {
		if ex := c.Exited(); len(ex) > 0 {
			return stop(fmt.Errorf("exited: %s", strings.Join(ex, "; ")))
		}
		node, err := c.Client.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		ready := false
		for _, cond := range node.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				ready = cond.Status == corev1.ConditionTrue
			}
		}
		if !ready {
			return errors.New("node not Ready")
		}
		for _, t := range node.Spec.Taints {
			if t.Effect == corev1.TaintEffectNoSchedule {
				return fmt.Errorf("node tainted %s", t.Key)
			}
		}
		if _, err := c.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			return err
		}
		_, err = c.Client.CoreV1().ConfigMaps("default").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return errors.New("no kube-root-ca.crt yet")
		}
		return err
	})
}

// stopError ends a poll at once.
type stopError struct{ error }

func stop(err error) error { return stopError{err} }

// poll calls f until it succeeds, returns a stopError, or timeout passes.
func poll(ctx context.Context, timeout time.Duration, what string, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		var s stopError
		if errors.As(err, &s) {
			return fmt.Errorf("%s: %w", what, s.error)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not within %v: %w", what, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func writeFile(path, content string) (string, error) {
	return path, os.WriteFile(path, []byte(content), 0o644)
}
