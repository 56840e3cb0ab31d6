package peers

import "github.com/prometheus/client_golang/prometheus"

const namespace = "stickylb"

// How pins travel, the "via" label.
const (
	viaGossip = "gossip"    // announcements
	viaState  = "push_pull" // full states
)

// Why a message is dropped, the "reason" label of peer_messages_dropped_total.
const (
	dropQueueFull      = "queue_full"      // an announcement pushed out of the gossip queue
	dropUndecodable    = "undecodable"     // a message received that is not a pin message
	dropVersion        = "wrong_version"   // a message of a version this replica does not speak
	dropStateTruncated = "state_truncated" // a state for a peer cut at MaxStateBytes
	dropRuleName       = "bad_rule_name"   // an announcement whose rule name cannot be sent
)

type metrics struct {
	enabled  prometheus.Gauge
	peers    prometheus.Gauge
	lag      prometheus.Histogram
	sent     *prometheus.CounterVec // via
	received *prometheus.CounterVec // via
	dropped  *prometheus.CounterVec // reason
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		enabled: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "peer_sync_enabled",
			Help: "1 when this replica shares pins with its peers; 0 without a peer key (--peer-key-file), when it serves from the Maglev table and its own pins only.",
		}),
		peers: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "peers",
			Help: "Other replicas this one is connected to (live members of its peer cluster).",
		}),
		lag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "peer_sync_lag_seconds",
			Help:    "Time from a peer announcing pins to this replica receiving them (first copy; the two clocks' skew included).",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 12), // 1 ms to about 24 s
		}),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "peer_pins_sent_total",
			Help: "Pins handed to the peers: via=gossip, announcements queued (once each, however often gossip repeats them); via=push_pull, pins in full states sent.",
		}, []string{"via"}),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "peer_pins_received_total",
			Help: "Pins received from peers and merged into the pin table: via=gossip (first copy of each announcement) or via=push_pull (full states).",
		}, []string{"via"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "peer_messages_dropped_total",
			Help: "Pin messages dropped, by reason: queue_full (announcements pushed out of the gossip queue; push/pull repairs them), undecodable, wrong_version, state_truncated (a state for a peer cut at its size bound), bad_rule_name.",
		}, []string{"reason"}),
	}
	for _, via := range []string{viaGossip, viaState} {
		m.sent.WithLabelValues(via)
		m.received.WithLabelValues(via)
	}
	for _, r := range []string{dropQueueFull, dropUndecodable, dropVersion, dropStateTruncated, dropRuleName} {
		m.dropped.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.enabled, m.peers, m.lag, m.sent, m.received, m.dropped} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
