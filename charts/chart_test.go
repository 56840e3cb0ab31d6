// Package charts_test checks the Helm chart in stickylb/ with the pinned helm
// binary: lint, rendering, the values schema, that its CRD and RBAC are the
// generated ones, and a real install into a real API server.
package charts_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	"github.com/stickylb/stickylb/config/crd"
	"github.com/stickylb/stickylb/internal/testenv"
)

const (
	chartDir  = "stickylb"
	crdFile   = "lb.stickylb.io_loadbalancerrules.yaml"
	release   = "stickylb"
	namespace = "stickylb-system"
)

// helm is the pinned helm binary (hack/versions.env) from KUBEBUILDER_ASSETS.
var helm string

func TestMain(m *testing.M) {
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is not set: run these tests with `make test`")
		os.Exit(1)
	}
	helm = filepath.Join(assets, "helm")
	if _, err := os.Stat(helm); err != nil {
		// An assets directory made before helm was pinned: build it into the same cache.
		out, err := exec.Command("../hack/test-binaries.sh", "helm").Output()
		if err != nil {
			fmt.Fprintln(os.Stderr, "hack/test-binaries.sh helm:", err)
			os.Exit(1)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		helm = filepath.Join(lines[len(lines)-1], "helm")
	}
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// runHelm runs helm with a private home, so no user configuration leaks in.
func runHelm(t *testing.T, args ...string) (stdout string, err error) {
	t.Helper()
	home := t.TempDir()
	cmd := exec.Command(helm, args...)
	cmd.Env = append(os.Environ(),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"),
		"KUBECONFIG="+filepath.Join(home, "no-kubeconfig"))
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("helm %s: %w\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out.String(), nil
}

// valuesFile writes values to a file for helm -f.
func valuesFile(t *testing.T, values string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(p, []byte(values), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// render runs helm template with the given values files and returns the objects.
// render is what helm install creates: the chart without its hooks.
func render(t *testing.T, valueFiles ...string) []*unstructured.Unstructured {
	t.Helper()
	return renderArgs(t, append([]string{"--no-hooks"}, valueFiles...)...)
}

// renderHooks is the chart's hooks only.
func renderHooks(t *testing.T) []*unstructured.Unstructured {
	t.Helper()
	var hooks []*unstructured.Unstructured
	for _, o := range renderArgs(t) {
		if o.GetAnnotations()["helm.sh/hook"] != "" {
			hooks = append(hooks, o)
		}
	}
	return hooks
}

func renderArgs(t *testing.T, flagsAndValueFiles ...string) []*unstructured.Unstructured {
	t.Helper()
	args := []string{"template", release, chartDir, "--namespace", namespace}
	for _, f := range flagsAndValueFiles {
		if strings.HasPrefix(f, "--") {
			args = append(args, f)
			continue
		}
		args = append(args, "-f", f)
	}
	out, err := runHelm(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	return decodeAll(t, out)
}

func decodeAll(t *testing.T, manifests string) []*unstructured.Unstructured {
	t.Helper()
	var objs []*unstructured.Unstructured
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(manifests), 4096)
	for {
		var m map[string]any
		err := dec.Decode(&m)
		if errors.Is(err, io.EOF) {
			return objs
		}
		if err != nil {
			t.Fatalf("decode rendered manifests: %v", err)
		}
		if len(m) > 0 {
			objs = append(objs, &unstructured.Unstructured{Object: m})
		}
	}
}

// only returns the one rendered object of kind and name (any name if empty), as T.
func only[T any](t *testing.T, objs []*unstructured.Unstructured, kind, name string) *T {
	t.Helper()
	var found []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == kind && (name == "" || o.GetName() == name) {
			found = append(found, o)
		}
	}
	if len(found) != 1 {
		t.Fatalf("want one %s %q in the rendered chart, got %d", kind, name, len(found))
	}
	var v T
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(found[0].Object, &v); err != nil {
		t.Fatalf("%s %s: %v", kind, name, err)
	}
	return &v
}

func kinds(objs []*unstructured.Unstructured) []string {
	var ks []string
	for _, o := range objs {
		ks = append(ks, o.GetKind()+"/"+o.GetName())
	}
	slices.Sort(ks)
	return ks
}

func appVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		APIVersion string `json:"apiVersion"`
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	if c.APIVersion != "v2" || c.AppVersion == "" {
		t.Fatalf("Chart.yaml: apiVersion %q appVersion %q; want v2 and a non-empty appVersion", c.APIVersion, c.AppVersion)
	}
	return c.AppVersion
}

func TestChartCRDIsTheGeneratedOne(t *testing.T) {
	copied, err := os.ReadFile(filepath.Join(chartDir, "files", crdFile))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(copied, crd.LoadBalancerRuleCRD) {
		t.Fatalf("charts/stickylb/files/%s differs from config/crd/bases/%s: run `make manifests`", crdFile, crdFile)
	}

	// The template adds labels and the keep annotation and must change nothing else.
	rendered := only[apiextensionsv1.CustomResourceDefinition](t, render(t), "CustomResourceDefinition", "")
	if got := rendered.Annotations["helm.sh/resource-policy"]; got != "keep" {
		t.Errorf("CRD annotation helm.sh/resource-policy = %q, want keep", got)
	}
	var generated apiextensionsv1.CustomResourceDefinition
	if err := yaml.UnmarshalStrict(crd.LoadBalancerRuleCRD, &generated); err != nil {
		t.Fatal(err)
	}
	delete(rendered.Annotations, "helm.sh/resource-policy")
	rendered.Labels = nil
	if !reflect.DeepEqual(rendered, &generated) {
		a, _ := yaml.Marshal(rendered)
		b, _ := yaml.Marshal(&generated)
		t.Errorf("rendered CRD differs from the generated one:\n--- rendered\n%s\n--- generated\n%s", a, b)
	}
}

func TestLint(t *testing.T) {
	for name, values := range map[string]string{
		"defaults":    "",
		"non-default": nonDefaultValues,
		"monitoring":  monitoringValues,
	} {
		t.Run(name, func(t *testing.T) {
			if out, err := runHelm(t, "lint", "--strict", chartDir, "-f", valuesFile(t, values)); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
		})
	}
}

func TestTemplateDefaults(t *testing.T) {
	objs := render(t)
	want := []string{
		"ClusterRole/stickylb-manager", "ClusterRole/stickylb-metrics-reader",
		"ClusterRoleBinding/stickylb-manager", "CustomResourceDefinition/loadbalancerrules.lb.stickylb.io",
		"Deployment/stickylb", "PodDisruptionBudget/stickylb", "Role/stickylb-manager",
		"RoleBinding/stickylb-manager", "Secret/stickylb-peers", "Service/stickylb-metrics", "ServiceAccount/stickylb",
	}
	if got := kinds(objs); !slices.Equal(got, want) {
		t.Errorf("rendered objects:\n got %v\nwant %v", got, want)
	}
	// The uninstall hook is a pre-delete hook only, and its pod is no replica:
	// the manager's pod selector must not match it.
	hooks := renderHooks(t)
	wantHooks := []string{"Job/stickylb-scale-down", "Role/stickylb-scale-down", "RoleBinding/stickylb-scale-down", "ServiceAccount/stickylb-scale-down"}
	if got := kinds(hooks); !slices.Equal(got, wantHooks) {
		t.Errorf("rendered hooks:\n got %v\nwant %v", got, wantHooks)
	}
	for _, o := range hooks {
		if got := o.GetAnnotations()["helm.sh/hook"]; got != "pre-delete" {
			t.Errorf("%s/%s: helm.sh/hook %q, want pre-delete", o.GetKind(), o.GetName(), got)
		}
		if o.GetKind() == "Job" {
			podLabels, _, _ := unstructured.NestedStringMap(o.Object, "spec", "template", "metadata", "labels")
			if podLabels["app.kubernetes.io/name"] == "stickylb" {
				t.Errorf("the scale-down Job's pod carries the manager's selector labels: %v", podLabels)
			}
		}
	}
	for _, o := range objs {
		if o.GetKind() != "CustomResourceDefinition" && !strings.HasPrefix(o.GetKind(), "Cluster") && o.GetNamespace() != namespace {
			t.Errorf("%s/%s in namespace %q, want the release namespace %s", o.GetKind(), o.GetName(), o.GetNamespace(), namespace)
		}
	}

	d := only[appsv1.Deployment](t, objs, "Deployment", "stickylb")
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
		t.Errorf("replicas = %v, want 2", d.Spec.Replicas)
	}
	pod := d.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("want one container, got %d", len(pod.Containers))
	}
	c := pod.Containers[0]
	if want := "ghcr.io/stickylb/stickylb:" + appVersion(t); c.Image != want {
		t.Errorf("image = %q, want %q", c.Image, want)
	}
	if c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("imagePullPolicy = %q", c.ImagePullPolicy)
	}
	for _, arg := range []string{"--leader-elect", "--metrics-secure", "--metrics-bind-address=:8443", "--health-probe-bind-address=:8081",
		"--dataplane-pod-selector=app.kubernetes.io/name=stickylb,app.kubernetes.io/instance=stickylb",
		"--shutdown-timeout=20s", "--shutdown-delay=5s", "--drain-timeout=30s"} {
		if !slices.Contains(c.Args, arg) {
			t.Errorf("args %v lack %s", c.Args, arg)
		}
	}
	for _, flag := range []string{"--controller=false", "--dataplane=false"} {
		if slices.Contains(c.Args, flag) {
			t.Errorf("args %v turn a role off (%s); the chart runs both", c.Args, flag)
		}
	}
	env := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			env[e.Name] = e.ValueFrom.FieldRef.FieldPath
		}
	}
	if env["POD_IP"] != "status.podIP" || env["POD_NAMESPACE"] != "metadata.namespace" || env["POD_NAME"] != "metadata.name" {
		t.Errorf("downward-API env = %v, want POD_IP=status.podIP, POD_NAMESPACE=metadata.namespace and POD_NAME=metadata.name", env)
	}
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	if ports["metrics"] != 8443 || ports["health"] != 8081 {
		t.Errorf("container ports = %v, want metrics 8443 and health 8081", ports)
	}
	for probeName, probe := range map[string]*corev1.Probe{"/healthz": c.LivenessProbe, "/readyz": c.ReadinessProbe} {
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != probeName || probe.HTTPGet.Port != intstr.FromString("health") {
			t.Errorf("probe for %s = %+v, want httpGet %s on port health", probeName, probe, probeName)
		}
	}
	// Readiness means serving and fails at once on SIGTERM: probed often, so
	// a replica that is not deleted leaves the frontends within seconds.
	if rp := c.ReadinessProbe; rp == nil || rp.PeriodSeconds != 2 || rp.FailureThreshold != 2 {
		t.Errorf("readiness probe = %+v, want periodSeconds 2, failureThreshold 2", rp)
	}
	// The grace period covers the whole shutdown: 20s + 5s + 30s.
	if g := pod.TerminationGracePeriodSeconds; g == nil || *g != 60 {
		t.Errorf("terminationGracePeriodSeconds = %v, want 60", g)
	}
	// A new replica is Ready before an old one stops.
	if st := d.Spec.Strategy; st.Type != appsv1.RollingUpdateDeploymentStrategyType || st.RollingUpdate == nil ||
		st.RollingUpdate.MaxSurge == nil || *st.RollingUpdate.MaxSurge != intstr.FromInt32(1) ||
		st.RollingUpdate.MaxUnavailable == nil || *st.RollingUpdate.MaxUnavailable != intstr.FromInt32(0) {
		t.Errorf("strategy = %+v, want RollingUpdate with maxSurge 1, maxUnavailable 0", st)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("resources = %+v, want CPU requests and memory limits", c.Resources)
	}

	// The Dockerfile's image runs as 65532; the pod must run as that user.
	if sc := pod.SecurityContext; sc == nil || sc.RunAsUser == nil || *sc.RunAsUser != 65532 || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot ||
		sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod securityContext = %+v", sc)
	}
	dockerfile, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(dockerfile, []byte("\nUSER 65532:65532\n")) {
		t.Error("the Dockerfile no longer runs as 65532:65532; update the chart's runAsUser")
	}
	if sc := c.SecurityContext; sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.Capabilities == nil ||
		!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 {
		t.Errorf("container securityContext = %+v", sc)
	}

	aa := pod.Affinity
	if aa == nil || aa.PodAntiAffinity == nil || len(aa.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution) != 1 ||
		len(aa.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution) != 0 {
		t.Fatalf("affinity = %+v, want one preferred pod anti-affinity term", aa)
	}
	term := aa.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution[0].PodAffinityTerm
	if term.TopologyKey != "kubernetes.io/hostname" || !reflect.DeepEqual(term.LabelSelector.MatchLabels, d.Spec.Selector.MatchLabels) {
		t.Errorf("anti-affinity term = %+v, want topologyKey kubernetes.io/hostname over the Deployment's selector", term)
	}

	pdb := only[policyv1.PodDisruptionBudget](t, objs, "PodDisruptionBudget", "stickylb")
	if pdb.Spec.MaxUnavailable == nil || *pdb.Spec.MaxUnavailable != intstr.FromInt32(1) ||
		!reflect.DeepEqual(pdb.Spec.Selector.MatchLabels, d.Spec.Selector.MatchLabels) {
		t.Errorf("PDB spec = %+v, want maxUnavailable 1 over the Deployment's pods", pdb.Spec)
	}
	svc := only[corev1.Service](t, objs, "Service", "stickylb-metrics")
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 8443 || svc.Spec.Ports[0].Name != "https" ||
		svc.Spec.Ports[0].TargetPort != intstr.FromString("metrics") || !reflect.DeepEqual(svc.Spec.Selector, d.Spec.Selector.MatchLabels) {
		t.Errorf("metrics Service spec = %+v, want https 8443 -> the pods' metrics port", svc.Spec)
	}
	sa := only[corev1.ServiceAccount](t, objs, "ServiceAccount", "")
	if pod.ServiceAccountName != sa.Name {
		t.Errorf("pod serviceAccountName %q, chart's ServiceAccount %q", pod.ServiceAccountName, sa.Name)
	}

	// Replicas share pins with a key the chart makes: a Secret, mounted
	// read-only, named by --peer-key-file, and the peer port open.
	secret := only[corev1.Secret](t, objs, "Secret", "stickylb-peers")
	if key, err := base64.StdEncoding.DecodeString(string(secret.Data["key"])); err != nil || len(key) != 32 {
		t.Errorf("Secret stickylb-peers key %q: want the base64 of 32 bytes (err %v, %d bytes)", secret.Data["key"], err, len(key))
	}
	other := only[corev1.Secret](t, render(t), "Secret", "stickylb-peers")
	if bytes.Equal(other.Data["key"], secret.Data["key"]) {
		t.Error("two renderings made the same key: it is not random")
	}
	checkPeers(t, d, "stickylb-peers", 7946)
}

// checkPeers checks that the pod mounts the peer key from secretName
// read-only, points --peer-key-file at it, and opens port on TCP and UDP.
func checkPeers(t *testing.T, d *appsv1.Deployment, secretName string, port int32) {
	t.Helper()
	pod := d.Spec.Template.Spec
	c := pod.Containers[0]
	var mount *corev1.VolumeMount
	for i := range c.VolumeMounts {
		if c.VolumeMounts[i].Name == "peer-key" {
			mount = &c.VolumeMounts[i]
		}
	}
	if mount == nil || !mount.ReadOnly {
		t.Fatalf("volume mounts %+v: want peer-key, read-only", c.VolumeMounts)
	}
	if want := "--peer-key-file=" + mount.MountPath + "/key"; !slices.Contains(c.Args, want) {
		t.Errorf("args %v lack %s", c.Args, want)
	}
	if want := fmt.Sprintf("--peer-bind-address=:%d", port); !slices.Contains(c.Args, want) {
		t.Errorf("args %v lack %s", c.Args, want)
	}
	var vol *corev1.Volume
	for i := range pod.Volumes {
		if pod.Volumes[i].Name == "peer-key" {
			vol = &pod.Volumes[i]
		}
	}
	if vol == nil || vol.Secret == nil || vol.Secret.SecretName != secretName {
		t.Fatalf("volumes %+v: want peer-key from Secret %s", pod.Volumes, secretName)
	}
	// The file is the group's (fsGroup, the manager's group), nobody else's.
	if m := vol.Secret.DefaultMode; m == nil || *m != 0o440 || pod.SecurityContext.FSGroup == nil || *pod.SecurityContext.FSGroup != 65532 {
		t.Errorf("peer key mode %v, fsGroup %v; want 0440 and 65532", vol.Secret.DefaultMode, pod.SecurityContext.FSGroup)
	}
	ports := map[corev1.Protocol]int32{}
	for _, p := range c.Ports {
		if strings.HasPrefix(p.Name, "peers") {
			ports[p.Protocol] = p.ContainerPort
		}
	}
	if ports[corev1.ProtocolTCP] != port || ports[corev1.ProtocolUDP] != port {
		t.Errorf("peer ports %v, want %d on TCP and UDP", ports, port)
	}
}

func TestTemplatePeers(t *testing.T) {
	t.Run("disabled", func(t *testing.T) {
		objs := render(t, valuesFile(t, "peers: {enabled: false}"))
		for _, o := range objs {
			if o.GetKind() == "Secret" {
				t.Errorf("peers.enabled=false renders Secret %s", o.GetName())
			}
		}
		d := only[appsv1.Deployment](t, objs, "Deployment", "stickylb")
		c := d.Spec.Template.Spec.Containers[0]
		for _, a := range c.Args {
			if strings.HasPrefix(a, "--peer") {
				t.Errorf("peers.enabled=false still passes %s", a)
			}
		}
		if len(d.Spec.Template.Spec.Volumes) != 0 || len(c.VolumeMounts) != 0 {
			t.Errorf("peers.enabled=false still mounts %+v %+v", d.Spec.Template.Spec.Volumes, c.VolumeMounts)
		}
		for _, p := range c.Ports {
			if strings.HasPrefix(p.Name, "peers") {
				t.Errorf("peers.enabled=false still opens port %s", p.Name)
			}
		}
	})
	t.Run("existing Secret", func(t *testing.T) {
		objs := render(t, valuesFile(t, "peers: {existingSecret: my-peer-key, port: 7000}"))
		for _, o := range objs {
			if o.GetKind() == "Secret" {
				t.Errorf("peers.existingSecret still renders Secret %s", o.GetName())
			}
		}
		checkPeers(t, only[appsv1.Deployment](t, objs, "Deployment", "stickylb"), "my-peer-key", 7000)
	})
}

const nonDefaultValues = `
replicas: 3
crds:
  enabled: false
image:
  repository: registry.example.com/lb/stickylb
  tag: v9.9.9-test
  pullPolicy: Always
resources:
  requests:
    cpu: 250m
    memory: 64Mi
  limits:
    cpu: "2"
    memory: 1Gi
extraArgs: [--max-connections=1000]
strategy:
  rollingUpdate: {maxSurge: 25%}
shutdown:
  timeoutSeconds: 40
  delaySeconds: 10
terminationGracePeriodSeconds: 90
`

func TestTemplateNonDefault(t *testing.T) {
	objs := render(t, valuesFile(t, nonDefaultValues))
	for _, o := range objs {
		if o.GetKind() == "CustomResourceDefinition" {
			t.Error("crds.enabled=false still renders the CRD")
		}
	}
	d := only[appsv1.Deployment](t, objs, "Deployment", "stickylb")
	if *d.Spec.Replicas != 3 {
		t.Errorf("replicas = %d, want 3", *d.Spec.Replicas)
	}
	c := d.Spec.Template.Spec.Containers[0]
	if c.Image != "registry.example.com/lb/stickylb:v9.9.9-test" || c.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("image %q pullPolicy %q", c.Image, c.ImagePullPolicy)
	}
	if got := c.Resources.Requests.Cpu().String(); got != "250m" {
		t.Errorf("cpu request = %s, want 250m", got)
	}
	if got := c.Resources.Limits.Memory().String(); got != "1Gi" {
		t.Errorf("memory limit = %s, want 1Gi", got)
	}
	if got := c.Resources.Limits.Cpu().String(); got != "2" {
		t.Errorf("cpu limit = %s, want 2", got)
	}
	if !slices.Contains(c.Args, "--max-connections=1000") || !slices.Contains(c.Args, "--metrics-secure") {
		t.Errorf("args = %v, want the defaults plus --max-connections=1000", c.Args)
	}
	for _, arg := range []string{"--shutdown-timeout=40s", "--shutdown-delay=10s", "--drain-timeout=30s"} {
		if !slices.Contains(c.Args, arg) {
			t.Errorf("args %v lack %s", c.Args, arg)
		}
	}
	if g := d.Spec.Template.Spec.TerminationGracePeriodSeconds; g == nil || *g != 90 {
		t.Errorf("terminationGracePeriodSeconds = %v, want 90", g)
	}
	if ru := d.Spec.Strategy.RollingUpdate; ru == nil || ru.MaxSurge == nil || *ru.MaxSurge != intstr.FromString("25%") ||
		ru.MaxUnavailable == nil || *ru.MaxUnavailable != intstr.FromInt32(0) {
		t.Errorf("strategy = %+v, want maxSurge 25%% and the default maxUnavailable 0", d.Spec.Strategy)
	}
	recreate := only[appsv1.Deployment](t, render(t, valuesFile(t, "strategy: {type: Recreate}")), "Deployment", "stickylb")
	if recreate.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType || recreate.Spec.Strategy.RollingUpdate != nil {
		t.Errorf("strategy.type=Recreate renders %+v", recreate.Spec.Strategy)
	}

	// crds.keep=false renders the CRD without the keep policy.
	crdObj := only[apiextensionsv1.CustomResourceDefinition](t, render(t, valuesFile(t, "crds: {keep: false}")), "CustomResourceDefinition", "")
	if _, ok := crdObj.Annotations["helm.sh/resource-policy"]; ok {
		t.Error("crds.keep=false still sets helm.sh/resource-policy")
	}
}

func TestSchemaRejectsBadValues(t *testing.T) {
	for _, tc := range []struct{ name, values, want string }{
		{"replicas not an integer", `replicas: two`, "/replicas"},
		{"replicas zero", `replicas: 0`, "/replicas"},
		{"replicas fractional", `replicas: 1.5`, "/replicas"},
		{"unknown top-level key", `replica: 3`, "'replica'"},
		{"empty image repository", `image: {repository: ""}`, "/image/repository"},
		{"image repository not a string", `image: {repository: 42}`, "/image/repository"},
		{"bad pull policy", `image: {pullPolicy: Sometimes}`, "/image/pullPolicy"},
		{"crds.enabled not a boolean", `crds: {enabled: "yes"}`, "/crds/enabled"},
		{"resources not an object", `resources: lots`, "/resources"},
		{"metrics port out of range", `metrics: {port: 70000}`, "/metrics/port"},
		{"unknown key under image", `image: {name: x}`, "'name'"},
		{"bad strategy type", `strategy: {type: BlueGreen}`, "/strategy/type"},
		{"maxSurge not a number or percentage", `strategy: {rollingUpdate: {maxSurge: lots}}`, "/strategy/rollingUpdate/maxSurge"},
		{"negative shutdown delay", `shutdown: {delaySeconds: -1}`, "/shutdown/delaySeconds"},
		{"shutdown timeout as a duration string", `shutdown: {timeoutSeconds: 20s}`, "/shutdown/timeoutSeconds"},
		{"peers.enabled not a boolean", `peers: {enabled: "no"}`, "/peers/enabled"},
		{"peer port out of range", `peers: {port: 0}`, "/peers/port"},
		{"peer Secret name not a name", `peers: {existingSecret: "My Key"}`, "/peers/existingSecret"},
		{"unknown key under peers", `peers: {key: abc}`, "'key'"},
		{"dashboard.enabled not a boolean", `metrics: {dashboard: {enabled: "yes"}}`, "/metrics/dashboard/enabled"},
		{"empty dashboard label", `metrics: {dashboard: {label: ""}}`, "/metrics/dashboard/label"},
		{"dashboard label value not a label value", `metrics: {dashboard: {labelValue: "a b"}}`, "/metrics/dashboard/labelValue"},
		{"unknown key under dashboard", `metrics: {dashboard: {folder: x}}`, "'folder'"},
		{"scrape interval a number", `metrics: {serviceMonitor: {interval: 30}}`, "/metrics/serviceMonitor/interval"},
		{"scrape timeout not a duration", `metrics: {serviceMonitor: {scrapeTimeout: ten seconds}}`, "/metrics/serviceMonitor/scrapeTimeout"},
		{"relabelings not a list", `metrics: {serviceMonitor: {relabelings: {action: drop}}}`, "/metrics/serviceMonitor/relabelings"},
		{"authorization without credentials' key", `metrics: {serviceMonitor: {authorization: {credentials: {name: token}}}}`, "/metrics/serviceMonitor/authorization/credentials"},
		{"Prometheus' ServiceAccount not a name", `metrics: {serviceMonitor: {prometheusServiceAccount: {name: Prometheus}}}`, "/metrics/serviceMonitor/prometheusServiceAccount/name"},
		{"unknown key under serviceMonitor", `metrics: {serviceMonitor: {bearerTokenFile: /token}}`, "'bearerTokenFile'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := runHelm(t, "template", release, chartDir, "-f", valuesFile(t, tc.values))
			if err == nil {
				t.Fatalf("values %q were accepted", tc.values)
			}
			if !strings.Contains(err.Error(), "schema") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error does not name %s:\n%v", tc.want, err)
			}
		})
	}
}

// TestGracePeriodCoversShutdown: the pod's grace period must outlast the
// whole shutdown (README: "What happens on SIGTERM"), and the shutdown
// durations must come from the values that are checked.
func TestGracePeriodCoversShutdown(t *testing.T) {
	for _, tc := range []struct{ name, values, want string }{
		{"grace shorter than the default shutdown", `terminationGracePeriodSeconds: 54`, "terminationGracePeriodSeconds (54) must cover"},
		{"longer drain without a longer grace", `shutdown: {drainTimeoutSeconds: 60}`, "(85)"},
		{"drain timeout in extraArgs", `extraArgs: [--drain-timeout=5m]`, "set --drain-timeout=5m through the shutdown values"},
		{"shutdown delay in extraArgs", `extraArgs: [-shutdown-delay=1m]`, "set -shutdown-delay=1m through the shutdown values"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := runHelm(t, "template", release, chartDir, "-f", valuesFile(t, tc.values))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("values %q: err %v, want one containing %q", tc.values, err, tc.want)
			}
		})
	}
	// Exactly enough is enough.
	d := only[appsv1.Deployment](t, render(t, valuesFile(t, "terminationGracePeriodSeconds: 25\nshutdown: {timeoutSeconds: 10, delaySeconds: 5, drainTimeoutSeconds: 10}")), "Deployment", "stickylb")
	if g := d.Spec.Template.Spec.TerminationGracePeriodSeconds; g == nil || *g != 25 {
		t.Errorf("terminationGracePeriodSeconds = %v, want 25", g)
	}
}

// generatedRBAC reads config/rbac/role.yaml, which controller-gen writes from the code's markers.
func generatedRBAC(t *testing.T) (clusterRules, nsRules []rbacv1.PolicyRule) {
	t.Helper()
	b, err := os.ReadFile("../config/rbac/role.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var haveCluster, haveRole bool
	for _, o := range decodeAll(t, string(b)) {
		switch o.GetKind() {
		case "ClusterRole":
			var r rbacv1.ClusterRole
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &r); err != nil {
				t.Fatal(err)
			}
			clusterRules, haveCluster = r.Rules, true
		case "Role":
			var r rbacv1.Role
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &r); err != nil {
				t.Fatal(err)
			}
			nsRules, haveRole = r.Rules, true
		default:
			t.Fatalf("unexpected %s in config/rbac/role.yaml", o.GetKind())
		}
	}
	if !haveCluster || !haveRole {
		t.Fatal("config/rbac/role.yaml lacks the ClusterRole or the Role")
	}
	return clusterRules, nsRules
}

func TestRBACIsTheGeneratedOne(t *testing.T) {
	clusterRules, nsRules := generatedRBAC(t)
	// --metrics-secure, which the chart sets, asks the API server to check scrapers.
	for _, want := range []rbacv1.PolicyRule{
		{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
		{APIGroups: []string{"authorization.k8s.io"}, Resources: []string{"subjectaccessreviews"}, Verbs: []string{"create"}},
	} {
		if !slices.ContainsFunc(clusterRules, func(r rbacv1.PolicyRule) bool { return reflect.DeepEqual(r, want) }) {
			t.Errorf("config/rbac/role.yaml lacks %+v, which --metrics-secure needs", want)
		}
	}

	objs := render(t)
	manager := only[rbacv1.ClusterRole](t, objs, "ClusterRole", "stickylb-manager")
	if !reflect.DeepEqual(manager.Rules, clusterRules) {
		t.Errorf("chart ClusterRole rules differ from config/rbac/role.yaml:\n got %+v\nwant %+v", manager.Rules, clusterRules)
	}
	role := only[rbacv1.Role](t, objs, "Role", "stickylb-manager")
	if !reflect.DeepEqual(role.Rules, nsRules) {
		t.Errorf("chart Role rules differ from config/rbac/role.yaml:\n got %+v\nwant %+v", role.Rules, nsRules)
	}
	reader := only[rbacv1.ClusterRole](t, objs, "ClusterRole", "stickylb-metrics-reader")
	if want := []rbacv1.PolicyRule{{NonResourceURLs: []string{"/metrics"}, Verbs: []string{"get"}}}; !reflect.DeepEqual(reader.Rules, want) {
		t.Errorf("metrics-reader rules = %+v, want %+v", reader.Rules, want)
	}

	sa := only[corev1.ServiceAccount](t, objs, "ServiceAccount", "")
	subject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa.Name, Namespace: namespace}}
	crb := only[rbacv1.ClusterRoleBinding](t, objs, "ClusterRoleBinding", "")
	if crb.RoleRef != (rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: manager.Name}) || !reflect.DeepEqual(crb.Subjects, subject) {
		t.Errorf("ClusterRoleBinding = %+v %+v", crb.RoleRef, crb.Subjects)
	}
	rb := only[rbacv1.RoleBinding](t, objs, "RoleBinding", "")
	if rb.RoleRef != (rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role.Name}) || !reflect.DeepEqual(rb.Subjects, subject) {
		t.Errorf("RoleBinding = %+v %+v", rb.RoleRef, rb.Subjects)
	}
	if role.Namespace != namespace || rb.Namespace != namespace {
		t.Errorf("Role in %q, RoleBinding in %q; want the release namespace %s", role.Namespace, rb.Namespace, namespace)
	}
}

// TestInstall installs the chart into a real API server with no CRDs, checks
// what it created, that its pods pass Pod Security admission at "restricted",
// and that the manager works with the chart's RBAC and arguments.
func TestInstall(t *testing.T) {
	env := &envtest.Environment{}
	cfg, err := testenv.Start(env)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	kcPath, _, err := testenv.AdminKubeconfig(env, "helm", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, apiextensionsv1.AddToScheme,
		authenticationv1.AddToScheme, coordinationv1.AddToScheme, rbacv1.AddToScheme} {
		if err := add(scheme); err != nil {
			t.Fatal(err)
		}
	}
	k8s, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// The release namespace enforces the restricted Pod Security Standard.
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace, Labels: map[string]string{
		"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest",
	}}}
	if err := k8s.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	crdName := "loadbalancerrules.lb.stickylb.io"
	if err := k8s.Get(ctx, client.ObjectKey{Name: crdName}, &apiextensionsv1.CustomResourceDefinition{}); !apierrors.IsNotFound(err) {
		t.Fatalf("the CRD exists before the install (err %v)", err)
	}

	notes, err := runHelm(t, "install", release, chartDir, "--namespace", namespace, "--kubeconfig", kcPath, "--timeout", "1m")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"kubectl apply -f config/samples/", "kubectl wait --for=condition=Ready lbr/", "/metrics", "stickylb-metrics-reader"} {
		if !strings.Contains(notes, want) {
			t.Errorf("install notes lack %q:\n%s", want, notes)
		}
	}
	for _, unwanted := range []string{"ServiceMonitor", "Grafana"} {
		if strings.Contains(notes, unwanted) {
			t.Errorf("install notes mention %s, which the defaults leave out:\n%s", unwanted, notes)
		}
	}

	// The CRD becomes Established: LoadBalancerRules can be created.
	for {
		var got apiextensionsv1.CustomResourceDefinition
		err := k8s.Get(ctx, client.ObjectKey{Name: crdName}, &got)
		if err == nil && established(&got) {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("CRD %s not Established: %v (err %v)", crdName, got.Status.Conditions, err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	rendered := render(t)
	if len(rendered) < 10 {
		t.Fatalf("rendered only %d objects: %v", len(rendered), kinds(rendered))
	}
	for _, o := range rendered {
		got := &unstructured.Unstructured{}
		got.SetGroupVersionKind(o.GroupVersionKind())
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(o), got); err != nil {
			t.Errorf("%s %s/%s not installed: %v", o.GetKind(), o.GetNamespace(), o.GetName(), err)
		}
	}

	// The peer key is kept on upgrade: new replicas must join the old ones.
	peerKey := func() []byte {
		var sec corev1.Secret
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: namespace, Name: "stickylb-peers"}, &sec); err != nil {
			t.Fatalf("peer key Secret: %v", err)
		}
		return sec.Data["key"]
	}
	installed := peerKey()
	// The upgrade turns monitoring on: a ServiceMonitor (its CRD installed
	// as the Prometheus Operator would), the dashboard, and the binding
	// that lets Prometheus' ServiceAccount read /metrics.
	installServiceMonitorCRD(ctx, t, k8s)
	monitoring := valuesFile(t, fmt.Sprintf(`metrics:
  dashboard: {enabled: true}
  serviceMonitor:
    enabled: true
    prometheusServiceAccount: {name: %s, namespace: %s}
`, prometheusSA, namespace))
	notes, err = runHelm(t, "upgrade", release, chartDir, "--namespace", namespace, "--kubeconfig", kcPath, "--timeout", "1m", "-f", monitoring)
	if err != nil {
		t.Fatal(err)
	}
	if upgraded := peerKey(); !bytes.Equal(upgraded, installed) || len(installed) == 0 {
		t.Errorf("helm upgrade changed the peer key: %q, then %q", installed, upgraded)
	}
	for _, want := range []string{
		"ServiceMonitor " + namespace + "/stickylb scrapes it with Prometheus' ServiceAccount token",
		"the chart bound " + namespace + ":" + prometheusSA + " to stickylb-metrics-reader",
		"Grafana dashboard \"stickylb\": ConfigMap " + namespace + "/stickylb-dashboard, label grafana_dashboard=1",
	} {
		if !strings.Contains(notes, want) {
			t.Errorf("upgrade notes lack %q:\n%s", want, notes)
		}
	}
	for _, o := range render(t, monitoring) {
		got := &unstructured.Unstructured{}
		got.SetGroupVersionKind(o.GroupVersionKind())
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(o), got); err != nil {
			t.Errorf("%s %s/%s not installed by the upgrade: %v", o.GetKind(), o.GetNamespace(), o.GetName(), err)
		}
	}

	// A pod of the Deployment passes Pod Security admission at "restricted"...
	d := only[appsv1.Deployment](t, rendered, "Deployment", "stickylb")
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: "stickylb-psa", Labels: d.Spec.Template.Labels},
		Spec:       *d.Spec.Template.Spec.DeepCopy(),
	}
	if err := k8s.Create(ctx, pod); err != nil {
		t.Fatalf("a pod from the chart's Deployment was refused in a restricted namespace: %v", err)
	}
	// ...which is enforced: the same pod allowed to escalate privileges is refused.
	bad := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: "stickylb-psa-bad"}, Spec: *d.Spec.Template.Spec.DeepCopy()}
	escalate := true
	bad.Spec.Containers[0].SecurityContext.AllowPrivilegeEscalation = &escalate
	if err := k8s.Create(ctx, bad); !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "allowPrivilegeEscalation") {
		t.Fatalf("Pod Security admission did not refuse a privilege-escalating pod: %v", err)
	}

	checkManagerWithChartRBAC(ctx, t, cfg, k8s, d.Spec.Template.Spec.Containers[0].Args)

	// Uninstalling keeps the CRD (crds.keep) and removes the rest. No kubelet
	// runs here to run the pre-delete Job; test/cluster runs it for real.
	if _, err := runHelm(t, "uninstall", release, "--namespace", namespace, "--kubeconfig", kcPath, "--timeout", "1m", "--no-hooks"); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Get(ctx, client.ObjectKey{Name: crdName}, &apiextensionsv1.CustomResourceDefinition{}); err != nil {
		t.Errorf("helm uninstall deleted the CRD: %v", err)
	}
	gone := &unstructured.Unstructured{}
	gone.SetGroupVersionKind(appsv1.SchemeGroupVersion.WithKind("Deployment"))
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: namespace, Name: "stickylb"}, gone); !apierrors.IsNotFound(err) {
		t.Errorf("Deployment still there after uninstall: %v", err)
	}
}

// checkManagerWithChartRBAC runs the real manager with the chart's arguments as
// the chart's ServiceAccount, so with exactly the chart's RBAC: it must win the
// leader Lease, touch nothing it may not, and serve /metrics over HTTPS only to
// callers bound to the metrics-reader ClusterRole.
func checkManagerWithChartRBAC(ctx context.Context, t *testing.T, cfg *rest.Config, k8s client.Client, chartArgs []string) {
	t.Helper()
	dir := t.TempDir()
	bin := stickylbBinary(t)
	token := func(sa string) string {
		t.Helper()
		if err := k8s.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: sa}}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
		tr := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{}}
		if err := k8s.SubResource("token").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: sa}}, tr); err != nil {
			t.Fatalf("token for %s: %v", sa, err)
		}
		return tr.Status.Token
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["envtest"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["manager"] = &clientcmdapi.AuthInfo{Token: token("stickylb")}
	kc.Contexts["manager"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "manager"}
	kc.CurrentContext = "manager"
	kcPath := filepath.Join(dir, "manager-kubeconfig")
	if err := clientcmd.WriteToFile(*kc, kcPath); err != nil {
		t.Fatal(err)
	}

	metricsAddr, healthAddr := testenv.FreeAddr(t), testenv.FreeAddr(t)
	args := []string{"--kubeconfig", kcPath, "--dataplane-bind-address", "127.0.0.1"}
	for _, a := range chartArgs {
		// Same flags, but on loopback ports of the test's choosing.
		switch {
		case strings.HasPrefix(a, "--metrics-bind-address="):
			a = "--metrics-bind-address=" + metricsAddr
		case strings.HasPrefix(a, "--health-probe-bind-address="):
			a = "--health-probe-bind-address=" + healthAddr
		case strings.HasPrefix(a, "--shutdown-delay="):
			a = "--shutdown-delay=0s" // no kube-proxy here; spare the test the wait
		case strings.HasPrefix(a, "--peer-key-file="):
			// No kubelet mounts the Secret here: the same kind of key, in a file.
			keyFile := filepath.Join(dir, "peer-key")
			if err := os.WriteFile(keyFile, []byte(base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32))+"\n"), 0o400); err != nil {
				t.Fatal(err)
			}
			a = "--peer-key-file=" + keyFile
		case strings.HasPrefix(a, "--peer-bind-address="):
			a = "--peer-bind-address=" + testenv.FreeAddr(t)
		}
		args = append(args, a)
	}
	var logs testenv.Output
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "POD_NAMESPACE="+namespace, "POD_IP=127.0.0.1", "POD_NAME=stickylb-test-0")
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("manager output:\n%s", logs.String())
		}
	}()

	// The leader Lease in the release namespace (the chart's Role) names a holder.
	var lease coordinationv1.Lease
	for {
		err := k8s.Get(ctx, client.ObjectKey{Namespace: namespace, Name: "stickylb.lb.stickylb.io"}, &lease)
		if err == nil && lease.Spec.HolderIdentity != nil && *lease.Spec.HolderIdentity != "" {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("the manager never took the leader Lease (err %v)", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// So does the replica's report Lease, written and watched (the cache
	// holds only report Leases of the release namespace) with the Role.
	for {
		var report coordinationv1.Lease
		err := k8s.Get(ctx, client.ObjectKey{Namespace: namespace, Name: "stickylb-dataplane-stickylb-test-0"}, &report)
		if err == nil && report.Spec.HolderIdentity != nil && *report.Spec.HolderIdentity == "stickylb-test-0" {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("the manager never wrote its report Lease (err %v)", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	scrape := func(bearer string) (int, string) {
		t.Helper()
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			// The manager's certificate is self-signed.
			TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec
		}}
		for {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+metricsAddr+"/metrics", nil)
			if err != nil {
				t.Fatal(err)
			}
			if bearer != "" {
				req.Header.Set("Authorization", "Bearer "+bearer)
			}
			resp, err := hc.Do(req)
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				return resp.StatusCode, string(body)
			}
			if ctx.Err() != nil {
				t.Fatalf("GET https://%s/metrics: %v", metricsAddr, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if code, body := scrape(""); code != http.StatusUnauthorized {
		t.Errorf("/metrics without a token: %d %s, want 401", code, body)
	}
	if code, body := scrape(token("stranger")); code != http.StatusForbidden {
		t.Errorf("/metrics with an unbound token: %d %s, want 403", code, body)
	}
	scraper := token("scraper")
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "scraper-stickylb-metrics"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "stickylb-metrics-reader"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: namespace, Name: "scraper"}},
	}
	if err := k8s.Create(ctx, binding); err != nil {
		t.Fatal(err)
	}
	if code, body := scrape(scraper); code != http.StatusOK || !strings.Contains(body, "controller_runtime_") {
		t.Errorf("/metrics as a metrics-reader: %d, want 200 and controller-runtime metrics; body:\n%.500s", code, body)
	}
	// The chart's own binding (metrics.serviceMonitor.prometheusServiceAccount) lets Prometheus in.
	if code, body := scrape(token(prometheusSA)); code != http.StatusOK || !strings.Contains(body, "stickylb_snapshot_version") {
		t.Errorf("/metrics as the chart-bound %s: %d, want 200 and stickylb metrics; body:\n%.500s", prometheusSA, code, body)
	}
	// It peers (the chart gives it a key), and finds no other replica to join.
	for !strings.Contains(logs.String(), `"no peers to join`) {
		if ctx.Err() != nil {
			t.Fatalf("the manager never said it peers and has nobody to join:\n%s", logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if strings.Contains(logs.String(), "forbidden") {
		t.Errorf("the manager was refused something with the chart's RBAC:\n%s", logs.String())
	}
}

func established(c *apiextensionsv1.CustomResourceDefinition) bool {
	for _, cond := range c.Status.Conditions {
		if cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue {
			return true
		}
	}
	return false
}
