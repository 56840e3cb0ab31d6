package controllers

import (
	"context"
	"errors"
	"net/http"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// Readiness is a replica's /readyz: it passes once the dataplane serves a
// snapshot built from synced caches, and fails from the moment shutdown
// begins, so that the controller takes the replica out of every frontend.
type Readiness struct {
	dataplane *Dataplane
	stopping  atomic.Bool
}

// NewReadiness returns the readiness of the replica whose dataplane is d.
func NewReadiness(d *Dataplane) *Readiness { return &Readiness{dataplane: d} }

var (
	errNotServing   = errors.New("the dataplane has not applied its first snapshot yet")
	errShuttingDown = errors.New("shutting down")
)

// Check is the healthz.Checker of /readyz.
func (r *Readiness) Check(*http.Request) error {
	switch {
	case r.stopping.Load():
		return errShuttingDown
	case !r.dataplane.Serving():
		return errNotServing
	}
	return nil
}

// Stop makes Check fail from now on.
func (r *Readiness) Stop() { r.stopping.Store(true) }

// unlistedPoll is how often WaitUntilUnlisted looks at the cache.
const unlistedPoll = 100 * time.Millisecond

// WaitUntilUnlisted waits until no frontend EndpointSlice (labelled
// LabelFrontend) lists addr as a ready endpoint, as c, an informer cache,
// sees them. It returns nil then; when ctx ends first it returns ctx's
// error and the slices (namespace/name) that still list addr.
func WaitUntilUnlisted(ctx context.Context, c client.Reader, addr netip.Addr) (listedIn []string, err error) {
	req, err := labels.NewRequirement(LabelFrontend, selection.Exists, nil)
	if err != nil {
		return nil, err
	}
	sel := client.MatchingLabelsSelector{Selector: labels.NewSelector().Add(*req)}
	addr = addr.Unmap()
	tick := time.NewTicker(unlistedPoll)
	defer tick.Stop()
	for {
		var list discoveryv1.EndpointSliceList
		if lerr := c.List(ctx, &list, sel, client.UnsafeDisableDeepCopy); lerr == nil {
			listedIn = listedIn[:0]
			for i := range list.Items {
				if listsReady(&list.Items[i], addr) {
					listedIn = append(listedIn, list.Items[i].Namespace+"/"+list.Items[i].Name)
				}
			}
			if len(listedIn) == 0 {
				return nil, nil
			}
			slices.Sort(listedIn)
		} else if ctx.Err() == nil {
			listedIn = []string{"(unknown: " + lerr.Error() + ")"}
		}
		select {
		case <-ctx.Done():
			return listedIn, ctx.Err()
		case <-tick.C:
		}
	}
}

// listsReady reports whether s lists addr as a ready endpoint (an absent
// ready condition means ready).
func listsReady(s *discoveryv1.EndpointSlice, addr netip.Addr) bool {
	for _, ep := range s.Endpoints {
		if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
			continue
		}
		for _, a := range ep.Addresses {
			if p, err := netip.ParseAddr(a); err == nil && p.Unmap() == addr {
				return true
			}
		}
	}
	return false
}
