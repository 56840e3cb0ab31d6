// Package cluster tests stickylb the way users run it: the chart's image and
// Deployment under a real kubelet, rules applied with kubectl, clients that
// reach the frontend through kube-proxy (ClusterIP and NodePort), backends
// that are real pods, and the operations users do every day (scaling,
// rolling updates, restarts, upgrades, losing the leader) under continuous
// load. The cluster is internal/cluster's: every process of it runs in
// namespaces of this test binary and ends with it.
package cluster

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stickylb/stickylb/internal/cluster"
	"github.com/stickylb/stickylb/internal/testimages"
)

var (
	kc      *cluster.Cluster
	images  testimages.Set
	assets  string
	workDir string
)

func TestMain(m *testing.M) {
	cluster.Enter()
	os.Exit(run(m))
}

func run(m *testing.M) int {
	assets = os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is not set: run these tests with `make test`, which builds the cluster's binaries")
		return 1
	}
	var err error
	if workDir, err = os.MkdirTemp("", "stickylb-cluster"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(workDir)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// The images build while the control plane starts.
	built := make(chan error, 1)
	go func() {
		var err error
		images, err = testimages.Build(ctx, "../..", filepath.Join(workDir, "images"))
		built <- err
	}()
	start := time.Now()
	kc, err = cluster.Start(ctx, cluster.Options{
		Assets:     assets,
		Dir:        filepath.Join(workDir, "cluster"),
		PauseImage: testimages.PauseImage,
		BeforeKubelet: func(ctx context.Context, c *cluster.Cluster) error {
			if err := <-built; err != nil {
				return fmt.Errorf("build images: %w", err)
			}
			for _, a := range []string{images.Pause.Archive, images.Backend.Archive, images.Stickylb.Archive} {
				if err := c.ImportImage(ctx, a); err != nil {
					return err
				}
			}
			return nil
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start the cluster:", err)
		dumpLogs(filepath.Join(workDir, "cluster", "logs"))
		return 1
	}
	fmt.Printf("cluster: up in %v (images built alongside)\n", time.Since(start).Round(time.Second))
	code := m.Run()
	if code != 0 {
		dumpLogs(filepath.Join(workDir, "cluster", "logs"))
	}
	kc.Stop()
	return code
}

// dumpLogs prints the end of every daemon's log, to see why a test failed.
func dumpLogs(dir string) {
	files, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if len(b) > 6000 {
			b = b[len(b)-6000:]
		}
		fmt.Fprintf(os.Stderr, "==== %s (end)\n%s\n", filepath.Base(f), b)
	}
}

// kubectl runs the real kubectl as the cluster's admin and returns its stdout.
func kubectl(t testing.TB, stdin string, args ...string) string {
	t.Helper()
	return tool(t, filepath.Join(assets, "kubectl"), stdin, args...)
}

// helm runs the real helm as the cluster's admin.
func helm(t testing.TB, args ...string) string {
	t.Helper()
	return tool(t, filepath.Join(assets, "helm"), "", args...)
}

func tool(t testing.TB, bin, stdin string, args ...string) string {
	t.Helper()
	out, err := toolErr(bin, stdin, args...)
	if err != nil {
		t.Fatalf("%s %s: %v", filepath.Base(bin), strings.Join(args, " "), err)
	}
	return out
}

func toolErr(bin, stdin string, args ...string) (string, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+kc.Kubeconfig, "HELM_CACHE_HOME="+filepath.Join(workDir, "helm"),
		"HELM_CONFIG_HOME="+filepath.Join(workDir, "helm"), "HELM_DATA_HOME="+filepath.Join(workDir, "helm"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w: %s%s", err, stderr.String(), stdout.String())
	}
	return stdout.String(), nil
}

// addrPort parses "ip:port".
func addrPort(t testing.TB, ip string, port int32) netip.AddrPort {
	t.Helper()
	a, err := netip.ParseAddr(ip)
	if err != nil {
		t.Fatalf("address %q: %v", ip, err)
	}
	return netip.AddrPortFrom(a, uint16(port))
}
