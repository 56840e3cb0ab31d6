package health

import (
	"errors"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"
)

func TestTCPProbeFlipsAfterExactlyThresholdResults(t *testing.T) {
	const (
		interval  = 50 * time.Millisecond
		threshold = 3
		// Azure's bound: threshold probes, one interval apart, plus slack.
		flipWithin = interval*threshold + time.Second
	)
	ln := listenTCP(t, "127.0.1.10:0")
	ap := addrPortOf(t, ln)
	target := tcpTarget(ap, interval, threshold)
	m, rec := newMonitor(t)
	if err := m.Update([]Target{target}); err != nil {
		t.Fatal(err)
	}

	st := waitProbes(t, m, target, 4, 2*time.Second)
	if !st.Up || st.Failures != 0 || rec.count() != 0 {
		t.Fatalf("with a listener: status %+v, %d notifications; want up, no failures, none", st, rec.count())
	}

	ln.Close()
	closedAt := time.Now()
	down, atDown := rec.wait(t, 1, flipWithin)
	t.Logf("down after %v: %q", time.Since(closedAt), down.Reason)
	if down.Up || down.Target != target {
		t.Fatalf("first transition = %+v, want %s down", down, target)
	}
	if !strings.Contains(down.Reason, "connection refused") {
		t.Errorf("down reason = %q, want it to say connection refused", down.Reason)
	}
	// Every failure so far came after the close, so this is the streak
	// length: down after exactly 3, i.e. still up after 2.
	if atDown.Failures != threshold {
		t.Errorf("went down after %d failures, want exactly %d", atDown.Failures, threshold)
	}
	if up, known := m.Status(target); up || !known {
		t.Errorf("Status after down = (%v, %v), want (false, true)", up, known)
	}

	listenTCP(t, ap.String())
	reopenedAt := time.Now()
	up, atUp := rec.wait(t, 2, flipWithin)
	t.Logf("up after %v: %q", time.Since(reopenedAt), up.Reason)
	if !up.Up || up.Reason != "TCP connect succeeded" {
		t.Fatalf("second transition = %+v, want up with reason %q", up, "TCP connect succeeded")
	}
	successesAtDown := atDown.Probes - atDown.Failures
	successesAtUp := atUp.Probes - atUp.Failures
	if got := successesAtUp - successesAtDown; got != threshold {
		t.Errorf("came up after %d successes, want exactly %d", got, threshold)
	}
	if upNow, _ := m.Status(target); !upNow {
		t.Error("Status after up = false")
	}
}

func TestNotifyOnlyOnTransitions(t *testing.T) {
	const interval = 20 * time.Millisecond
	ln := listenTCP(t, "127.0.1.10:0")
	ap := addrPortOf(t, ln)
	target := tcpTarget(ap, interval, 1)
	m, rec := newMonitor(t)
	if err := m.Update([]Target{target}); err != nil {
		t.Fatal(err)
	}

	st := waitProbes(t, m, target, 10, 3*time.Second)
	if n := rec.count(); n != 0 {
		t.Fatalf("%d notifications over %d passing probes of a new target, want 0", n, st.Probes)
	}

	ln.Close()
	_, atDown := rec.wait(t, 1, time.Second)
	st = waitProbes(t, m, target, atDown.Probes+10, 3*time.Second)
	if n := rec.count(); n != 1 {
		t.Fatalf("%d notifications after %d failing probes, want 1", n, st.Failures)
	}

	listenTCP(t, ap.String())
	_, atUp := rec.wait(t, 2, time.Second)
	waitProbes(t, m, target, atUp.Probes+10, 3*time.Second)
	if n := rec.count(); n != 2 {
		t.Fatalf("%d notifications after recovering, want 2", n)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.events[0].Up || !rec.events[1].Up {
		t.Errorf("transitions = %+v, want down then up", rec.events)
	}
}

func TestUpdateStartsStopsAndKeepsProbers(t *testing.T) {
	const interval = 20 * time.Millisecond
	ln := listenTCP(t, "127.0.1.20:0")
	kept := tcpTarget(closedPort(t, "127.0.1.21"), interval, 1)
	removed := tcpTarget(addrPortOf(t, ln), interval, 1)
	// Same backend and port as removed, but probed differently: a distinct
	// target with a prober of its own.
	added := tcpTarget(addrPortOf(t, ln), interval, 2)

	m, rec := newMonitor(t)
	if err := m.Update([]Target{kept, removed}); err != nil {
		t.Fatal(err)
	}
	rec.wait(t, 1, time.Second) // kept goes down: nothing listens there
	waitProbes(t, m, removed, 2, time.Second)
	keptProber := (*m.probers.Load())[kept]
	removedProber := (*m.probers.Load())[removed]
	keptBefore := mustStatus(t, m, kept)

	if err := m.Update([]Target{kept, added, kept}); err != nil {
		t.Fatal(err)
	}

	// Removed: its goroutine has exited by the time Update returns.
	select {
	case <-removedProber.done:
	default:
		t.Fatal("removed target's prober still running after Update returned")
	}
	if _, known := m.Status(removed); known {
		t.Error("removed target still known")
	}
	frozen := removedProber.probes.Load()

	// Kept: same prober, still down, counters carried on, no new
	// notification (a reset to Up would have produced a second "down").
	if (*m.probers.Load())[kept] != keptProber {
		t.Error("kept target got a new prober")
	}
	if up, known := m.Status(kept); up || !known {
		t.Errorf("kept Status = (%v, %v), want (false, true): state lost across Update", up, known)
	}
	keptAfter := waitProbes(t, m, kept, keptBefore.Probes+5, time.Second)
	if keptAfter.Failures < keptBefore.Failures+5 {
		t.Errorf("kept failures went from %d to %d, want counters preserved and growing", keptBefore.Failures, keptAfter.Failures)
	}

	// Added: running, starts up.
	st := waitProbes(t, m, added, 3, time.Second)
	if !st.Up {
		t.Errorf("added target %+v, want up", st)
	}
	if n := len(m.Snapshot()); n != 2 {
		t.Errorf("snapshot has %d targets, want 2 (duplicates share a prober)", n)
	}

	if got := removedProber.probes.Load(); got != frozen {
		t.Errorf("removed target kept probing: %d probes, then %d", frozen, got)
	}
	if n := rec.count(); n != 1 {
		t.Errorf("%d notifications, want 1", n)
	}
}

func TestUpdateSkipsInvalidTargets(t *testing.T) {
	ln := listenTCP(t, "127.0.1.22:0")
	good := tcpTarget(addrPortOf(t, ln), 20*time.Millisecond, 1)
	bad := good
	bad.Spec.Threshold = 0
	m, _ := newMonitor(t)
	err := m.Update([]Target{bad, good})
	if err == nil || !strings.Contains(err.Error(), "threshold") {
		t.Fatalf("Update error = %v, want one naming the threshold", err)
	}
	if _, known := m.Status(good); !known {
		t.Error("valid target not probed because another was invalid")
	}
	if _, known := m.Status(bad); known {
		t.Error("invalid target is probed")
	}
}

func TestFirstProbesAreSpreadOverTheInterval(t *testing.T) {
	const interval = time.Second
	ln := listenTCP(t, "127.0.1.23:0")
	ap := addrPortOf(t, ln)
	var targets []Target
	for i := 1; i <= 50; i++ {
		targets = append(targets, tcpTarget(ap, interval, i))
	}
	m, _ := newMonitor(t)
	if err := m.Update(targets); err != nil {
		t.Fatal(err)
	}
	time.Sleep(interval * 3 / 10)
	probed := 0
	for _, s := range m.Snapshot() {
		if s.Probes > 0 {
			probed++
		}
	}
	// With uniform offsets, about 15 of 50; all or none has odds below 1e-7.
	if probed == 0 || probed == len(targets) {
		t.Errorf("%d of %d targets probed in the first 30%% of the interval, want some but not all", probed, len(targets))
	}
}

func TestCloseStopsEverything(t *testing.T) {
	ln := listenTCP(t, "127.0.1.24:0")
	up := addrPortOf(t, ln)
	down := closedPort(t, "127.0.1.25")
	httpAP, _ := serveHTTP(t, "127.0.1.26", false, okHandler())
	before := runtime.NumGoroutine()

	m := New(func(Transition) {})
	var targets []Target
	for i := 1; i <= 10; i++ {
		targets = append(targets,
			tcpTarget(up, 10*time.Millisecond, i),
			tcpTarget(down, 10*time.Millisecond, i),
			Target{Addr: httpAP.Addr(), Spec: Spec{
				Protocol: HTTP, Port: int(httpAP.Port()), RequestPath: "/", Interval: 10 * time.Millisecond, Threshold: i,
			}},
		)
	}
	if err := m.Update(targets); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, func() bool {
		for _, s := range m.Snapshot() {
			if s.Probes < 2 {
				return false
			}
		}
		return true
	}, "every target to be probed")
	probers := *m.probers.Load()

	m.Close()
	m.Close() // idempotent

	for target, p := range probers {
		select {
		case <-p.done:
		default:
			t.Fatalf("prober for %s still running after Close", target)
		}
	}
	if _, known := m.Status(targets[0]); known {
		t.Error("target still known after Close")
	}
	if err := m.Update(targets); !errors.Is(err, ErrClosed) {
		t.Errorf("Update after Close = %v, want ErrClosed", err)
	}
	// Connection goroutines of the HTTP transport and server wind down
	// asynchronously; give them a moment.
	var after int
	waitFor(t, 2*time.Second, func() bool {
		after = runtime.NumGoroutine()
		return after <= before
	}, "goroutines to return to %d (now %d)", before, after)
}

func TestSpecValidate(t *testing.T) {
	valid := Spec{Protocol: HTTP, Port: 8080, RequestPath: "/healthz?full=1", Interval: 5 * time.Second, Threshold: 1}
	cases := []struct {
		name   string
		mutate func(*Spec)
		want   string // substring of the error; empty for valid
	}{
		{"valid HTTP", func(*Spec) {}, ""},
		{"valid TCP", func(s *Spec) { s.Protocol, s.RequestPath = TCP, "" }, ""},
		{"valid HTTPS", func(s *Spec) { s.Protocol = HTTPS }, ""},
		{"unknown protocol", func(s *Spec) { s.Protocol = "UDP" }, "protocol"},
		{"HTTP without path", func(s *Spec) { s.RequestPath = "" }, "requestPath"},
		{"relative path", func(s *Spec) { s.RequestPath = "healthz" }, "requestPath"},
		{"TCP with path", func(s *Spec) { s.Protocol = TCP }, "requestPath"},
		{"port 0", func(s *Spec) { s.Port = 0 }, "port"},
		{"port too high", func(s *Spec) { s.Port = 65536 }, "port"},
		{"zero interval", func(s *Spec) { s.Interval = 0 }, "interval"},
		{"zero threshold", func(s *Spec) { s.Threshold = 0 }, "threshold"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := valid
			tc.mutate(&s)
			err := s.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("Validate() = %v, want an error about %s", err, tc.want)
			}
		})
	}
	if err := (Target{Spec: valid}).Validate(); err == nil {
		t.Error("target without an address validated")
	}
	if err := (Target{Addr: netip.MustParseAddr("10.0.0.4"), Spec: valid}).Validate(); err != nil {
		t.Errorf("valid target: %v", err)
	}
}

func TestTimeoutIsIntervalCappedAt30s(t *testing.T) {
	for interval, want := range map[time.Duration]time.Duration{
		50 * time.Millisecond: 50 * time.Millisecond,
		5 * time.Second:       5 * time.Second,
		30 * time.Second:      30 * time.Second,
		2 * time.Minute:       30 * time.Second,
	} {
		if got := (Spec{Interval: interval}).Timeout(); got != want {
			t.Errorf("Timeout() with interval %v = %v, want %v", interval, got, want)
		}
	}
}
