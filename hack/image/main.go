// Command image writes the stickylb image as one OCI archive, without a
// container engine; `make image` runs it.
//
//	go run ./hack/image -binary bin/stickylb-linux-amd64 -o bin/stickylb-image.tar [-name REF]
//
// The binary must be the static linux build of the Dockerfile's `go build`
// line. The image is what the Dockerfile builds: /stickylb on a
// distroless-style nonroot base (/etc/passwd, /etc/group, /tmp, no shell),
// user 65532:65532, entrypoint /stickylb. REF defaults to the Helm chart's
// default image, ghcr.io/stickylb/stickylb:<appVersion>. The archive loads
// with `docker load`, `kind load image-archive` and
// `ctr -n k8s.io images import`.
package main

import (
	"debug/elf"
	"flag"
	"fmt"
	"os"

	"github.com/stickylb/stickylb/internal/ociimage"
	"github.com/stickylb/stickylb/internal/testimages"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run() error {
	binary := flag.String("binary", "", "the stickylb binary (static, GOOS=linux) to put in the image at /stickylb")
	out := flag.String("o", "bin/stickylb-image.tar", "the archive to write")
	ref := flag.String("name", "", "the image reference (default: the Helm chart's, ghcr.io/stickylb/stickylb:<appVersion>)")
	arch := flag.String("arch", "", "the image's architecture, a GOARCH (default: the binary's)")
	repo := flag.String("repo", ".", "the repository root, for charts/stickylb/Chart.yaml")
	flag.Parse()
	if *binary == "" || flag.NArg() > 0 {
		flag.Usage()
		return fmt.Errorf("need -binary and no arguments")
	}
	if *ref == "" {
		r, err := testimages.StickylbRef(*repo)
		if err != nil {
			return err
		}
		*ref = r
	}
	if *arch == "" {
		a, err := elfArch(*binary)
		if err != nil {
			return err
		}
		*arch = a
	}
	if err := ociimage.Write(*out, testimages.StickylbSpec(*ref, *binary, *arch)); err != nil {
		return err
	}
	fmt.Printf("wrote %s (%s, linux/%s)\n", *out, *ref, *arch)
	return nil
}

// elfArch returns the GOARCH of a Linux ELF binary.
func elfArch(path string) (string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return "", fmt.Errorf("%s is not a linux binary: %w", path, err)
	}
	defer f.Close()
	archs := map[elf.Machine]string{
		elf.EM_X86_64:  "amd64",
		elf.EM_AARCH64: "arm64",
		elf.EM_386:     "386",
		elf.EM_ARM:     "arm",
		elf.EM_PPC64:   "ppc64le",
		elf.EM_S390:    "s390x",
		elf.EM_RISCV:   "riscv64",
	}
	a, ok := archs[f.Machine]
	if !ok {
		return "", fmt.Errorf("%s: unknown machine %v; pass -arch", path, f.Machine)
	}
	if f.Machine == elf.EM_PPC64 && f.ByteOrder.String() == "BigEndian" {
		a = "ppc64"
	}
	return a, nil
}
