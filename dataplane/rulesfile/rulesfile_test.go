package rulesfile

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/equality"
	"sigs.k8s.io/yaml"

	"github.com/stickylb/stickylb/api/v1alpha1"
)

// baseRule is the complete rule every malformed case starts from (the same
// one api/v1alpha1/validation_test.go sends to a real API server).
func baseRule() map[string]any {
	return map[string]any{
		"apiVersion": "lb.stickylb.io/v1alpha1",
		"kind":       "LoadBalancerRule",
		"metadata":   map[string]any{"name": "bad"},
		"spec": map[string]any{
			"frontend":           map[string]any{"name": "web", "port": 80, "serviceType": "ClusterIP"},
			"backendPool":        map[string]any{"serviceName": "web"},
			"backendPort":        8080,
			"protocol":           "TCP",
			"sessionPersistence": "ClientIP",
			"probe": map[string]any{
				"protocol": "HTTP", "port": 8080, "requestPath": "/healthz",
				"intervalInSeconds": 5, "probeThreshold": 2,
			},
		},
	}
}

// setSpec writes v at a dotted path under spec, making maps on the way; nil
// deletes the field.
func setSpec(obj map[string]any, path string, v any) {
	m := obj["spec"].(map[string]any)
	keys := strings.Split(path, ".")
	for _, k := range keys[:len(keys)-1] {
		next, ok := m[k].(map[string]any)
		if !ok {
			next = map[string]any{}
			m[k] = next
		}
		m = next
	}
	last := keys[len(keys)-1]
	if v == nil {
		delete(m, last)
		return
	}
	m[last] = v
}

func toYAML(t testing.TB, docs ...map[string]any) []byte {
	t.Helper()
	var b strings.Builder
	for _, d := range docs {
		y, err := yaml.Marshal(d)
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString("---\n")
		b.Write(y)
	}
	return []byte(b.String())
}

func addresses(n int) []any {
	out := make([]any, n)
	for i := range out {
		out[i] = fmt.Sprintf("10.1.%d.%d", i/250, i%250+1)
	}
	return out
}

type ruleCase struct {
	name   string
	mutate func(map[string]any)
	want   []string // each must appear in the error; none for a valid rule
}

// malformedCases are the malformed rules of the API tests
// (api/v1alpha1/validation_test.go), with what the API server says.
func malformedCases() []ruleCase {
	ipPool := func(addrs ...any) func(map[string]any) {
		return func(r map[string]any) {
			setSpec(r, "backendPool.serviceName", nil)
			setSpec(r, "backendPool.addresses", addrs)
		}
	}
	long := strings.Repeat("a", 64)
	return []ruleCase{
		{"frontend missing", func(r map[string]any) { setSpec(r, "frontend", nil) }, []string{"spec.frontend: Required value"}},
		{"frontend port missing", func(r map[string]any) { setSpec(r, "frontend.port", nil) }, []string{"spec.frontend.port: Required value"}},
		{"frontend port 0", func(r map[string]any) { setSpec(r, "frontend.port", 0) }, []string{"spec.frontend.port: Invalid value: 0: spec.frontend.port in body should be greater than or equal to 1"}},
		{"frontend port negative", func(r map[string]any) { setSpec(r, "frontend.port", -80) }, []string{"spec.frontend.port", "greater than or equal to 1"}},
		{"frontend port 65536", func(r map[string]any) { setSpec(r, "frontend.port", 65536) }, []string{"spec.frontend.port", "less than or equal to 65535"}},
		{"frontend port string", func(r map[string]any) { setSpec(r, "frontend.port", "http") }, []string{"spec.frontend.port", "must be of type integer"}},
		{"frontend name empty", func(r map[string]any) { setSpec(r, "frontend.name", "") }, []string{"spec.frontend.name"}},
		{"frontend name uppercase", func(r map[string]any) { setSpec(r, "frontend.name", "Public") }, []string{"spec.frontend.name", "should match"}},
		{"frontend name too long", func(r map[string]any) { setSpec(r, "frontend.name", long[:51]) }, []string{"spec.frontend.name", "Too long"}},
		{"frontend serviceType ExternalName", func(r map[string]any) { setSpec(r, "frontend.serviceType", "ExternalName") }, []string{"spec.frontend.serviceType", "Unsupported value"}},
		{"frontend unknown field", func(r map[string]any) { setSpec(r, "frontend.ip", "10.0.0.1") }, []string{`unknown field "spec.frontend.ip"`}},
		{"backendPool missing", func(r map[string]any) { setSpec(r, "backendPool", nil) }, []string{"spec.backendPool: Required value"}},
		{"backendPool empty", func(r map[string]any) { setSpec(r, "backendPool.serviceName", nil) }, []string{"spec.backendPool", "exactly one of spec.backendPool.serviceName or spec.backendPool.addresses"}},
		{"backendPool both kinds", func(r map[string]any) { setSpec(r, "backendPool.addresses", []any{"10.0.0.1"}) }, []string{"spec.backendPool", "exactly one of spec.backendPool.serviceName or spec.backendPool.addresses"}},
		{"serviceName underscore", func(r map[string]any) { setSpec(r, "backendPool.serviceName", "web_svc") }, []string{"spec.backendPool.serviceName", "should match"}},
		{"serviceName too long", func(r map[string]any) { setSpec(r, "backendPool.serviceName", long) }, []string{"spec.backendPool.serviceName", "Too long"}},
		{"addresses empty", ipPool(), []string{"spec.backendPool.addresses"}},
		{"address not an IP", ipPool("backend-1"), []string{"spec.backendPool.addresses[0]", "unicast IPv4 or IPv6 address"}},
		{"address octet 256", ipPool("10.0.0.1", "10.0.0.256"), []string{"spec.backendPool.addresses[1]", "unicast IPv4 or IPv6 address"}},
		{"address CIDR", ipPool("10.0.0.0/24"), []string{"spec.backendPool.addresses[0]"}},
		{"address leading zero", ipPool("010.0.0.1"), []string{"spec.backendPool.addresses[0]"}},
		{"address IPv6 not canonical", ipPool("FD00:0:0::1"), []string{"spec.backendPool.addresses[0]", "canonical form"}},
		{"address unspecified", ipPool("0.0.0.0"), []string{"spec.backendPool.addresses[0]"}},
		{"address multicast", ipPool("224.0.0.5"), []string{"spec.backendPool.addresses[0]"}},
		{"address too long", ipPool(long[:46]), []string{"spec.backendPool.addresses[0]", "Too long"}},
		{"address duplicate", ipPool("10.0.0.1", "10.0.0.2", "10.0.0.1"), []string{`spec.backendPool.addresses[2]: Duplicate value: "10.0.0.1"`}},
		{"addresses over 1000", ipPool(addresses(1001)...), []string{"spec.backendPool.addresses", "Too many"}},
		{"backendPort missing", func(r map[string]any) { setSpec(r, "backendPort", nil) }, []string{"spec.backendPort: Required value"}},
		{"backendPort 0", func(r map[string]any) { setSpec(r, "backendPort", 0) }, []string{"spec.backendPort", "greater than or equal to 1"}},
		{"backendPort 70000", func(r map[string]any) { setSpec(r, "backendPort", 70000) }, []string{"spec.backendPort", "less than or equal to 65535"}},
		{"protocol SCTP", func(r map[string]any) { setSpec(r, "protocol", "SCTP") }, []string{"spec.protocol", "Unsupported value"}},
		{"protocol lowercase", func(r map[string]any) { setSpec(r, "protocol", "tcp") }, []string{"spec.protocol", "Unsupported value"}},
		{"sessionPersistence SourceIP", func(r map[string]any) { setSpec(r, "sessionPersistence", "SourceIP") }, []string{"spec.sessionPersistence", "Unsupported value"}},
		{"persistence timeout with None", func(r map[string]any) {
			setSpec(r, "sessionPersistence", "None")
			setSpec(r, "sessionPersistenceTimeoutInMinutes", 5)
		}, []string{"spec.sessionPersistenceTimeoutInMinutes: Invalid value: spec.sessionPersistenceTimeoutInMinutes applies to ClientIP and ClientIPProtocol and must be unset or 0 when spec.sessionPersistence is None"}},
		{"persistence timeout with None by default", func(r map[string]any) {
			setSpec(r, "sessionPersistence", nil)
			setSpec(r, "sessionPersistenceTimeoutInMinutes", 30)
		}, []string{"spec.sessionPersistenceTimeoutInMinutes", "must be unset or 0 when spec.sessionPersistence is None"}},
		{"persistence timeout 1441", func(r map[string]any) { setSpec(r, "sessionPersistenceTimeoutInMinutes", 1441) }, []string{"spec.sessionPersistenceTimeoutInMinutes", "less than or equal to 1440"}},
		{"persistence timeout negative", func(r map[string]any) { setSpec(r, "sessionPersistenceTimeoutInMinutes", -1) }, []string{"spec.sessionPersistenceTimeoutInMinutes", "greater than or equal to 0"}},
		{"persistence timeout string", func(r map[string]any) { setSpec(r, "sessionPersistenceTimeoutInMinutes", "3h") }, []string{"spec.sessionPersistenceTimeoutInMinutes", "must be of type integer"}},
		{"idle timeout 3", func(r map[string]any) { setSpec(r, "idleTimeoutInMinutes", 3) }, []string{"spec.idleTimeoutInMinutes", "greater than or equal to 4"}},
		{"idle timeout 101", func(r map[string]any) { setSpec(r, "idleTimeoutInMinutes", 101) }, []string{"spec.idleTimeoutInMinutes", "less than or equal to 100"}},
		{"enableTcpReset not a bool", func(r map[string]any) { setSpec(r, "enableTcpReset", "yes") }, []string{"spec.enableTcpReset", "must be of type boolean"}},
		{"enableTcpReset with UDP", func(r map[string]any) {
			setSpec(r, "protocol", "UDP")
			setSpec(r, "enableTcpReset", true)
		}, []string{"spec.enableTcpReset", "cannot be true when spec.protocol is UDP"}},
		{"proxyProtocol V2 with UDP", func(r map[string]any) {
			setSpec(r, "protocol", "UDP")
			setSpec(r, "proxyProtocol", "V2")
		}, []string{"spec.proxyProtocol: Invalid value: spec.proxyProtocol applies to TCP flows and must be None when spec.protocol is UDP"}},
		{"proxyProtocol V1 with UDP", func(r map[string]any) {
			setSpec(r, "protocol", "UDP")
			setSpec(r, "proxyProtocol", "V1")
		}, []string{"spec.proxyProtocol", "must be None when spec.protocol is UDP"}},
		{"proxyProtocol V3", func(r map[string]any) { setSpec(r, "proxyProtocol", "V3") }, []string{"spec.proxyProtocol", "Unsupported value", `"V3"`}},
		{"proxyProtocol lowercase", func(r map[string]any) { setSpec(r, "proxyProtocol", "v2") }, []string{"spec.proxyProtocol", "Unsupported value"}},
		{"proxyProtocol empty", func(r map[string]any) { setSpec(r, "proxyProtocol", "") }, []string{"spec.proxyProtocol", "Unsupported value"}},
		{"proxyProtocol not a string", func(r map[string]any) { setSpec(r, "proxyProtocol", 2) }, []string{"spec.proxyProtocol", "must be of type string"}},
		{"probe protocol missing", func(r map[string]any) { setSpec(r, "probe.protocol", nil) }, []string{"spec.probe.protocol: Required value"}},
		{"probe protocol UDP", func(r map[string]any) { setSpec(r, "probe.protocol", "UDP") }, []string{"spec.probe.protocol", "Unsupported value"}},
		{"HTTP probe without path", func(r map[string]any) { setSpec(r, "probe.requestPath", nil) }, []string{"spec.probe.requestPath", "required when spec.probe.protocol is HTTP or HTTPS"}},
		{"TCP probe with path", func(r map[string]any) { setSpec(r, "probe.protocol", "TCP") }, []string{"spec.probe.requestPath", "must not be set when spec.probe.protocol is TCP"}},
		{"probe path without slash", func(r map[string]any) { setSpec(r, "probe.requestPath", "healthz") }, []string{"spec.probe.requestPath", "should match"}},
		{"probe path with space", func(r map[string]any) { setSpec(r, "probe.requestPath", "/health z") }, []string{"spec.probe.requestPath"}},
		{"probe port 0", func(r map[string]any) { setSpec(r, "probe.port", 0) }, []string{"spec.probe.port"}},
		{"probe interval 4", func(r map[string]any) { setSpec(r, "probe.intervalInSeconds", 4) }, []string{"spec.probe.intervalInSeconds", "greater than or equal to 5"}},
		{"probe threshold 0", func(r map[string]any) { setSpec(r, "probe.probeThreshold", 0) }, []string{"spec.probe.probeThreshold", "greater than or equal to 1"}},
		{"noHealthyBackendsBehavior unknown", func(r map[string]any) { setSpec(r, "noHealthyBackendsBehavior", "DropAll") }, []string{"spec.noHealthyBackendsBehavior", "Unsupported value"}},
		{"unknown spec field", func(r map[string]any) { setSpec(r, "loadDistribution", "SourceIP") }, []string{`unknown field "spec.loadDistribution"`}},
	}
}

// validCases are edge cases the API server accepts.
func validCases() []ruleCase {
	return []ruleCase{
		{"base", func(map[string]any) {}, nil},
		{"lowest ports", func(r map[string]any) {
			setSpec(r, "frontend.port", 1)
			setSpec(r, "backendPort", 1)
			setSpec(r, "probe.port", 1)
		}, nil},
		{"highest ports", func(r map[string]any) {
			setSpec(r, "frontend.port", 65535)
			setSpec(r, "backendPort", 65535)
			setSpec(r, "probe.port", 65535)
		}, nil},
		{"1000 addresses", func(r map[string]any) { setSpec(r, "backendPool", map[string]any{"addresses": addresses(1000)}) }, nil},
		{"mixed IPv4 and IPv6", func(r map[string]any) {
			setSpec(r, "backendPool", map[string]any{"addresses": []any{"10.0.0.1", "fd00::1", "::1"}})
		}, nil},
		{"All with reset", func(r map[string]any) { setSpec(r, "protocol", "All"); setSpec(r, "enableTcpReset", true) }, nil},
		{"TCP probe, defaults", func(r map[string]any) { setSpec(r, "probe", map[string]any{"protocol": "TCP"}) }, nil},
		{"no probe, defaults", func(r map[string]any) {
			r["spec"] = map[string]any{"frontend": map[string]any{"port": 9}, "backendPool": map[string]any{"serviceName": "s"}, "backendPort": 9}
		}, nil},
		{"probe path with query", func(r map[string]any) { setSpec(r, "probe.requestPath", "/health?full=1") }, nil},
		{"ClientIP, persistence timeout unset", func(r map[string]any) { setSpec(r, "sessionPersistenceTimeoutInMinutes", nil) }, nil},
		{"ClientIP, persistence timeout bounds low", func(r map[string]any) { setSpec(r, "sessionPersistenceTimeoutInMinutes", 0) }, nil},
		{"ClientIP, persistence timeout bounds high", func(r map[string]any) { setSpec(r, "sessionPersistenceTimeoutInMinutes", 1440) }, nil},
		{"ClientIPProtocol, persistence timeout 0", func(r map[string]any) {
			setSpec(r, "sessionPersistence", "ClientIPProtocol")
			setSpec(r, "sessionPersistenceTimeoutInMinutes", 0)
		}, nil},
		{"None, persistence timeout 0", func(r map[string]any) {
			setSpec(r, "sessionPersistence", "None")
			setSpec(r, "sessionPersistenceTimeoutInMinutes", 0)
		}, nil},
		{"None, persistence timeout unset", func(r map[string]any) { setSpec(r, "sessionPersistence", "None") }, nil},
		{"All, proxyProtocol V2", func(r map[string]any) {
			setSpec(r, "protocol", "All")
			setSpec(r, "proxyProtocol", "V2")
		}, nil},
		{"TCP, proxyProtocol V1", func(r map[string]any) { setSpec(r, "proxyProtocol", "V1") }, nil},
		{"TCP, proxyProtocol V2, TCP probe", func(r map[string]any) {
			setSpec(r, "proxyProtocol", "V2")
			setSpec(r, "probe", map[string]any{"protocol": "TCP"})
		}, nil},
		{"UDP, proxyProtocol None", func(r map[string]any) {
			setSpec(r, "protocol", "UDP")
			setSpec(r, "proxyProtocol", "None")
		}, nil},
		{"UDP, proxyProtocol unset", func(r map[string]any) { setSpec(r, "protocol", "UDP") }, nil},
		{"UDP, ClientIPProtocol, AllProbedUp", func(r map[string]any) {
			setSpec(r, "protocol", "UDP")
			setSpec(r, "sessionPersistence", "ClientIPProtocol")
			setSpec(r, "noHealthyBackendsBehavior", "AllProbedUp")
		}, nil},
	}
}

// TestRejectsWhatTheAPIServerRejects runs the malformed cases of the API
// tests through Parse: the same fields and messages must come out.
func TestRejectsWhatTheAPIServerRejects(t *testing.T) {
	cases := malformedCases()
	if len(cases) < 40 {
		t.Fatalf("only %d cases", len(cases))
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := baseRule()
			tc.mutate(r)
			rules, err := Parse("rules.yaml", toYAML(t, r))
			if err == nil {
				t.Fatalf("accepted %+v; want an error mentioning %q", rules, tc.want)
			}
			if rules != nil {
				t.Errorf("returned rules with an error: %+v", rules)
			}
			for _, line := range strings.Split(err.Error(), "\n") {
				if !strings.HasPrefix(line, "rules.yaml: document 1 (bad): ") {
					t.Errorf("error line does not name the file, document and rule: %q", line)
				}
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not mention %q:\n%v", w, err)
				}
			}
		})
	}
}

func TestAcceptsTheBaseRuleAndItsEdges(t *testing.T) {
	for _, tc := range validCases() {
		t.Run(tc.name, func(t *testing.T) {
			r := baseRule()
			tc.mutate(r)
			rules, err := Parse("rules.yaml", toYAML(t, r))
			if err != nil {
				t.Fatal(err)
			}
			if len(rules) != 1 || rules[0].Name != "bad" {
				t.Fatalf("got %+v", rules)
			}
		})
	}
}

func TestExactMessage(t *testing.T) {
	good, bad := baseRule(), baseRule()
	good["metadata"] = map[string]any{"name": "api"}
	bad["metadata"] = map[string]any{"name": "web"}
	setSpec(bad, "frontend.port", 0)
	_, err := Parse("rules.yaml", toYAML(t, good, bad))
	want := "rules.yaml: document 2 (web): spec.frontend.port: Invalid value: 0: spec.frontend.port in body should be greater than or equal to 1"
	if err == nil || err.Error() != want {
		t.Fatalf("got  %v\nwant %s", err, want)
	}
}

// TestProxyProtocolWithUDPMessage: a UDP rule asking for a PROXY protocol
// header is refused with the CRD's message, which names the field.
func TestProxyProtocolWithUDPMessage(t *testing.T) {
	for _, v := range []string{"V1", "V2"} {
		r := baseRule()
		r["metadata"] = map[string]any{"name": "game"}
		setSpec(r, "protocol", "UDP")
		setSpec(r, "proxyProtocol", v)
		_, err := Parse("rules.yaml", toYAML(t, r))
		want := "rules.yaml: document 1 (game): spec.proxyProtocol: Invalid value: spec.proxyProtocol applies to TCP flows and must be None when spec.protocol is UDP"
		if err == nil || err.Error() != want {
			t.Errorf("%s: got  %v\nwant %s", v, err, want)
		}
	}
}

func TestParsesTheSamples(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("..", "..", "config", "samples", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]func(t *testing.T, r v1alpha1.LoadBalancerRule){
		"web-clientip-http-probe.yaml": func(t *testing.T, r v1alpha1.LoadBalancerRule) {
			if r.Name != "web" || r.Spec.Frontend.Port != 80 || r.Spec.BackendPool.ServiceName != "web" || !r.Spec.EnableTcpReset ||
				r.Spec.IdleTimeoutInMinutes != 15 || r.Spec.Probe.RequestPath != "/healthz" || r.Spec.Probe.ProbeThreshold != 2 ||
				r.Spec.SessionPersistenceTimeoutInMinutes == nil || *r.Spec.SessionPersistenceTimeoutInMinutes != 180 {
				t.Errorf("web sample read as %+v", r)
			}
		},
		"game-udp-clientipprotocol.yaml": func(t *testing.T, r v1alpha1.LoadBalancerRule) {
			if r.Name != "game" || r.Spec.Protocol != v1alpha1.ProtocolUDP || r.Spec.SessionPersistence != v1alpha1.SessionPersistenceClientIPProtocol ||
				*r.Spec.Probe.Port != 7778 || r.Spec.Frontend.ServiceType != v1alpha1.ServiceTypeNodePort {
				t.Errorf("game sample read as %+v", r)
			}
		},
		"dns-all-ip-pool.yaml": func(t *testing.T, r v1alpha1.LoadBalancerRule) {
			if r.Name != "dns" || r.Spec.Protocol != v1alpha1.ProtocolAll || len(r.Spec.BackendPool.Addresses) != 3 ||
				r.Spec.NoHealthyBackendsBehavior != v1alpha1.AllProbedUp || r.Spec.Probe.ProbeThreshold != 1 {
				t.Errorf("dns sample read as %+v", r)
			}
		},
	}
	var all []byte
	for _, f := range files {
		base := filepath.Base(f)
		if base == "kustomization.yaml" {
			continue
		}
		check, ok := want[base]
		if !ok {
			t.Errorf("new sample %s: add what it should read as", base)
			continue
		}
		delete(want, base)
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		rules, err := Parse(base, data)
		if err != nil {
			t.Fatalf("sample rejected: %v", err)
		}
		if len(rules) != 1 {
			t.Fatalf("%s: %d rules", base, len(rules))
		}
		if rules[0].Namespace != "default" {
			t.Errorf("%s: namespace %q, want default", base, rules[0].Namespace)
		}
		check(t, rules[0])
		all = append(append(all, "---\n"...), data...)
	}
	for base := range want {
		t.Errorf("sample %s not found", base)
	}
	// All samples in one file: three documents.
	rules, err := Parse("samples.yaml", all)
	if err != nil || len(rules) != 3 {
		t.Fatalf("samples together: %d rules, %v", len(rules), err)
	}
}

func TestAppliesDefaults(t *testing.T) {
	rules, err := Parse("rules.yaml", []byte(`
apiVersion: lb.stickylb.io/v1alpha1
kind: LoadBalancerRule
metadata:
  name: minimal
spec:
  frontend:
    port: 443
  backendPool:
    addresses: [10.0.0.1]
  backendPort: 8443
  probe:
    protocol: TCP
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) != 1 {
		t.Fatalf("%d rules", len(rules))
	}
	r := rules[0]
	checks := []struct {
		field     string
		got, want any
	}{
		{"metadata.namespace", r.Namespace, "default"},
		{"metadata.generation", r.Generation, int64(1)},
		{"kind", r.Kind, "LoadBalancerRule"},
		{"apiVersion", r.APIVersion, "lb.stickylb.io/v1alpha1"},
		{"spec.frontend.name", r.Spec.Frontend.Name, "default"},
		{"spec.frontend.serviceType", r.Spec.Frontend.ServiceType, v1alpha1.ServiceTypeClusterIP},
		{"spec.protocol", r.Spec.Protocol, v1alpha1.ProtocolTCP},
		{"spec.sessionPersistence", r.Spec.SessionPersistence, v1alpha1.SessionPersistenceNone},
		{"spec.idleTimeoutInMinutes", r.Spec.IdleTimeoutInMinutes, int32(4)},
		{"spec.enableTcpReset", r.Spec.EnableTcpReset, false},
		{"spec.noHealthyBackendsBehavior", r.Spec.NoHealthyBackendsBehavior, v1alpha1.AllProbedDown},
		{"spec.probe.intervalInSeconds", r.Spec.Probe.IntervalInSeconds, int32(15)},
		{"spec.probe.probeThreshold", r.Spec.Probe.ProbeThreshold, int32(1)},
		{"spec.probe.port", r.Spec.Probe.Port, (*v1alpha1.PortNumber)(nil)},
		// No schema default: translation applies 180 minutes to ClientIP rules.
		{"spec.sessionPersistenceTimeoutInMinutes", r.Spec.SessionPersistenceTimeoutInMinutes, (*int32)(nil)},
		{"spec.proxyProtocol", r.Spec.ProxyProtocol, v1alpha1.ProxyProtocolNone},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.field, c.got, c.want)
		}
	}
}

const goodDoc = `apiVersion: lb.stickylb.io/v1alpha1
kind: LoadBalancerRule
metadata:
  name: %s
spec:
  frontend: {port: %d}
  backendPool: {addresses: [10.0.0.1]}
  backendPort: 80
`

func TestReportsEveryDocument(t *testing.T) {
	data := fmt.Sprintf(goodDoc, "one", 81) + "---\n" +
		strings.Replace(fmt.Sprintf(goodDoc, "two", 82), "backendPort: 80", "backendPort: 0", 1) + "---\n" +
		fmt.Sprintf(goodDoc, "three", 83) + "---\n" +
		strings.Replace(fmt.Sprintf(goodDoc, "four", 84), "10.0.0.1", "10.0.0.999", 1) + "\n" +
		"  sessionPersistence: Sticky\n"
	rules, err := Parse("rules.yaml", []byte(data))
	if err == nil {
		t.Fatalf("accepted %+v", rules)
	}
	if rules != nil {
		t.Errorf("returned rules with an error: %+v", rules)
	}
	for _, want := range []string{
		"rules.yaml: document 2 (two): spec.backendPort: Invalid value: 0:",
		"rules.yaml: document 4 (four): spec.sessionPersistence: Unsupported value: \"Sticky\"",
		// CEL runs only once the schema errors are fixed, as in the API server.
		"rules.yaml: document 4 (four): some validation rules were not checked",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not contain %q:\n%v", want, err)
		}
	}
	for _, good := range []string{"(one)", "(three)"} {
		if strings.Contains(err.Error(), good) {
			t.Errorf("valid rule %s reported:\n%v", good, err)
		}
	}
	if n := strings.Count(err.Error(), "\n") + 1; n != 3 {
		t.Errorf("%d errors, want 3:\n%v", n, err)
	}
}

func TestDocumentNumbers(t *testing.T) {
	bad := "apiVersion: lb.stickylb.io/v1alpha1\nkind: Service\nmetadata: {name: x}\n"
	good := fmt.Sprintf(goodDoc, "ok", 80)
	cases := []struct {
		name string
		data string
		want string
	}{
		{"single document", bad, "f.yaml: document 1 (x): kind:"},
		{"leading separator", "---\n" + bad, "f.yaml: document 1 (x): kind:"},
		{"leading comments", "# rules\n\n---\n" + bad, "f.yaml: document 1 (x): kind:"},
		{"empty documents count", good + "---\n---\n# nothing\n---\n" + bad, "f.yaml: document 4 (x): kind:"},
		{"separator with comment", good + "--- # second\n" + bad, "f.yaml: document 2 (x): kind:"},
		{"CRLF line ends", strings.ReplaceAll(good+"---\n"+bad, "\n", "\r\n"), "f.yaml: document 2 (x): kind:"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.data))
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error starting %q", err, tc.want)
			}
		})
	}
}

func TestSkipsEmptyDocuments(t *testing.T) {
	for _, data := range []string{"", "\n", "# only a comment\n", "---\n---\n"} {
		rules, err := Parse("f.yaml", []byte(data))
		if err != nil || len(rules) != 0 {
			t.Errorf("%q: %v, %v", data, rules, err)
		}
	}
	rules, err := Parse("f.yaml", []byte("---\n\n---\n"+fmt.Sprintf(goodDoc, "a", 80)+"---\n\n"))
	if err != nil || len(rules) != 1 {
		t.Errorf("got %v, %v", rules, err)
	}
}

func TestYAMLSyntaxError(t *testing.T) {
	data := fmt.Sprintf(goodDoc, "one", 80) + "---\n" +
		"apiVersion: lb.stickylb.io/v1alpha1\nkind: LoadBalancerRule\nmetadata: {name: two\n"
	_, err := Parse("rules.yaml", []byte(data))
	if err == nil {
		t.Fatal("accepted")
	}
	// The document starts on line 10 of the file; the parser trips at its end.
	if !strings.HasPrefix(err.Error(), "rules.yaml: document 2: yaml: line 1") {
		t.Errorf("got %v", err)
	}
	_, err = Parse("rules.yaml", []byte(fmt.Sprintf(goodDoc, "one", 80)+"---\nspec:\n  a: 1\n   b: 2\n"))
	if err == nil || !strings.Contains(err.Error(), "rules.yaml: document 2: yaml: line 12:") {
		t.Errorf("line not given in file terms: %v", err)
	}
}

func TestRejectsDuplicateKeys(t *testing.T) {
	data := fmt.Sprintf(goodDoc, "a", 80) + "  backendPort: 81\n"
	_, err := Parse("rules.yaml", []byte(data))
	if err == nil || !strings.Contains(err.Error(), `document 1: `) || !strings.Contains(err.Error(), "backendPort") {
		t.Fatalf("got %v", err)
	}
}

func TestRejectsUnknownFields(t *testing.T) {
	cases := map[string]struct{ doc, want string }{
		"in spec":     {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "backendPort: 80", "backendPort: 80\n  weight: 3", 1), `unknown field "spec.weight"`},
		"nested":      {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "{port: 80}", "{port: 80, ip: 10.0.0.9}", 1), `unknown field "spec.frontend.ip"`},
		"in metadata": {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "  name: a", "  name: a\n  nmespace: x", 1), `unknown field "metadata.nmespace"`},
		"at the root": {fmt.Sprintf(goodDoc, "a", 80) + "spek: {}\n", `unknown field "spek"`},
		"in status":   {fmt.Sprintf(goodDoc, "a", 80) + "status: {healthy: 1}\n", `unknown field "status.healthy"`},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Parse("rules.yaml", []byte(tc.doc))
			if err == nil || err.Error() != "rules.yaml: document 1 (a): "+tc.want {
				t.Fatalf("got %v, want %s", err, tc.want)
			}
		})
	}
}

func TestRejectsOtherObjects(t *testing.T) {
	cases := map[string]struct{ doc, want string }{
		"wrong kind":        {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "kind: LoadBalancerRule", "kind: Service", 1), `kind: Invalid value: "Service": must be LoadBalancerRule`},
		"wrong version":     {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "v1alpha1", "v1", 1), `apiVersion: Invalid value: "lb.stickylb.io/v1": must be lb.stickylb.io/v1alpha1`},
		"no kind":           {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "kind: LoadBalancerRule\n", "", 1), `kind: Required value: must be LoadBalancerRule`},
		"a list":            {"- 1\n- 2\n", "want a LoadBalancerRule object, got a list"},
		"a string":          {"hello\n", "want a LoadBalancerRule object, got a string"},
		"no name":           {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "  name: a\n", "  labels: {app: x}\n", 1), "metadata.name: Required value"},
		"generateName only": {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "  name: a\n", "  generateName: a-\n", 1), "metadata.name: Required value: a rules file needs a name for every rule"},
		"name not DNS":      {fmt.Sprintf(goodDoc, "Web_1", 80), `metadata.name: Invalid value: "Web_1": a lowercase RFC 1123 subdomain`},
		"bad namespace":     {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "  name: a\n", "  name: a\n  namespace: Prod\n", 1), `metadata.namespace: Invalid value: "Prod"`},
		"metadata a string": {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "metadata:\n  name: a\n", "metadata: a\n", 1), "metadata:"},
		"bad label":         {strings.Replace(fmt.Sprintf(goodDoc, "a", 80), "  name: a\n", "  name: a\n  labels: {\"-x\": v}\n", 1), "metadata.labels: Invalid value: \"-x\""},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			rules, err := Parse("rules.yaml", []byte(tc.doc))
			if err == nil {
				t.Fatalf("accepted %+v", rules)
			}
			if !strings.HasPrefix(err.Error(), "rules.yaml: document 1") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %s", err, tc.want)
			}
		})
	}
}

func TestRejectsDuplicateRules(t *testing.T) {
	a := fmt.Sprintf(goodDoc, "web", 80)
	inProd := strings.Replace(a, "  name: web\n", "  name: web\n  namespace: prod\n", 1)
	explicitDefault := strings.Replace(a, "  name: web\n", "  name: web\n  namespace: default\n", 1)

	_, err := Parse("rules.yaml", []byte(a+"---\n"+inProd+"---\n"+explicitDefault))
	want := "rules.yaml: document 3 (web): rule default/web is already defined in document 1"
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %s", err, want)
	}
	rules, err := Parse("rules.yaml", []byte(a+"---\n"+inProd))
	if err != nil || len(rules) != 2 || rules[1].Namespace != "prod" {
		t.Fatalf("same name in two namespaces: %v, %v", rules, err)
	}
}

func TestResetsServerOwnedFields(t *testing.T) {
	// What `kubectl get lbr web -o yaml` prints reads as the rule it shows.
	exported := fmt.Sprintf(goodDoc, "web", 80)
	exported = strings.Replace(exported, "  name: web\n", `  name: web
  namespace: shop
  uid: 0b7d5d8e-2c1d-4f43-9c55-0a4c0e1d2f3a
  resourceVersion: "4711"
  generation: 7
  creationTimestamp: "2026-01-02T03:04:05Z"
  labels: {team: shop}
`, 1)
	exported += `status:
  observedGeneration: 7
  backends: {total: 1, ready: 1, healthy: 1}
  conditions:
  - {type: Ready, status: "True", reason: Ready, message: "", lastTransitionTime: "2026-01-02T03:04:06Z"}
`
	rules, err := Parse("rules.yaml", []byte(exported))
	if err != nil {
		t.Fatal(err)
	}
	r := rules[0]
	if r.UID != "" || r.ResourceVersion != "" || !r.CreationTimestamp.IsZero() || r.Generation != 1 {
		t.Errorf("server-owned metadata kept: %+v", r.ObjectMeta)
	}
	if r.Namespace != "shop" || r.Labels["team"] != "shop" {
		t.Errorf("user metadata lost: %+v", r.ObjectMeta)
	}
	if !equality.Semantic.DeepEqual(r.Status, v1alpha1.LoadBalancerRuleStatus{}) {
		t.Errorf("status kept: %+v", r.Status)
	}
}

// BenchmarkParse measures one rule's validation; the schema and CEL programs
// are compiled once per process, not per call.
func BenchmarkParse(b *testing.B) {
	data := toYAML(b, baseRule())
	if _, err := Parse("rules.yaml", data); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse("rules.yaml", data); err != nil {
			b.Fatal(err)
		}
	}
}
