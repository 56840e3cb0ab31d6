package main

import (
	"bufio"
	"bytes"
	"debug/elf"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// controllerGen returns the pinned controller-gen, building it if needed.
func controllerGen(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("CONTROLLER_GEN"); p != "" {
		return p
	}
	out, err := exec.Command("hack/test-binaries.sh", "controller-gen").Output()
	if err != nil {
		t.Fatalf("hack/test-binaries.sh controller-gen: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return filepath.Join(lines[len(lines)-1], "controller-gen")
}

// copyTree copies the repository (without .git and build output) to dst.
func copyTree(t *testing.T, dst string) {
	t.Helper()
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (path == ".git" || path == "bin") {
			return filepath.SkipDir
		}
		target := filepath.Join(dst, path)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, info.Mode().Perm())
	})
	if err != nil {
		t.Fatal(err)
	}
}

// generated lists the files controller-gen writes, relative to root.
func generated(t *testing.T, root string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	for _, pattern := range []string{"api/*/zz_generated.deepcopy.go", "config/crd/bases/*.yaml", "config/rbac/role.yaml"} {
		matches, err := filepath.Glob(filepath.Join(root, pattern))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range matches {
			b, err := os.ReadFile(m)
			if err != nil {
				t.Fatal(err)
			}
			rel, _ := filepath.Rel(root, m)
			files[rel] = b
		}
	}
	return files
}

// TestGeneratedFilesUpToDate regenerates deepcopy, CRD and RBAC in a copy of
// the tree and fails when the committed files differ.
func TestGeneratedFilesUpToDate(t *testing.T) {
	gen := controllerGen(t)
	tmp := t.TempDir()
	copyTree(t, tmp)
	for _, f := range []string{"api/v1alpha1/zz_generated.deepcopy.go", "config/crd/bases/lb.stickylb.io_loadbalancerrules.yaml", "config/rbac/role.yaml"} {
		if err := os.Remove(filepath.Join(tmp, f)); err != nil {
			t.Fatalf("generated file missing from the tree: %v", err)
		}
	}
	cmd := exec.Command("make", "generate", "manifests", "CONTROLLER_GEN="+gen)
	cmd.Dir = tmp
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make generate manifests: %v\n%s", err, out)
	}
	want, have := generated(t, tmp), generated(t, ".")
	for name, b := range want {
		if !bytes.Equal(b, have[name]) {
			t.Errorf("%s is stale: run `make generate manifests` and commit the result", name)
		}
	}
	for name := range have {
		if _, ok := want[name]; !ok {
			t.Errorf("%s is no longer generated: delete it", name)
		}
	}
}

// dockerfileBuild returns the `go build` command of the Dockerfile's build stage.
func dockerfileBuild(t *testing.T) (cmd string, goVersion string) {
	t.Helper()
	f, err := os.Open("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if v, ok := strings.CutPrefix(line, "ARG GO_VERSION="); ok {
			goVersion = v
		}
		if c, ok := strings.CutPrefix(line, "RUN "); ok && strings.Contains(c, "go build") {
			cmd = c
		}
	}
	if cmd == "" {
		t.Fatal("Dockerfile has no RUN ... go build line")
	}
	return cmd, goVersion
}

// TestDockerfileBuild runs the Dockerfile's own build command (no container
// engine runs here) and checks the result is a static binary that starts.
func TestDockerfileBuild(t *testing.T) {
	build, goVersion := dockerfileBuild(t)
	versions, err := os.ReadFile("hack/versions.env")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(versions), "GO_VERSION="+goVersion+"\n") {
		t.Errorf("Dockerfile GO_VERSION=%s differs from hack/versions.env", goVersion)
	}
	out := t.TempDir()
	cmd := exec.Command("sh", "-c", strings.ReplaceAll(build, "/out/", out+"/"))
	cmd.Env = append(os.Environ(), "TARGETOS=linux", "TARGETARCH="+runtime.GOARCH)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", build, err, b)
	}
	bin := filepath.Join(out, "stickylb")
	ef, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer ef.Close()
	for _, p := range ef.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("binary is dynamically linked (%v); distroless/static needs a static one", p.Type)
		}
	}
	if b, err := exec.Command(bin, "--help").CombinedOutput(); err != nil || !strings.Contains(string(b), "-leader-elect") {
		t.Errorf("stickylb --help: %v\n%s", err, b)
	}
}
