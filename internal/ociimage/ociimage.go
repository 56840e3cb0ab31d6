// Package ociimage writes a single-platform container image with one layer
// as one tar archive, without a container engine.
//
// The archive is what `docker save` writes since Docker 25: an OCI image
// layout (oci-layout, index.json, blobs/sha256/...) plus a Docker-compatible
// manifest.json whose Config and Layers name the same blobs. So one file
// loads with `ctr -n k8s.io images import`, `docker load` and
// `kind load image-archive`, and go-containerregistry reads it both as an
// OCI layout and as a Docker tarball.
//
// The layer is built deterministically: entries sorted by path, every mtime
// the Unix epoch, owners and modes exactly as given, no user or group names.
// The same Spec and the same file contents give the same digests.
package ociimage

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations on the image's descriptor in index.json, as Docker and
// containerd write them: containerd names the image it imports after
// AnnotationImageName; the OCI ref name is the tag alone.
const (
	AnnotationImageName = "io.containerd.image.name"
	AnnotationRefName   = "org.opencontainers.image.ref.name"
)

// Well-known accounts of distroless-style images.
const (
	RootUID    = 0
	NonrootUID = 65532
)

// Spec is an image: its reference, the files and directories of its one
// layer, and its run-time configuration.
type Spec struct {
	// Name is the image reference with a tag, e.g. ghcr.io/stickylb/stickylb:0.1.0.
	// Without a registry it is a Docker Hub name (docker.io/library/...);
	// without a tag it is :latest.
	Name string
	// Arch is the GOARCH the image runs on; runtime.GOARCH when empty.
	// The OS is always linux.
	Arch string

	Files []File
	// Dirs lists directories with their owner and mode. The parents of
	// every file and directory are added as root-owned 0755 directories
	// when not listed.
	Dirs []Dir

	User       string // "uid:gid" (numeric, so no /etc/passwd lookup is needed), or empty for root
	Entrypoint []string
	Cmd        []string
	Env        []string // KEY=value
	WorkingDir string
	Labels     map[string]string
}

// File is a regular file in the image.
type File struct {
	// Path is the absolute, clean path in the image, e.g. /stickylb.
	Path string
	// Source is a regular file on this host to copy; when empty, Data
	// is the content.
	Source string
	Data   []byte
	// Mode holds the permission bits, e.g. 0o755; setuid, setgid and
	// sticky may be given as fs.ModeSetuid etc. or as 0o4000 etc.
	// Zero means the Source file's permission bits, or 0o644 for Data.
	Mode     fs.FileMode
	UID, GID int
}

// Dir is a directory in the image.
type Dir struct {
	// Path is the absolute, clean path in the image, e.g. /tmp.
	Path string
	// Mode holds the permission bits, e.g. 0o1777 (or fs.ModeSticky|0o777);
	// zero means 0o755.
	Mode     fs.FileMode
	UID, GID int
}

// NonrootBase returns the files and directories a distroless "nonroot"
// image has besides its program: /etc/passwd and /etc/group naming root (0)
// and nonroot (65532), nonroot's home /home/nonroot, and /tmp (mode 1777).
// There is no shell: the login shell in /etc/passwd does not exist.
func NonrootBase() ([]Dir, []File) {
	dirs := []Dir{
		{Path: "/etc", Mode: 0o755},
		{Path: "/home", Mode: 0o755},
		{Path: "/home/nonroot", Mode: 0o700, UID: NonrootUID, GID: NonrootUID},
		{Path: "/tmp", Mode: 0o1777},
	}
	files := []File{
		{Path: "/etc/passwd", Mode: 0o644, Data: []byte(
			"root:x:0:0:root:/root:/sbin/nologin\n" +
				"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")},
		{Path: "/etc/group", Mode: 0o644, Data: []byte(
			"root:x:0:\n" +
				"nonroot:x:65532:\n")},
	}
	return dirs, files
}

// epoch is every timestamp in an image: its layer's mtimes, its config's
// and its history's creation time.
var epoch = time.Unix(0, 0).UTC()

// Reference is an image name made explicit the way containerd and the
// kubelet spell it: registry/repository:tag, with Docker Hub as docker.io.
type Reference struct {
	Full string // e.g. ghcr.io/stickylb/stickylb:0.1.0, docker.io/library/busybox:latest
	Tag  string // e.g. 0.1.0
}

// ParseReference checks an image reference with a tag (no digest) and
// returns it fully qualified.
func ParseReference(s string) (Reference, error) {
	tag, err := name.NewTag(s)
	if err != nil {
		return Reference{}, fmt.Errorf("image name %q: %w", s, err)
	}
	reg := tag.RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	return Reference{
		Full: reg + "/" + tag.RepositoryStr() + ":" + tag.TagStr(),
		Tag:  tag.TagStr(),
	}, nil
}

// Write writes the image s as one tar archive at archivePath, replacing
// it. The archive is written next to archivePath first and renamed into
// place, so a reader never sees half of it.
func Write(archivePath string, s Spec) error {
	if err := write(archivePath, s); err != nil {
		return fmt.Errorf("image %s: %w", s.Name, err)
	}
	return nil
}

func write(archivePath string, s Spec) error {
	ref, err := ParseReference(s.Name)
	if err != nil {
		return err
	}
	arch := s.Arch
	if arch == "" {
		arch = runtime.GOARCH
	}
	entries, err := layerEntries(s)
	if err != nil {
		return err
	}

	dir := filepath.Dir(archivePath)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	layerFile, err := os.CreateTemp(dir, ".layer-*.tar.gz")
	if err != nil {
		return err
	}
	defer os.Remove(layerFile.Name())
	if err := writeLayer(layerFile, entries); err != nil {
		layerFile.Close()
		return fmt.Errorf("layer: %w", err)
	}
	if err := layerFile.Close(); err != nil {
		return fmt.Errorf("layer: %w", err)
	}

	img, err := buildImage(layerFile.Name(), s, arch)
	if err != nil {
		return err
	}

	out, err := os.CreateTemp(dir, ".image-*.tar")
	if err != nil {
		return err
	}
	defer os.Remove(out.Name()) // after the rename, removes nothing
	if err := writeArchive(out, img, ref, arch); err != nil {
		out.Close()
		return fmt.Errorf("archive: %w", err)
	}
	if err := out.Chmod(0o644); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("archive: %w", err)
	}
	return os.Rename(out.Name(), archivePath)
}

// entry is one tar entry of the layer.
type entry struct {
	hdr    tar.Header
	source string // host file to copy, for regular files with a Source
	data   []byte
}

// layerEntries validates s's files and directories, adds missing parent
// directories and returns the entries sorted by path.
func layerEntries(s Spec) ([]*entry, error) {
	byPath := map[string]*entry{}
	add := func(p string, e *entry) error {
		if !path.IsAbs(p) || path.Clean(p) != p || p == "/" {
			return fmt.Errorf("path %q: want an absolute, clean path below /", p)
		}
		if _, dup := byPath[p]; dup {
			return fmt.Errorf("path %q is listed twice", p)
		}
		e.hdr.Name = strings.TrimPrefix(p, "/")
		if e.hdr.Typeflag == tar.TypeDir {
			e.hdr.Name += "/"
		}
		e.hdr.ModTime = epoch
		byPath[p] = e
		return nil
	}
	for _, d := range s.Dirs {
		mode := d.Mode
		if mode == 0 {
			mode = 0o755
		}
		if err := add(d.Path, &entry{hdr: tar.Header{
			Typeflag: tar.TypeDir, Mode: unixMode(mode), Uid: d.UID, Gid: d.GID,
		}}); err != nil {
			return nil, err
		}
	}
	for _, f := range s.Files {
		e := &entry{hdr: tar.Header{Typeflag: tar.TypeReg, Uid: f.UID, Gid: f.GID}}
		mode := f.Mode
		if f.Source != "" {
			fi, err := os.Stat(f.Source)
			if err != nil {
				return nil, fmt.Errorf("file %s: %w", f.Path, err)
			}
			if !fi.Mode().IsRegular() {
				return nil, fmt.Errorf("file %s: source %s is not a regular file", f.Path, f.Source)
			}
			if mode == 0 {
				mode = fi.Mode().Perm()
			}
			e.source, e.hdr.Size = f.Source, fi.Size()
		} else {
			if mode == 0 {
				mode = 0o644
			}
			e.data, e.hdr.Size = f.Data, int64(len(f.Data))
		}
		e.hdr.Mode = unixMode(mode)
		if err := add(f.Path, e); err != nil {
			return nil, err
		}
	}
	// Parents, root-owned 0755 unless listed; a file cannot be a parent.
	listed := make([]string, 0, len(byPath))
	for p := range byPath {
		listed = append(listed, p)
	}
	for _, p := range listed {
		for q := path.Dir(p); q != "/"; q = path.Dir(q) {
			parent, ok := byPath[q]
			if !ok {
				if err := add(q, &entry{hdr: tar.Header{Typeflag: tar.TypeDir, Mode: 0o755}}); err != nil {
					return nil, err
				}
				continue
			}
			if parent.hdr.Typeflag != tar.TypeDir {
				return nil, fmt.Errorf("path %q: parent %q is a file", p, q)
			}
		}
	}
	paths := make([]string, 0, len(byPath))
	for p := range byPath {
		paths = append(paths, p)
	}
	// Sorted by path, a directory comes before everything in it.
	slices.Sort(paths)
	entries := make([]*entry, len(paths))
	for i, p := range paths {
		entries[i] = byPath[p]
	}
	return entries, nil
}

// unixMode turns m into tar's mode bits, taking setuid, setgid and sticky
// either as Go's fs.Mode bits or as the Unix octal bits.
func unixMode(m fs.FileMode) int64 {
	u := int64(m & 0o7777)
	if m&fs.ModeSetuid != 0 {
		u |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		u |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		u |= 0o1000
	}
	return u
}

// writeLayer writes entries as a gzip-compressed tar to w. Go's gzip with
// no name and no mtime in its header gives the same bytes for the same
// input.
func writeLayer(w io.Writer, entries []*entry) error {
	zw, err := gzip.NewWriterLevel(w, gzip.DefaultCompression)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(zw)
	for _, e := range entries {
		if err := writeEntry(tw, e); err != nil {
			return fmt.Errorf("/%s: %w", strings.TrimSuffix(e.hdr.Name, "/"), err)
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

func writeEntry(tw *tar.Writer, e *entry) error {
	hdr := e.hdr
	if err := tw.WriteHeader(&hdr); err != nil {
		return err
	}
	switch {
	case hdr.Typeflag != tar.TypeReg:
		return nil
	case e.source == "":
		_, err := tw.Write(e.data)
		return err
	}
	f, err := os.Open(e.source)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := io.Copy(tw, f)
	if err != nil {
		return fmt.Errorf("copying %s: %w", e.source, err)
	}
	if n != hdr.Size {
		return fmt.Errorf("%s changed size while being read (%d bytes, was %d)", e.source, n, hdr.Size)
	}
	return nil
}

// buildImage returns the OCI image of the compressed layer at layerPath
// with s's configuration.
func buildImage(layerPath string, s Spec, arch string) (v1.Image, error) {
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return os.Open(layerPath) },
		tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err := mutate.Append(base, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History: v1.History{
			Created:   v1.Time{Time: epoch},
			CreatedBy: "stickylb internal/ociimage",
			Comment:   "one layer, written without a container engine",
		},
	})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.Architecture = arch
	cf.OS = "linux"
	cf.Created = v1.Time{Time: epoch}
	cf.Config.User = s.User
	cf.Config.Entrypoint = slices.Clone(s.Entrypoint)
	cf.Config.Cmd = slices.Clone(s.Cmd)
	cf.Config.Env = slices.Clone(s.Env)
	cf.Config.WorkingDir = s.WorkingDir
	if len(s.Labels) > 0 {
		cf.Config.Labels = make(map[string]string, len(s.Labels))
		for k, v := range s.Labels {
			cf.Config.Labels[k] = v
		}
	}
	return mutate.ConfigFile(img, cf)
}

// writeArchive writes img to w as an OCI layout with a Docker manifest.json.
func writeArchive(w io.Writer, img v1.Image, ref Reference, arch string) error {
	manifest, err := img.RawManifest()
	if err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	manifestDigest, err := img.Digest()
	if err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	mediaType, err := img.MediaType()
	if err != nil {
		return err
	}
	config, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	configDigest, err := img.ConfigName()
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	if len(layers) != 1 {
		return fmt.Errorf("image has %d layers, want 1", len(layers))
	}
	layer := layers[0]
	layerDigest, err := layer.Digest()
	if err != nil {
		return fmt.Errorf("layer: %w", err)
	}
	layerSize, err := layer.Size()
	if err != nil {
		return fmt.Errorf("layer: %w", err)
	}

	index, err := json.Marshal(v1.IndexManifest{
		SchemaVersion: 2,
		MediaType:     types.OCIImageIndex,
		Manifests: []v1.Descriptor{{
			MediaType: mediaType,
			Size:      int64(len(manifest)),
			Digest:    manifestDigest,
			Annotations: map[string]string{
				AnnotationImageName: ref.Full,
				AnnotationRefName:   ref.Tag,
			},
			Platform: &v1.Platform{OS: "linux", Architecture: arch},
		}},
	})
	if err != nil {
		return err
	}
	dockerManifest, err := json.Marshal([]struct {
		Config   string
		RepoTags []string
		Layers   []string
	}{{
		Config:   blobPath(configDigest),
		RepoTags: []string{ref.Full},
		Layers:   []string{blobPath(layerDigest)},
	}})
	if err != nil {
		return err
	}

	tw := tar.NewWriter(w)
	writeFile := func(name string, size int64, write func() error) error {
		if err := tw.WriteHeader(&tar.Header{
			Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: size, ModTime: epoch,
		}); err != nil {
			return err
		}
		if err := write(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	}
	bytesOf := func(b []byte) func() error {
		return func() error { _, err := tw.Write(b); return err }
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch}); err != nil {
			return err
		}
	}
	// The blobs in digest order, then the layout's own files.
	blobs := []blob{
		{configDigest, int64(len(config)), bytesOf(config)},
		{manifestDigest, int64(len(manifest)), bytesOf(manifest)},
		{layerDigest, layerSize, func() error {
			rc, err := layer.Compressed()
			if err != nil {
				return err
			}
			defer rc.Close()
			n, err := io.Copy(tw, rc)
			if err == nil && n != layerSize {
				err = fmt.Errorf("layer is %d bytes, want %d", n, layerSize)
			}
			return err
		}},
	}
	slices.SortFunc(blobs, func(a, b blob) int { return strings.Compare(a.digest.Hex, b.digest.Hex) })
	for _, b := range blobs {
		if err := writeFile(blobPath(b.digest), b.size, b.write); err != nil {
			return err
		}
	}
	for _, f := range []struct {
		name string
		data []byte
	}{
		{"index.json", index},
		{"manifest.json", dockerManifest},
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
	} {
		if err := writeFile(f.name, int64(len(f.data)), bytesOf(f.data)); err != nil {
			return err
		}
	}
	return tw.Close()
}

// blob is a file under blobs/ in the archive.
type blob struct {
	digest v1.Hash
	size   int64
	write  func() error
}

func blobPath(h v1.Hash) string {
	return "blobs/" + h.Algorithm + "/" + h.Hex
}
