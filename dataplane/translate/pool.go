package translate

import (
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

type serviceKey struct{ namespace, name string }

// pool is what the cluster says about one Service's endpoints.
type pool struct {
	exists bool
	// endpoints by address; an address listed in several slices keeps its
	// most usable state.
	endpoints map[netip.Addr]endpointState
}

// endpointState orders an endpoint's conditions from least to most usable.
type endpointState uint8

const (
	// notReady endpoints are not in the pool (but are counted in Total).
	notReady endpointState = iota
	// terminating endpoints that no longer serve drain: no new flows.
	terminating
	// servingTerminating endpoints drain too, unless no endpoint is ready:
	// then they take new flows, as kube-proxy falls back to them.
	servingTerminating
	// ready endpoints take new flows.
	ready
)

// stateOf reads an endpoint's conditions as the EndpointSlice API defines
// them: ready and serving default to true, terminating to false. The ready
// condition decides, as in kube-proxy: it is true for a terminating endpoint
// only when the Service publishes not-ready addresses, which asks for exactly
// that.
func stateOf(c discoveryv1.EndpointConditions) endpointState {
	isReady := c.Ready == nil || *c.Ready
	isServing := c.Serving == nil || *c.Serving
	isTerminating := c.Terminating != nil && *c.Terminating
	switch {
	case isReady:
		return ready
	case isTerminating && isServing:
		return servingTerminating
	case isTerminating:
		return terminating
	}
	return notReady
}

// indexPools groups EndpointSlices by the Service they belong to and marks
// which Services exist.
func indexPools(services []corev1.Service, epSlices []discoveryv1.EndpointSlice) map[serviceKey]*pool {
	pools := map[serviceKey]*pool{}
	get := func(k serviceKey) *pool {
		p := pools[k]
		if p == nil {
			p = &pool{endpoints: map[netip.Addr]endpointState{}}
			pools[k] = p
		}
		return p
	}
	for i := range services {
		get(serviceKey{namespace: services[i].Namespace, name: services[i].Name}).exists = true
	}
	for i := range epSlices {
		es := &epSlices[i]
		if k, ok := sliceService(es); ok {
			get(k).add(es)
		}
	}
	return pools
}

// sliceService is the Service whose pool es adds to, if any: the one its
// kubernetes.io/service-name label names, for slices of IP addresses.
func sliceService(es *discoveryv1.EndpointSlice) (serviceKey, bool) {
	svc := es.Labels[discoveryv1.LabelServiceName]
	if svc == "" {
		return serviceKey{}, false
	}
	if es.AddressType != discoveryv1.AddressTypeIPv4 && es.AddressType != discoveryv1.AddressTypeIPv6 {
		return serviceKey{}, false // FQDN endpoints name no address to dial
	}
	return serviceKey{namespace: es.Namespace, name: svc}, true
}

// add merges the endpoints of es into the pool.
func (p *pool) add(es *discoveryv1.EndpointSlice) {
	for _, ep := range es.Endpoints {
		if len(ep.Addresses) == 0 {
			continue
		}
		addr, err := netip.ParseAddr(ep.Addresses[0])
		if err != nil || addr.Zone() != "" {
			continue
		}
		addr = addr.Unmap()
		st := stateOf(ep.Conditions)
		if prev, seen := p.endpoints[addr]; !seen || st > prev {
			p.endpoints[addr] = st
		}
	}
}

// backends is the pool at port: ready endpoints active, terminating ones
// draining, serving-terminating ones active when nothing is ready. Total
// counts every distinct endpoint listed, ready the ready ones.
func (p *pool) backends(port uint16) (out []snapshot.Backend, total, readyCount int32) {
	for _, st := range p.endpoints {
		if st == ready {
			readyCount++
		}
	}
	fallback := readyCount == 0
	for addr, st := range p.endpoints {
		total++
		b := snapshot.Backend{Addr: netip.AddrPortFrom(addr, port)}
		switch st {
		case ready:
		case servingTerminating:
			b.Draining = !fallback
		case terminating:
			b.Draining = true
		default:
			continue
		}
		out = append(out, b)
	}
	return out, total, readyCount
}
