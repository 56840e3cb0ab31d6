package v1alpha1_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/testenv"
)

// These tests send rules to a real kube-apiserver (envtest) with the
// generated CRD installed, so they check the schema and CEL rules users meet.

var k8s client.Client

func TestMain(m *testing.M) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is not set: run these tests with `make test`, which builds kube-apiserver and etcd")
		os.Exit(1)
	}
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := testenv.Start(env)
	if err != nil {
		fmt.Fprintln(os.Stderr, "start envtest:", err)
		os.Exit(1)
	}
	s := runtime.NewScheme()
	_ = lbv1alpha1.AddToScheme(s)
	_ = apiextensionsv1.AddToScheme(s)
	k8s, err = client.New(cfg, client.Options{Scheme: s})
	code := 1
	if err == nil {
		code = m.Run()
	} else {
		fmt.Fprintln(os.Stderr, "client:", err)
	}
	if err := env.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "stop envtest:", err)
	}
	os.Exit(code)
}

// validRule is a complete rule every case below starts from.
func validRule() map[string]any {
	return map[string]any{
		"apiVersion": "lb.stickylb.io/v1alpha1",
		"kind":       "LoadBalancerRule",
		"metadata":   map[string]any{"namespace": "default"},
		"spec": map[string]any{
			"frontend":           map[string]any{"name": "web", "port": int64(80), "serviceType": "ClusterIP"},
			"backendPool":        map[string]any{"serviceName": "web"},
			"backendPort":        int64(8080),
			"protocol":           "TCP",
			"sessionPersistence": "ClientIP",
			"probe": map[string]any{
				"protocol": "HTTP", "port": int64(8080), "requestPath": "/healthz",
				"intervalInSeconds": int64(5), "probeThreshold": int64(2),
			},
		},
	}
}

// set writes v at the dotted path under spec, creating maps on the way;
// a nil v deletes the field.
func set(obj map[string]any, path string, v any) {
	keys := strings.Split(path, ".")
	m := obj["spec"].(map[string]any)
	for _, k := range keys[:len(keys)-1] {
		next, ok := m[k].(map[string]any)
		if !ok {
			next = map[string]any{}
			m[k] = next
		}
		m = next
	}
	if v == nil {
		delete(m, keys[len(keys)-1])
		return
	}
	m[keys[len(keys)-1]] = v
}

func ips(n int, format string) []any {
	out := make([]any, n)
	for i := range out {
		out[i] = fmt.Sprintf(format, i/250, i%250+1)
	}
	return out
}

func create(t *testing.T, name string, obj map[string]any) error {
	t.Helper()
	u := &unstructured.Unstructured{Object: obj}
	u.SetName(name)
	return k8s.Create(context.Background(), u, client.FieldValidation("Strict"))
}

func TestRejectsMalformedRules(t *testing.T) {
	long := func(n int) string { return strings.Repeat("a", n) }
	cases := []struct {
		name   string
		mutate func(r map[string]any)
		want   []string // each must appear in the error
	}{
		{"frontend missing", func(r map[string]any) { set(r, "frontend", nil) }, []string{"spec.frontend", "Required"}},
		{"frontend port missing", func(r map[string]any) { set(r, "frontend.port", nil) }, []string{"spec.frontend.port", "Required"}},
		{"frontend port 0", func(r map[string]any) { set(r, "frontend.port", 0) }, []string{"spec.frontend.port", "greater than or equal to 1"}},
		{"frontend port negative", func(r map[string]any) { set(r, "frontend.port", -80) }, []string{"spec.frontend.port"}},
		{"frontend port 65536", func(r map[string]any) { set(r, "frontend.port", 65536) }, []string{"spec.frontend.port", "less than or equal to 65535"}},
		{"frontend port string", func(r map[string]any) { set(r, "frontend.port", "http") }, []string{"spec.frontend.port"}},
		{"frontend name empty", func(r map[string]any) { set(r, "frontend.name", "") }, []string{"spec.frontend.name"}},
		{"frontend name uppercase", func(r map[string]any) { set(r, "frontend.name", "Public") }, []string{"spec.frontend.name", "should match"}},
		{"frontend name leading dash", func(r map[string]any) { set(r, "frontend.name", "-web") }, []string{"spec.frontend.name"}},
		{"frontend name too long", func(r map[string]any) { set(r, "frontend.name", long(51)) }, []string{"spec.frontend.name", "Too long"}},
		{"frontend serviceType ExternalName", func(r map[string]any) { set(r, "frontend.serviceType", "ExternalName") }, []string{"spec.frontend.serviceType", "Unsupported value"}},
		{"frontend unknown field", func(r map[string]any) { set(r, "frontend.ip", "10.0.0.1") }, []string{"spec.frontend.ip", "unknown field"}},
		{"backendPool missing", func(r map[string]any) { set(r, "backendPool", nil) }, []string{"spec.backendPool", "Required"}},
		{"backendPool empty", func(r map[string]any) { set(r, "backendPool.serviceName", nil) }, []string{"spec.backendPool", "exactly one of spec.backendPool.serviceName or spec.backendPool.addresses"}},
		{"backendPool both kinds", func(r map[string]any) { set(r, "backendPool.addresses", []any{"10.0.0.1"}) }, []string{"spec.backendPool", "exactly one of spec.backendPool.serviceName or spec.backendPool.addresses"}},
		{"serviceName empty", func(r map[string]any) { set(r, "backendPool.serviceName", "") }, []string{"spec.backendPool.serviceName"}},
		{"serviceName underscore", func(r map[string]any) { set(r, "backendPool.serviceName", "web_svc") }, []string{"spec.backendPool.serviceName", "should match"}},
		{"serviceName too long", func(r map[string]any) { set(r, "backendPool.serviceName", long(64)) }, []string{"spec.backendPool.serviceName", "Too long"}},
		{"addresses empty", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{})
		}, []string{"spec.backendPool.addresses"}},
		{"address not an IP", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"backend-1"})
		}, []string{"spec.backendPool.addresses[0]", "unicast IPv4 or IPv6 address"}},
		{"address octet 256", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"10.0.0.1", "10.0.0.256"})
		}, []string{"spec.backendPool.addresses[1]", "unicast IPv4 or IPv6 address"}},
		{"address CIDR", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"10.0.0.0/24"})
		}, []string{"spec.backendPool.addresses[0]"}},
		{"address leading zero", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"010.0.0.1"})
		}, []string{"spec.backendPool.addresses[0]"}},
		{"address IPv6 not canonical", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"FD00:0:0::1"})
		}, []string{"spec.backendPool.addresses[0]", "canonical form"}},
		{"address unspecified", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"0.0.0.0"})
		}, []string{"spec.backendPool.addresses[0]"}},
		{"address IPv6 unspecified", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"::"})
		}, []string{"spec.backendPool.addresses[0]"}},
		{"address multicast", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"224.0.0.5"})
		}, []string{"spec.backendPool.addresses[0]"}},
		{"address too long", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{long(46)})
		}, []string{"spec.backendPool.addresses[0]", "Too long"}},
		{"address duplicate", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"10.0.0.1", "10.0.0.2", "10.0.0.1"})
		}, []string{"spec.backendPool.addresses[2]", "Duplicate value"}},
		{"addresses over 1000", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", ips(1001, "10.1.%d.%d"))
		}, []string{"spec.backendPool.addresses", "Too many"}},
		{"backendPort missing", func(r map[string]any) { set(r, "backendPort", nil) }, []string{"spec.backendPort", "Required"}},
		{"backendPort 0", func(r map[string]any) { set(r, "backendPort", 0) }, []string{"spec.backendPort", "greater than or equal to 1"}},
		{"backendPort 70000", func(r map[string]any) { set(r, "backendPort", 70000) }, []string{"spec.backendPort", "less than or equal to 65535"}},
		{"protocol SCTP", func(r map[string]any) { set(r, "protocol", "SCTP") }, []string{"spec.protocol", "Unsupported value"}},
		{"protocol lowercase", func(r map[string]any) { set(r, "protocol", "tcp") }, []string{"spec.protocol", "Unsupported value"}},
		{"sessionPersistence SourceIP", func(r map[string]any) { set(r, "sessionPersistence", "SourceIP") }, []string{"spec.sessionPersistence", "Unsupported value"}},
		{"sessionPersistence empty", func(r map[string]any) { set(r, "sessionPersistence", "") }, []string{"spec.sessionPersistence"}},
		{"persistence timeout with None", func(r map[string]any) {
			set(r, "sessionPersistence", "None")
			set(r, "sessionPersistenceTimeoutInMinutes", 30)
		}, []string{"spec.sessionPersistenceTimeoutInMinutes", "must be unset or 0 when spec.sessionPersistence is None"}},
		{"persistence timeout with None by default", func(r map[string]any) {
			set(r, "sessionPersistence", nil)
			set(r, "sessionPersistenceTimeoutInMinutes", 1)
		}, []string{"spec.sessionPersistenceTimeoutInMinutes", "must be unset or 0 when spec.sessionPersistence is None"}},
		{"persistence timeout 1441", func(r map[string]any) { set(r, "sessionPersistenceTimeoutInMinutes", 1441) }, []string{"spec.sessionPersistenceTimeoutInMinutes", "less than or equal to 1440"}},
		{"persistence timeout negative", func(r map[string]any) { set(r, "sessionPersistenceTimeoutInMinutes", -1) }, []string{"spec.sessionPersistenceTimeoutInMinutes", "greater than or equal to 0"}},
		{"persistence timeout string", func(r map[string]any) { set(r, "sessionPersistenceTimeoutInMinutes", "3h") }, []string{"spec.sessionPersistenceTimeoutInMinutes", "must be of type integer"}},
		{"idle timeout 3", func(r map[string]any) { set(r, "idleTimeoutInMinutes", 3) }, []string{"spec.idleTimeoutInMinutes", "greater than or equal to 4"}},
		{"idle timeout 101", func(r map[string]any) { set(r, "idleTimeoutInMinutes", 101) }, []string{"spec.idleTimeoutInMinutes", "less than or equal to 100"}},
		{"enableTcpReset not a bool", func(r map[string]any) { set(r, "enableTcpReset", "yes") }, []string{"spec.enableTcpReset"}},
		{"enableTcpReset with UDP", func(r map[string]any) {
			set(r, "protocol", "UDP")
			set(r, "enableTcpReset", true)
		}, []string{"spec.enableTcpReset", "cannot be true when spec.protocol is UDP"}},
		{"proxyProtocol V2 with UDP", func(r map[string]any) {
			set(r, "protocol", "UDP")
			set(r, "proxyProtocol", "V2")
		}, []string{"spec.proxyProtocol: Invalid value: spec.proxyProtocol applies to TCP flows and must be None when spec.protocol is UDP"}},
		{"proxyProtocol V1 with UDP", func(r map[string]any) {
			set(r, "protocol", "UDP")
			set(r, "proxyProtocol", "V1")
		}, []string{"spec.proxyProtocol", "must be None when spec.protocol is UDP"}},
		{"proxyProtocol V2 with UDP, no probe", func(r map[string]any) {
			set(r, "protocol", "UDP")
			set(r, "probe", nil)
			set(r, "proxyProtocol", "V2")
		}, []string{"spec.proxyProtocol", "must be None when spec.protocol is UDP"}},
		{"proxyProtocol V3", func(r map[string]any) { set(r, "proxyProtocol", "V3") }, []string{"spec.proxyProtocol", "Unsupported value", `"V3"`}},
		{"proxyProtocol lowercase", func(r map[string]any) { set(r, "proxyProtocol", "v2") }, []string{"spec.proxyProtocol", "Unsupported value"}},
		{"proxyProtocol empty", func(r map[string]any) { set(r, "proxyProtocol", "") }, []string{"spec.proxyProtocol", "Unsupported value"}},
		{"proxyProtocol not a string", func(r map[string]any) { set(r, "proxyProtocol", 2) }, []string{"spec.proxyProtocol", "must be of type string"}},
		{"probe protocol missing", func(r map[string]any) { set(r, "probe.protocol", nil) }, []string{"spec.probe.protocol", "Required"}},
		{"probe protocol UDP", func(r map[string]any) { set(r, "probe.protocol", "UDP") }, []string{"spec.probe.protocol", "Unsupported value"}},
		{"HTTP probe without path", func(r map[string]any) { set(r, "probe.requestPath", nil) }, []string{"spec.probe.requestPath", "required when spec.probe.protocol is HTTP or HTTPS"}},
		{"HTTPS probe without path", func(r map[string]any) {
			set(r, "probe.protocol", "HTTPS")
			set(r, "probe.requestPath", nil)
		}, []string{"spec.probe.requestPath", "required when spec.probe.protocol is HTTP or HTTPS"}},
		{"TCP probe with path", func(r map[string]any) { set(r, "probe.protocol", "TCP") }, []string{"spec.probe.requestPath", "must not be set when spec.probe.protocol is TCP"}},
		{"probe path without slash", func(r map[string]any) { set(r, "probe.requestPath", "healthz") }, []string{"spec.probe.requestPath", "should match"}},
		{"probe path with space", func(r map[string]any) { set(r, "probe.requestPath", "/health z") }, []string{"spec.probe.requestPath"}},
		{"probe path too long", func(r map[string]any) { set(r, "probe.requestPath", "/"+long(1024)) }, []string{"spec.probe.requestPath", "Too long"}},
		{"probe port 0", func(r map[string]any) { set(r, "probe.port", 0) }, []string{"spec.probe.port"}},
		{"probe port 65536", func(r map[string]any) { set(r, "probe.port", 65536) }, []string{"spec.probe.port"}},
		{"probe interval 4", func(r map[string]any) { set(r, "probe.intervalInSeconds", 4) }, []string{"spec.probe.intervalInSeconds", "greater than or equal to 5"}},
		{"probe interval 3601", func(r map[string]any) { set(r, "probe.intervalInSeconds", 3601) }, []string{"spec.probe.intervalInSeconds"}},
		{"probe threshold 0", func(r map[string]any) { set(r, "probe.probeThreshold", 0) }, []string{"spec.probe.probeThreshold", "greater than or equal to 1"}},
		{"probe threshold 101", func(r map[string]any) { set(r, "probe.probeThreshold", 101) }, []string{"spec.probe.probeThreshold"}},
		{"noHealthyBackendsBehavior unknown", func(r map[string]any) { set(r, "noHealthyBackendsBehavior", "DropAll") }, []string{"spec.noHealthyBackendsBehavior", "Unsupported value"}},
		{"unknown spec field", func(r map[string]any) { set(r, "loadDistribution", "SourceIP") }, []string{"spec.loadDistribution", "unknown field"}},
	}
	if len(cases) < 40 {
		t.Fatalf("only %d malformed cases", len(cases))
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := validRule()
			tc.mutate(r)
			err := create(t, fmt.Sprintf("bad-%d", i), r)
			if err == nil {
				t.Fatalf("accepted; want an error mentioning %q", tc.want)
			}
			t.Log(err)
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not mention %q:\n%v", w, err)
				}
			}
		})
	}
	// A rejected create leaves nothing behind.
	var list lbv1alpha1.LoadBalancerRuleList
	if err := k8s.List(context.Background(), &list, client.InNamespace("default")); err != nil {
		t.Fatal(err)
	}
	for _, r := range list.Items {
		if strings.HasPrefix(r.Name, "bad-") {
			t.Errorf("rejected rule %s was stored", r.Name)
		}
	}
}

func TestAcceptsValidEdgeCases(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(r map[string]any)
	}{
		{"the base rule", func(map[string]any) {}},
		{"lowest ports", func(r map[string]any) { set(r, "frontend.port", 1); set(r, "backendPort", 1); set(r, "probe.port", 1) }},
		{"highest ports", func(r map[string]any) {
			set(r, "frontend.port", 65535)
			set(r, "backendPort", 65535)
			set(r, "probe.port", 65535)
		}},
		{"idle timeout bounds low", func(r map[string]any) { set(r, "idleTimeoutInMinutes", 4) }},
		{"idle timeout bounds high", func(r map[string]any) { set(r, "idleTimeoutInMinutes", 100) }},
		{"frontend name of 50 characters", func(r map[string]any) { set(r, "frontend.name", "f"+strings.Repeat("0", 49)) }},
		{"service name of 63 characters", func(r map[string]any) { set(r, "backendPool.serviceName", "s"+strings.Repeat("1", 62)) }},
		{"1000 IPv4 addresses", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", ips(1000, "10.2.%d.%d"))
		}},
		{"1000 IPv6 addresses of the longest form", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			a := make([]any, 1000)
			for i := range a {
				a[i] = fmt.Sprintf("fd00:1234:5678:9abc:def0:1234:%x:%x", 0x1000+i/100, 0x1000+i)
			}
			set(r, "backendPool.addresses", a)
		}},
		{"mixed IPv4 and IPv6 pool", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"10.0.0.1", "fd00::1", "192.168.1.20", "2001:db8::5"})
		}},
		{"loopback backends", func(r map[string]any) {
			set(r, "backendPool.serviceName", nil)
			set(r, "backendPool.addresses", []any{"127.0.1.1", "::1"})
		}},
		{"HTTPS probe", func(r map[string]any) { set(r, "probe.protocol", "HTTPS") }},
		{"TCP probe without path and port", func(r map[string]any) {
			set(r, "probe", map[string]any{"protocol": "TCP"})
		}},
		{"probe bounds", func(r map[string]any) { set(r, "probe.intervalInSeconds", 3600); set(r, "probe.probeThreshold", 100) }},
		{"longest probe path", func(r map[string]any) { set(r, "probe.requestPath", "/"+strings.Repeat("p", 1023)) }},
		{"probe path with query", func(r map[string]any) { set(r, "probe.requestPath", "/health?full=1") }},
		{"no probe", func(r map[string]any) { set(r, "probe", nil) }},
		{"UDP without reset", func(r map[string]any) {
			set(r, "protocol", "UDP")
			set(r, "enableTcpReset", false)
			set(r, "probe", nil)
		}},
		{"All with reset", func(r map[string]any) { set(r, "protocol", "All"); set(r, "enableTcpReset", true) }},
		{"All with proxyProtocol V2", func(r map[string]any) { set(r, "protocol", "All"); set(r, "proxyProtocol", "V2") }},
		{"TCP with proxyProtocol V1", func(r map[string]any) { set(r, "protocol", "TCP"); set(r, "proxyProtocol", "V1") }},
		{"TCP probe with proxyProtocol V2", func(r map[string]any) {
			set(r, "proxyProtocol", "V2")
			set(r, "probe", map[string]any{"protocol": "TCP"})
		}},
		{"UDP with proxyProtocol None", func(r map[string]any) {
			set(r, "protocol", "UDP")
			set(r, "proxyProtocol", "None")
			set(r, "probe", nil)
		}},
		{"every persistence mode", func(r map[string]any) { set(r, "sessionPersistence", "ClientIPProtocol") }},
		{"persistence None", func(r map[string]any) { set(r, "sessionPersistence", "None") }},
		{"persistence timeout 0 with None", func(r map[string]any) {
			set(r, "sessionPersistence", "None")
			set(r, "sessionPersistenceTimeoutInMinutes", 0)
		}},
		{"persistence timeout bounds low", func(r map[string]any) { set(r, "sessionPersistenceTimeoutInMinutes", 0) }},
		{"persistence timeout bounds high", func(r map[string]any) { set(r, "sessionPersistenceTimeoutInMinutes", 1440) }},
		{"persistence timeout 0 with ClientIPProtocol", func(r map[string]any) {
			set(r, "sessionPersistence", "ClientIPProtocol")
			set(r, "sessionPersistenceTimeoutInMinutes", 0)
		}},
		{"LoadBalancer frontend", func(r map[string]any) { set(r, "frontend.serviceType", "LoadBalancer") }},
		{"NodePort frontend", func(r map[string]any) { set(r, "frontend.serviceType", "NodePort") }},
		{"AllProbedUp", func(r map[string]any) { set(r, "noHealthyBackendsBehavior", "AllProbedUp") }},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := validRule()
			tc.mutate(r)
			if err := create(t, fmt.Sprintf("edge-%d", i), r); err != nil {
				t.Fatalf("rejected: %v", err)
			}
		})
	}
}

// TestProxyProtocolReadsBack: spec.proxyProtocol defaults to None, also
// under UDP, and V1/V2 are stored as given.
func TestProxyProtocolReadsBack(t *testing.T) {
	cases := []struct {
		name     string
		protocol string
		proxy    any // nil: unset
		want     lbv1alpha1.ProxyProtocol
	}{
		{"TCP unset", "TCP", nil, lbv1alpha1.ProxyProtocolNone},
		{"UDP unset", "UDP", nil, lbv1alpha1.ProxyProtocolNone},
		{"All unset", "All", nil, lbv1alpha1.ProxyProtocolNone},
		{"TCP V1", "TCP", "V1", lbv1alpha1.ProxyProtocolV1},
		{"All V2", "All", "V2", lbv1alpha1.ProxyProtocolV2},
		{"UDP None", "UDP", "None", lbv1alpha1.ProxyProtocolNone},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := validRule()
			set(r, "protocol", tc.protocol)
			set(r, "proxyProtocol", tc.proxy)
			name := fmt.Sprintf("proxy-protocol-%d", i)
			if err := create(t, name, r); err != nil {
				t.Fatalf("rejected: %v", err)
			}
			var got lbv1alpha1.LoadBalancerRule
			if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: name}, &got); err != nil {
				t.Fatal(err)
			}
			if got.Spec.ProxyProtocol != tc.want {
				t.Errorf("spec.proxyProtocol = %q, want %q", got.Spec.ProxyProtocol, tc.want)
			}
		})
	}
}

// TestProxyProtocolExplained: kubectl explain says that the header applies
// to TCP flows only, also with All.
func TestProxyProtocolExplained(t *testing.T) {
	var crd apiextensionsv1.CustomResourceDefinition
	if err := k8s.Get(context.Background(), client.ObjectKey{Name: "loadbalancerrules.lb.stickylb.io"}, &crd); err != nil {
		t.Fatal(err)
	}
	field, ok := crd.Spec.Versions[0].Schema.OpenAPIV3Schema.Properties["spec"].Properties["proxyProtocol"]
	if !ok {
		t.Fatal("no spec.proxyProtocol in the schema")
	}
	desc := strings.Join(strings.Fields(field.Description), " ")
	for _, w := range []string{"TCP flows only", "must be None when protocol is UDP", "with All only the TCP flows carry the header", "health probes"} {
		if !strings.Contains(desc, w) {
			t.Errorf("spec.proxyProtocol description does not say %q:\n%s", w, field.Description)
		}
	}
}

// TestSessionPersistenceTimeoutReadsBack: the API server stores the field as
// given. Unset stays unset (no schema default: translation applies 180
// minutes to ClientIP rules), and 0 stays 0, which is not the same.
func TestSessionPersistenceTimeoutReadsBack(t *testing.T) {
	cases := []struct {
		name        string
		persistence string
		minutes     any // nil: unset
		want        *int32
	}{
		{"ClientIP unset", "ClientIP", nil, nil},
		{"ClientIP 0", "ClientIP", int64(0), ptr(int32(0))},
		{"ClientIPProtocol 1440", "ClientIPProtocol", int64(1440), ptr(int32(1440))},
		{"None unset", "None", nil, nil},
		{"None 0", "None", int64(0), ptr(int32(0))},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := validRule()
			set(r, "sessionPersistence", tc.persistence)
			set(r, "sessionPersistenceTimeoutInMinutes", tc.minutes)
			name := fmt.Sprintf("pin-timeout-%d", i)
			if err := create(t, name, r); err != nil {
				t.Fatalf("rejected: %v", err)
			}
			var got lbv1alpha1.LoadBalancerRule
			if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: name}, &got); err != nil {
				t.Fatal(err)
			}
			switch v := got.Spec.SessionPersistenceTimeoutInMinutes; {
			case tc.want == nil && v != nil:
				t.Errorf("spec.sessionPersistenceTimeoutInMinutes = %d, want unset", *v)
			case tc.want != nil && (v == nil || *v != *tc.want):
				t.Errorf("spec.sessionPersistenceTimeoutInMinutes = %v, want %d", v, *tc.want)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

func TestAcceptsSamples(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("..", "..", "config", "samples", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, f := range files {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		obj := map[string]any{}
		if err := yaml.Unmarshal(raw, &obj); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		u := &unstructured.Unstructured{Object: obj}
		u.SetNamespace("samples")
		if n == 0 {
			ns := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": "samples"}}}
			if err := k8s.Create(context.Background(), ns); err != nil {
				t.Fatal(err)
			}
		}
		if err := k8s.Create(context.Background(), u, client.FieldValidation("Strict")); err != nil {
			t.Errorf("sample %s rejected: %v", f, err)
		}
		n++
	}
	if n < 3 {
		t.Fatalf("found %d samples, want at least 3", n)
	}
}

func TestDefaultsApplied(t *testing.T) {
	minimal := map[string]any{
		"apiVersion": "lb.stickylb.io/v1alpha1",
		"kind":       "LoadBalancerRule",
		"metadata":   map[string]any{"namespace": "default"},
		"spec": map[string]any{
			"frontend":    map[string]any{"port": int64(443)},
			"backendPool": map[string]any{"serviceName": "web"},
			"backendPort": int64(8443),
			"probe":       map[string]any{"protocol": "TCP"},
		},
	}
	if err := create(t, "minimal", minimal); err != nil {
		t.Fatal(err)
	}
	var got lbv1alpha1.LoadBalancerRule
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: "minimal"}, &got); err != nil {
		t.Fatal(err)
	}
	s := got.Spec
	checks := []struct {
		field     string
		got, want any
	}{
		{"spec.frontend.name", s.Frontend.Name, "default"},
		{"spec.frontend.serviceType", s.Frontend.ServiceType, lbv1alpha1.ServiceTypeClusterIP},
		{"spec.protocol", s.Protocol, lbv1alpha1.ProtocolTCP},
		{"spec.sessionPersistence", s.SessionPersistence, lbv1alpha1.SessionPersistenceNone},
		{"spec.idleTimeoutInMinutes", s.IdleTimeoutInMinutes, int32(4)},
		{"spec.enableTcpReset", s.EnableTcpReset, false},
		{"spec.noHealthyBackendsBehavior", s.NoHealthyBackendsBehavior, lbv1alpha1.AllProbedDown},
		{"spec.probe.intervalInSeconds", s.Probe.IntervalInSeconds, int32(15)},
		{"spec.probe.probeThreshold", s.Probe.ProbeThreshold, int32(1)},
		{"spec.probe.port", s.Probe.Port, (*lbv1alpha1.PortNumber)(nil)},
		{"spec.sessionPersistenceTimeoutInMinutes", s.SessionPersistenceTimeoutInMinutes, (*int32)(nil)},
		{"spec.proxyProtocol", s.ProxyProtocol, lbv1alpha1.ProxyProtocolNone},
	}
	for _, c := range checks {
		if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
			t.Errorf("%s = %v, want %v", c.field, c.got, c.want)
		}
	}
}

func TestCRDShape(t *testing.T) {
	var crd apiextensionsv1.CustomResourceDefinition
	if err := k8s.Get(context.Background(), client.ObjectKey{Name: "loadbalancerrules.lb.stickylb.io"}, &crd); err != nil {
		t.Fatal(err)
	}
	if got := crd.Spec.Names.ShortNames; len(got) != 1 || got[0] != "lbr" {
		t.Errorf("short names = %v, want [lbr]", got)
	}
	v := crd.Spec.Versions[0]
	if v.Subresources == nil || v.Subresources.Status == nil {
		t.Error("no status subresource")
	}
	var cols []string
	for _, c := range v.AdditionalPrinterColumns {
		cols = append(cols, c.Name)
	}
	if got, want := strings.Join(cols, ","), "Protocol,Port,Persistence,Healthy,Ready,Age"; got != want {
		t.Errorf("printer columns = %s, want %s", got, want)
	}
}
