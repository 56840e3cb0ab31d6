package rulesfile

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	"sigs.k8s.io/yaml"

	"github.com/stickylb/stickylb/api/v1alpha1"
)

// FuzzParse: Parse never panics or hangs, and whatever it accepts means the
// same thing after a write and a read: marshalled back to YAML, the rules
// parse to the same rules.
func FuzzParse(f *testing.F) {
	samples, err := filepath.Glob(filepath.Join("..", "..", "config", "samples", "*.yaml"))
	if err != nil {
		f.Fatal(err)
	}
	var all []byte
	for _, s := range samples {
		if filepath.Base(s) == "kustomization.yaml" {
			continue
		}
		data, err := os.ReadFile(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
		all = append(append(all, "---\n"...), data...)
	}
	f.Add(all)
	good := strings.ReplaceAll(goodDoc, "%s", "a")
	good = strings.ReplaceAll(good, "%d", "80")
	for _, seed := range []string{
		good,
		"---\n# empty\n---\n" + good,
		good + "---\n" + strings.Replace(good, "name: a", "name: b", 1),
		strings.Replace(good, "port: 80", "port: 0", 1),
		strings.Replace(good, "10.0.0.1", "10.0.0.1, 10.0.0.1", 1),
		strings.Replace(good, "backendPort: 80", "backendPort: 80\n  protocol: UDP\n  enableTcpReset: true", 1),
		strings.Replace(good, "backendPort: 80", "backendPort: 80\n  probe: {protocol: HTTP}", 1),
		strings.Replace(good, "kind: LoadBalancerRule", "kind: Service", 1),
		strings.Replace(good, "name: a", "name: a\n  labels: {app: web}\n  annotations: {note: \"x\"}", 1),
		good + "status: {backends: {total: 1, ready: 1, healthy: 1}}\n",
		"metadata: {name: [\n",
		"- a\n- b\n",
		"apiVersion: lb.stickylb.io/v1alpha1\nkind: LoadBalancerRule\nmetadata: {name: x}\nspec: null\n",
	} {
		f.Add([]byte(seed))
	}

	f.Fuzz(func(t *testing.T, data []byte) {
		// The fuzzer does not notice a hang; a crash it records.
		watchdog := time.AfterFunc(10*time.Second, func() { panic(fmt.Sprintf("Parse hangs on %q", data)) })
		defer watchdog.Stop()
		rules, err := Parse("fuzz.yaml", data)
		if err != nil {
			if rules != nil {
				t.Fatalf("rules and an error: %v", err)
			}
			if !strings.HasPrefix(err.Error(), "fuzz.yaml: ") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		seen := map[string]bool{}
		for _, r := range rules {
			key := r.Namespace + "/" + r.Name
			if r.Name == "" || r.Namespace == "" || seen[key] || r.Kind != kind || r.APIVersion != apiVersion {
				t.Fatalf("accepted a rule without a unique name, or of another kind: %+v", r.ObjectMeta)
			}
			seen[key] = true
			if r.Spec.Frontend.Port < 1 || r.Spec.BackendPort < 1 || r.Spec.Protocol == "" || r.Spec.IdleTimeoutInMinutes < 4 {
				t.Fatalf("accepted an invalid or undefaulted spec: %+v", r.Spec)
			}
			if (r.Spec.BackendPool.ServiceName == "") == (len(r.Spec.BackendPool.Addresses) == 0) {
				t.Fatalf("accepted a pool with both or neither kind: %+v", r.Spec.BackendPool)
			}
		}
		again, err := Parse("again.yaml", marshal(t, rules))
		if err != nil {
			t.Fatalf("accepted rules do not parse after a round trip: %v\ninput:\n%s", err, data)
		}
		if !equality.Semantic.DeepEqual(rules, again) {
			t.Fatalf("round trip changed the rules:\nfirst: %+v\nagain: %+v", rules, again)
		}
	})
}

func marshal(t *testing.T, rules []v1alpha1.LoadBalancerRule) []byte {
	var b strings.Builder
	for _, r := range rules {
		y, err := yaml.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString("---\n")
		b.Write(y)
	}
	return []byte(b.String())
}
