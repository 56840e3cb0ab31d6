package translate

import (
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/dataplane/rulesfile"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

var loopback = netip.MustParseAddr("127.0.0.1")

func TestFromRules(t *testing.T) {
	cases := []struct {
		name    string
		rules   []v1alpha1.LoadBalancerRule
		bind    netip.Addr
		wantErr []string // each must appear; none means success
	}{
		{"IP pools", []v1alpha1.LoadBalancerRule{
			lbr("default", "a", 80), lbr("default", "b", 81, protocol(v1alpha1.ProtocolAll)),
		}, loopback, nil},
		{"no rules", nil, loopback, nil},
		{"Service pool", []v1alpha1.LoadBalancerRule{lbr("default", "web", 80, service("web"))}, loopback,
			[]string{`rule default/web: spec.backendPool.serviceName: Invalid value: "web"`}},
		{"conflicting ports name both rules", []v1alpha1.LoadBalancerRule{
			lbr("default", "dns", 53, protocol(v1alpha1.ProtocolAll)),
			lbr("default", "dns-udp", 53, protocol(v1alpha1.ProtocolUDP), createdAfter(time.Second)),
		}, loopback, []string{"rules default/dns and default/dns-udp both listen on UDP/127.0.0.1:53"}},
		{"every conflict reported", []v1alpha1.LoadBalancerRule{
			lbr("default", "a", 80), lbr("default", "b", 80), lbr("default", "c", 80),
		}, loopback, []string{"rules default/a and default/b both", "rules default/a and default/c both"}},
		{"same rule twice", []v1alpha1.LoadBalancerRule{lbr("default", "a", 80), lbr("default", "a", 81)}, loopback,
			[]string{"rule default/a is defined twice"}},
		{"invalid spec", []v1alpha1.LoadBalancerRule{lbr("default", "a", 0)}, loopback, []string{"rule default/a: spec.frontend.port"}},
		// Built in code, so not checked by the schema's CEL rule.
		{"proxy protocol with UDP", []v1alpha1.LoadBalancerRule{lbr("default", "a", 53, protocol(v1alpha1.ProtocolUDP), func(r *v1alpha1.LoadBalancerRule) {
			r.Spec.ProxyProtocol = v1alpha1.ProxyProtocolV2
		})}, loopback, []string{`rule default/a: spec.proxyProtocol: Invalid value: "V2": applies to TCP flows and must be None when spec.protocol is UDP`}},
		{"no bind address", []v1alpha1.LoadBalancerRule{lbr("default", "a", 80)}, netip.Addr{}, []string{"bind address"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			snap, err := FromRules(tc.rules, tc.bind, 3)
			if len(tc.wantErr) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				if snap.Version != 3 || len(snap.Rules) != len(tc.rules) || snap.Validate() != nil {
					t.Fatalf("snapshot %+v", snap)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted: %+v", snap)
			}
			if !reflect.DeepEqual(snap, snapshot.Snapshot{}) {
				t.Errorf("a snapshot came with the error: %+v", snap)
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not mention %q:\n%v", w, err)
				}
			}
		})
	}
}

// TestRulesFile goes from a file to a Snapshot as `stickylb proxy --rules`
// does.
func TestRulesFile(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "..", "config", "samples", "dns-all-ip-pool.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	rules, err := rulesfile.Parse("dns.yaml", data)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := FromRules(rules, loopback, 1)
	if err != nil {
		t.Fatal(err)
	}
	at := func(a string) snapshot.Backend {
		return snapshot.Backend{Addr: netip.AddrPortFrom(netip.MustParseAddr(a), 53)}
	}
	want := snapshot.Rule{
		Name: "default/dns", Generation: 1, Frontend: "default/dns", Bind: loopback, Port: 53,
		Protocols:   []snapshot.Protocol{snapshot.TCP, snapshot.UDP},
		Persistence: snapshot.PersistenceClientIP,
		PinTimeout:  180 * time.Minute, // unset in the sample: the default
		IdleTimeout: 4 * time.Minute,
		Probe:       &snapshot.Probe{Protocol: snapshot.ProbeTCP, Port: 53, Interval: 5 * time.Second, Threshold: 1},
		AllProbedUp: true,
		Backends:    []snapshot.Backend{at("10.20.0.10"), at("10.20.0.11"), at("fd00:20::12")},

		ProxyProtocol: snapshot.ProxyNone, // defaulted by the file's schema
	}
	if len(snap.Rules) != 1 || !reflect.DeepEqual(snap.Rules[0], want) {
		t.Fatalf("got  %+v\nwant %+v", snap.Rules, want)
	}

	// With proxyProtocol V2 the All rule keeps it: its TCP flows carry the header.
	v2 := strings.Replace(string(data), "protocol: All\n", "protocol: All\n  proxyProtocol: V2\n", 1)
	rules, err = rulesfile.Parse("dns.yaml", []byte(v2))
	if err != nil {
		t.Fatal(err)
	}
	if snap, err = FromRules(rules, loopback, 1); err != nil {
		t.Fatal(err)
	}
	want.ProxyProtocol = snapshot.ProxyV2
	if len(snap.Rules) != 1 || !reflect.DeepEqual(snap.Rules[0], want) {
		t.Fatalf("proxyProtocol V2: got  %+v\nwant %+v", snap.Rules, want)
	}

	// A second rule on UDP 53 is valid on its own, but not next to dns.
	clash := string(data) + "---\n" + strings.NewReplacer("name: dns\n", "name: dns-udp\n", "protocol: All", "protocol: UDP").Replace(string(data))
	rules, err = rulesfile.Parse("dns.yaml", []byte(clash))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := FromRules(rules, loopback, 2); err == nil || !strings.Contains(err.Error(), "default/dns and default/dns-udp") {
		t.Errorf("conflicting rules file: %v", err)
	}
}
