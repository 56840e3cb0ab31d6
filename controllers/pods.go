package controllers

import (
	"context"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// A frontend endpoint's zone comes from its node's labels; only the
// metadata of Nodes is read (and cached).
// +kubebuilder:rbac:groups=core,resources=nodes,verbs=get;list;watch

// DataplaneEndpoint is one ready dataplane replica: an endpoint of every
// frontend.
type DataplaneEndpoint struct {
	Address netip.Addr
	// NodeName is the node the replica's pod runs on; kube-proxy counts an
	// endpoint as local (externalTrafficPolicy: Local) only on that node.
	// Empty outside a cluster.
	NodeName string
	// Zone is the node's topology.kubernetes.io/zone label, if any.
	Zone string
	// Pod is the replica's pod (Kind Pod, namespace, name, uid); nil outside a cluster.
	Pod *corev1.ObjectReference
}

// NodeMetadata is the type the Nodes are read as: metadata only, so no full
// Node object is ever cached.
func NodeMetadata() *metav1.PartialObjectMetadata {
	return &metav1.PartialObjectMetadata{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Node"}}
}

// TrimNode is the cache transform for Node metadata: it keeps the name,
// uid, resourceVersion and zone label, and drops everything else (other
// labels, annotations, managed fields), which can be large on nodes.
func TrimNode(in any) (any, error) {
	m, ok := in.(*metav1.PartialObjectMetadata)
	if !ok {
		return in, nil
	}
	out := &metav1.PartialObjectMetadata{TypeMeta: m.TypeMeta, ObjectMeta: metav1.ObjectMeta{
		Name: m.Name, UID: m.UID, ResourceVersion: m.ResourceVersion,
		CreationTimestamp: m.CreationTimestamp, DeletionTimestamp: m.DeletionTimestamp,
	}}
	if z, ok := m.Labels[corev1.LabelTopologyZone]; ok {
		out.Labels = map[string]string{corev1.LabelTopologyZone: z}
	}
	return out, nil
}

// ReadyPodEndpoints lists the ready, not terminating pods matching selector
// in namespace: the dataplane replicas a frontend sends traffic to, each
// with its node and zone. c should be a cache reader (the manager's client)
// for Pods and Node metadata.
func ReadyPodEndpoints(c client.Reader, namespace string, selector labels.Selector) func(context.Context) ([]DataplaneEndpoint, error) {
	return func(ctx context.Context) ([]DataplaneEndpoint, error) {
		var pods corev1.PodList
		if err := c.List(ctx, &pods, client.InNamespace(namespace), client.MatchingLabelsSelector{Selector: selector}); err != nil {
			return nil, err
		}
		zones := map[string]string{}
		var out []DataplaneEndpoint
		for i := range pods.Items {
			p := &pods.Items[i]
			if p.DeletionTimestamp != nil || !podReady(p) {
				continue
			}
			a, err := netip.ParseAddr(p.Status.PodIP)
			if err != nil {
				continue
			}
			ep := DataplaneEndpoint{Address: a, NodeName: p.Spec.NodeName,
				Pod: &corev1.ObjectReference{Kind: "Pod", Namespace: p.Namespace, Name: p.Name, UID: p.UID}}
			if ep.NodeName != "" {
				zone, seen := zones[ep.NodeName]
				if !seen {
					if zone, err = nodeZone(ctx, c, ep.NodeName); err != nil {
						return nil, err
					}
					zones[ep.NodeName] = zone
				}
				ep.Zone = zone
			}
			out = append(out, ep)
		}
		return out, nil
	}
}

// nodeZone is the zone label of a node, "" when it has none or is gone.
func nodeZone(ctx context.Context, c client.Reader, name string) (string, error) {
	n := NodeMetadata()
	if err := c.Get(ctx, client.ObjectKey{Name: name}, n); err != nil {
		if apierrors.IsNotFound(err) {
			return "", nil
		}
		return "", err
	}
	return n.Labels[corev1.LabelTopologyZone], nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
