package proxy

import (
	"fmt"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/stickylb/stickylb/dataplane/pins"
)

// Probe states of a BackendView.
const (
	ProbeUp   = "up"
	ProbeDown = "down"
	// ProbeNone: the rule has no probe.
	ProbeNone = "none"
	// ProbeUnknown: the first probe has not answered yet (counted as up).
	ProbeUnknown = "unknown"
)

// RuleView is a rule as this replica serves it: what `kubectl stickylb
// status` shows per replica.
type RuleView struct {
	Rule string `json:"rule"`
	// Snapshot is the configuration version the view comes from.
	Snapshot uint64 `json:"snapshot"`
	// Listeners are the rule's frontends, each open or not here.
	Listeners []ListenerView `json:"listeners"`
	// Healthy counts the non-draining backends passing their probe.
	Healthy int `json:"healthy"`
	// ProbeDownFallback: no backend passes its probe and the rule's
	// AllProbedUp sends new flows to them all anyway.
	ProbeDownFallback bool `json:"probeDownFallback,omitempty"`
	// Pins is how many clients this replica holds pinned for the rule.
	Pins     int           `json:"pins"`
	Backends []BackendView `json:"backends"`
}

// ListenerView is one frontend socket of a rule.
type ListenerView struct {
	Address string `json:"address"` // PROTOCOL/ADDR:PORT
	Open    bool   `json:"open"`
}

// BackendView is one backend of a rule, as this replica serves it.
type BackendView struct {
	Address string `json:"address"`
	// Draining: the endpoint is terminating; its flows go on, new ones go
	// elsewhere.
	Draining bool   `json:"draining,omitempty"`
	Probe    string `json:"probe"`
	// Share is the backend's fraction of the Maglev table: the share of
	// new clients it takes. 0 when it takes no new flows.
	Share float64 `json:"share"`
	// Pinned counts the clients pinned to it on this replica.
	Pinned int `json:"pinned"`
	// Flows counts its established TCP connections and UDP sessions here.
	Flows int `json:"flows"`
}

// View returns how this replica serves rule now.
func (p *Proxy) View(rule string) (RuleView, error) {
	p.mu.Lock()
	rs, ok := p.rules[rule]
	var v RuleView
	if ok {
		if p.current != nil {
			v.Snapshot = p.current.Version
		}
		for _, k := range rs.rule.Listeners() {
			_, open := p.listeners[k]
			v.Listeners = append(v.Listeners, ListenerView{Address: k.String(), Open: open})
		}
	}
	p.mu.Unlock()
	if !ok {
		return RuleView{}, fmt.Errorf("rule %s is not served here", rule)
	}
	v.Rule = rule
	pl := rs.pool.Load()
	v.Healthy = pl.healthy
	v.ProbeDownFallback = pl.healthy == 0 && len(pl.picks) > 0

	// The share of a backend is its count of table slots.
	slots := make([]int, len(pl.picks))
	if size := pl.table.Size(); len(pl.picks) > 0 {
		for s := uint64(0); s < size; s++ {
			slots[pl.table.Lookup(s)]++
		}
	}
	share := make(map[*backend]float64, len(pl.picks))
	for i, b := range pl.picks {
		share[&pl.backends[b]] = float64(slots[i]) / float64(pl.table.Size())
	}
	var pinned map[uint64]int
	if rs.pins != nil {
		pinned = rs.pins.CountByBackend(pins.Now())
		for _, n := range pinned {
			v.Pins += n
		}
	}
	flows := p.flowsByBackend(rule)
	for _, sb := range rs.rule.Backends {
		b := &rs.backends[rs.find(sb.Addr)]
		name := sb.Addr.String()
		bv := BackendView{Address: name, Draining: sb.Draining, Probe: ProbeNone, Share: share[b], Pinned: pinned[b.pinKey], Flows: flows[name]}
		if t, ok := probeTarget(rs.rule, sb.Addr); ok {
			switch up, known := p.monitor.Status(t); {
			case !known:
				bv.Probe = ProbeUnknown
			case up:
				bv.Probe = ProbeUp
			default:
				bv.Probe = ProbeDown
			}
		}
		v.Backends = append(v.Backends, bv)
	}
	return v, nil
}

// flowsByBackend reads the rule's active_flows series. A backend's series
// exist only once it has had a flow, so this collects rather than asks.
func (p *Proxy) flowsByBackend(rule string) map[string]int {
	ch := make(chan prometheus.Metric, 64)
	go func() {
		p.metrics.activeFlows.Collect(ch)
		close(ch)
	}()
	out := map[string]int{}
	for m := range ch {
		var d dto.Metric
		if m.Write(&d) != nil {
			continue
		}
		var r, b string
		for _, l := range d.GetLabel() {
			switch l.GetName() {
			case "rule":
				r = l.GetValue()
			case "backend":
				b = l.GetValue()
			}
		}
		if r == rule {
			out[b] += int(d.GetGauge().GetValue())
		}
	}
	return out
}

// Rules returns the names of the rules this replica serves, sorted.
func (p *Proxy) Rules() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	names := make([]string, 0, len(p.rules))
	for n := range p.rules {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}
