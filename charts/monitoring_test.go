package charts_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	promlabels "github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/stickylb/stickylb/internal/testbackend"
	"github.com/stickylb/stickylb/internal/testenv"
)

const dashboardFile = "stickylb/files/grafana-dashboard.json"

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// stickylbBinary builds the repository's binary once per test run.
func stickylbBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "stickylb-chart-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "stickylb")
		if out, err := exec.Command("go", "build", "-o", binPath, "..").CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// monitoringValues sets every monitoring value.
const monitoringValues = `metrics:
  dashboard:
    enabled: true
    label: example.com/dashboard
    labelValue: stickylb
    namespace: monitoring
    labels: {team: network}
    annotations: {grafana_folder: Networking}
  serviceMonitor:
    enabled: true
    labels: {release: kube-prometheus-stack}
    annotations: {owner: network}
    interval: 1m
    scrapeTimeout: 20s
    tlsConfig: {serverName: stickylb-metrics, ca: {configMap: {name: stickylb-ca, key: ca.crt}}}
    authorization: {type: Bearer, credentials: {name: scraper-token, key: token}}
    relabelings: [{action: replace, sourceLabels: [__meta_kubernetes_pod_node_name], targetLabel: node}]
    metricRelabelings: [{action: drop, sourceLabels: [__name__], regex: go_.*}]
    prometheusServiceAccount: {name: prometheus-k8s, namespace: monitoring}
`

// prometheusSA is the ServiceAccount TestInstall has the chart bind to the
// metrics-reader ClusterRole, as Prometheus' would be.
const prometheusSA = "prometheus"

// installServiceMonitorCRD installs a ServiceMonitor CRD that accepts any
// spec, so that the chart's ServiceMonitor can be installed; its fields are
// checked against the Prometheus Operator's types in TestTemplateServiceMonitor.
func installServiceMonitorCRD(ctx context.Context, t *testing.T, k8s client.Client) {
	t.Helper()
	preserve := true
	crd := &apiextensionsv1.CustomResourceDefinition{
		ObjectMeta: metav1.ObjectMeta{Name: "servicemonitors.monitoring.coreos.com"},
		Spec: apiextensionsv1.CustomResourceDefinitionSpec{
			Group: "monitoring.coreos.com",
			Names: apiextensionsv1.CustomResourceDefinitionNames{
				Plural: "servicemonitors", Singular: "servicemonitor", Kind: "ServiceMonitor", ListKind: "ServiceMonitorList",
			},
			Scope: apiextensionsv1.NamespaceScoped,
			Versions: []apiextensionsv1.CustomResourceDefinitionVersion{{
				Name: "v1", Served: true, Storage: true,
				Schema: &apiextensionsv1.CustomResourceValidation{OpenAPIV3Schema: &apiextensionsv1.JSONSchemaProps{
					Type: "object", XPreserveUnknownFields: &preserve,
				}},
			}},
		},
	}
	if err := k8s.Create(ctx, crd); err != nil {
		t.Fatal(err)
	}
	for {
		var got apiextensionsv1.CustomResourceDefinition
		err := k8s.Get(ctx, client.ObjectKeyFromObject(crd), &got)
		if err == nil && established(&got) {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("CRD %s not Established (err %v)", crd.Name, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestTemplateMonitoringOffByDefault(t *testing.T) {
	for _, o := range render(t) {
		switch {
		case o.GetKind() == "ServiceMonitor", o.GetKind() == "ConfigMap":
			t.Errorf("the defaults render %s/%s", o.GetKind(), o.GetName())
		case o.GetKind() == "ClusterRoleBinding" && o.GetName() == "stickylb-metrics-reader":
			t.Error("the defaults bind a ServiceAccount to the metrics-reader ClusterRole")
		}
	}
	// Enabled alone, the ServiceMonitor does not bind anyone either.
	for _, o := range render(t, valuesFile(t, "metrics: {serviceMonitor: {enabled: true}}")) {
		if o.GetKind() == "ClusterRoleBinding" && o.GetName() == "stickylb-metrics-reader" {
			t.Error("metrics.serviceMonitor.enabled without prometheusServiceAccount binds a ServiceAccount")
		}
	}
}

func TestTemplateDashboard(t *testing.T) {
	file, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	check := func(t *testing.T, cm *corev1.ConfigMap, wantNS, wantKey, wantValue string) {
		t.Helper()
		if cm.Namespace != wantNS {
			t.Errorf("dashboard ConfigMap in namespace %q, want %q", cm.Namespace, wantNS)
		}
		if got, ok := cm.Labels[wantKey]; !ok || got != wantValue {
			t.Errorf("dashboard ConfigMap labels %v, want %s=%q", cm.Labels, wantKey, wantValue)
		}
		if len(cm.Data) != 1 {
			t.Fatalf("dashboard ConfigMap data keys %v, want one JSON file", slices.Sorted(maps.Keys(cm.Data)))
		}
		for key, data := range cm.Data {
			if !strings.HasSuffix(key, ".json") {
				t.Errorf("data key %q: the sidecar writes it as the file name; want a .json name", key)
			}
			if !json.Valid([]byte(data)) {
				t.Fatalf("data %s is not valid JSON", key)
			}
			if strings.TrimSpace(data) != strings.TrimSpace(string(file)) {
				t.Errorf("data %s differs from %s", key, dashboardFile)
			}
		}
	}
	t.Run("defaults", func(t *testing.T) {
		objs := render(t, valuesFile(t, "metrics: {dashboard: {enabled: true}}"))
		cm := only[corev1.ConfigMap](t, objs, "ConfigMap", "stickylb-dashboard")
		check(t, cm, namespace, "grafana_dashboard", "1")
	})
	t.Run("custom label namespace and folder", func(t *testing.T) {
		objs := render(t, valuesFile(t, monitoringValues))
		cm := only[corev1.ConfigMap](t, objs, "ConfigMap", "stickylb-dashboard")
		check(t, cm, "monitoring", "example.com/dashboard", "stickylb")
		if _, ok := cm.Labels["grafana_dashboard"]; ok {
			t.Errorf("labels %v: the default sidecar label stays although another was asked for", cm.Labels)
		}
		if cm.Labels["team"] != "network" || cm.Annotations["grafana_folder"] != "Networking" {
			t.Errorf("labels %v annotations %v, want team=network and grafana_folder=Networking", cm.Labels, cm.Annotations)
		}
	})
}

// serviceMonitor decodes the rendered ServiceMonitor strictly into the
// Prometheus Operator's own type, so a misspelt field fails.
func serviceMonitor(t *testing.T, objs []*unstructured.Unstructured) *monitoringv1.ServiceMonitor {
	t.Helper()
	var found []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == "ServiceMonitor" {
			found = append(found, o)
		}
	}
	if len(found) != 1 {
		t.Fatalf("want one ServiceMonitor, got %d: %v", len(found), kinds(objs))
	}
	if found[0].GetAPIVersion() != "monitoring.coreos.com/v1" {
		t.Errorf("ServiceMonitor apiVersion %q", found[0].GetAPIVersion())
	}
	raw, err := json.Marshal(found[0].Object)
	if err != nil {
		t.Fatal(err)
	}
	var sm monitoringv1.ServiceMonitor
	if err := yaml.UnmarshalStrict(raw, &sm); err != nil {
		t.Fatalf("the ServiceMonitor is not a monitoring.coreos.com/v1 ServiceMonitor: %v\n%s", err, raw)
	}
	return &sm
}

func TestTemplateServiceMonitor(t *testing.T) {
	objs := render(t, valuesFile(t, "metrics: {serviceMonitor: {enabled: true}}"))
	sm := serviceMonitor(t, objs)
	svc := only[corev1.Service](t, objs, "Service", "stickylb-metrics")
	if sm.Namespace != namespace || !slices.Equal(sm.Spec.NamespaceSelector.MatchNames, []string{namespace}) {
		t.Errorf("ServiceMonitor in %q selecting namespaces %v, want %s", sm.Namespace, sm.Spec.NamespaceSelector.MatchNames, namespace)
	}
	// It selects the metrics Service, and no other Service the chart makes.
	if len(sm.Spec.Selector.MatchLabels) == 0 || len(sm.Spec.Selector.MatchExpressions) != 0 {
		t.Fatalf("ServiceMonitor selector %+v, want matchLabels only", sm.Spec.Selector)
	}
	sel := labels.SelectorFromSet(sm.Spec.Selector.MatchLabels)
	for _, o := range objs {
		if o.GetKind() == "Service" && sel.Matches(labels.Set(o.GetLabels())) != (o.GetName() == svc.Name) {
			t.Errorf("ServiceMonitor selector %v vs Service %s labels %v", sm.Spec.Selector.MatchLabels, o.GetName(), o.GetLabels())
		}
	}
	if len(sm.Spec.Endpoints) != 1 {
		t.Fatalf("endpoints %+v, want one", sm.Spec.Endpoints)
	}
	ep := sm.Spec.Endpoints[0]
	if len(svc.Spec.Ports) != 1 || ep.Port != svc.Spec.Ports[0].Name || ep.Port == "" {
		t.Errorf("endpoint port %q, want the metrics Service's port name (ports %+v)", ep.Port, svc.Spec.Ports)
	}
	if ep.Scheme.String() != "https" || ep.Path != "/metrics" {
		t.Errorf("endpoint scheme %q path %q, want https /metrics", ep.Scheme.String(), ep.Path)
	}
	// The managers check the scraper's own ServiceAccount token with the API
	// server, and serve a self-signed certificate.
	if ep.BearerTokenFile != "/var/run/secrets/kubernetes.io/serviceaccount/token" || ep.Authorization != nil {
		t.Errorf("endpoint bearerTokenFile %q authorization %+v, want Prometheus' ServiceAccount token", ep.BearerTokenFile, ep.Authorization)
	}
	if ep.TLSConfig == nil || ep.TLSConfig.InsecureSkipVerify == nil || !*ep.TLSConfig.InsecureSkipVerify {
		t.Errorf("endpoint tlsConfig %+v, want insecureSkipVerify", ep.TLSConfig)
	}
	if ep.Interval != "30s" || ep.ScrapeTimeout != "" {
		t.Errorf("interval %q scrapeTimeout %q, want 30s and Prometheus' default", ep.Interval, ep.ScrapeTimeout)
	}

	t.Run("non-default", func(t *testing.T) {
		objs := render(t, valuesFile(t, monitoringValues))
		sm := serviceMonitor(t, objs)
		ep := sm.Spec.Endpoints[0]
		if sm.Labels["release"] != "kube-prometheus-stack" || ep.Interval != "1m" || ep.ScrapeTimeout != "20s" {
			t.Errorf("labels %v interval %q scrapeTimeout %q", sm.Labels, ep.Interval, ep.ScrapeTimeout)
		}
		if ep.TLSConfig == nil || ep.TLSConfig.InsecureSkipVerify != nil || ep.TLSConfig.ServerName == nil || *ep.TLSConfig.ServerName != "stickylb-metrics" ||
			ep.TLSConfig.CA.ConfigMap == nil || ep.TLSConfig.CA.ConfigMap.Name != "stickylb-ca" {
			t.Errorf("tlsConfig %+v, want the given one instead of insecureSkipVerify", ep.TLSConfig)
		}
		if ep.BearerTokenFile != "" || ep.Authorization == nil || ep.Authorization.Credentials == nil || ep.Authorization.Credentials.Name != "scraper-token" {
			t.Errorf("bearerTokenFile %q authorization %+v, want the given authorization instead of the file", ep.BearerTokenFile, ep.Authorization)
		}
		if len(ep.RelabelConfigs) != 1 || ep.RelabelConfigs[0].TargetLabel != "node" || len(ep.MetricRelabelConfigs) != 1 {
			t.Errorf("relabelings %+v metricRelabelings %+v", ep.RelabelConfigs, ep.MetricRelabelConfigs)
		}
		crb := only[rbacv1.ClusterRoleBinding](t, objs, "ClusterRoleBinding", "stickylb-metrics-reader")
		want := []rbacv1.Subject{{Kind: "ServiceAccount", Name: "prometheus-k8s", Namespace: "monitoring"}}
		if crb.RoleRef != (rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "stickylb-metrics-reader"}) || !slices.Equal(crb.Subjects, want) {
			t.Errorf("ClusterRoleBinding %+v %+v, want prometheus-k8s in monitoring bound to stickylb-metrics-reader", crb.RoleRef, crb.Subjects)
		}
	})

	for _, tc := range []struct{ name, values, want string }{
		{"without the metrics Service", "metrics: {service: {enabled: false}, serviceMonitor: {enabled: true}}", "needs metrics.service.enabled"},
		{"Prometheus' ServiceAccount without a namespace", "metrics: {serviceMonitor: {prometheusServiceAccount: {name: prometheus}}}", "prometheusServiceAccount.namespace is required"},
		{"Prometheus' namespace without a ServiceAccount", "metrics: {serviceMonitor: {prometheusServiceAccount: {namespace: monitoring}}}", "prometheusServiceAccount.name is required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := runHelm(t, "template", release, chartDir, "-f", valuesFile(t, tc.values))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("values %q: err %v, want one containing %q", tc.values, err, tc.want)
			}
		})
	}
}

// dashboard is the part of Grafana's dashboard model the tests read.
type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
			Regex string `json:"regex"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int               `json:"id"`
	Type       string            `json:"type"`
	Title      string            `json:"title"`
	Datasource map[string]string `json:"datasource"`
	GridPos    struct{ H, W, X, Y int }
	Targets    []struct {
		RefID      string            `json:"refId"`
		Expr       string            `json:"expr"`
		Datasource map[string]string `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's
}

// query is one PromQL expression of the dashboard and where it is.
type query struct{ where, expr string }

func loadDashboard(t *testing.T) (*dashboard, []query) {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	if !json.Valid(b) {
		t.Fatalf("%s is not valid JSON", dashboardFile)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	if d.UID == "" || d.Title == "" {
		t.Errorf("dashboard uid %q title %q: want both", d.UID, d.Title)
	}
	var qs []query
	ids := map[int]bool{}
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			if ids[p.ID] {
				t.Errorf("panel id %d used twice", p.ID)
			}
			ids[p.ID] = true
			if p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 {
				t.Errorf("panel %q: gridPos %+v outside the 24 columns", p.Title, p.GridPos)
			}
			if p.Type != "row" && (p.Datasource["uid"] != "${datasource}" || len(p.Targets) == 0) {
				t.Errorf("panel %q: datasource %v, %d queries; want ${datasource} and a query", p.Title, p.Datasource, len(p.Targets))
			}
			for _, tg := range p.Targets {
				if tg.Datasource["uid"] != "${datasource}" {
					t.Errorf("panel %q query %s: datasource %v, want ${datasource}", p.Title, tg.RefID, tg.Datasource)
				}
				qs = append(qs, query{fmt.Sprintf("panel %q query %s", p.Title, tg.RefID), tg.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	// Query variables: label_values(SELECTOR, LABEL); the selector is PromQL.
	labelValues := regexp.MustCompile(`^label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$`)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q, _ := v.Query.(string)
		m := labelValues.FindStringSubmatch(q)
		if m == nil {
			t.Errorf("variable %s: query %q, want label_values(SELECTOR, LABEL)", v.Name, v.Query)
			continue
		}
		qs = append(qs, query{"variable " + v.Name, m[1]})
	}
	return &d, qs
}

var grafanaVariable = regexp.MustCompile(`\$(?:\{([a-zA-Z0-9_]+)(?::[a-z]+)?\}|([a-zA-Z0-9_]+))`)

// concrete replaces Grafana's variables with values PromQL accepts: a
// duration for the interval ones, a word for the dashboard's own.
func concrete(t *testing.T, d *dashboard, where, expr string) string {
	t.Helper()
	defined := map[string]bool{}
	for _, v := range d.Templating.List {
		defined[v.Name] = true
	}
	return grafanaVariable.ReplaceAllStringFunc(expr, func(m string) string {
		sub := grafanaVariable.FindStringSubmatch(m)
		name := sub[1] + sub[2]
		switch {
		case name == "__rate_interval" || name == "__interval" || name == "__range":
			return "5m"
		case defined[name]:
			return "value"
		}
		t.Errorf("%s: %s is no variable of the dashboard's", where, m)
		return m
	})
}

var promql = parser.NewParser(parser.Options{})

func TestDashboardQueriesParse(t *testing.T) {
	d, qs := loadDashboard(t)
	if len(qs) < 40 {
		t.Fatalf("found %d queries in the dashboard; the walk misses panels", len(qs))
	}
	names := map[string]bool{}
	for _, q := range qs {
		expr, err := promql.ParseExpr(concrete(t, d, q.where, q.expr))
		if err != nil {
			t.Errorf("%s: %q does not parse: %v", q.where, q.expr, err)
			continue
		}
		for _, s := range selectors(expr) {
			names[s.name] = true
		}
	}
	// What issue 17 asks the dashboard to show.
	for _, want := range []string{
		"stickylb_byte_count_total", "stickylb_packet_count_total", "stickylb_syn_count_total", "stickylb_active_flows",
		"stickylb_health_probe_status", "stickylb_refused_total", "stickylb_dial_failures_total", "stickylb_dial_retries_total",
		"stickylb_udp_sessions", "stickylb_table_rebuilds_total", "stickylb_snapshot_version",
		"stickylb_pins", "stickylb_pins_overriding", "stickylb_pins_created_total", "stickylb_pins_expired_total",
		"stickylb_peers", "stickylb_peer_sync_lag_seconds_bucket",
	} {
		if !names[want] {
			t.Errorf("the dashboard does not show %s", want)
		}
	}
	vars := map[string]bool{}
	for _, v := range d.Templating.List {
		vars[v.Name+"/"+v.Type] = true
	}
	for _, want := range []string{"datasource/datasource", "namespace/query", "rule/query", "backend/query"} {
		if !vars[want] {
			t.Errorf("the dashboard lacks the variable %s (have %v)", want, vars)
		}
	}
}

// selector is a vector selector of a query: the metric and its matchers.
type selector struct {
	name     string
	matchers []*promlabels.Matcher
}

func selectorOf(vs *parser.VectorSelector) selector {
	s := selector{name: vs.Name}
	for _, m := range vs.LabelMatchers {
		if m.Name == model.MetricNameLabel {
			if s.name == "" && m.Type == promlabels.MatchEqual {
				s.name = m.Value
			}
			continue
		}
		s.matchers = append(s.matchers, m)
	}
	return s
}

func selectors(expr parser.Expr) []selector {
	var out []selector
	parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			out = append(out, selectorOf(vs))
		}
		return nil
	})
	return out
}

// targetLabels are the labels Prometheus (through a ServiceMonitor) adds to
// every scraped series; the binary does not export them.
var targetLabels = []string{"pod", "instance", "job", "namespace", "service", "endpoint", "container"}

// exported is what one scrape shows: each family, by the names a query
// may use for it, with its label names and values.
type exported map[string]map[string]map[string]bool // name → label → values

func parseScrape(t *testing.T, body string) exported {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse the scrape: %v", err)
	}
	ex := exported{}
	add := func(name string, m *dto.Metric, extra ...string) {
		ls := ex[name]
		if ls == nil {
			ls = map[string]map[string]bool{}
			ex[name] = ls
		}
		for _, lp := range m.GetLabel() {
			if ls[lp.GetName()] == nil {
				ls[lp.GetName()] = map[string]bool{}
			}
			ls[lp.GetName()][lp.GetValue()] = true
		}
		for _, l := range extra {
			if ls[l] == nil {
				ls[l] = map[string]bool{}
			}
		}
	}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			switch f.GetType() {
			case dto.MetricType_HISTOGRAM:
				add(name+"_bucket", m, "le")
				add(name+"_sum", m)
				add(name+"_count", m)
			case dto.MetricType_SUMMARY:
				add(name, m, "quantile")
				add(name+"_sum", m)
				add(name+"_count", m)
			default:
				add(name, m)
			}
		}
	}
	return ex
}

// checkLabels walks expr and returns the labels its result may carry,
// reporting a grouping or matching label that the series beneath it lack.
func checkLabels(t *testing.T, where string, ex exported, expr parser.Expr) map[string]bool {
	t.Helper()
	union := func(sets ...map[string]bool) map[string]bool {
		out := map[string]bool{}
		for _, s := range sets {
			for k := range s {
				out[k] = true
			}
		}
		return out
	}
	need := func(have map[string]bool, ls []string, what string) {
		for _, l := range ls {
			if !have[l] {
				t.Errorf("%s: %s %q, which the series beneath (labels %v) do not carry", where, what, l, sortedKeys(have))
			}
		}
	}
	switch e := expr.(type) {
	case *parser.VectorSelector:
		s := selectorOf(e)
		have := map[string]bool{}
		for l := range ex[s.name] {
			have[l] = true
		}
		for _, l := range targetLabels {
			have[l] = true
		}
		for _, m := range s.matchers {
			if !have[m.Name] {
				t.Errorf("%s: %s has no label %q (it has %v)", where, s.name, m.Name, sortedKeys(ex[s.name]))
			}
			// A fixed value must be one the binary exports.
			if m.Type == promlabels.MatchEqual && !slices.Contains(targetLabels, m.Name) && !ex[s.name][m.Name][m.Value] {
				t.Errorf("%s: %s{%s=%q}: the binary exports %s only as %v", where, s.name, m.Name, m.Value, m.Name, sortedKeys(ex[s.name][m.Name]))
			}
		}
		return have
	case *parser.MatrixSelector:
		return checkLabels(t, where, ex, e.VectorSelector)
	case *parser.ParenExpr:
		return checkLabels(t, where, ex, e.Expr)
	case *parser.NumberLiteral, *parser.StringLiteral:
		return map[string]bool{}
	case *parser.Call:
		var sets []map[string]bool
		for _, a := range e.Args {
			sets = append(sets, checkLabels(t, where, ex, a))
		}
		out := union(sets...)
		if e.Func.Name == "histogram_quantile" {
			need(out, []string{"le"}, "histogram_quantile needs")
			delete(out, "le")
		}
		return out
	case *parser.AggregateExpr:
		inner := checkLabels(t, where, ex, e.Expr)
		if e.Param != nil {
			checkLabels(t, where, ex, e.Param)
		}
		if e.Without {
			out := union(inner)
			for _, l := range e.Grouping {
				delete(out, l)
			}
			return out
		}
		need(inner, e.Grouping, e.Op.String()+" by")
		out := map[string]bool{}
		for _, l := range e.Grouping {
			out[l] = true
		}
		if e.Op == parser.COUNT_VALUES {
			if s, ok := e.Param.(*parser.StringLiteral); ok {
				out[s.Val] = true
			}
		}
		return out
	case *parser.BinaryExpr:
		lhs := checkLabels(t, where, ex, e.LHS)
		rhs := checkLabels(t, where, ex, e.RHS)
		if vm := e.VectorMatching; vm != nil && vm.On {
			need(lhs, vm.MatchingLabels, "on")
			need(rhs, vm.MatchingLabels, "on")
		}
		if e.LHS.Type() == parser.ValueTypeScalar {
			return rhs
		}
		return lhs
	case *parser.UnaryExpr:
		return checkLabels(t, where, ex, e.Expr)
	default:
		t.Errorf("%s: the label check does not know %T; teach it", where, expr)
		return map[string]bool{}
	}
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}

// TestDashboardMetricsAreExported runs the real binary as `stickylb proxy`
// with a rule that has every feature the dashboard shows (TCP and UDP,
// ClientIP pins, a probe, the PROXY protocol, peers), sends it traffic, and
// checks that every series the dashboard selects is in its scrape, with the
// labels the dashboard groups and filters by.
func TestDashboardMetricsAreExported(t *testing.T) {
	d, qs := loadDashboard(t)
	bin := stickylbBinary(t)
	backendIPs := []netip.Addr{netip.MustParseAddr("127.0.1.1"), netip.MustParseAddr("127.0.1.2")}
	backendPort := testbackend.FreePort(t, backendIPs...)
	backends := testbackend.StartN(t, len(backendIPs), backendPort)
	frontPort := testbackend.FreePort(t)
	dir := t.TempDir()
	rules := filepath.Join(dir, "rules.yaml")
	writeTestFile(t, rules, fmt.Sprintf(`apiVersion: lb.stickylb.io/v1alpha1
kind: LoadBalancerRule
metadata:
  name: web
  namespace: shop
spec:
  frontend:
    port: %d
  backendPool:
    addresses: [%s, %s]
  backendPort: %d
  protocol: All
  sessionPersistence: ClientIP
  proxyProtocol: V2
  probe:
    protocol: TCP
    intervalInSeconds: 5
`, frontPort, backends[0].Addr.Addr(), backends[1].Addr.Addr(), backendPort))
	keyFile := filepath.Join(dir, "peer-key")
	writeTestFile(t, keyFile, base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{3}, 32))+"\n")
	peerAddr := net.JoinHostPort("127.0.0.1", fmt.Sprint(testbackend.FreePort(t)))
	metricsAddr := testenv.FreeAddr(t)

	var logs testenv.Output
	cmd := exec.Command(bin, "proxy", "--rules", rules, "--bind-address", "127.0.0.1", "--metrics-bind-address", metricsAddr,
		"--peer-key-file", keyFile, "--peers", peerAddr, "--peer-bind-address", peerAddr)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("stickylb proxy logged:\n%s", logs.String())
		}
	})

	// Traffic: TCP connections that send and close (packets are counted at
	// close), and UDP sessions, from a few clients.
	// The log line comes once every listener is open: a TCP listener
	// accepts before the UDP one of the same rule is bound.
	front := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), frontPort)
	testbackend.Eventually(t, 20*time.Second, "the proxy loads its rules", func() bool {
		return strings.Contains(logs.String(), `"rules loaded"`)
	})
	for i := range 8 {
		name, c, err := testbackend.BackendOf(testbackend.ClientIP(i), front)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("hello\n")); err != nil {
			t.Fatal(err)
		}
		c.Close()
		if reply, err := testbackend.UDPExchange(testbackend.UDPClient(t, testbackend.ClientIP(i), front)); err != nil || reply != name {
			t.Errorf("client %d: UDP reached %q (err %v), TCP %q; one ClientIP rule sends both to one backend", i, reply, err, name)
		}
	}

	scrape := func() string {
		resp, err := http.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
		}
		return string(body)
	}
	type use struct {
		where string
		expr  parser.Expr
	}
	var uses []use
	used := map[string]bool{}
	for _, q := range qs {
		expr, err := promql.ParseExpr(concrete(t, d, q.where, q.expr))
		if err != nil {
			t.Fatalf("%s: %v (TestDashboardQueriesParse says more)", q.where, err)
		}
		uses = append(uses, use{q.where, expr})
		for _, s := range selectors(expr) {
			used[s.name] = true
		}
	}
	// Series of a connection appear when it closes: wait for the traffic to show.
	var ex exported
	deadline := time.Now().Add(15 * time.Second)
	for {
		ex = parseScrape(t, scrape())
		var missing []string
		for name := range used {
			if ex[name] == nil {
				missing = append(missing, name)
			}
		}
		_, udp := ex["stickylb_active_flows"]["protocol"]["UDP"]
		packets := ex["stickylb_packet_count_total"] != nil
		if len(missing) == 0 && udp && packets {
			break
		}
		if time.Now().After(deadline) {
			sort.Strings(missing)
			t.Fatalf("the dashboard uses metrics that `stickylb proxy` does not export: %v", missing)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, u := range uses {
		checkLabels(t, u.where, ex, u.expr)
	}

	// The namespace variable's regex takes the namespace out of the rule label.
	for _, v := range d.Templating.List {
		if v.Name != "namespace" {
			continue
		}
		re, err := regexp.Compile(strings.TrimSuffix(strings.TrimPrefix(v.Regex, "/"), "/"))
		if err != nil {
			t.Fatalf("variable namespace: regex %q: %v", v.Regex, err)
		}
		var got []string
		for rule := range ex["stickylb_table_rebuilds_total"]["rule"] {
			if m := re.FindStringSubmatch(rule); len(m) == 2 {
				got = append(got, m[1])
			}
		}
		if !slices.Equal(got, []string{"shop"}) {
			t.Errorf("variable namespace over rules %v gives %v, want [shop]", sortedKeys(ex["stickylb_table_rebuilds_total"]["rule"]), got)
		}
	}
}

func writeTestFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}
