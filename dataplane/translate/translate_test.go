package translate

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

var (
	bind  = netip.MustParseAddr("10.244.0.7")
	epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
)

// lbr is a rule "ns/name" on TCP port, created at epoch + age, with an
// IP pool of one address unless an option changes it.
func lbr(ns, name string, port int32, opts ...func(*v1alpha1.LoadBalancerRule)) v1alpha1.LoadBalancerRule {
	r := v1alpha1.LoadBalancerRule{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Generation: 1, CreationTimestamp: metav1.NewTime(epoch)},
		Spec: v1alpha1.LoadBalancerRuleSpec{
			Frontend:                  v1alpha1.Frontend{Name: "default", Port: v1alpha1.PortNumber(port), ServiceType: v1alpha1.ServiceTypeClusterIP},
			BackendPool:               v1alpha1.BackendPool{Addresses: []string{"192.0.2.1"}},
			BackendPort:               8080,
			Protocol:                  v1alpha1.ProtocolTCP,
			SessionPersistence:        v1alpha1.SessionPersistenceNone,
			IdleTimeoutInMinutes:      4,
			NoHealthyBackendsBehavior: v1alpha1.AllProbedDown,
		},
	}
	for _, o := range opts {
		o(&r)
	}
	return r
}

func createdAfter(d time.Duration) func(*v1alpha1.LoadBalancerRule) {
	return func(r *v1alpha1.LoadBalancerRule) { r.CreationTimestamp = metav1.NewTime(epoch.Add(d)) }
}

func protocol(p v1alpha1.Protocol) func(*v1alpha1.LoadBalancerRule) {
	return func(r *v1alpha1.LoadBalancerRule) { r.Spec.Protocol = p }
}

func service(name string) func(*v1alpha1.LoadBalancerRule) {
	return func(r *v1alpha1.LoadBalancerRule) { r.Spec.BackendPool = v1alpha1.BackendPool{ServiceName: name} }
}

func svc(ns, name string) corev1.Service {
	return corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
}

// slice is an EndpointSlice of Service ns/service.
func slice(ns, service, name string, family discoveryv1.AddressType, eps ...discoveryv1.Endpoint) discoveryv1.EndpointSlice {
	return discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns, Name: name,
			Labels: map[string]string{discoveryv1.LabelServiceName: service},
		},
		AddressType: family,
		Endpoints:   eps,
		Ports:       []discoveryv1.EndpointPort{{Port: ptr(int32(9999))}}, // ignored: backendPort decides
	}
}

// cond is a tri-state condition: nil, true or false.
type cond *bool

var (
	unset cond = nil
	yes   cond = ptr(true)
	no    cond = ptr(false)
)

func ptr[T any](v T) *T { return &v }

func ep(addr string, ready, serving, terminating cond) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{addr},
		Conditions: discoveryv1.EndpointConditions{Ready: ready, Serving: serving, Terminating: terminating},
	}
}

func active(addr string) snapshot.Backend {
	return snapshot.Backend{Addr: netip.AddrPortFrom(netip.MustParseAddr(addr), 8080)}
}

func draining(addr string) snapshot.Backend {
	b := active(addr)
	b.Draining = true
	return b
}

// translate runs Translate and checks what every output must satisfy.
func translate(t *testing.T, in Input) (snapshot.Snapshot, map[types.NamespacedName]Result) {
	t.Helper()
	snap, results := Translate(in)
	if err := snap.Validate(); err != nil {
		t.Fatalf("snapshot does not validate: %v", err)
	}
	again := snapshot.Snapshot{Version: snap.Version, Rules: slices.Clone(snap.Rules)}
	for i := range again.Rules {
		again.Rules[i].Backends = slices.Clone(again.Rules[i].Backends)
		again.Rules[i].Protocols = slices.Clone(again.Rules[i].Protocols)
	}
	again.Normalize()
	if !reflect.DeepEqual(snap, again) {
		t.Fatalf("snapshot is not normalized:\n%+v\n%+v", snap, again)
	}
	if len(results) != len(in.Rules) {
		t.Errorf("%d results for %d rules", len(results), len(in.Rules))
	}
	for _, r := range snap.Rules {
		ns, name, _ := strings.Cut(r.Name, "/")
		if !results[types.NamespacedName{Namespace: ns, Name: name}].Accepted {
			t.Errorf("rule %s is in the snapshot but not accepted", r.Name)
		}
	}
	return snap, results
}

func TestTranslatesEveryField(t *testing.T) {
	probePort := v1alpha1.PortNumber(9090)
	web := lbr("shop", "web", 443, func(r *v1alpha1.LoadBalancerRule) {
		r.Generation = 7
		r.Spec.Frontend.Name = "public"
		r.Spec.BackendPool.Addresses = []string{"fd00::2", "10.0.0.3", "10.0.0.1", "::ffff:10.0.0.9"}
		r.Spec.BackendPort = 8443
		r.Spec.Protocol = v1alpha1.ProtocolAll
		r.Spec.SessionPersistence = v1alpha1.SessionPersistenceClientIPProtocol
		r.Spec.SessionPersistenceTimeoutInMinutes = ptr(int32(45))
		r.Spec.IdleTimeoutInMinutes = 30
		r.Spec.EnableTcpReset = true
		r.Spec.NoHealthyBackendsBehavior = v1alpha1.AllProbedUp
		r.Spec.Probe = &v1alpha1.Probe{Protocol: v1alpha1.ProbeProtocolHTTPS, Port: &probePort, RequestPath: "/healthz", IntervalInSeconds: 20, ProbeThreshold: 3}
		r.Spec.ProxyProtocol = v1alpha1.ProxyProtocolV2
	})
	snap, results := translate(t, Input{Rules: []v1alpha1.LoadBalancerRule{web}, Bind: bind, Version: 42})

	at := func(a string) snapshot.Backend {
		return snapshot.Backend{Addr: netip.AddrPortFrom(netip.MustParseAddr(a), 8443)}
	}
	want := snapshot.Snapshot{Version: 42, Rules: []snapshot.Rule{{
		Name:        "shop/web",
		Generation:  7,
		Frontend:    "shop/public",
		Bind:        bind,
		Port:        443,
		Protocols:   []snapshot.Protocol{snapshot.TCP, snapshot.UDP},
		Persistence: snapshot.PersistenceClientIPProtocol,
		PinTimeout:  45 * time.Minute,
		IdleTimeout: 30 * time.Minute,
		TCPReset:    true,
		Probe:       &snapshot.Probe{Protocol: snapshot.ProbeHTTPS, Port: 9090, Path: "/healthz", Interval: 20 * time.Second, Threshold: 3},
		AllProbedUp: true,
		Backends:    []snapshot.Backend{at("10.0.0.1"), at("10.0.0.3"), at("10.0.0.9"), at("fd00::2")},

		ProxyProtocol: snapshot.ProxyV2,
	}}}
	if !reflect.DeepEqual(snap, want) {
		t.Errorf("got\n%+v\nwant\n%+v", snap, want)
	}
	wantRes := Result{Accepted: true, ResolvedRefs: true, Total: 4, Ready: 4}
	if got := results[types.NamespacedName{Namespace: "shop", Name: "web"}]; got != wantRes {
		t.Errorf("result %+v, want %+v", got, wantRes)
	}
}

func TestRuleFields(t *testing.T) {
	cases := []struct {
		name  string
		opt   func(*v1alpha1.LoadBalancerRule)
		check func(r snapshot.Rule) bool
	}{
		{"TCP serves TCP", protocol(v1alpha1.ProtocolTCP), func(r snapshot.Rule) bool {
			return slices.Equal(r.Protocols, []snapshot.Protocol{snapshot.TCP})
		}},
		{"UDP serves UDP", protocol(v1alpha1.ProtocolUDP), func(r snapshot.Rule) bool {
			return slices.Equal(r.Protocols, []snapshot.Protocol{snapshot.UDP})
		}},
		{"All serves TCP and UDP", protocol(v1alpha1.ProtocolAll), func(r snapshot.Rule) bool {
			return slices.Equal(r.Protocols, []snapshot.Protocol{snapshot.TCP, snapshot.UDP}) && len(r.Listeners()) == 2
		}},
		{"persistence None", func(r *v1alpha1.LoadBalancerRule) { r.Spec.SessionPersistence = v1alpha1.SessionPersistenceNone }, func(r snapshot.Rule) bool {
			return r.Persistence == snapshot.PersistenceNone
		}},
		{"persistence ClientIP", func(r *v1alpha1.LoadBalancerRule) { r.Spec.SessionPersistence = v1alpha1.SessionPersistenceClientIP }, func(r snapshot.Rule) bool {
			return r.Persistence == snapshot.PersistenceClientIP
		}},
		{"idle timeout in minutes", func(r *v1alpha1.LoadBalancerRule) { r.Spec.IdleTimeoutInMinutes = 100 }, func(r snapshot.Rule) bool {
			return r.IdleTimeout == 100*time.Minute
		}},
		{"no probe", func(*v1alpha1.LoadBalancerRule) {}, func(r snapshot.Rule) bool { return r.Probe == nil && !r.AllProbedUp && !r.TCPReset }},
		{"probe port defaults to backendPort", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.Probe = &v1alpha1.Probe{Protocol: v1alpha1.ProbeProtocolTCP, IntervalInSeconds: 5, ProbeThreshold: 2}
		}, func(r snapshot.Rule) bool {
			return *r.Probe == snapshot.Probe{Protocol: snapshot.ProbeTCP, Port: 8080, Interval: 5 * time.Second, Threshold: 2}
		}},
		{"HTTP probe keeps its path", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.Probe = &v1alpha1.Probe{Protocol: v1alpha1.ProbeProtocolHTTP, RequestPath: "/ready?deep=1", IntervalInSeconds: 15, ProbeThreshold: 1}
		}, func(r snapshot.Rule) bool {
			return r.Probe.Protocol == snapshot.ProbeHTTP && r.Probe.Path == "/ready?deep=1" && r.Probe.Port == 8080
		}},
		// Rules not defaulted by an API server (built in code) get the API's defaults.
		{"zero values mean the API defaults", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.Frontend.Name = ""
			r.Spec.Protocol = ""
			r.Spec.SessionPersistence = ""
			r.Spec.IdleTimeoutInMinutes = 0
			r.Spec.NoHealthyBackendsBehavior = ""
			r.Spec.Probe = &v1alpha1.Probe{Protocol: v1alpha1.ProbeProtocolTCP}
		}, func(r snapshot.Rule) bool {
			return r.Frontend == "ns/default" && slices.Equal(r.Protocols, []snapshot.Protocol{snapshot.TCP}) &&
				r.Persistence == snapshot.PersistenceNone && r.IdleTimeout == 4*time.Minute && !r.AllProbedUp &&
				*r.Probe == snapshot.Probe{Protocol: snapshot.ProbeTCP, Port: 8080, Interval: 15 * time.Second, Threshold: 1}
		}},
		{"frontend is namespaced", func(r *v1alpha1.LoadBalancerRule) { r.Spec.Frontend.Name = "edge" }, func(r snapshot.Rule) bool {
			return r.Frontend == "ns/edge" && r.Name == "ns/r"
		}},
		{"duplicate pool addresses count once", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.BackendPool.Addresses = []string{"10.0.0.2", "10.0.0.1", "10.0.0.2"}
		}, func(r snapshot.Rule) bool {
			return reflect.DeepEqual(r.Backends, []snapshot.Backend{active("10.0.0.1"), active("10.0.0.2")})
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			snap, _ := translate(t, Input{Rules: []v1alpha1.LoadBalancerRule{lbr("ns", "r", 80, tc.opt)}, Bind: bind})
			if len(snap.Rules) != 1 {
				t.Fatalf("%d rules", len(snap.Rules))
			}
			if !tc.check(snap.Rules[0]) {
				t.Errorf("unexpected rule %+v (probe %+v)", snap.Rules[0], snap.Rules[0].Probe)
			}
		})
	}
}

// TestPinTimeout: sessionPersistenceTimeoutInMinutes becomes the rule's
// PinTimeout, 180 minutes when unset under ClientIP and ClientIPProtocol,
// and no pins under None.
func TestPinTimeout(t *testing.T) {
	cases := []struct {
		name        string
		persistence v1alpha1.SessionPersistence
		minutes     *int32
		want        time.Duration
	}{
		{"ClientIP unset is 180 minutes", v1alpha1.SessionPersistenceClientIP, nil, 180 * time.Minute},
		{"ClientIPProtocol unset is 180 minutes", v1alpha1.SessionPersistenceClientIPProtocol, nil, 3 * time.Hour},
		{"ClientIP 0 keeps no pins", v1alpha1.SessionPersistenceClientIP, ptr(int32(0)), 0},
		{"ClientIPProtocol 0 keeps no pins", v1alpha1.SessionPersistenceClientIPProtocol, ptr(int32(0)), 0},
		{"ClientIP 1 minute", v1alpha1.SessionPersistenceClientIP, ptr(int32(1)), time.Minute},
		{"ClientIP 1440 is a day", v1alpha1.SessionPersistenceClientIP, ptr(int32(1440)), 24 * time.Hour},
		{"None unset keeps no pins", v1alpha1.SessionPersistenceNone, nil, 0},
		{"None 0 keeps no pins", v1alpha1.SessionPersistenceNone, ptr(int32(0)), 0},
		{"persistence unset (None) keeps no pins", "", nil, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := lbr("ns", "r", 80, func(r *v1alpha1.LoadBalancerRule) {
				r.Spec.SessionPersistence = tc.persistence
				r.Spec.SessionPersistenceTimeoutInMinutes = tc.minutes
			})
			snap, results := translate(t, Input{Rules: []v1alpha1.LoadBalancerRule{r}, Bind: bind})
			if res := results[types.NamespacedName{Namespace: "ns", Name: "r"}]; !res.Accepted {
				t.Fatalf("not accepted: %+v", res)
			}
			if got := snap.Rules[0].PinTimeout; got != tc.want {
				t.Errorf("PinTimeout = %v, want %v", got, tc.want)
			}
		})
	}
	if v1alpha1.DefaultSessionPersistenceTimeoutInMinutes != 180 {
		t.Errorf("DefaultSessionPersistenceTimeoutInMinutes = %d, want 180 (kube-proxy's 3 hours)", v1alpha1.DefaultSessionPersistenceTimeoutInMinutes)
	}
}

// TestProxyProtocol: spec.proxyProtocol becomes the rule's ProxyProtocol,
// none when unset. With All it is kept: only the TCP flows carry the header.
func TestProxyProtocol(t *testing.T) {
	cases := []struct {
		name     string
		protocol v1alpha1.Protocol
		proxy    v1alpha1.ProxyProtocol
		want     snapshot.ProxyProtocol
	}{
		{"unset is None", v1alpha1.ProtocolTCP, "", snapshot.ProxyNone},
		{"TCP None", v1alpha1.ProtocolTCP, v1alpha1.ProxyProtocolNone, snapshot.ProxyNone},
		{"TCP V1", v1alpha1.ProtocolTCP, v1alpha1.ProxyProtocolV1, snapshot.ProxyV1},
		{"TCP V2", v1alpha1.ProtocolTCP, v1alpha1.ProxyProtocolV2, snapshot.ProxyV2},
		{"protocol unset (TCP) V2", "", v1alpha1.ProxyProtocolV2, snapshot.ProxyV2},
		{"All V1", v1alpha1.ProtocolAll, v1alpha1.ProxyProtocolV1, snapshot.ProxyV1},
		{"All V2", v1alpha1.ProtocolAll, v1alpha1.ProxyProtocolV2, snapshot.ProxyV2},
		{"UDP None", v1alpha1.ProtocolUDP, v1alpha1.ProxyProtocolNone, snapshot.ProxyNone},
		{"UDP unset", v1alpha1.ProtocolUDP, "", snapshot.ProxyNone},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := lbr("ns", "r", 80, func(r *v1alpha1.LoadBalancerRule) {
				r.Spec.Protocol = tc.protocol
				r.Spec.ProxyProtocol = tc.proxy
			})
			snap, results := translate(t, Input{Rules: []v1alpha1.LoadBalancerRule{r}, Bind: bind})
			if res := results[types.NamespacedName{Namespace: "ns", Name: "r"}]; !res.Accepted {
				t.Fatalf("not accepted: %+v", res)
			}
			if got := snap.Rules[0].ProxyProtocol; got != tc.want {
				t.Errorf("ProxyProtocol = %v, want %v", got, tc.want)
			}
		})
	}
	for p, want := range map[snapshot.ProxyProtocol]string{snapshot.ProxyNone: "None", snapshot.ProxyV1: "V1", snapshot.ProxyV2: "V2"} {
		if got := p.String(); got != want {
			t.Errorf("ProxyProtocol(%d).String() = %q, want %q", uint8(p), got, want)
		}
	}
}

func TestServicePool(t *testing.T) {
	const v4, v6, fqdn = discoveryv1.AddressTypeIPv4, discoveryv1.AddressTypeIPv6, discoveryv1.AddressTypeFQDN
	cases := []struct {
		name         string
		slices       []discoveryv1.EndpointSlice
		want         []snapshot.Backend
		total, ready int32
	}{
		{"no slices", nil, nil, 0, 0},
		{"nil conditions: ready, serving, not terminating", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.1", unset, unset, unset)),
		}, []snapshot.Backend{active("10.0.0.1")}, 1, 1},
		{"ready", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.1", yes, yes, no)),
		}, []snapshot.Backend{active("10.0.0.1")}, 1, 1},
		{"not ready, not terminating: left out but counted", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.1", yes, yes, no), ep("10.0.0.2", no, no, no), ep("10.0.0.3", no, unset, unset)),
		}, []snapshot.Backend{active("10.0.0.1")}, 3, 1},
		{"terminating endpoints drain while others are ready", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.1", yes, yes, no), ep("10.0.0.2", no, yes, yes), ep("10.0.0.3", no, no, yes)),
		}, []snapshot.Backend{active("10.0.0.1"), draining("10.0.0.2"), draining("10.0.0.3")}, 3, 1},
		{"nothing ready: serving terminating endpoints take flows", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.2", no, yes, yes), ep("10.0.0.3", no, no, yes), ep("10.0.0.4", no, no, no)),
		}, []snapshot.Backend{active("10.0.0.2"), draining("10.0.0.3")}, 3, 0},
		{"nil serving counts as serving", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.2", no, unset, yes)),
		}, []snapshot.Backend{active("10.0.0.2")}, 1, 0},
		{"ready and terminating (publishNotReadyAddresses) is ready", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.1", yes, yes, yes), ep("10.0.0.2", no, yes, yes)),
		}, []snapshot.Backend{active("10.0.0.1"), draining("10.0.0.2")}, 2, 1},
		{"nothing ready, nothing serving", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.3", no, no, yes), ep("10.0.0.4", no, no, no)),
		}, []snapshot.Backend{draining("10.0.0.3")}, 2, 0},
		{"IPv6 slice", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s6", v6, ep("fd00::1", yes, yes, no)),
			slice("ns", "app", "s4", v4, ep("10.0.0.1", unset, unset, unset)),
		}, []snapshot.Backend{active("10.0.0.1"), active("fd00::1")}, 2, 2},
		// "10.0.0.9" is a valid DNS name too; an FQDN slice still names no IP.
		{"FQDN slices ignored", []discoveryv1.EndpointSlice{
			slice("ns", "app", "sf", fqdn, ep("backend.example.com", yes, yes, no), ep("10.0.0.9", yes, yes, no)),
			slice("ns", "app", "s4", v4, ep("10.0.0.1", yes, yes, no)),
		}, []snapshot.Backend{active("10.0.0.1")}, 1, 1},
		{"IPv4-mapped IPv6 address is its IPv4 address", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s6", v6, ep("::ffff:10.0.0.1", yes, yes, no)),
			slice("ns", "app", "s4", v4, ep("10.0.0.1", no, no, yes)),
		}, []snapshot.Backend{active("10.0.0.1")}, 1, 1},
		{"first address of an endpoint", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, discoveryv1.Endpoint{Addresses: []string{"10.0.0.5", "10.0.0.6"}}),
		}, []snapshot.Backend{active("10.0.0.5")}, 1, 1},
		{"unusable endpoints skipped", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, discoveryv1.Endpoint{}, ep("not-an-ip", yes, yes, no), ep("10.0.0.1", yes, yes, no)),
		}, []snapshot.Backend{active("10.0.0.1")}, 1, 1},
		{"same address in two slices counts once, ready copy wins", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.1", no, no, yes), ep("10.0.0.2", yes, yes, no)),
			slice("ns", "app", "s2", v4, ep("10.0.0.1", yes, yes, no), ep("10.0.0.2", no, no, no)),
		}, []snapshot.Backend{active("10.0.0.1"), active("10.0.0.2")}, 2, 2},
		{"same address, terminating copies: serving one wins", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.1", no, no, yes)),
			slice("ns", "app", "s2", v4, ep("10.0.0.1", no, yes, yes)),
			slice("ns", "app", "s3", v4, ep("10.0.0.1", no, no, no)),
		}, []snapshot.Backend{active("10.0.0.1")}, 1, 0},
		{"other Services and namespaces ignored", []discoveryv1.EndpointSlice{
			slice("ns", "app", "s1", v4, ep("10.0.0.1", yes, yes, no)),
			slice("ns", "other", "s2", v4, ep("10.0.0.2", yes, yes, no)),
			slice("elsewhere", "app", "s3", v4, ep("10.0.0.3", yes, yes, no)),
			func() discoveryv1.EndpointSlice {
				s := slice("ns", "app", "unlabelled", v4, ep("10.0.0.4", yes, yes, no))
				s.Labels = nil
				return s
			}(),
		}, []snapshot.Backend{active("10.0.0.1")}, 1, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := Input{
				Rules:    []v1alpha1.LoadBalancerRule{lbr("ns", "r", 80, service("app"))},
				Services: []corev1.Service{svc("ns", "app"), svc("ns", "other"), svc("elsewhere", "app")},
				Slices:   tc.slices,
				Bind:     bind,
			}
			snap, results := translate(t, in)
			if len(snap.Rules) != 1 {
				t.Fatalf("%d rules", len(snap.Rules))
			}
			if got := snap.Rules[0].Backends; !reflect.DeepEqual(got, tc.want) {
				t.Errorf("backends\ngot  %v\nwant %v", got, tc.want)
			}
			want := Result{Accepted: true, ResolvedRefs: true, Total: tc.total, Ready: tc.ready}
			if got := results[types.NamespacedName{Namespace: "ns", Name: "r"}]; got != want {
				t.Errorf("result %+v, want %+v", got, want)
			}
		})
	}
}

func TestMissingService(t *testing.T) {
	in := Input{
		Rules: []v1alpha1.LoadBalancerRule{lbr("ns", "r", 80, service("gone"))},
		// Slices left behind by a deleted Service do not count.
		Slices:   []discoveryv1.EndpointSlice{slice("ns", "gone", "s1", discoveryv1.AddressTypeIPv4, ep("10.0.0.1", yes, yes, no))},
		Services: []corev1.Service{svc("other", "gone")},
		Bind:     bind,
	}
	snap, results := translate(t, in)
	if len(snap.Rules) != 1 || len(snap.Rules[0].Backends) != 0 || snap.Rules[0].Port != 80 {
		t.Fatalf("want the rule listening with no backends, got %+v", snap.Rules)
	}
	want := Result{Accepted: true, ResolvedRefs: false}
	if got := results[types.NamespacedName{Namespace: "ns", Name: "r"}]; got != want {
		t.Errorf("result %+v, want %+v", got, want)
	}
}

func TestListenerConflicts(t *testing.T) {
	type outcome struct {
		accepted     bool
		conflictWith string
	}
	ok := outcome{accepted: true}
	lost := func(to string) outcome { return outcome{conflictWith: to} }
	cases := []struct {
		name  string
		rules []v1alpha1.LoadBalancerRule
		want  map[string]outcome
	}{
		{"older rule wins, whatever the names", []v1alpha1.LoadBalancerRule{
			lbr("a", "first-by-name", 80, createdAfter(time.Hour)),
			lbr("z", "older", 80),
		}, map[string]outcome{"a/first-by-name": lost("z/older"), "z/older": ok}},
		{"same age: namespace decides before name", []v1alpha1.LoadBalancerRule{
			lbr("b", "a", 80),
			lbr("a", "z", 80),
		}, map[string]outcome{"a/z": ok, "b/a": lost("a/z")}},
		{"same age and namespace: name decides", []v1alpha1.LoadBalancerRule{
			lbr("ns", "web-2", 80),
			lbr("ns", "web-1", 80),
		}, map[string]outcome{"ns/web-1": ok, "ns/web-2": lost("ns/web-1")}},
		{"three on one port: the oldest wins, both others name it", []v1alpha1.LoadBalancerRule{
			lbr("ns", "c", 80, createdAfter(2*time.Minute)),
			lbr("ns", "a", 80, createdAfter(time.Minute)),
			lbr("ns", "b", 80, createdAfter(-time.Minute)),
		}, map[string]outcome{"ns/b": ok, "ns/a": lost("ns/b"), "ns/c": lost("ns/b")}},
		{"TCP and UDP on one port do not conflict", []v1alpha1.LoadBalancerRule{
			lbr("ns", "tcp", 53, protocol(v1alpha1.ProtocolTCP)),
			lbr("ns", "udp", 53, protocol(v1alpha1.ProtocolUDP)),
		}, map[string]outcome{"ns/tcp": ok, "ns/udp": ok}},
		{"older All beats a TCP rule", []v1alpha1.LoadBalancerRule{
			lbr("ns", "all", 53, protocol(v1alpha1.ProtocolAll)),
			lbr("ns", "tcp", 53, protocol(v1alpha1.ProtocolTCP), createdAfter(time.Second)),
		}, map[string]outcome{"ns/all": ok, "ns/tcp": lost("ns/all")}},
		{"All loses as a whole to an older UDP rule", []v1alpha1.LoadBalancerRule{
			lbr("ns", "udp", 53, protocol(v1alpha1.ProtocolUDP)),
			lbr("ns", "all", 53, protocol(v1alpha1.ProtocolAll), createdAfter(time.Second)),
		}, map[string]outcome{"ns/udp": ok, "ns/all": lost("ns/udp")}},
		// The All rule lost, so it holds nothing: the UDP rule is free.
		{"a loser claims no listener", []v1alpha1.LoadBalancerRule{
			lbr("ns", "tcp", 53, protocol(v1alpha1.ProtocolTCP)),
			lbr("ns", "all", 53, protocol(v1alpha1.ProtocolAll), createdAfter(time.Second)),
			lbr("ns", "udp", 53, protocol(v1alpha1.ProtocolUDP), createdAfter(2*time.Second)),
		}, map[string]outcome{"ns/tcp": ok, "ns/all": lost("ns/tcp"), "ns/udp": ok}},
		{"different ports do not conflict", []v1alpha1.LoadBalancerRule{
			lbr("ns", "a", 80), lbr("ns", "b", 81),
		}, map[string]outcome{"ns/a": ok, "ns/b": ok}},
		{"an invalid rule claims nothing", []v1alpha1.LoadBalancerRule{
			lbr("ns", "broken", 80, protocol("SCTP")),
			lbr("ns", "web", 80, createdAfter(time.Hour)),
		}, map[string]outcome{"ns/broken": {}, "ns/web": ok}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			snap, results := translate(t, Input{Rules: tc.rules, Bind: bind})
			var wantInSnapshot []string
			for name, want := range tc.want {
				ns, n, _ := strings.Cut(name, "/")
				got := results[types.NamespacedName{Namespace: ns, Name: n}]
				if got.Accepted != want.accepted || got.ConflictWith != want.conflictWith {
					t.Errorf("%s: accepted=%v conflictWith=%q, want accepted=%v conflictWith=%q", name, got.Accepted, got.ConflictWith, want.accepted, want.conflictWith)
				}
				if want.conflictWith != "" && (got.ConflictOn.Addr.Addr() != bind || got.ConflictOn.Addr.Port() != uint16(tc.rules[0].Spec.Frontend.Port)) {
					t.Errorf("%s: conflict on %v", name, got.ConflictOn)
				}
				if want.accepted {
					wantInSnapshot = append(wantInSnapshot, name)
				}
			}
			var inSnapshot []string
			for _, r := range snap.Rules {
				inSnapshot = append(inSnapshot, r.Name)
			}
			slices.Sort(wantInSnapshot)
			if !slices.Equal(inSnapshot, wantInSnapshot) {
				t.Errorf("snapshot has %v, want %v", inSnapshot, wantInSnapshot)
			}
		})
	}
}

func TestConflictNamesTheListener(t *testing.T) {
	_, results := translate(t, Input{Bind: bind, Rules: []v1alpha1.LoadBalancerRule{
		lbr("ns", "udp", 53, protocol(v1alpha1.ProtocolUDP)),
		lbr("ns", "all", 53, protocol(v1alpha1.ProtocolAll), createdAfter(time.Second)),
	}})
	got := results[types.NamespacedName{Namespace: "ns", Name: "all"}].ConflictOn.String()
	if got != "UDP/10.244.0.7:53" {
		t.Errorf("conflict on %s, want UDP/10.244.0.7:53", got)
	}
}

func TestInvalidSpecs(t *testing.T) {
	cases := []struct {
		name string
		opt  func(*v1alpha1.LoadBalancerRule)
		want string
	}{
		{"port 0", func(r *v1alpha1.LoadBalancerRule) { r.Spec.Frontend.Port = 0 }, "spec.frontend.port"},
		{"port too high", func(r *v1alpha1.LoadBalancerRule) { r.Spec.Frontend.Port = 70000 }, "spec.frontend.port"},
		{"backend port 0", func(r *v1alpha1.LoadBalancerRule) { r.Spec.BackendPort = 0 }, "spec.backendPort"},
		{"unknown protocol", protocol("SCTP"), "spec.protocol"},
		{"unknown persistence", func(r *v1alpha1.LoadBalancerRule) { r.Spec.SessionPersistence = "Sticky" }, "spec.sessionPersistence"},
		{"pin timeout with None", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.SessionPersistenceTimeoutInMinutes = ptr(int32(30))
		}, "spec.sessionPersistenceTimeoutInMinutes"},
		{"pin timeout negative", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.SessionPersistence = v1alpha1.SessionPersistenceClientIP
			r.Spec.SessionPersistenceTimeoutInMinutes = ptr(int32(-1))
		}, "spec.sessionPersistenceTimeoutInMinutes"},
		{"pin timeout over a day", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.SessionPersistence = v1alpha1.SessionPersistenceClientIP
			r.Spec.SessionPersistenceTimeoutInMinutes = ptr(int32(1441))
		}, "spec.sessionPersistenceTimeoutInMinutes"},
		{"proxy protocol V2 with UDP", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.Protocol = v1alpha1.ProtocolUDP
			r.Spec.ProxyProtocol = v1alpha1.ProxyProtocolV2
		}, "spec.proxyProtocol"},
		{"proxy protocol V1 with UDP", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.Protocol = v1alpha1.ProtocolUDP
			r.Spec.ProxyProtocol = v1alpha1.ProxyProtocolV1
		}, "spec.proxyProtocol"},
		{"unknown proxy protocol", func(r *v1alpha1.LoadBalancerRule) { r.Spec.ProxyProtocol = "V3" }, "spec.proxyProtocol"},
		{"both pools", func(r *v1alpha1.LoadBalancerRule) { r.Spec.BackendPool.ServiceName = "app" }, "spec.backendPool"},
		{"no pool", func(r *v1alpha1.LoadBalancerRule) { r.Spec.BackendPool = v1alpha1.BackendPool{} }, "spec.backendPool"},
		{"bad address", func(r *v1alpha1.LoadBalancerRule) { r.Spec.BackendPool.Addresses = []string{"10.0.0.1", "nope"} }, "spec.backendPool.addresses[1]"},
		{"bad probe protocol", func(r *v1alpha1.LoadBalancerRule) { r.Spec.Probe = &v1alpha1.Probe{Protocol: "ICMP"} }, "spec.probe.protocol"},
		{"bad probe port", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.Probe = &v1alpha1.Probe{Protocol: v1alpha1.ProbeProtocolTCP, Port: ptr(v1alpha1.PortNumber(0))}
		}, "spec.probe.port"},
		{"HTTP probe without path", func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.Probe = &v1alpha1.Probe{Protocol: v1alpha1.ProbeProtocolHTTP}
		}, "spec.probe.requestPath"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			snap, results := translate(t, Input{Rules: []v1alpha1.LoadBalancerRule{lbr("ns", "r", 80, tc.opt)}, Bind: bind})
			if len(snap.Rules) != 0 {
				t.Errorf("invalid rule served: %+v", snap.Rules)
			}
			res := results[types.NamespacedName{Namespace: "ns", Name: "r"}]
			if res.Accepted || !strings.HasPrefix(res.Invalid, tc.want+":") {
				t.Errorf("result %+v, want not accepted, Invalid naming %s", res, tc.want)
			}
		})
	}
}

// TestDeterministic shuffles every input list (and the endpoints in each
// slice): the output must not change.
func TestDeterministic(t *testing.T) {
	var in Input
	in.Bind, in.Version = bind, 9
	for i := range 40 {
		ns := fmt.Sprintf("ns-%d", i%3)
		opts := []func(*v1alpha1.LoadBalancerRule){createdAfter(time.Duration(i%4) * time.Minute)}
		switch i % 5 {
		case 0:
			opts = append(opts, protocol(v1alpha1.ProtocolAll))
		case 1:
			opts = append(opts, protocol(v1alpha1.ProtocolUDP))
		}
		if i%2 == 0 {
			opts = append(opts, service(fmt.Sprintf("svc-%d", i%7)))
		}
		in.Rules = append(in.Rules, lbr(ns, fmt.Sprintf("rule-%d", i), int32(8000+i%6), opts...))
	}
	states := []cond{unset, yes, no}
	for s := range 7 {
		for _, ns := range []string{"ns-0", "ns-1", "ns-2"} {
			if s != 3 {
				in.Services = append(in.Services, svc(ns, fmt.Sprintf("svc-%d", s)))
			}
			for part := range 3 {
				var eps []discoveryv1.Endpoint
				for e := range 6 {
					addr := fmt.Sprintf("10.%d.0.%d", s, (e*7+part)%9+1) // overlaps across slices
					eps = append(eps, ep(addr, states[(e+part)%3], states[(e*2+s)%3], states[(e+s+part)%3]))
				}
				in.Slices = append(in.Slices, slice(ns, fmt.Sprintf("svc-%d", s), fmt.Sprintf("svc-%d-%d", s, part), discoveryv1.AddressTypeIPv4, eps...))
			}
		}
	}
	wantSnap, wantResults := translate(t, in)
	accepted := 0
	for _, r := range wantResults {
		if r.Accepted {
			accepted++
		}
	}
	if accepted < 10 || accepted == len(in.Rules) {
		t.Fatalf("the input should mix accepted and conflicting rules; %d of %d accepted", accepted, len(in.Rules))
	}

	rng := rand.New(rand.NewPCG(1, 2))
	for range 50 {
		shuffled := Input{Bind: in.Bind, Version: in.Version}
		shuffled.Rules = slices.Clone(in.Rules)
		shuffled.Services = slices.Clone(in.Services)
		shuffled.Slices = slices.Clone(in.Slices)
		rng.Shuffle(len(shuffled.Rules), func(i, j int) { shuffled.Rules[i], shuffled.Rules[j] = shuffled.Rules[j], shuffled.Rules[i] })
		rng.Shuffle(len(shuffled.Services), func(i, j int) {
			shuffled.Services[i], shuffled.Services[j] = shuffled.Services[j], shuffled.Services[i]
		})
		rng.Shuffle(len(shuffled.Slices), func(i, j int) { shuffled.Slices[i], shuffled.Slices[j] = shuffled.Slices[j], shuffled.Slices[i] })
		for i := range shuffled.Slices {
			eps := slices.Clone(shuffled.Slices[i].Endpoints)
			rng.Shuffle(len(eps), func(a, b int) { eps[a], eps[b] = eps[b], eps[a] })
			shuffled.Slices[i].Endpoints = eps
		}
		snap, results := translate(t, shuffled)
		if !reflect.DeepEqual(snap, wantSnap) {
			t.Fatalf("snapshot depends on input order")
		}
		if !reflect.DeepEqual(results, wantResults) {
			t.Fatalf("results depend on input order")
		}
	}
}

func TestDoesNotModifyInput(t *testing.T) {
	rules := []v1alpha1.LoadBalancerRule{lbr("ns", "b", 80), lbr("ns", "a", 80)}
	before := []v1alpha1.LoadBalancerRule{*rules[0].DeepCopy(), *rules[1].DeepCopy()}
	translate(t, Input{Rules: rules, Bind: bind})
	if !reflect.DeepEqual(rules, before) {
		t.Error("Translate reordered or changed its input")
	}
}

func TestPanicsWithoutBindAddress(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("no panic")
		}
	}()
	Translate(Input{})
}
