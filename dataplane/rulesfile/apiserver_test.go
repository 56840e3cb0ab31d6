package rulesfile

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/testenv"
)

// TestAgreesWithTheAPIServer sends every case to a real kube-apiserver with
// the CRD installed and to Parse: both must accept or reject it; a rejection
// must carry the same errors, an acceptance the same defaulted spec.
func TestAgreesWithTheAPIServer(t *testing.T) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set: run with `make test`, which builds kube-apiserver and etcd")
	}
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := testenv.Start(env)
	if err != nil {
		t.Fatalf("start envtest: %v", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("stop envtest: %v", err)
		}
	})
	k8s, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}

	metadataCases := []ruleCase{
		{"name not a DNS subdomain", func(r map[string]any) { r["metadata"] = map[string]any{"name": "Web_1"} }, []string{"metadata.name"}},
		{"bad label", func(r map[string]any) {
			r["metadata"].(map[string]any)["labels"] = map[string]any{"-x": "v"}
		}, []string{"metadata.labels"}},
		{"unknown metadata field", func(r map[string]any) { r["metadata"].(map[string]any)["nmespace"] = "x" }, []string{`unknown field "metadata.nmespace"`}},
		{"two errors and CEL skipped", func(r map[string]any) {
			setSpec(r, "frontend.port", 0)
			setSpec(r, "protocol", "SCTP")
			setSpec(r, "probe.requestPath", nil)
		}, []string{"spec.frontend.port", "spec.protocol"}},
		{"two CEL errors", func(r map[string]any) {
			setSpec(r, "protocol", "UDP")
			setSpec(r, "enableTcpReset", true)
			setSpec(r, "probe.requestPath", nil)
		}, []string{"spec.enableTcpReset", "spec.probe.requestPath"}},
		{"two CEL errors on spec", func(r map[string]any) {
			setSpec(r, "protocol", "UDP")
			setSpec(r, "enableTcpReset", true)
			setSpec(r, "sessionPersistence", "None")
			setSpec(r, "sessionPersistenceTimeoutInMinutes", 5)
		}, []string{"spec.enableTcpReset", "spec.sessionPersistenceTimeoutInMinutes"}},
		{"two CEL errors on spec, proxyProtocol", func(r map[string]any) {
			setSpec(r, "protocol", "UDP")
			setSpec(r, "enableTcpReset", true)
			setSpec(r, "proxyProtocol", "V2")
		}, []string{"spec.enableTcpReset", "spec.proxyProtocol"}},
		{"proxyProtocol V3 with UDP", func(r map[string]any) {
			setSpec(r, "protocol", "UDP")
			setSpec(r, "proxyProtocol", "V3")
		}, []string{"spec.proxyProtocol", "Unsupported value"}},
		// A bound error does not stop CEL: the value is out of range and set with None.
		{"persistence timeout 1441 with None", func(r map[string]any) {
			setSpec(r, "sessionPersistence", "None")
			setSpec(r, "sessionPersistenceTimeoutInMinutes", 1441)
		}, []string{"less than or equal to 1440", "must be unset or 0 when spec.sessionPersistence is None"}},
	}
	var cases []ruleCase
	cases = append(cases, malformedCases()...)
	cases = append(cases, metadataCases...)
	cases = append(cases, validCases()...)
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			obj := baseRule()
			tc.mutate(obj)
			if meta := obj["metadata"].(map[string]any); meta["name"] == "bad" {
				meta["name"] = fmt.Sprintf("case-%d", i)
			}
			obj["metadata"].(map[string]any)["namespace"] = "default"
			obj = jsonValue(t, obj) // numbers as the API machinery decodes them

			apiErr := k8s.Create(context.Background(), &unstructured.Unstructured{Object: jsonValue(t, obj)}, client.FieldValidation("Strict"))
			rules, parseErr := Parse("rules.yaml", toYAML(t, obj))

			switch {
			case apiErr == nil && parseErr == nil:
				var stored unstructured.Unstructured
				stored.SetGroupVersionKind(v1alpha1.GroupVersion.WithKind(kind))
				name := obj["metadata"].(map[string]any)["name"].(string)
				if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: name}, &stored); err != nil {
					t.Fatal(err)
				}
				var want v1alpha1.LoadBalancerRule
				if err := runtime.DefaultUnstructuredConverter.FromUnstructured(stored.Object, &want); err != nil {
					t.Fatal(err)
				}
				if !equality.Semantic.DeepEqual(rules[0].Spec, want.Spec) {
					t.Errorf("defaulted spec differs:\nParse:      %+v\nAPI server: %+v", rules[0].Spec, want.Spec)
				}
				if len(tc.want) > 0 {
					t.Errorf("both accepted a rule that should be rejected with %q", tc.want)
				}
			case apiErr == nil:
				t.Fatalf("the API server accepts it, Parse says:\n%v", parseErr)
			case parseErr == nil:
				t.Fatalf("Parse accepts it, the API server says:\n%v", apiErr)
			default:
				t.Logf("API server: %v", apiErr)
				expected := apiServerErrors(t, apiErr)
				got := strings.Split(parseErr.Error(), "\n")
				for _, e := range expected {
					if !strings.Contains(parseErr.Error(), e) {
						t.Errorf("Parse does not report %q:\n%v", e, parseErr)
					}
				}
				if len(got) != len(expected) {
					t.Errorf("Parse reports %d errors, the API server %d:\n%v\n%v", len(got), len(expected), parseErr, apiErr)
				}
				for _, w := range tc.want {
					if !strings.Contains(parseErr.Error(), w) {
						t.Errorf("error does not mention %q:\n%v", w, parseErr)
					}
				}
			}
		})
	}
}

// apiServerErrors lists the API server's complaints in the form Parse gives
// them: "field: message" per cause, or the unknown fields of a strict
// decoding error.
func apiServerErrors(t *testing.T, err error) []string {
	t.Helper()
	var status apierrors.APIStatus
	if !errors.As(err, &status) {
		t.Fatalf("not an API error: %v", err)
	}
	s := status.Status()
	if _, strict, ok := strings.Cut(s.Message, "strict decoding error: "); ok {
		return strings.Split(strict, ", ")
	}
	if s.Details == nil || len(s.Details.Causes) == 0 {
		t.Fatalf("API error without causes: %v", err)
	}
	var out []string
	for _, c := range s.Details.Causes {
		if c.Field == "" || c.Field == "<nil>" {
			// An error about the whole object; Parse gives only its detail.
			_, detail, _ := strings.Cut(c.Message, `"null": `)
			out = append(out, detail)
			continue
		}
		out = append(out, c.Field+": "+c.Message)
	}
	return out
}

// jsonValue is obj as decoded from JSON by the API machinery (int64 and
// float64 numbers), which unstructured objects require.
func jsonValue(t *testing.T, obj map[string]any) map[string]any {
	t.Helper()
	b, err := utiljson.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	if err := utiljson.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}
