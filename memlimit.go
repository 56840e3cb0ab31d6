package main

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/go-logr/logr"
)

// memoryLimitShare is the part of the container's memory limit the Go
// runtime aims to stay under (its soft limit, GOMEMLIMIT); the rest is for
// what it does not count (the kernel's socket buffers, pipes for splice).
const memoryLimitShare = 0.9

// applyMemoryLimit sets the Go runtime's soft memory limit to 90% of the
// container's memory limit, unless GOMEMLIMIT is set: near the limit the
// garbage collector then runs more often instead of letting garbage grow
// the heap to twice what is live (GOGC's default), which is what would get
// the container OOM-killed first.
func applyMemoryLimit(log logr.Logger) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	limit, ok := cgroupMemoryLimit("/sys/fs/cgroup")
	if !ok {
		return
	}
	soft := int64(float64(limit) * memoryLimitShare)
	debug.SetMemoryLimit(soft)
	log.Info("Go soft memory limit set from the container's memory limit", "containerLimit", limit, "softLimit", soft)
}

// cgroupMemoryLimit reads the memory limit of the process's cgroup under
// root (v2: memory.max; v1: memory/memory.limit_in_bytes), if it has one.
func cgroupMemoryLimit(root string) (int64, bool) {
	for _, f := range []string{"memory.max", filepath.Join("memory", "memory.limit_in_bytes")} {
		raw, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			continue
		}
		v := strings.TrimSpace(string(raw))
		n, err := strconv.ParseInt(v, 10, 64)
		// "max" (v2), or v1's page-rounded largest int64: no limit.
		if err != nil || n <= 0 || n >= 1<<62 {
			return 0, false
		}
		return n, true
	}
	return 0, false
}
