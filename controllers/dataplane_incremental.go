package controllers

import (
	"context"
	"sync"

	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
)

// objectKind is a kind of object the dataplane translates.
type objectKind int

const (
	kindRule objectKind = iota
	kindService
	kindSlice
)

// changeSet collects the objects changed since a Reconcile last took them.
// Event handlers add to it; it never blocks them for long.
type changeSet struct {
	mu   sync.Mutex
	keys map[objectKind]map[types.NamespacedName]struct{}
}

func (c *changeSet) add(kind objectKind, key types.NamespacedName) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.keys == nil {
		c.keys = map[objectKind]map[types.NamespacedName]struct{}{}
	}
	m := c.keys[kind]
	if m == nil {
		m = map[types.NamespacedName]struct{}{}
		c.keys[kind] = m
	}
	m[key] = struct{}{}
}

// take returns the changes and starts a new set.
func (c *changeSet) take() map[objectKind]map[types.NamespacedName]struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.keys
	c.keys = nil
	return out
}

// putBack returns changes a Reconcile could not take in.
func (c *changeSet) putBack(changes map[objectKind]map[types.NamespacedName]struct{}) {
	for kind, keys := range changes {
		for key := range keys {
			c.add(kind, key)
		}
	}
}

// objectEvents notes the Services and EndpointSlices that changed and
// enqueues the Reconcile that takes them in.
type objectEvents struct {
	d    *Dataplane
	kind objectKind
}

func (h objectEvents) changed(o client.Object, q ruleQueue) {
	if o == nil {
		return
	}
	h.d.changes.add(h.kind, client.ObjectKeyFromObject(o))
	q.Add(everything)
}

func (h objectEvents) Create(_ context.Context, e event.CreateEvent, q ruleQueue) {
	h.changed(e.Object, q)
}

func (h objectEvents) Update(_ context.Context, e event.UpdateEvent, q ruleQueue) {
	h.changed(e.ObjectNew, q)
}

func (h objectEvents) Delete(_ context.Context, e event.DeleteEvent, q ruleQueue) {
	h.changed(e.Object, q)
}

func (h objectEvents) Generic(_ context.Context, e event.GenericEvent, q ruleQueue) {
	h.changed(e.Object, q)
}
