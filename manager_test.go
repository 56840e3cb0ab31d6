package main

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/stickylb/stickylb/controllers"

	"github.com/stickylb/stickylb/internal/testenv"
)

// TestManagerStarts runs the real binary against a real API server and waits
// for its health endpoint and its report Lease, then stops it with SIGINT
// and expects exit 0, the Lease deleted.
func TestManagerStarts(t *testing.T) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set: run with `make test`")
	}
	env := &envtest.Environment{CRDDirectoryPaths: []string{filepath.Join("config", "crd", "bases")}, ErrorIfCRDPathMissing: true}
	cfg, err := testenv.Start(env)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	dir := t.TempDir()
	kcPath, _, err := testenv.AdminKubeconfig(env, "stickylb", dir)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "stickylb")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	health := testenv.FreeAddr(t)
	cmd := exec.Command(bin, "--kubeconfig", kcPath, "--health-probe-bind-address", health,
		"--metrics-bind-address", testenv.FreeAddr(t), "--leader-elect", "--leader-election-namespace", "default")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		resp, err := http.Get("http://" + health + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case <-ctx.Done():
			_ = cmd.Process.Kill()
			t.Fatal("manager never served /healthz")
		case <-time.After(100 * time.Millisecond):
		}
	}
	// Outside a cluster the replica is its bind address (0.0.0.0 here), its
	// report in --leader-election-namespace.
	c, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	key := client.ObjectKey{Namespace: "default", Name: controllers.ReportLeaseName("0.0.0.0")}
	for {
		var l coordinationv1.Lease
		err := c.Get(ctx, key, &l)
		if err == nil && l.Labels[controllers.LabelReport] == "true" {
			break
		}
		select {
		case <-ctx.Done():
			_ = cmd.Process.Kill()
			t.Fatalf("manager never published its report Lease %s (err %v)", key, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("manager exit after SIGINT: %v", err)
	}
	if err := c.Get(context.Background(), key, &coordinationv1.Lease{}); !apierrors.IsNotFound(err) {
		t.Errorf("report Lease after shutdown: %v, want it deleted", err)
	}
}
