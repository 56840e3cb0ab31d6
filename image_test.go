package main

import (
	"bufio"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/stickylb/stickylb/internal/testimages"
)

// makeRecipe returns the recipe of a Makefile target, continuation lines
// joined.
func makeRecipe(t *testing.T, target string) []string {
	t.Helper()
	f, err := os.Open("Makefile")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var (
		recipe []string
		in     bool
		cont   string
	)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := sc.Text()
		switch {
		case strings.HasPrefix(l, target+":"):
			in = true
		case in && strings.HasPrefix(l, "\t"):
			l = cont + strings.TrimSpace(l)
			cont = ""
			if s, ok := strings.CutSuffix(l, `\`); ok {
				cont = s
				continue
			}
			recipe = append(recipe, l)
		case in:
			return recipe
		}
	}
	return recipe
}

// shellWords splits a command line into words, removing double quotes.
func shellWords(s string) []string {
	var (
		words []string
		w     strings.Builder
		inQ   bool
		has   bool
	)
	for _, r := range s {
		switch {
		case r == '"':
			inQ, has = !inQ, true
		case (r == ' ' || r == '\t') && !inQ:
			if has {
				words = append(words, w.String())
			}
			w.Reset()
			has = false
		default:
			w.WriteRune(r)
			has = true
		}
	}
	if has {
		words = append(words, w.String())
	}
	return words
}

// goBuild splits a shell command at its `go build`: the environment
// assignments before it, the flags up to -o, and the packages after -o's
// value.
func goBuild(t *testing.T, cmd string) (env map[string]string, flags, pkgs []string) {
	t.Helper()
	words := shellWords(cmd)
	i := slices.Index(words, "go")
	if i < 0 || i+1 >= len(words) || words[i+1] != "build" {
		t.Fatalf("no go build in %q", cmd)
	}
	env = map[string]string{}
	for _, w := range words[:i] {
		k, v, ok := strings.Cut(w, "=")
		if !ok {
			t.Fatalf("%q: %q before go build is not an assignment", cmd, w)
		}
		env[k] = v
	}
	rest := words[i+2:]
	o := slices.Index(rest, "-o")
	if o < 0 || o+1 >= len(rest) {
		t.Fatalf("%q: no -o", cmd)
	}
	return env, rest[:o], rest[o+2:]
}

// goBuildCommand returns the simple command with `go build` of a shell
// line of commands joined by ";" and "&&".
func goBuildCommand(t *testing.T, line string) string {
	t.Helper()
	for _, c := range strings.FieldsFunc(strings.ReplaceAll(line, "&&", ";"), func(r rune) bool { return r == ';' }) {
		if strings.Contains(c, "go build") {
			return strings.TrimSpace(c)
		}
	}
	t.Fatalf("no go build in %q", line)
	return ""
}

// TestImageBuildFlags checks that `make image` and the test cluster's
// images (internal/testimages) build the binary the way the Dockerfile does.
func TestImageBuildFlags(t *testing.T) {
	docker, _ := dockerfileBuild(t)
	dEnv, dFlags, dPkgs := goBuild(t, goBuildCommand(t, docker))

	var makeBuild string
	for _, l := range makeRecipe(t, "image") {
		if strings.Contains(l, "go build") {
			makeBuild = l
		}
	}
	if makeBuild == "" {
		t.Fatal("the Makefile's image target has no go build")
	}
	mEnv, mFlags, mPkgs := goBuild(t, goBuildCommand(t, makeBuild))

	if !slices.Equal(mFlags, dFlags) {
		t.Errorf("make image builds with %q, the Dockerfile with %q", mFlags, dFlags)
	}
	if !slices.Equal(mPkgs, dPkgs) {
		t.Errorf("make image builds %q, the Dockerfile %q", mPkgs, dPkgs)
	}
	if len(mEnv) != len(dEnv) {
		t.Errorf("make image's environment %v, the Dockerfile's %v", mEnv, dEnv)
	}
	for k, dv := range dEnv {
		mv, ok := mEnv[k]
		switch {
		case !ok:
			t.Errorf("make image's go build does not set %s (the Dockerfile sets %s=%s)", k, k, dv)
		case k == "GOOS" && mv != "linux":
			t.Errorf("make image builds for GOOS=%s, want linux", mv)
		case k != "GOOS" && k != "GOARCH" && mv != dv:
			t.Errorf("make image sets %s=%s, the Dockerfile %s=%s", k, mv, k, dv)
		}
	}
	if dockerfile, err := os.ReadFile("Dockerfile"); err != nil || !strings.Contains(string(dockerfile), "ARG TARGETOS=linux\n") {
		t.Errorf("the Dockerfile's GOOS is no longer linux by default (%v)", err)
	}

	if !slices.Equal(testimages.GoBuildFlags, dFlags) {
		t.Errorf("internal/testimages builds with %q, the Dockerfile with %q", testimages.GoBuildFlags, dFlags)
	}
}
