package controllers

import (
	"context"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// ReadyPodAddresses lists the IPs of the ready, not terminating pods matching
// selector in namespace: the dataplane replicas a frontend sends traffic to.
func ReadyPodAddresses(c client.Reader, namespace string, selector labels.Selector) func(context.Context) ([]netip.Addr, error) {
	return func(ctx context.Context) ([]netip.Addr, error) {
		var pods corev1.PodList
		if err := c.List(ctx, &pods, client.InNamespace(namespace), client.MatchingLabelsSelector{Selector: selector}); err != nil {
			return nil, err
		}
		var out []netip.Addr
		for i := range pods.Items {
			p := &pods.Items[i]
			if p.DeletionTimestamp != nil || !podReady(p) {
				continue
			}
			if a, err := netip.ParseAddr(p.Status.PodIP); err == nil {
				out = append(out, a)
			}
		}
		return out, nil
	}
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
