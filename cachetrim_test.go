package main

import (
	"net/netip"
	"reflect"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/controllers"
	"github.com/stickylb/stickylb/dataplane/translate"
)

// trimInput is a cluster's worth of backends with every field translation
// might read set: conditions in every combination, several addresses per
// endpoint, IPv6 and FQDN slices, a slice of no Service, a Service without
// slices, a missing Service, and a frontend the controller role wrote.
func trimInput() ([]lbv1alpha1.LoadBalancerRule, []corev1.Service, []discoveryv1.EndpointSlice) {
	meta := func(ns, name string, labels map[string]string) metav1.ObjectMeta {
		return metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name), ResourceVersion: "42",
			Labels: labels, CreationTimestamp: metav1.NewTime(time.Unix(1700000000, 0)),
			Annotations:     map[string]string{"kubectl.kubernetes.io/last-applied-configuration": `{"big":"json"}`},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Service", Name: name, UID: "owner"}},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}},
		}
	}
	service := func(ns, name string, labels map[string]string) corev1.Service {
		return corev1.Service{ObjectMeta: meta(ns, name, labels), Spec: corev1.ServiceSpec{
			ClusterIP: "10.0.0.10", Selector: map[string]string{"app": name}, PublishNotReadyAddresses: true,
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}},
		}, Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: "192.0.2.1"}}}}}
	}
	conds := []discoveryv1.EndpointConditions{
		{},
		{Ready: ptr.To(true)},
		{Ready: ptr.To(false)},
		{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
		{Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)},
		{Ready: ptr.To(false), Serving: ptr.To(false), Terminating: ptr.To(true)},
		{Ready: ptr.To(false), Serving: ptr.To(true)},
		{Serving: ptr.To(false), Terminating: ptr.To(true)},
	}
	slice := func(ns, name, svc string, family discoveryv1.AddressType, addrs ...[]string) discoveryv1.EndpointSlice {
		labels := map[string]string{discoveryv1.LabelManagedBy: "endpointslice-controller.k8s.io", "app": svc}
		if svc != "" {
			labels[discoveryv1.LabelServiceName] = svc
		}
		es := discoveryv1.EndpointSlice{ObjectMeta: meta(ns, name, labels), AddressType: family,
			Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080)}}}
		for i, a := range addrs {
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
				Addresses: a, Conditions: conds[i%len(conds)], Hostname: ptr.To("h"),
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: "pod", UID: "pod-uid"},
				NodeName:  ptr.To("node-1"), Zone: ptr.To("zone-a"),
				Hints: &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "zone-a"}}},
			})
		}
		return es
	}
	var v4, v4b, v6 [][]string
	for i := range 2 * len(conds) {
		v4 = append(v4, []string{netip.AddrFrom4([4]byte{10, 0, 1, byte(i + 1)}).String(), "10.9.9.9"})
		v4b = append(v4b, []string{netip.AddrFrom4([4]byte{10, 0, 1, byte(i + 3)}).String()})
		v6 = append(v6, []string{netip.AddrFrom16([16]byte{0xfd, 15: byte(i + 1)}).String()})
	}
	// All ready but one: servingTerminating endpoints drain.
	allReady := slice("a", "web-2", "web2", discoveryv1.AddressTypeIPv4, []string{"10.0.2.1"}, []string{"10.0.2.2"})
	allReady.Endpoints[0].Conditions = conds[4]
	allReady.Endpoints[1].Conditions = conds[1]
	// Nothing ready: serving-terminating endpoints take new flows, the
	// others drain.
	noneReady := slice("a", "drain-1", "drain", discoveryv1.AddressTypeIPv4, []string{"10.0.5.1"}, []string{"10.0.5.2"}, []string{"10.0.5.3"})
	noneReady.Endpoints[0].Conditions = conds[4]
	noneReady.Endpoints[1].Conditions = conds[5]
	noneReady.Endpoints[2].Conditions = conds[2]
	frontendLabels := map[string]string{controllers.LabelFrontend: "default", discoveryv1.LabelServiceName: "stickylb-default"}
	services := []corev1.Service{
		service("a", "web", nil), service("a", "web2", nil), service("a", "v6", nil), service("a", "empty", nil), service("a", "drain", nil),
		service("b", "web", map[string]string{"tier": "backend"}), service("a", "stickylb-default", frontendLabels),
	}
	slices := []discoveryv1.EndpointSlice{
		slice("a", "web-1", "web", discoveryv1.AddressTypeIPv4, v4...),
		slice("a", "web-x", "web", discoveryv1.AddressTypeIPv4, v4b...),
		allReady, noneReady,
		slice("a", "v6-1", "v6", discoveryv1.AddressTypeIPv6, v6...),
		slice("a", "fqdn", "web", discoveryv1.AddressTypeFQDN, []string{"example.com"}),
		slice("a", "orphan", "", discoveryv1.AddressTypeIPv4, []string{"10.0.3.1"}),
		slice("b", "web-1", "web", discoveryv1.AddressTypeIPv4, v4[:3]...),
		slice("a", "stickylb-default-1", "stickylb-default", discoveryv1.AddressTypeIPv4, []string{"10.0.4.1"}),
	}
	slices[len(slices)-1].Labels[controllers.LabelFrontend] = "default"
	rule := func(ns, name string, port int32, svc string) lbv1alpha1.LoadBalancerRule {
		return lbv1alpha1.LoadBalancerRule{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Generation: 1},
			Spec: lbv1alpha1.LoadBalancerRuleSpec{Frontend: lbv1alpha1.Frontend{Name: "default", Port: lbv1alpha1.PortNumber(port)},
				BackendPool: lbv1alpha1.BackendPool{ServiceName: svc}, BackendPort: 8080,
				SessionPersistence: lbv1alpha1.SessionPersistenceClientIP}}
	}
	rules := []lbv1alpha1.LoadBalancerRule{
		rule("a", "web", 1001, "web"), rule("a", "web2", 1002, "web2"), rule("a", "v6", 1003, "v6"),
		rule("a", "empty", 1004, "empty"), rule("a", "missing", 1005, "missing"), rule("b", "web", 1006, "web"),
		rule("a", "front", 1007, "stickylb-default"), rule("a", "drain", 1008, "drain"),
	}
	return rules, services, slices
}

func trimAll(t *testing.T, services []corev1.Service, slices []discoveryv1.EndpointSlice) ([]corev1.Service, []discoveryv1.EndpointSlice) {
	var svcs []corev1.Service
	for i := range services {
		o, err := trimService(services[i].DeepCopy())
		if err != nil {
			t.Fatal(err)
		}
		svcs = append(svcs, *o.(*corev1.Service))
	}
	var ess []discoveryv1.EndpointSlice
	for i := range slices {
		o, err := trimEndpointSlice(slices[i].DeepCopy())
		if err != nil {
			t.Fatal(err)
		}
		ess = append(ess, *o.(*discoveryv1.EndpointSlice))
	}
	return svcs, ess
}

// TestTrimKeepsTranslation: translation reads nothing the cache drops.
func TestTrimKeepsTranslation(t *testing.T) {
	rules, services, slices := trimInput()
	svcs, ess := trimAll(t, services, slices)
	bind := netip.MustParseAddr("127.0.0.1")
	want, wantResults := translate.Translate(translate.Input{Rules: rules, Services: services, Slices: slices, Bind: bind, Version: 1})
	got, gotResults := translate.Translate(translate.Input{Rules: rules, Services: svcs, Slices: ess, Bind: bind, Version: 1})
	if !reflect.DeepEqual(got, want) {
		t.Errorf("snapshot from trimmed objects:\n%+v\nfrom whole ones:\n%+v", got, want)
	}
	if !reflect.DeepEqual(gotResults, wantResults) {
		t.Errorf("results from trimmed objects:\n%+v\nfrom whole ones:\n%+v", gotResults, wantResults)
	}
	// The input must exercise translation: a pool with backends, draining ones, and IPv6.
	var backends, draining int
	for _, r := range want.Rules {
		for _, b := range r.Backends {
			backends++
			if b.Draining {
				draining++
			}
		}
	}
	if backends < 10 || draining == 0 {
		t.Fatalf("the input gives %d backends, %d draining: it tests little", backends, draining)
	}
}

// TestTrimDropsWhatIsNotRead: backends lose what translation does not read;
// frontends, which the controller role updates from the cache, lose only
// their managed fields.
func TestTrimDropsWhatIsNotRead(t *testing.T) {
	_, services, slices := trimInput()
	svcs, ess := trimAll(t, services, slices)
	for i, s := range svcs {
		orig := services[i]
		orig.ManagedFields = nil
		if isFrontend(&orig.ObjectMeta) {
			if !reflect.DeepEqual(s, orig) {
				t.Errorf("frontend Service %s/%s changed: %+v", s.Namespace, s.Name, s)
			}
			continue
		}
		if s.Annotations != nil || s.OwnerReferences != nil || s.ManagedFields != nil ||
			!reflect.DeepEqual(s.Spec, corev1.ServiceSpec{}) || !reflect.DeepEqual(s.Status, corev1.ServiceStatus{}) {
			t.Errorf("backend Service %s/%s keeps more than its identity: %+v", s.Namespace, s.Name, s)
		}
		if s.Name != orig.Name || s.Namespace != orig.Namespace || s.UID != orig.UID || s.ResourceVersion != orig.ResourceVersion {
			t.Errorf("backend Service %s/%s lost its identity", orig.Namespace, orig.Name)
		}
	}
	for i, es := range ess {
		orig := slices[i]
		orig.ManagedFields = nil
		if isFrontend(&orig.ObjectMeta) {
			if !reflect.DeepEqual(es, orig) {
				t.Errorf("frontend EndpointSlice %s/%s changed: %+v", es.Namespace, es.Name, es)
			}
			continue
		}
		if es.Annotations != nil || es.OwnerReferences != nil || es.ManagedFields != nil || es.Ports != nil || len(es.Labels) > 1 {
			t.Errorf("EndpointSlice %s/%s keeps more than translation reads: %+v", es.Namespace, es.Name, es.ObjectMeta)
		}
		if es.Labels[discoveryv1.LabelServiceName] != orig.Labels[discoveryv1.LabelServiceName] || es.ResourceVersion != orig.ResourceVersion {
			t.Errorf("EndpointSlice %s/%s lost its service or resource version", es.Namespace, es.Name)
		}
		for j, ep := range es.Endpoints {
			if ep.TargetRef != nil || ep.NodeName != nil || ep.Zone != nil || ep.Hints != nil || ep.Hostname != nil || len(ep.Addresses) > 1 {
				t.Errorf("EndpointSlice %s/%s endpoint %d keeps more than translation reads: %+v", es.Namespace, es.Name, j, ep)
			}
			if !reflect.DeepEqual(ep.Conditions, orig.Endpoints[j].Conditions) || ep.Addresses[0] != orig.Endpoints[j].Addresses[0] {
				t.Errorf("EndpointSlice %s/%s endpoint %d: %+v, want the conditions and first address of %+v", es.Namespace, es.Name, j, ep, orig.Endpoints[j])
			}
		}
	}
}
