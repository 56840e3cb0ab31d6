// Command pause is the pod sandbox process of the test cluster, in place of
// registry.k8s.io/pause: it holds the pod's namespaces open by doing
// nothing until SIGTERM or SIGINT, then exits 0. As PID 1 of the pod's PID
// namespace (shareProcessNamespace) it also reaps orphaned zombies.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	pid1 := os.Getpid() == 1
	if pid1 {
		signal.Notify(sigs, syscall.SIGCHLD)
		reap() // orphans adopted before the handler was in place
	}
	for sig := range sigs {
		if sig == syscall.SIGCHLD {
			reap()
			continue
		}
		fmt.Fprintf(os.Stderr, "pause: shutting down, got %v\n", sig)
		os.Exit(0)
	}
}

// reap collects every child that has exited, without blocking.
func reap() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return // ECHILD: no children; 0: none has exited yet
		}
	}
}
