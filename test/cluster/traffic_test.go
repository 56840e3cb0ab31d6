package cluster

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickylb/stickylb/internal/cluster"
)

// askTCP connects from src to dst, asks the backend its name and closes.
func askTCP(src netip.Addr, dst netip.AddrPort) (string, error) {
	return ask("tcp", src, dst, 5*time.Second)
}

// askUDP sends "ID" from a new socket on src (a new session) and returns the
// answer.
func askUDP(src netip.Addr, dst netip.AddrPort) (string, error) {
	return ask("udp", src, dst, 3*time.Second)
}

// ask sends "ID" over network from src to dst and returns the backend's
// name, giving up after timeout.
func ask(network string, src netip.Addr, dst netip.AddrPort, timeout time.Duration) (string, error) {
	d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
	if network == "udp" {
		d.LocalAddr = &net.UDPAddr{IP: src.AsSlice()}
	}
	c, err := d.Dial(network, dst.String())
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	msg := "ID"
	if network == "tcp" {
		msg += "\n"
	}
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	buf := make([]byte, 256)
	if network == "tcp" {
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return "", fmt.Errorf("no answer: %w", err)
		}
		return strings.TrimSpace(line), nil
	}
	n, err := c.Read(buf)
	if err != nil {
		return "", fmt.Errorf("no answer: %w", err)
	}
	return string(buf[:n]), nil
}

// counts are the outcomes of one kind of new connection under load.
type counts struct {
	Attempts, Refused, Failed int64
	// Errors holds a few of the errors, by text.
	Errors map[string]int
}

func (c counts) String() string {
	s := fmt.Sprintf("%d new, %d refused, %d failed", c.Attempts, c.Refused, c.Failed)
	if len(c.Errors) > 0 {
		var keys []string
		for k, n := range c.Errors {
			keys = append(keys, fmt.Sprintf("%q×%d", k, n))
		}
		sort.Strings(keys)
		s += " (" + strings.Join(keys, ", ") + ")"
	}
	return s
}

// loadResult is what a load saw while one operation ran.
type loadResult struct {
	TCP, UDP counts
	Duration time.Duration
}

func (r loadResult) String() string {
	return fmt.Sprintf("over %v: TCP %v; UDP %v", r.Duration.Round(time.Second), r.TCP, r.UDP)
}

// load keeps opening new TCP connections and new UDP sessions from many
// client addresses to the frontend until stopped, and counts what fails.
type load struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	start  time.Time

	mu       sync.Mutex
	tcp, udp counts
}

// loadClients is how many client addresses the load uses.
const loadClients = 200

// startLoad runs tcpWorkers and udpWorkers, each opening one connection (or
// session) to a target after another, with a pause of a few milliseconds.
func startLoad(targets []netip.AddrPort, tcpWorkers, udpWorkers int) *load {
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{cancel: cancel, start: time.Now()}
	l.tcp.Errors, l.udp.Errors = map[string]int{}, map[string]int{}
	worker := func(ask func(netip.Addr, netip.AddrPort) (string, error), into *counts) {
		defer l.wg.Done()
		for ctx.Err() == nil {
			src := cluster.ClientIP(rand.IntN(loadClients))
			dst := targets[rand.IntN(len(targets))]
			_, err := ask(src, dst)
			l.mu.Lock()
			into.Attempts++
			if err != nil {
				if errors.Is(err, syscall.ECONNREFUSED) {
					into.Refused++
				} else {
					into.Failed++
				}
				if len(into.Errors) < 20 {
					into.Errors[errorText(err)]++
				}
			}
			l.mu.Unlock()
			time.Sleep(time.Duration(2+rand.IntN(4)) * time.Millisecond)
		}
	}
	for range tcpWorkers {
		l.wg.Add(1)
		go worker(askTCP, &l.tcp)
	}
	for range udpWorkers {
		l.wg.Add(1)
		go worker(askUDP, &l.udp)
	}
	return l
}

// stop ends the load and returns what it counted.
func (l *load) stop() loadResult {
	l.cancel()
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return loadResult{TCP: l.tcp, UDP: l.udp, Duration: time.Since(l.start)}
}

// errorText drops the addresses from an error so that alike errors count
// together.
func errorText(err error) string {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Op + ": " + op.Err.Error()
	}
	return err.Error()
}

// listenInPod holds port on the pod's address, inside the pod's network
// namespace: what another process of the pod taking the port would do. The
// pod is found by the POD_NAME the chart gives its container.
func listenInPod(pod string, addr netip.AddrPort) (net.Listener, error) {
	pid, err := podProcess(pod)
	if err != nil {
		return nil, err
	}
	target, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		return nil, err
	}
	defer target.Close()
	// Only this goroutine's thread enters the pod's namespace; the socket
	// stays there when the thread comes back.
	runtime.LockOSThread()
	own, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer own.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("enter the network namespace of %s: %w", pod, err)
	}
	l, lerr := net.Listen("tcp", addr.String())
	if err := unix.Setns(int(own.Fd()), unix.CLONE_NEWNET); err != nil {
		// A thread stuck in the pod's namespace must not run anything else:
		// left locked, it ends with this goroutine.
		return l, fmt.Errorf("leave the network namespace of %s: %w", pod, err)
	}
	runtime.UnlockOSThread()
	return l, lerr
}

// podProcess finds a process of the pod's container by its POD_NAME.
func podProcess(pod string) (int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	want := []byte("POD_NAME=" + pod + "\x00")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if err == nil && bytes.Contains(env, want) {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no process of pod %s", pod)
}
