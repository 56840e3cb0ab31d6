// Package health runs active health probes against backends, with the
// semantics of Azure Load Balancer's health probes, and reports only state
// transitions.
//
// A probe is described by a [Spec]: a TCP probe passes when a TCP connection
// to the backend's probe port is established; an HTTP or HTTPS probe passes
// only when GET RequestPath answers 200 (redirects are failures and are not
// followed, as in Azure). HTTPS probes do not verify the certificate: the
// probe asks "is the backend alive", not "is it who it claims to be", and
// backends commonly serve self-signed certificates. A probe times out after
// min(Interval, 30s). Threshold consecutive results that disagree with the
// current state are needed to flip it, in either direction.
//
// A backend starts Up. Kubernetes readiness already gates which endpoints
// reach the pool, so a new backend has passed one health check before it is
// probed here; starting Down would black-hole a freshly scaled pool for
// Threshold × Interval. Starting Up is not a transition and is not notified.
//
// The set of things to probe is keyed by [Target] (backend address plus
// spec), so rules that probe the same backend the same way share one prober
// and one view of its health. A [Monitor] diffs each [Monitor.Update] against
// the running set, the way google/seesaw's healthcheck manager does, so
// unchanged targets keep their state and counters across configuration
// changes.
package health

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/stickylb/stickylb/dataplane/proxyheader"
)

// Protocol is how a backend is probed.
type Protocol string

// The probe protocols Azure Load Balancer offers.
const (
	TCP   Protocol = "TCP"
	HTTP  Protocol = "HTTP"
	HTTPS Protocol = "HTTPS"
)

// maxTimeout caps a probe's timeout, as Azure does, whatever the interval.
const maxTimeout = 30 * time.Second

// Spec is a health probe as configured on a rule (spec.probe), with defaults
// already applied by the API layer.
//
// This package accepts any positive Interval; the API enforces Azure's
// minimum of 5s, and tests here use tens of milliseconds.
type Spec struct {
	Protocol Protocol
	// Port is the probe port on the backend, which may differ from the
	// port that carries traffic.
	Port int
	// RequestPath is the path (and optional query) of the GET, for HTTP
	// and HTTPS only.
	RequestPath string
	Interval    time.Duration
	// Threshold is the number of consecutive results of the opposite kind
	// that flip the state (Azure's probeThreshold).
	Threshold int
	// ProxyHeader, when not 0, is the PROXY protocol version whose header
	// without a client (v2 LOCAL, v1 UNKNOWN) opens every probe connection,
	// before the HTTP request and before the TLS handshake: a backend that
	// requires the header passes its probe.
	ProxyHeader proxyheader.Version
}

// Timeout is how long one probe may take: min(Interval, 30s). Bounding it by
// the interval means probes of one target never overlap.
func (s Spec) Timeout() time.Duration {
	return min(s.Interval, maxTimeout)
}

// Validate reports why s cannot be probed, if it cannot.
func (s Spec) Validate() error {
	var errs []error
	switch s.Protocol {
	case TCP:
		if s.RequestPath != "" {
			errs = append(errs, errors.New("requestPath must be empty for TCP probes"))
		}
	case HTTP, HTTPS:
		if !strings.HasPrefix(s.RequestPath, "/") {
			errs = append(errs, fmt.Errorf("requestPath %q must start with /", s.RequestPath))
		} else if _, err := url.ParseRequestURI(s.RequestPath); err != nil {
			errs = append(errs, fmt.Errorf("requestPath %q: %w", s.RequestPath, err))
		}
	default:
		errs = append(errs, fmt.Errorf("protocol %q is not one of TCP, HTTP, HTTPS", s.Protocol))
	}
	if s.ProxyHeader > proxyheader.V2 {
		errs = append(errs, fmt.Errorf("PROXY protocol version %d is not 0, 1 or 2", s.ProxyHeader))
	}
	if s.Port < 1 || s.Port > 65535 {
		errs = append(errs, fmt.Errorf("port %d is outside 1-65535", s.Port))
	}
	if s.Interval <= 0 {
		errs = append(errs, fmt.Errorf("interval %v must be positive", s.Interval))
	}
	if s.Threshold < 1 {
		errs = append(errs, fmt.Errorf("threshold %d must be at least 1", s.Threshold))
	}
	return errors.Join(errs...)
}

// Target is one backend probed one way. It is comparable and is the identity
// of a prober: callers look health up by the same value they registered.
type Target struct {
	// Addr is the backend's IP; the probe connects to Addr:Spec.Port.
	Addr netip.Addr
	Spec Spec
}

// Validate reports why t cannot be probed, if it cannot.
func (t Target) Validate() error {
	var errs []error
	if !t.Addr.IsValid() {
		errs = append(errs, errors.New("backend address is not set"))
	}
	if err := t.Spec.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("health target %s: %w", t, err)
	}
	return nil
}

// String names the target the way logs and events should show it.
func (t Target) String() string {
	// Not addrPort: an invalid port must show as given in validation errors.
	s := fmt.Sprintf("%s %s", t.Spec.Protocol, net.JoinHostPort(t.Addr.String(), strconv.Itoa(t.Spec.Port)))
	if t.Spec.RequestPath != "" {
		s += t.Spec.RequestPath
	}
	return s
}

func (t Target) addrPort() netip.AddrPort {
	return netip.AddrPortFrom(t.Addr, uint16(t.Spec.Port))
}

// Transition is a change of a target's health, the only thing reported.
type Transition struct {
	Target Target
	// Up is the new state.
	Up bool
	// Reason describes the probe result that completed the flip, such as
	// "HTTP 503", "connect: connection refused" or "timeout after 5s".
	Reason string
	// At is when that probe started.
	At time.Time
}

// TargetStatus is a point-in-time view of one target, for metrics and
// status reporting.
type TargetStatus struct {
	Target Target
	Up     bool
	// Probes and Failures count completed probes since the target was
	// first added; they survive Updates that keep the target.
	Probes   uint64
	Failures uint64
	// LastReason and LastProbe describe the latest completed probe; they
	// are zero before the first one.
	LastReason string
	LastProbe  time.Time
}
