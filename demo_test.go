package main

import (
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// TestDemo runs `make demo`'s program to completion and checks what it
// shows: every client keeps its backend, and only the removed backend's
// clients move.
func TestDemo(t *testing.T) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set: run with `make test`")
	}
	out, err := exec.Command("go", "run", "./hack/demo", "-stickylb", stickylbBinary(t)).CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	text := string(out)
	pinned := regexp.MustCompile(`(?m)^\s+127\.0\.2\.\d+\s+(10\.1\.1\.\d)\s+(10\.1\.1\.\d)\s+pinned$`).FindAllStringSubmatch(text, -1)
	if len(pinned) != 12 {
		t.Errorf("%d clients shown pinned, want 12:\n%s", len(pinned), text)
	}
	for _, m := range pinned {
		if m[1] != m[2] {
			t.Errorf("client marked pinned changed backend: %q", m[0])
		}
	}
	if !strings.Contains(text, "condition met") || !regexp.MustCompile(`==> done: [1-9]\d* of 12 clients moved, all of them from 10\.1\.1\.2`).MatchString(text) {
		t.Errorf("demo output lacks the Ready wait or the failover summary:\n%s", text)
	}
}
