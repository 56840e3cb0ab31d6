// Package testenv holds what tests that drive real processes share: an
// admin kubeconfig for an envtest API server, child-process output, and
// free addresses.
package testenv

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// AdminKubeconfig adds a system:masters user to env and writes its
// kubeconfig into dir. It returns the file and the user's rest.Config.
func AdminKubeconfig(env *envtest.Environment, name, dir string) (string, *rest.Config, error) {
	user, err := env.AddUser(envtest.User{Name: name, Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return "", nil, err
	}
	raw, err := user.KubeConfig()
	if err != nil {
		return "", nil, err
	}
	path := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		return "", nil, err
	}
	return path, user.Config(), nil
}

// Output collects a child process's output while the test reads it.
type Output struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (o *Output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.Write(p)
}

func (o *Output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// FreeAddr returns a 127.0.0.1 TCP address nothing listens on now.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Start starts env and, when that fails part way (a CRD that does not
// install, say), stops whatever it had already launched: envtest leaves
// kube-apiserver and etcd running otherwise.
func Start(env *envtest.Environment) (*rest.Config, error) {
	cfg, err := env.Start()
	if err != nil {
		_ = env.Stop()
		return nil, err
	}
	return cfg, nil
}
