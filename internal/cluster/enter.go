package cluster

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// stageEnv tells a re-executed test binary which part it plays:
// unset on the host, "init" as PID 1 of the new namespaces, "test" below it.
const stageEnv = "STICKYLB_CLUSTER_STAGE"

// cgroupEnv names the cgroup (in every hierarchy) under which the kubelet puts
// every pod; init removes it when the tests are over.
const cgroupEnv = "STICKYLB_CLUSTER_CGROUP"

// Enter runs the rest of the test binary inside new PID, mount and network
// namespaces and exits with its status; in that run it returns. Call it
// first in TestMain.
//
// The PID namespace is what makes clean-up certain: when the tests end, by
// success, failure, panic or timeout, its init (a copy of this binary) exits
// and the kernel kills every process left in it: daemons, shims and pods.
// The mount namespace takes every mount with it (tmpfs over /run, /var/lib
// and /var/log, container root filesystems, network-namespace handles), and
// the network namespace is where the clients live. init then removes the
// pods' cgroups, the only state the kernel does not scope.
func Enter() {
	switch os.Getenv(stageEnv) {
	case "test":
		return
	case "init":
		os.Exit(runInit())
	}
	self, err := os.Executable()
	if err != nil {
		fatal(err)
	}
	os.Exit(forward(self, []string{stageEnv + "=init", cgroupEnv + "=/stickylb-test-" + strconv.Itoa(os.Getpid())},
		&syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWPID | unix.CLONE_NEWNS | unix.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}))
}

// forward runs self with extra environment, passes on the signals a test
// runner sends, and returns the child's exit status.
func forward(self string, env []string, attr *syscall.SysProcAttr) int {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT)
	p, err := os.StartProcess(self, os.Args, &os.ProcAttr{
		Env:   setEnv(os.Environ(), env...),
		Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		Sys:   attr,
	})
	if err != nil {
		fatal(fmt.Errorf("start the test binary in new namespaces (needs root): %w", err))
	}
	go func() {
		for s := range sigs {
			_ = p.Signal(s)
		}
	}()
	st, err := p.Wait()
	if err != nil {
		fatal(err)
	}
	return exitCode(st.Sys().(syscall.WaitStatus))
}

// runInit is PID 1: it prepares the mount namespace, runs the tests as its
// child, reaps every orphan (containerd's shims end up here), and on the way
// out kills what is left and removes the pods' cgroups.
func runInit() int {
	if os.Getpid() != 1 {
		fatal(errors.New("init stage outside a new PID namespace"))
	}
	if err := prepareMounts(); err != nil {
		fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		fatal(err)
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT)
	p, err := os.StartProcess(self, os.Args, &os.ProcAttr{
		Env:   setEnv(os.Environ(), stageEnv+"=test"),
		Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
	})
	if err != nil {
		fatal(err)
	}
	go func() {
		for s := range sigs {
			_ = syscall.Kill(p.Pid, s.(syscall.Signal))
		}
	}()
	code := 1
	for {
		var st unix.WaitStatus
		pid, err := unix.Wait4(-1, &st, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			break
		}
		if pid == p.Pid {
			code = exitCode(syscall.WaitStatus(st))
			break
		}
	}
	killAll()
	if err := removeCgroups(os.Getenv(cgroupEnv)); err != nil {
		fmt.Fprintln(os.Stderr, "cluster: cgroups left behind:", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// prepareMounts gives the namespace its own /proc (its own PIDs), private
// copies of the directories kubelet, containerd and the CNI plugins write
// whatever their flags say, and plain files over the host-wide sysctls
// kubelet sets.
func prepareMounts() error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount /proc: %w", err)
	}
	for _, dir := range []string{"/run", "/var/lib", "/var/log"} {
		if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "mode=755,size=8g"); err != nil {
			return fmt.Errorf("mount tmpfs on %s: %w", dir, err)
		}
	}
	// kubelet with protectKernelDefaults=false writes these; in the host's
	// /proc they are not namespaced, so they get files of their own.
	shadow := "/run/stickylb-sysctl"
	if err := os.MkdirAll(shadow, 0o755); err != nil {
		return err
	}
	for _, key := range []string{"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
		"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes"} {
		target := "/proc/sys/" + key
		cur, err := os.ReadFile(target)
		if err != nil {
			continue
		}
		file := filepath.Join(shadow, strings.ReplaceAll(key, "/", "."))
		if err := os.WriteFile(file, cur, 0o644); err != nil {
			return err
		}
		if err := unix.Mount(file, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("shadow %s: %w", target, err)
		}
	}
	return nil
}

// killAll kills every process in the namespace but init and reaps them.
func killAll() {
	for range 50 {
		left := 0
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == 1 {
				continue
			}
			left++
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		for {
			pid, err := unix.Wait4(-1, nil, unix.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
		if left == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// removeCgroups removes name, depth first, from every cgroup hierarchy.
func removeCgroups(name string) error {
	if name == "" {
		return nil
	}
	hierarchies, err := filepath.Glob("/sys/fs/cgroup/*")
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range append(hierarchies, "/sys/fs/cgroup") {
		root := filepath.Join(h, name)
		if _, err := os.Stat(root); err != nil {
			continue
		}
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			// A cgroup whose last process just died may be busy for a moment.
			var err error
			for range 50 {
				if err = unix.Rmdir(dirs[i]); err == nil || errors.Is(err, unix.ENOENT) {
					err = nil
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("rmdir %s: %w", dirs[i], err))
			}
		}
	}
	return errors.Join(errs...)
}

// setEnv returns env with each KEY=value of kv set, replacing any earlier
// value: the first of two duplicates is the one a child would read.
func setEnv(env []string, kv ...string) []string {
	out := make([]string, 0, len(env)+len(kv))
	for _, e := range env {
		key, _, _ := strings.Cut(e, "=")
		if !slices.ContainsFunc(kv, func(s string) bool { return strings.HasPrefix(s, key+"=") }) {
			out = append(out, e)
		}
	}
	return append(out, kv...)
}

func exitCode(st syscall.WaitStatus) int {
	if st.Signaled() {
		return 128 + int(st.Signal())
	}
	return st.ExitStatus()
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "cluster:", err)
	os.Exit(1)
}
