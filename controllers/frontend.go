package controllers

import (
	"cmp"
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
)

// +kubebuilder:rbac:groups=core,resources=services,verbs=create;update;patch;delete
// +kubebuilder:rbac:groups=discovery.k8s.io,resources=endpointslices,verbs=create;update;patch;delete

const (
	// LabelFrontend marks the Service and EndpointSlice of a frontend with its name.
	LabelFrontend = "lb.stickylb.io/frontend"
	// managedBy is the EndpointSlice controller name; Kubernetes' own
	// EndpointSlice controller leaves slices of other managers alone.
	managedBy = "lb.stickylb.io"
)

// FrontendServiceName is the Service of frontend name in a rule's namespace.
func FrontendServiceName(frontend string) string { return "stickylb-" + frontend }

// frontendOf is the frontend a rule listens on.
func frontendOf(r *lbv1alpha1.LoadBalancerRule) string {
	if r.Spec.Frontend.Name == "" {
		return "default"
	}
	return r.Spec.Frontend.Name
}

// desiredFrontend computes a frontend's Service and EndpointSlice from the
// accepted rules on it (oldest first) and the ready dataplane replicas. A
// frontend with no accepted rule has neither.
func desiredFrontend(namespace, frontend string, rules []*lbv1alpha1.LoadBalancerRule, dataplane []DataplaneEndpoint) (*corev1.Service, *discoveryv1.EndpointSlice) {
	if len(rules) == 0 {
		return nil, nil
	}
	name := FrontendServiceName(frontend)
	labels := map[string]string{LabelFrontend: frontend, "app.kubernetes.io/managed-by": "stickylb"}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: labels}}
	// Rules sharing a frontend share its Service; the oldest rule's
	// serviceType is the frontend's.
	svc.Spec.Type = corev1.ServiceType(rules[0].Spec.Frontend.ServiceType)
	if svc.Spec.Type == "" {
		svc.Spec.Type = corev1.ServiceTypeClusterIP
	}
	if svc.Spec.Type != corev1.ServiceTypeClusterIP {
		// Local keeps the client's IP, which session persistence hashes.
		svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	var slicePorts []discoveryv1.EndpointPort
	for _, r := range rules {
		for _, proto := range transports(r.Spec.Protocol) {
			port := int32(r.Spec.Frontend.Port)
			pname := fmt.Sprintf("%s-%d", strings.ToLower(string(proto)), port)
			svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{
				Name: pname, Protocol: proto, Port: port, TargetPort: intstr.FromInt32(port),
			})
			slicePorts = append(slicePorts, discoveryv1.EndpointPort{Name: ptr.To(pname), Protocol: ptr.To(proto), Port: ptr.To(port)})
		}
		svc.OwnerReferences = append(svc.OwnerReferences, metav1.OwnerReference{
			APIVersion: lbv1alpha1.GroupVersion.String(), Kind: "LoadBalancerRule", Name: r.Name, UID: r.UID,
		})
	}
	slices.SortFunc(svc.Spec.Ports, func(a, b corev1.ServicePort) int { return cmp.Compare(a.Name, b.Name) })
	slices.SortFunc(slicePorts, func(a, b discoveryv1.EndpointPort) int { return cmp.Compare(*a.Name, *b.Name) })

	eps := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: map[string]string{
			LabelFrontend:                  frontend,
			discoveryv1.LabelServiceName:   name,
			discoveryv1.LabelManagedBy:     managedBy,
			"app.kubernetes.io/managed-by": "stickylb",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       slicePorts,
		Endpoints:   []discoveryv1.Endpoint{},
	}
	// The pod cache lists in no fixed order; a fixed one writes no spurious updates.
	dataplane = slices.Clone(dataplane)
	slices.SortFunc(dataplane, func(a, b DataplaneEndpoint) int { return a.Address.Compare(b.Address) })
	for _, d := range dataplane {
		a := d.Address
		if a.Is6() && !a.Is4In6() {
			eps.AddressType = discoveryv1.AddressTypeIPv6
		}
		if !a.IsGlobalUnicast() {
			continue // loopback (a local run) is no endpoint other pods can reach
		}
		ep := discoveryv1.Endpoint{
			Addresses:  []string{a.Unmap().String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
		}
		// kube-proxy counts an endpoint as local (externalTrafficPolicy:
		// Local, the health-check node port) only when nodeName is its node.
		if d.NodeName != "" {
			ep.NodeName = ptr.To(d.NodeName)
		}
		if d.Zone != "" {
			ep.Zone = ptr.To(d.Zone)
		}
		if d.Pod != nil {
			ep.TargetRef = d.Pod.DeepCopy()
		}
		eps.Endpoints = append(eps.Endpoints, ep)
	}
	return svc, eps
}

// transports are the Kubernetes protocols of a rule's protocol.
func transports(p lbv1alpha1.Protocol) []corev1.Protocol {
	switch p {
	case lbv1alpha1.ProtocolUDP:
		return []corev1.Protocol{corev1.ProtocolUDP}
	case lbv1alpha1.ProtocolAll:
		return []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP}
	}
	return []corev1.Protocol{corev1.ProtocolTCP}
}

// applyFrontend makes the frontend's Service and EndpointSlice match want
// (deleting them when want is nil), writing only what differs. It returns
// the Service as stored.
func applyFrontend(ctx context.Context, c client.Client, namespace, frontend string, want *corev1.Service, wantSlice *discoveryv1.EndpointSlice) (*corev1.Service, error) {
	key := types.NamespacedName{Namespace: namespace, Name: FrontendServiceName(frontend)}
	var svc corev1.Service
	err := c.Get(ctx, key, &svc)
	switch {
	case apierrors.IsNotFound(err):
		if want == nil {
			return nil, nil
		}
		svc = *want.DeepCopy()
		if err := c.Create(ctx, &svc); err != nil {
			return nil, fmt.Errorf("create frontend Service %s: %w", key, err)
		}
	case err != nil:
		return nil, err
	case want == nil:
		// The slice goes with the Service (owner reference); delete it too so
		// nothing lingers where no garbage collector runs.
		if err := c.Delete(ctx, &svc); err != nil && !apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("delete frontend Service %s: %w", key, err)
		}
		slice := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: key.Name}}
		if err := c.Delete(ctx, slice); err != nil && !apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("delete frontend EndpointSlice %s: %w", key, err)
		}
		return nil, nil
	default:
		orig := svc.DeepCopy()
		svc.Labels = want.Labels
		svc.OwnerReferences = want.OwnerReferences
		svc.Spec.Type = want.Spec.Type
		svc.Spec.Ports = mergePorts(want.Spec.Ports, svc.Spec.Ports)
		svc.Spec.ExternalTrafficPolicy = want.Spec.ExternalTrafficPolicy
		if svc.Spec.Type == corev1.ServiceTypeClusterIP {
			svc.Spec.ExternalTrafficPolicy = ""
		}
		if !equality.Semantic.DeepEqual(orig, &svc) {
			if err := c.Update(ctx, &svc); err != nil {
				return nil, fmt.Errorf("update frontend Service %s: %w", key, err)
			}
		}
	}

	wantSlice = wantSlice.DeepCopy()
	if err := controllerutil.SetControllerReference(&svc, wantSlice, c.Scheme()); err != nil {
		return nil, err
	}
	var slice discoveryv1.EndpointSlice
	err = c.Get(ctx, key, &slice)
	switch {
	case apierrors.IsNotFound(err):
		if err := c.Create(ctx, wantSlice); err != nil {
			return nil, fmt.Errorf("create frontend EndpointSlice %s: %w", key, err)
		}
	case err != nil:
		return nil, err
	default:
		orig := slice.DeepCopy()
		slice.Labels, slice.OwnerReferences = wantSlice.Labels, wantSlice.OwnerReferences
		slice.AddressType, slice.Ports, slice.Endpoints = wantSlice.AddressType, wantSlice.Ports, wantSlice.Endpoints
		if slice.AddressType != orig.AddressType {
			// addressType is immutable: replace the slice.
			if err := c.Delete(ctx, orig); err != nil {
				return nil, err
			}
			if err := c.Create(ctx, wantSlice); err != nil {
				return nil, err
			}
		} else if !equality.Semantic.DeepEqual(orig, &slice) {
			if err := c.Update(ctx, &slice); err != nil {
				return nil, fmt.Errorf("update frontend EndpointSlice %s: %w", key, err)
			}
		}
	}
	return &svc, nil
}

// mergePorts keeps the node ports the API server allocated for ports that stay.
func mergePorts(want, have []corev1.ServicePort) []corev1.ServicePort {
	out := slices.Clone(want)
	for i := range out {
		for _, h := range have {
			if h.Name == out[i].Name && h.Protocol == out[i].Protocol && h.Port == out[i].Port {
				out[i].NodePort = h.NodePort
			}
		}
	}
	return out
}

// frontendAddresses are the addresses clients reach the frontend at.
func frontendAddresses(svc *corev1.Service, bind netip.Addr, local bool) []string {
	var out []string
	if local {
		out = append(out, bind.String())
	}
	if svc == nil {
		return out
	}
	for _, ip := range svc.Spec.ClusterIPs {
		if ip != "" && ip != corev1.ClusterIPNone {
			out = append(out, ip)
		}
	}
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		if ing.IP != "" {
			out = append(out, ing.IP)
		} else if ing.Hostname != "" {
			out = append(out, ing.Hostname)
		}
	}
	return slices.Compact(out)
}
