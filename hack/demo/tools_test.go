package main

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestDemoBuildsOnlyWhatItRuns checks that `make demo` and `make dev` build
// exactly the binaries the demo runs: the hack/test-binaries.sh commands in
// what make would run for each target, and what that script would build for
// them into an empty cache, against the tools hack/demo's code asks for. It
// builds nothing, so it takes a second.
func TestDemoBuildsOnlyWhatItRuns(t *testing.T) {
	runs := toolsUsed(t)
	if !sameSet(runs, tools) {
		t.Fatalf("hack/demo asks tool() for %v, but its tools list is %v: keep them the same", runs, tools)
	}
	for _, target := range []string{"demo", "dev"} {
		asked := makeTools(t, target)
		if extra, missing := diff(asked, runs); len(extra) > 0 || len(missing) > 0 {
			t.Errorf("make %s passes hack/test-binaries.sh %v; hack/demo runs %v: builds %v it never runs, lacks %v (DEMO_TOOLS in the Makefile)",
				target, asked, runs, extra, missing)
		}
		built := scriptBuilds(t, asked...)
		if extra, missing := diff(built, runs); len(extra) > 0 || len(missing) > 0 {
			t.Errorf("for make %s, hack/test-binaries.sh %v would build %v into an empty cache; hack/demo runs %v: builds %v it never runs, lacks %v",
				target, asked, built, runs, extra, missing)
		}
	}
	// The dry run does list what it would build: the full set has helm.
	if all := scriptBuilds(t); !slices.Contains(all, "helm") || !slices.Contains(all, "controller-gen") {
		t.Errorf("hack/test-binaries.sh --dry-run with no tools lists %v, which lacks helm or controller-gen: the dry run does not report what it builds", all)
	}
}

// toolsUsed returns the names hack/demo's code passes to tool as literals.
func toolsUsed(t *testing.T) []string {
	t.Helper()
	fset := token.NewFileSet()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	var used []string
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok || len(call.Args) != 2 {
				return true
			}
			if fn, ok := call.Fun.(*ast.Ident); !ok || fn.Name != "tool" {
				return true
			}
			if lit, ok := call.Args[1].(*ast.BasicLit); ok && lit.Kind == token.STRING {
				s, err := strconv.Unquote(lit.Value)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Contains(used, s) {
					used = append(used, s)
				}
			}
			return true
		})
	}
	if len(used) == 0 {
		t.Fatal("found no tool(assets, \"name\") call in hack/demo: the demo must find its binaries through tool")
	}
	return used
}

var testBinaries = regexp.MustCompile(`hack/test-binaries\.sh((?:[ \t]+[a-z][a-z0-9-]*)*)`)

// makeTools returns every tool that `make TARGET` asks hack/test-binaries.sh
// for: in the commands `make -n TARGET` prints, and in any call make itself
// runs while expanding them (a $(shell hack/test-binaries.sh ...)), which
// STICKYLB_DRY_RUN turns into a dry run that records what it would build.
func makeTools(t *testing.T, target string) []string {
	t.Helper()
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("no make here")
	}
	record := filepath.Join(t.TempDir(), "built")
	cmd := exec.Command("make", "-n", "--no-print-directory", "-C", "../..", target)
	// Not the flags of the make running `make test` (its jobserver, say).
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		return slices.Contains([]string{"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "GNUMAKEFLAGS"}, k)
	})
	cmd.Env = append(cmd.Env, "STICKYLB_CACHE="+t.TempDir(), "STICKYLB_DRY_RUN="+record)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("make -n %s: %v\n%s", target, err, out)
	}
	var tools []string
	if recorded, err := os.ReadFile(record); err == nil {
		for _, line := range strings.Split(strings.TrimSpace(string(recorded)), "\n") {
			if tool, ok := strings.CutPrefix(line, "build "); ok && !slices.Contains(tools, tool) {
				tools = append(tools, tool)
			}
		}
	}
	matches := testBinaries.FindAllStringSubmatch(string(out), -1)
	if len(matches) == 0 {
		t.Fatalf("make -n %s runs no hack/test-binaries.sh:\n%s", target, out)
	}
	for _, m := range matches {
		args := strings.Fields(m[1])
		if len(args) == 0 {
			t.Fatalf("make %s runs hack/test-binaries.sh with no tools, which builds its whole default set:\n%s", target, out)
		}
		for _, a := range args {
			if !slices.Contains(tools, a) {
				tools = append(tools, a)
			}
		}
	}
	return tools
}

// scriptBuilds returns what hack/test-binaries.sh would build for these
// arguments into an empty cache.
func scriptBuilds(t *testing.T, args ...string) []string {
	t.Helper()
	cmd := exec.Command("../test-binaries.sh", append([]string{"--dry-run"}, args...)...)
	cmd.Env = append(os.Environ(), "STICKYLB_CACHE="+t.TempDir())
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("hack/test-binaries.sh --dry-run %v: %v\n%s", args, err, out)
	}
	var built []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if tool, ok := strings.CutPrefix(line, "build "); ok {
			built = append(built, tool)
		}
	}
	return built
}

// diff returns what a has that b lacks, and what b has that a lacks.
func diff(a, b []string) (extra, missing []string) {
	for _, x := range a {
		if !slices.Contains(b, x) {
			extra = append(extra, x)
		}
	}
	for _, x := range b {
		if !slices.Contains(a, x) {
			missing = append(missing, x)
		}
	}
	return extra, missing
}

func sameSet(a, b []string) bool {
	extra, missing := diff(a, b)
	return len(extra) == 0 && len(missing) == 0
}
