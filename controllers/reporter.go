package controllers

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/go-logr/logr"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/manager"
)

const (
	// DefaultReportInterval is the least time between two writes of a report.
	DefaultReportInterval = time.Second
	// DefaultReportHeartbeat is how often a report is renewed when nothing
	// changes; ReportLeaseDuration lets the controller drop a replica that
	// died without a word after missing about three.
	DefaultReportHeartbeat = 5 * time.Second
	// ReportLeaseDuration is the report Lease's leaseDurationSeconds, as
	// long as the leader election's: a killed leader's report expires about
	// when its successor takes over.
	ReportLeaseDuration = 15 * time.Second
	// reportRetries bounds the conflicts one write goes through.
	reportRetries = 5
)

// Reporter publishes what this replica's dataplane serves as a Report (see
// report.go) in the Lease ReportLeaseName(Replica) in Namespace. It runs on
// every replica (not leader-elected). It writes only when the report
// changed, the first change at once and later ones coalesced to at most one
// write per Interval, and renews the Lease every Heartbeat when nothing
// changes. Leave deletes the Lease when the replica stops serving.
//
// It publishes from the start, before the first snapshot (Snapshot and
// Covered 0): a replica that has not caught up yet says so.
type Reporter struct {
	// Client writes the Lease.
	Client client.Client
	// Reader reads it back (after a conflict, or when it exists already); an
	// uncached reader, such as the manager's APIReader.
	Reader    client.Reader
	Dataplane *Dataplane
	// ProbedDown is how many of a served rule's ("ns/name") backends the
	// proxy's probes see down (Proxy.ProbedDown).
	ProbedDown func(rule string) (int, bool)
	// Replica names this replica: its pod's name, or its bind address
	// outside a cluster. Namespace holds the Lease.
	Replica, Namespace string
	// Address is where this replica's frontends listen.
	Address string
	// Interval is the least time between two writes (DefaultReportInterval
	// when 0); Heartbeat how often the Lease is renewed when nothing changes
	// (DefaultReportHeartbeat when 0).
	Interval, Heartbeat time.Duration
	Log                 logr.Logger

	stopOnce sync.Once
	stopping chan struct{} // closed by Leave
	initOnce sync.Once

	mu      sync.Mutex // held across each write and Leave's delete
	stopped bool
	lease   *coordinationv1.Lease // as last written, nil before
	written string                // the report in lease
}

var _ manager.LeaderElectionRunnable = (*Reporter)(nil)

// NeedLeaderElection is false: every replica reports.
func (r *Reporter) NeedLeaderElection() bool { return false }

// LeaseName is the name of this replica's report Lease.
func (r *Reporter) LeaseName() string { return ReportLeaseName(r.Replica) }

func (r *Reporter) init() {
	r.initOnce.Do(func() { r.stopping = make(chan struct{}) })
}

func (r *Reporter) interval() time.Duration {
	if r.Interval > 0 {
		return r.Interval
	}
	return DefaultReportInterval
}

func (r *Reporter) heartbeat() time.Duration {
	if r.Heartbeat > 0 {
		return r.Heartbeat
	}
	return DefaultReportHeartbeat
}

// Report is what the replica serves now.
func (r *Reporter) Report() *Report {
	st := r.Dataplane.State()
	rep := &Report{Replica: r.Replica, Address: r.Address, Snapshot: st.Version, Covered: r.Dataplane.Covered()}
	for key, msg := range st.ListenErrors {
		if rep.Failed == nil {
			rep.Failed = map[string]string{}
		}
		rep.Failed[key.String()] = msg
	}
	if r.ProbedDown != nil {
		for key, res := range st.Results {
			if !res.Accepted {
				continue
			}
			// Counted in the proxy's own pool: a ready count from the
			// translation and a healthy count from the proxy would disagree
			// for a moment after every EndpointSlice change.
			down, served := r.ProbedDown(key.String())
			if !served || down <= 0 {
				continue
			}
			if rep.Down == nil {
				rep.Down = map[string]int32{}
			}
			rep.Down[key.String()] = int32(down)
		}
	}
	return rep
}

var (
	errReporterStopped = errors.New("the reporter has left")
	errNotOurs         = errors.New("not taking it over")
)

// Start publishes the report until ctx ends or Leave is called.
func (r *Reporter) Start(ctx context.Context) error {
	r.init()
	changed, cancel := r.Dataplane.Subscribe()
	defer cancel()
	// Leave aborts a write under way, so that it need not wait for it.
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		select {
		case <-r.stopping:
			stop()
		case <-ctx.Done():
		}
	}()

	var (
		dirty     = true    // the report may differ from the one written
		attempted time.Time // the last write (or attempt): the throttle
		renewed   time.Time // the last successful write: the heartbeat
		timer     = time.NewTimer(0)
	)
	defer timer.Stop()
	for {
		now := time.Now()
		heartbeatDue := now.Sub(renewed) >= r.heartbeat()
		if (dirty || heartbeatDue) && now.Sub(attempted) >= r.interval() {
			// Built only when it may be written: at most once an Interval
			// however often the dataplane changes.
			rep := r.Report()
			dirty = false
			if enc := rep.encode(); enc != r.lastWritten() || heartbeatDue {
				attempted = now
				switch err := r.write(ctx, rep, enc); {
				case err == nil:
					renewed = time.Now()
				case ctx.Err() != nil || errors.Is(err, errReporterStopped):
					return nil
				case errors.Is(err, errNotOurs):
					// Two replicas whose names map to one Lease: try
					// again at the next heartbeat, not every Interval.
					r.Log.Error(err, "publish the dataplane report", "lease", r.Namespace+"/"+r.LeaseName())
					renewed = now
				default:
					r.Log.Error(err, "publish the dataplane report", "lease", r.Namespace+"/"+r.LeaseName())
					dirty = true // try again after Interval
				}
			}
		}
		next := renewed.Add(r.heartbeat())
		if dirty {
			next = attempted.Add(r.interval())
		}
		next = maxTime(next, attempted.Add(r.interval()))
		timer.Reset(time.Until(next))
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			dirty = true
		case <-timer.C:
		}
	}
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func (r *Reporter) lastWritten() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.written
}

// write creates or updates the Lease with rep (encoded as enc), renewing it.
func (r *Reporter) write(ctx context.Context, rep *Report, enc string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var err error
	for range reportRetries {
		if r.stopped {
			return errReporterStopped
		}
		if r.lease == nil {
			err = r.create(ctx, enc)
		} else {
			err = r.update(ctx, enc)
		}
		if err == nil {
			r.written = enc
			r.Log.V(1).Info("dataplane report published", "lease", r.Namespace+"/"+r.lease.Name,
				"resourceVersion", r.lease.ResourceVersion, "snapshot", rep.Snapshot, "covered", rep.Covered,
				"failed", len(rep.Failed), "down", len(rep.Down))
			return nil
		}
		if !apierrors.IsConflict(err) && !apierrors.IsAlreadyExists(err) && !apierrors.IsNotFound(err) {
			return err
		}
		// Someone changed the Lease, created it first, or deleted it: read
		// it again (r.lease nil when it is gone), and take it over only
		// when it is this replica's.
		if rerr := r.reread(ctx); rerr != nil {
			return rerr
		}
	}
	return err
}

// reread sets r.lease from the API server: nil when there is none.
func (r *Reporter) reread(ctx context.Context) error {
	var cur coordinationv1.Lease
	err := r.Reader.Get(ctx, client.ObjectKey{Namespace: r.Namespace, Name: r.LeaseName()}, &cur)
	switch {
	case apierrors.IsNotFound(err):
		r.lease = nil
		return nil
	case err != nil:
		return err
	case ptr.Deref(cur.Spec.HolderIdentity, "") != r.Replica:
		r.lease = nil
		return fmt.Errorf("lease %s/%s belongs to replica %q, not to this one (%q): %w",
			r.Namespace, cur.Name, ptr.Deref(cur.Spec.HolderIdentity, ""), r.Replica, errNotOurs)
	}
	r.lease = &cur
	return nil
}

func (r *Reporter) fill(l *coordinationv1.Lease, enc string) {
	now := metav1.NewMicroTime(time.Now())
	if l.Labels == nil {
		l.Labels = map[string]string{}
	}
	l.Labels[LabelReport] = "true"
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	l.Annotations[annotationReport] = enc
	l.Spec.HolderIdentity = ptr.To(r.Replica)
	l.Spec.LeaseDurationSeconds = ptr.To(int32(ReportLeaseDuration / time.Second))
	if l.Spec.AcquireTime == nil {
		l.Spec.AcquireTime = &now
	}
	l.Spec.RenewTime = &now
}

func (r *Reporter) create(ctx context.Context, enc string) error {
	l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: r.Namespace, Name: r.LeaseName()}}
	r.fill(l, enc)
	if err := r.Client.Create(ctx, l); err != nil {
		return err
	}
	r.lease = l
	return nil
}

// update writes over r.lease, at its resourceVersion (optimistic concurrency).
func (r *Reporter) update(ctx context.Context, enc string) error {
	l := r.lease.DeepCopy()
	r.fill(l, enc)
	if err := r.Client.Update(ctx, l); err != nil {
		return err
	}
	r.lease = l
	return nil
}

// Leave stops publishing for good and deletes this replica's Lease, so the
// controller stops counting the replica at once. Call it when the replica
// stops serving; a write under way is abandoned. It deletes only the Lease
// this replica wrote (or, when it never saw its write complete, one whose
// holder is this replica), never another's.
func (r *Reporter) Leave(ctx context.Context) error {
	r.init()
	r.stopOnce.Do(func() { close(r.stopping) })
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopped = true
	l := r.lease
	if l == nil {
		// A create whose answer was lost, or a write from a previous run of
		// this replica (a restarted container) may have left one.
		if err := r.reread(ctx); errors.Is(err, errNotOurs) {
			return nil
		} else if err != nil {
			return err
		}
		if l = r.lease; l == nil {
			return nil
		}
	}
	err := r.Client.Delete(ctx, l, client.Preconditions{UID: ptr.To(l.UID)})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete lease %s/%s: %w", l.Namespace, l.Name, err)
	}
	r.lease = nil
	return nil
}
