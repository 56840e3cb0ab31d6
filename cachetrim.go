package main

// What the informers keep of Services and EndpointSlices. Every Service and
// EndpointSlice of the cluster is watched (any of them may be a rule's
// backend), so at 10,000 Services of 100 endpoints the caches held most of
// the manager's memory: a pod reference, node, zone and hints per endpoint,
// last-applied annotations, owner references and managed fields, none of
// which translation reads. It reads (dataplane/translate) a backend
// Service's existence (namespace and name), and of an EndpointSlice its
// kubernetes.io/service-name label, address type, and per endpoint the
// first address and the three conditions. The frontends the controller
// role writes are kept whole: it reads them back (cluster IP, node ports,
// owner references) and updates them from the cache.
// TestTrimKeepsTranslation checks that translation gives the same result
// from trimmed objects as from whole ones.

import (
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stickylb/stickylb/controllers"
)

// isFrontend tells the objects the controller role writes.
func isFrontend(m *metav1.ObjectMeta) bool { return m.Labels[controllers.LabelFrontend] != "" }

// keptMeta is what the cache keeps of a trimmed object's metadata, with
// labels as given.
func keptMeta(m *metav1.ObjectMeta, labels map[string]string) metav1.ObjectMeta {
	return metav1.ObjectMeta{
		Namespace: m.Namespace, Name: m.Name, UID: m.UID, ResourceVersion: m.ResourceVersion,
		Generation: m.Generation, CreationTimestamp: m.CreationTimestamp, DeletionTimestamp: m.DeletionTimestamp,
		Labels: labels,
	}
}

// trimService keeps a backend Service's identity and labels only, and a
// frontend Service whole but for its managed fields.
func trimService(obj any) (any, error) {
	svc, ok := obj.(*corev1.Service)
	if !ok {
		return obj, nil
	}
	svc.ManagedFields = nil
	if isFrontend(&svc.ObjectMeta) {
		return svc, nil
	}
	return &corev1.Service{TypeMeta: svc.TypeMeta, ObjectMeta: keptMeta(&svc.ObjectMeta, svc.Labels)}, nil
}

// Conditions point at these, not at three allocations per endpoint. Nothing
// writes through a cached object's pointers.
var condTrue, condFalse = true, false

func sharedBool(b *bool) *bool {
	switch {
	case b == nil:
		return nil
	case *b:
		return &condTrue
	default:
		return &condFalse
	}
}

// trimEndpointSlice keeps of a backend EndpointSlice its service-name label,
// its address type and each endpoint's first address and conditions; a
// frontend EndpointSlice whole but for its managed fields.
func trimEndpointSlice(obj any) (any, error) {
	es, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return obj, nil
	}
	es.ManagedFields = nil
	if isFrontend(&es.ObjectMeta) {
		return es, nil
	}
	var labels map[string]string
	if svc, ok := es.Labels[discoveryv1.LabelServiceName]; ok {
		labels = map[string]string{discoveryv1.LabelServiceName: svc}
	}
	out := &discoveryv1.EndpointSlice{TypeMeta: es.TypeMeta, ObjectMeta: keptMeta(&es.ObjectMeta, labels), AddressType: es.AddressType}
	if len(es.Endpoints) > 0 {
		out.Endpoints = make([]discoveryv1.Endpoint, len(es.Endpoints))
	}
	for i := range es.Endpoints {
		ep := &es.Endpoints[i]
		c := ep.Conditions
		out.Endpoints[i] = discoveryv1.Endpoint{
			Addresses: ep.Addresses[:min(len(ep.Addresses), 1):min(len(ep.Addresses), 1)],
			Conditions: discoveryv1.EndpointConditions{
				Ready: sharedBool(c.Ready), Serving: sharedBool(c.Serving), Terminating: sharedBool(c.Terminating),
			},
		}
	}
	return out, nil
}
