package ociimage

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

const testRef = "ghcr.io/stickylb/stickylb:0.1.0"

// testSpec is a nonroot image with a program from the host, a file owned
// by nonroot and a file given as bytes.
func testSpec(t *testing.T) Spec {
	t.Helper()
	prog := filepath.Join(t.TempDir(), "prog")
	if err := os.WriteFile(prog, []byte("#!not really a program\n"+strings.Repeat("x", 100000)), 0o700); err != nil {
		t.Fatal(err)
	}
	dirs, files := NonrootBase()
	files = append(files,
		File{Path: "/stickylb", Source: prog, Mode: 0o755},
		File{Path: "/home/nonroot/.config/app.conf", Data: []byte("a=1\n"), UID: NonrootUID, GID: NonrootUID},
	)
	return Spec{
		Name:       testRef,
		Dirs:       dirs,
		Files:      files,
		User:       "65532:65532",
		Entrypoint: []string{"/stickylb"},
		Cmd:        []string{"--help"},
		Env:        []string{"PATH=/usr/bin:/bin"},
		WorkingDir: "/home/nonroot",
		Labels:     map[string]string{"org.opencontainers.image.source": "https://github.com/stickylb/stickylb"},
	}
}

// extract unpacks the archive into a directory, to read it as an OCI layout.
func extract(t *testing.T, archive string) (dir string, names []string) {
	t.Helper()
	dir = t.TempDir()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return dir, names
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, hdr.Name)
		p := filepath.Join(dir, filepath.FromSlash(hdr.Name))
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("archive entry %s has type %c", hdr.Name, hdr.Typeflag)
		}
	}
}

// layerEntry is what a test checks of a file in the layer.
type layerEntry struct {
	typ      byte
	mode     int64
	uid, gid int
	size     int64
}

func readLayer(t *testing.T, img v1.Image) map[string]layerEntry {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("%d layers, want 1", len(layers))
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	entries := map[string]layerEntry{}
	var order []string
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if !hdr.ModTime.Equal(epoch) {
			t.Errorf("%s: mtime %v, want the epoch", hdr.Name, hdr.ModTime)
		}
		if hdr.Uname != "" || hdr.Gname != "" {
			t.Errorf("%s: owner names %q:%q, want none", hdr.Name, hdr.Uname, hdr.Gname)
		}
		p := "/" + strings.TrimSuffix(hdr.Name, "/")
		order = append(order, p)
		entries[p] = layerEntry{typ: hdr.Typeflag, mode: hdr.Mode, uid: hdr.Uid, gid: hdr.Gid, size: hdr.Size}
	}
	if !slices.IsSorted(order) {
		t.Errorf("layer entries not sorted: %v", order)
	}
	return entries
}

func TestWriteAndReadBack(t *testing.T) {
	spec := testSpec(t)
	archive := filepath.Join(t.TempDir(), "out", "image.tar")
	if err := Write(archive, spec); err != nil {
		t.Fatal(err)
	}
	dir, names := extract(t, archive)
	for _, want := range []string{"oci-layout", "index.json", "manifest.json", "blobs/sha256/"} {
		if !slices.Contains(names, want) {
			t.Errorf("archive has no %s: %v", want, names)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "oci-layout")); err != nil || !strings.Contains(string(b), `"imageLayoutVersion":"1.0.0"`) {
		t.Errorf("oci-layout: %s %v", b, err)
	}

	// As an OCI layout.
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("index.json has %d manifests, want 1", len(im.Manifests))
	}
	desc := im.Manifests[0]
	if desc.MediaType != types.OCIManifestSchema1 {
		t.Errorf("manifest media type %s", desc.MediaType)
	}
	if got := desc.Annotations[AnnotationImageName]; got != testRef {
		t.Errorf("%s = %q, want %q", AnnotationImageName, got, testRef)
	}
	if got := desc.Annotations[AnnotationRefName]; got != "0.1.0" {
		t.Errorf("%s = %q, want 0.1.0", AnnotationRefName, got)
	}
	if desc.Platform == nil || desc.Platform.OS != "linux" || desc.Platform.Architecture != runtime.GOARCH {
		t.Errorf("platform %+v, want linux/%s", desc.Platform, runtime.GOARCH)
	}
	img, err := idx.Image(desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(img); err != nil {
		t.Fatalf("OCI layout image does not validate: %v", err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.Config.MediaType != types.OCIConfigJSON || len(m.Layers) != 1 || m.Layers[0].MediaType != types.OCILayer {
		t.Errorf("manifest: config %s, layers %+v", m.Config.MediaType, m.Layers)
	}

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("config platform %s/%s", cf.OS, cf.Architecture)
	}
	if !cf.Created.Time.Equal(epoch) {
		t.Errorf("config created %v, want the epoch", cf.Created)
	}
	c := cf.Config
	if c.User != "65532:65532" {
		t.Errorf("User %q", c.User)
	}
	if !slices.Equal(c.Entrypoint, []string{"/stickylb"}) || !slices.Equal(c.Cmd, []string{"--help"}) {
		t.Errorf("Entrypoint %q, Cmd %q", c.Entrypoint, c.Cmd)
	}
	if !slices.Equal(c.Env, []string{"PATH=/usr/bin:/bin"}) || c.WorkingDir != "/home/nonroot" {
		t.Errorf("Env %q, WorkingDir %q", c.Env, c.WorkingDir)
	}
	if c.Labels["org.opencontainers.image.source"] != "https://github.com/stickylb/stickylb" {
		t.Errorf("Labels %v", c.Labels)
	}

	entries := readLayer(t, img)
	want := map[string]layerEntry{
		"/etc":                           {tar.TypeDir, 0o755, 0, 0, 0},
		"/etc/group":                     {tar.TypeReg, 0o644, 0, 0, int64(len("root:x:0:\nnonroot:x:65532:\n"))},
		"/etc/passwd":                    {tar.TypeReg, 0o644, 0, 0, -1},
		"/home":                          {tar.TypeDir, 0o755, 0, 0, 0},
		"/home/nonroot":                  {tar.TypeDir, 0o700, 65532, 65532, 0},
		"/home/nonroot/.config":          {tar.TypeDir, 0o755, 0, 0, 0}, // added parent
		"/home/nonroot/.config/app.conf": {tar.TypeReg, 0o644, 65532, 65532, 4},
		"/stickylb":                      {tar.TypeReg, 0o755, 0, 0, int64(len("#!not really a program\n") + 100000)},
		"/tmp":                           {tar.TypeDir, 0o1777, 0, 0, 0},
	}
	for p, w := range want {
		g, ok := entries[p]
		if w.size == -1 {
			w.size = g.size
		}
		if !ok || g != w {
			t.Errorf("%s: got %+v (present %v), want %+v", p, g, ok, w)
		}
	}
	for p := range entries {
		if _, ok := want[p]; !ok {
			t.Errorf("unexpected %s in the layer", p)
		}
	}
	if _, ok := entries["/bin/sh"]; ok {
		t.Error("the image has a shell")
	}

	// As a Docker tarball, through manifest.json and its RepoTags.
	var dm []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dm); err != nil {
		t.Fatal(err)
	}
	if len(dm) != 1 || !slices.Equal(dm[0].RepoTags, []string{testRef}) {
		t.Fatalf("manifest.json %s", b)
	}
	if dm[0].Config != "blobs/sha256/"+m.Config.Digest.Hex || !slices.Equal(dm[0].Layers, []string{"blobs/sha256/" + m.Layers[0].Digest.Hex}) {
		t.Errorf("manifest.json points elsewhere than the OCI manifest: %s", b)
	}
	tag, err := name.NewTag(testRef)
	if err != nil {
		t.Fatal(err)
	}
	timg, err := tarball.ImageFromPath(archive, &tag)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(timg); err != nil {
		t.Fatalf("Docker tarball image does not validate: %v", err)
	}
	tcf, err := timg.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	if tcf != m.Config.Digest {
		t.Errorf("tarball config %s, OCI config %s", tcf, m.Config.Digest)
	}
	tl, err := timg.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if d, err := tl[0].Digest(); err != nil || d != m.Layers[0].Digest {
		t.Errorf("tarball layer %s %v, OCI layer %s", d, err, m.Layers[0].Digest)
	}
	other, err := name.NewTag("ghcr.io/stickylb/stickylb:other")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tarball.ImageFromPath(archive, &other); err == nil {
		t.Error("an image tagged :other was found")
	}
}

func manifestDigest(t *testing.T, archive string) v1.Hash {
	t.Helper()
	dir, _ := extract(t, archive)
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	return im.Manifests[0].Digest
}

func TestDeterministic(t *testing.T) {
	spec := testSpec(t)
	a := filepath.Join(t.TempDir(), "a.tar")
	b := filepath.Join(t.TempDir(), "b.tar")
	if err := Write(a, spec); err != nil {
		t.Fatal(err)
	}
	// The same inputs listed in another order, the source file touched.
	slices.Reverse(spec.Files)
	slices.Reverse(spec.Dirs)
	for _, f := range spec.Files {
		if f.Source != "" {
			if err := os.Chtimes(f.Source, epoch, epoch); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := Write(b, spec); err != nil {
		t.Fatal(err)
	}
	da, db := manifestDigest(t, a), manifestDigest(t, b)
	if da != db {
		t.Errorf("same inputs, different manifests: %s and %s", da, db)
	}
	ba, _ := os.ReadFile(a)
	bb, _ := os.ReadFile(b)
	if string(ba) != string(bb) {
		t.Error("same inputs, different archives")
	}

	spec.User = "0:0"
	if err := Write(b, spec); err != nil {
		t.Fatal(err)
	}
	if manifestDigest(t, b) == da {
		t.Error("another user, the same manifest")
	}
}

func TestNames(t *testing.T) {
	for in, want := range map[string]Reference{
		"ghcr.io/stickylb/stickylb:0.1.0": {"ghcr.io/stickylb/stickylb:0.1.0", "0.1.0"},
		"stickylb.test/backend:v1":        {"stickylb.test/backend:v1", "v1"},
		"busybox":                         {"docker.io/library/busybox:latest", "latest"},
		"docker.io/me/app:2":              {"docker.io/me/app:2", "2"},
		"localhost:5000/app:dev":          {"localhost:5000/app:dev", "dev"},
	} {
		got, err := ParseReference(in)
		if err != nil || got != want {
			t.Errorf("ParseReference(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	if _, err := ParseReference("ghcr.io/x/y@sha256:" + strings.Repeat("a", 64)); err == nil {
		t.Error("a digest reference was accepted")
	}
}

func TestSpecErrors(t *testing.T) {
	dir := t.TempDir()
	for name, s := range map[string]Spec{
		"bad name":        {Name: "UPPER/case:x"},
		"relative path":   {Name: testRef, Files: []File{{Path: "etc/passwd"}}},
		"unclean path":    {Name: testRef, Files: []File{{Path: "/etc/../passwd"}}},
		"twice":           {Name: testRef, Files: []File{{Path: "/a"}}, Dirs: []Dir{{Path: "/a"}}},
		"file as parent":  {Name: testRef, Files: []File{{Path: "/a"}, {Path: "/a/b"}}},
		"missing source":  {Name: testRef, Files: []File{{Path: "/a", Source: filepath.Join(dir, "none")}}},
		"directory input": {Name: testRef, Files: []File{{Path: "/a", Source: dir}}},
	} {
		out := filepath.Join(dir, "x.tar")
		if err := Write(out, s); err == nil {
			t.Errorf("%s: no error", name)
		} else if !strings.Contains(err.Error(), s.Name) {
			t.Errorf("%s: error %q does not name the image", name, err)
		}
		if _, err := os.Stat(out); err == nil {
			t.Errorf("%s: an archive was written", name)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*")); len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}
