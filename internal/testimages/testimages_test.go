package testimages

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/stickylb/stickylb/internal/ociimage"
)

// indexJSON reads index.json from an image archive.
func indexJSON(t *testing.T, archive string) v1.IndexManifest {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			t.Fatalf("%s has no index.json", archive)
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Name == "index.json" {
			var idx v1.IndexManifest
			if err := json.NewDecoder(tr).Decode(&idx); err != nil {
				t.Fatal(err)
			}
			return idx
		}
	}
}

func TestBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds stickylb")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	set, err := Build(ctx, root, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	stickylbRef, err := StickylbRef(root)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(stickylbRef, "ghcr.io/stickylb/stickylb:") {
		t.Errorf("StickylbRef = %q", stickylbRef)
	}
	for _, c := range []struct {
		img        Image
		ref        string
		user       string
		entrypoint string
	}{
		{set.Stickylb, stickylbRef, "65532:65532", "/stickylb"},
		{set.Backend, "stickylb.test/backend:v1", "65532:65532", "/backend"},
		{set.Pause, "stickylb.test/pause:v1", "65535:65535", "/pause"},
	} {
		if c.img.Ref != c.ref {
			t.Errorf("Ref %q, want %q", c.img.Ref, c.ref)
		}
		idx := indexJSON(t, c.img.Archive)
		if len(idx.Manifests) != 1 || idx.Manifests[0].Annotations[ociimage.AnnotationImageName] != c.ref {
			t.Errorf("%s: index.json %+v, want one image named %s", c.img.Archive, idx.Manifests, c.ref)
		}
		tag, err := name.NewTag(c.ref)
		if err != nil {
			t.Fatal(err)
		}
		img, err := tarball.ImageFromPath(c.img.Archive, &tag)
		if err != nil {
			t.Fatalf("%s: %v", c.img.Archive, err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if cf.Config.User != c.user || !slices.Equal(cf.Config.Entrypoint, []string{c.entrypoint}) || cf.Architecture != runtime.GOARCH {
			t.Errorf("%s: user %q, entrypoint %q, arch %s", c.ref, cf.Config.User, cf.Config.Entrypoint, cf.Architecture)
		}
		if !hasExecutable(t, img, strings.TrimPrefix(c.entrypoint, "/")) {
			t.Errorf("%s: no executable %s in the layer", c.ref, c.entrypoint)
		}
	}
}

// hasExecutable reports whether the image's layer has a non-empty 0755
// file at p.
func hasExecutable(t *testing.T, img v1.Image, p string) bool {
	t.Helper()
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return false
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Name == p {
			return hdr.Typeflag == tar.TypeReg && hdr.Mode == 0o755 && hdr.Size > 0
		}
	}
}

func TestStickylbRef(t *testing.T) {
	dir := t.TempDir()
	chart := filepath.Join(dir, "charts", "stickylb")
	if err := os.MkdirAll(chart, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(chart, "Chart.yaml"), []byte("apiVersion: v2\nname: stickylb\nversion: 1.2.3\nappVersion: \"4.5.6\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := StickylbRef(dir); err != nil || got != "ghcr.io/stickylb/stickylb:4.5.6" {
		t.Errorf("StickylbRef = %q, %v", got, err)
	}
	if _, err := StickylbRef(t.TempDir()); err == nil {
		t.Error("no Chart.yaml, no error")
	}
}
