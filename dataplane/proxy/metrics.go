package proxy

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// Metric names follow Azure Load Balancer's metrics where one exists
// (ByteCount, PacketCount, SYNCount, DipAvailability as probe status).
const namespace = "stickylb"

// Refusal reasons, the "reason" label of refused_total.
const (
	refusedGlobalLimit  = "global_limit"
	refusedClientLimit  = "client_limit"
	refusedNoBackend    = "no_healthy_backend"
	refusedDialFailed   = "dial_failed"
	refusedSessionLimit = "udp_session_limit"
	refusedDraining     = "shutting_down"
)

// Client distances, the "distance" label of tcp_bulk_clients_total.
const (
	clientNear = iota
	clientFar
)

var refusedReasons = []string{refusedGlobalLimit, refusedClientLimit, refusedNoBackend, refusedDialFailed, refusedSessionLimit, refusedDraining}

type metrics struct {
	bytes        *prometheus.CounterVec // rule, backend, direction
	packets      *prometheus.CounterVec // rule, backend, direction
	syn          *prometheus.CounterVec // rule, backend
	activeFlows  *prometheus.GaugeVec   // rule, backend, protocol
	udpSessions  *prometheus.GaugeVec   // rule
	dialFailures *prometheus.CounterVec // rule, backend
	dialRetries  *prometheus.CounterVec // rule
	refused      *prometheus.CounterVec // rule, reason
	idleTimeouts *prometheus.CounterVec // rule
	probeStatus  *prometheus.GaugeVec   // rule, backend
	rebuilds     *prometheus.CounterVec // rule
	pinsRefused  *prometheus.CounterVec // reason
	headers      *prometheus.CounterVec // rule, first_bytes
	version      prometheus.Gauge
	congestion   *prometheus.GaugeVec  // side, algorithm
	bulkClients  [2]prometheus.Counter // by distance
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "byte_count_total",
			Help: "Bytes proxied (Azure ByteCount); direction in = client to backend, out = backend to client.",
		}, []string{"rule", "backend", "direction"}),
		packets: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "packet_count_total",
			Help: "Packets proxied (Azure PacketCount): UDP datagrams, and TCP segments counted when a connection closes.",
		}, []string{"rule", "backend", "direction"}),
		syn: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "syn_count_total",
			Help: "New TCP connections sent to a backend (Azure SYNCount).",
		}, []string{"rule", "backend"}),
		activeFlows: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "active_flows",
			Help: "Established TCP connections and live UDP sessions.",
		}, []string{"rule", "backend", "protocol"}),
		udpSessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "udp_sessions",
			Help: "Live UDP sessions (one per client address and port).",
		}, []string{"rule"}),
		dialFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "dial_failures_total",
			Help: "Failed connections to a backend.",
		}, []string{"rule", "backend"}),
		dialRetries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "dial_retries_total",
			Help: "Connections retried on the next backend of the client's preference order.",
		}, []string{"rule"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "refused_total",
			Help: "Connections and datagrams refused, by reason.",
		}, []string{"rule", "reason"}),
		idleTimeouts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "idle_timeouts_total",
			Help: "TCP connections closed and UDP sessions expired for idleness.",
		}, []string{"rule"}),
		probeStatus: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "health_probe_status",
			Help: "1 when the backend passes the rule's health probe, 0 when not (Azure DipAvailability).",
		}, []string{"rule", "backend"}),
		rebuilds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "table_rebuilds_total",
			Help: "Maglev table rebuilds (configuration changes and probe transitions).",
		}, []string{"rule"}),
		pinsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "pins_refused_total",
			Help: "New clients served from the table without a pin: replica_limit (--max-pins reached) or source_limit (--max-pins-per-source reached for the client's /24 or /64).",
		}, []string{"reason"}),
		headers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "proxy_protocol_headers_total",
			Help: "PROXY protocol headers sent to backends: first_bytes=with when the client's first bytes went in the same write, alone when the header went by itself (the client had not spoken yet).",
		}, []string{"rule", "first_bytes"}),
		version: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "snapshot_version",
			Help: "Version of the configuration snapshot the dataplane serves.",
		}),
		congestion: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "tcp_congestion_control_info",
			Help: "1 for the TCP congestion control algorithm of each side of proxied connections: backend, frontend, and frontend_near for clients under --near-client-rtt.",
		}, []string{"side", "algorithm"}),
	}
	bulkClients := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "tcp_bulk_clients_total",
		Help: "TCP connections that sent their client more than 64 KiB, by the client's smallest round-trip time: near (under --near-client-rtt; kept the backend side's congestion control) or far (switched to the frontend side's). Counted only when the two sides' algorithms differ.",
	}, []string{"distance"})
	m.bulkClients = [2]prometheus.Counter{bulkClients.WithLabelValues("near"), bulkClients.WithLabelValues("far")}
	for _, c := range []prometheus.Collector{m.bytes, m.packets, m.syn, m.activeFlows, m.udpSessions,
		m.dialFailures, m.dialRetries, m.refused, m.idleTimeouts, m.probeStatus, m.rebuilds, m.pinsRefused, m.headers, m.version, m.congestion, bulkClients,
		newTableCollector(&sharedTables)} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// backendMetrics are one (rule, backend) pair's series, resolved once when a
// pool is built so the hot path only does atomic adds.
type backendMetrics struct {
	bytesIn, bytesOut     prometheus.Counter
	packetsIn, packetsOut prometheus.Counter
	syn, dialFailures     prometheus.Counter
	tcpFlows, udpFlows    prometheus.Gauge
}

func (m *metrics) forBackend(rule, backend string) *backendMetrics {
	return &backendMetrics{
		bytesIn:      m.bytes.WithLabelValues(rule, backend, "in"),
		bytesOut:     m.bytes.WithLabelValues(rule, backend, "out"),
		packetsIn:    m.packets.WithLabelValues(rule, backend, "in"),
		packetsOut:   m.packets.WithLabelValues(rule, backend, "out"),
		syn:          m.syn.WithLabelValues(rule, backend),
		dialFailures: m.dialFailures.WithLabelValues(rule, backend),
		tcpFlows:     m.activeFlows.WithLabelValues(rule, backend, "TCP"),
		udpFlows:     m.activeFlows.WithLabelValues(rule, backend, "UDP"),
	}
}

// forgetBackend drops the series of a backend that left a rule's pool.
func (m *metrics) forgetBackend(rule, backend string) {
	for _, d := range []string{"in", "out"} {
		m.bytes.DeleteLabelValues(rule, backend, d)
		m.packets.DeleteLabelValues(rule, backend, d)
	}
	m.syn.DeleteLabelValues(rule, backend)
	m.dialFailures.DeleteLabelValues(rule, backend)
	m.activeFlows.DeleteLabelValues(rule, backend, "TCP")
	m.activeFlows.DeleteLabelValues(rule, backend, "UDP")
	m.probeStatus.DeleteLabelValues(rule, backend)
}

// forgetRule drops every series of a rule that is gone. It deletes them by
// their exact labels: a partial match scans every series of every rule.
func (m *metrics) forgetRule(r *snapshot.Rule) {
	for _, b := range r.Backends {
		m.forgetBackend(r.Name, b.Addr.String())
	}
	m.udpSessions.DeleteLabelValues(r.Name)
	m.dialRetries.DeleteLabelValues(r.Name)
	m.idleTimeouts.DeleteLabelValues(r.Name)
	m.rebuilds.DeleteLabelValues(r.Name)
	m.headers.DeleteLabelValues(r.Name, "with")
	m.headers.DeleteLabelValues(r.Name, "alone")
	for _, reason := range refusedReasons {
		m.refused.DeleteLabelValues(r.Name, reason)
	}
}

// ruleMetrics are a rule's own series.
type ruleMetrics struct {
	dialRetries, idleTimeouts, rebuilds prometheus.Counter
	// headersWithData and headersAlone exist only for rules that send the
	// PROXY protocol header.
	headersWithData, headersAlone prometheus.Counter
	udpSessions                   prometheus.Gauge
	refused                       map[string]prometheus.Counter
}

func (m *metrics) forRule(rule string) *ruleMetrics {
	rm := &ruleMetrics{
		dialRetries:  m.dialRetries.WithLabelValues(rule),
		idleTimeouts: m.idleTimeouts.WithLabelValues(rule),
		rebuilds:     m.rebuilds.WithLabelValues(rule),
		udpSessions:  m.udpSessions.WithLabelValues(rule),
		refused:      map[string]prometheus.Counter{},
	}
	for _, r := range refusedReasons {
		rm.refused[r] = m.refused.WithLabelValues(rule, r)
	}
	return rm
}
