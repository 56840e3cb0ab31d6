// Package testimages builds the images of the test cluster as OCI archives,
// without a container engine: stickylb itself (the Helm chart's default
// image), a backend (./backend) and the pod sandbox's pause process
// (./pause). Each archive imports with `ctr -n k8s.io images import`.
package testimages

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	"sigs.k8s.io/yaml"

	"github.com/stickylb/stickylb/internal/ociimage"
)

// Image references. Configure containerd's sandbox image (sandbox_image, or
// pinned_images.sandbox) as PauseImage so that no pod needs a registry.
// The stickylb image is StickylbRepository:<the chart's appVersion>; see
// StickylbRef.
const (
	StickylbRepository = "ghcr.io/stickylb/stickylb"
	BackendImage       = "stickylb.test/backend:v1"
	PauseImage         = "stickylb.test/pause:v1"
)

// Users the images run as, "uid:gid".
const (
	NonrootUser = "65532:65532" // stickylb and the backend, as distroless nonroot
	PauseUser   = "65535:65535" // as registry.k8s.io/pause
)

// GoBuildFlags are the flags of the Dockerfile's `go build` line, which
// Build uses too (a test at the repository root checks they agree). The
// environment is CGO_ENABLED=0 GOOS=linux GOARCH=<arch>.
var GoBuildFlags = []string{"-trimpath", "-ldflags=-s -w"}

// Image is one built image.
type Image struct {
	Ref     string // e.g. stickylb.test/backend:v1
	Archive string // the tar archive's path
}

// Set is the images Build makes.
type Set struct {
	Stickylb Image
	Backend  Image
	Pause    Image
}

// StickylbRef returns the Helm chart's default image,
// ghcr.io/stickylb/stickylb:<appVersion of charts/stickylb/Chart.yaml>.
func StickylbRef(repoRoot string) (string, error) {
	file := filepath.Join(repoRoot, "charts", "stickylb", "Chart.yaml")
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	var chart struct {
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(b, &chart); err != nil {
		return "", fmt.Errorf("%s: %w", file, err)
	}
	if chart.AppVersion == "" {
		return "", fmt.Errorf("%s: no appVersion", file)
	}
	return StickylbRepository + ":" + chart.AppVersion, nil
}

// StickylbSpec is the stickylb image with the binary at binaryPath, as the
// Dockerfile builds it: /stickylb on a distroless-style nonroot base,
// user 65532:65532, entrypoint /stickylb. `make image` writes the same.
func StickylbSpec(ref, binaryPath, arch string) ociimage.Spec {
	return program(ref, arch, binaryPath, "/stickylb", NonrootUser)
}

// BackendSpec is the backend image with the binary at binaryPath.
func BackendSpec(binaryPath, arch string) ociimage.Spec {
	return program(BackendImage, arch, binaryPath, "/backend", NonrootUser)
}

// PauseSpec is the pause image with the binary at binaryPath: the binary
// and /tmp, nothing else.
func PauseSpec(binaryPath, arch string) ociimage.Spec {
	return ociimage.Spec{
		Name:       PauseImage,
		Arch:       arch,
		Dirs:       []ociimage.Dir{{Path: "/tmp", Mode: 0o1777}},
		Files:      []ociimage.File{{Path: "/pause", Source: binaryPath, Mode: 0o755}},
		User:       PauseUser,
		Entrypoint: []string{"/pause"},
	}
}

// program is a nonroot distroless-style image of one static binary.
func program(ref, arch, binaryPath, inImage, user string) ociimage.Spec {
	dirs, files := ociimage.NonrootBase()
	files = append(files, ociimage.File{Path: inImage, Source: binaryPath, Mode: 0o755})
	return ociimage.Spec{
		Name:       ref,
		Arch:       arch,
		Dirs:       dirs,
		Files:      files,
		User:       user,
		Entrypoint: []string{inImage},
		Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin"},
	}
}

// Build compiles stickylb (the module's root package), ./internal/testimages/pause
// and ./internal/testimages/backend for linux/runtime.GOARCH in one
// `go build`, run in repoRoot with the Dockerfile's flags, and writes
// stickylb.tar, backend.tar and pause.tar into outDir.
func Build(ctx context.Context, repoRoot, outDir string) (Set, error) {
	arch := runtime.GOARCH
	ref, err := StickylbRef(repoRoot)
	if err != nil {
		return Set{}, err
	}
	// go build runs in repoRoot: a relative -o would be taken from there.
	if outDir, err = filepath.Abs(outDir); err != nil {
		return Set{}, err
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return Set{}, err
	}
	binDir, err := os.MkdirTemp(outDir, ".bin-")
	if err != nil {
		return Set{}, err
	}
	defer os.RemoveAll(binDir)

	args := append([]string{"build"}, GoBuildFlags...)
	args = append(args, "-o", binDir+string(filepath.Separator),
		".", "./internal/testimages/pause", "./internal/testimages/backend")
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
	if out, err := cmd.CombinedOutput(); err != nil {
		return Set{}, fmt.Errorf("CGO_ENABLED=0 GOOS=linux GOARCH=%s go %s: %w\n%s",
			arch, strings.Join(args, " "), err, out)
	}

	set := Set{
		Stickylb: Image{Ref: ref, Archive: filepath.Join(outDir, "stickylb.tar")},
		Backend:  Image{Ref: BackendImage, Archive: filepath.Join(outDir, "backend.tar")},
		Pause:    Image{Ref: PauseImage, Archive: filepath.Join(outDir, "pause.tar")},
	}
	jobs := []struct {
		archive string
		spec    ociimage.Spec
	}{
		{set.Stickylb.Archive, StickylbSpec(ref, filepath.Join(binDir, "stickylb"), arch)},
		{set.Backend.Archive, BackendSpec(filepath.Join(binDir, "backend"), arch)},
		{set.Pause.Archive, PauseSpec(filepath.Join(binDir, "pause"), arch)},
	}
	errs := make([]error, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Go(func() { errs[i] = ociimage.Write(j.archive, j.spec) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return Set{}, err
		}
	}
	return set, nil
}
