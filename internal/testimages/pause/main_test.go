package main

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

const runMainEnv = "STICKYLB_PAUSE_TEST_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		main()
		os.Exit(3) // main returns only by exiting
	}
	os.Exit(m.Run())
}

// TestSignals runs the real program and stops it with SIGTERM and SIGINT.
func TestSignals(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		cmd := exec.Command(exe)
		cmd.Env = append(os.Environ(), runMainEnv+"=1")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		// It must still be running: pause does nothing until told to stop.
		select {
		case err := <-done:
			t.Fatalf("pause exited by itself: %v", err)
		case <-time.After(300 * time.Millisecond):
		}
		// By now its handler is in place: a signal that killed it instead
		// would show as "signal: terminated", not exit status 0.
		if err := cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%v: exit %v, want 0", sig, err)
			}
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("%v: pause did not exit", sig)
		}
	}
}
