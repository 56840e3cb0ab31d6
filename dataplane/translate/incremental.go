package translate

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// Incremental is Translate kept up to date one change at a time. It holds
// the objects it is given and, per rule, what it built from them; Build
// translates again only the rules whose inputs changed since the previous
// Build, and the Snapshot it returns shares every other rule (backends
// included) with the previous one.
//
// A rule's inputs are its own object, the Service its pool names and that
// Service's EndpointSlices, and the rules on the same frontend port, which
// compete for its listeners: a change to any of them makes the rule dirty.
// For the same objects, Build returns exactly what Translate returns.
//
// Incremental keeps the objects it is given (it reads them again when a
// rule's pool changes): callers must not modify them afterwards, as with
// objects from an informer's cache. Objects whose non-empty resourceVersion
// equals the one held are taken as unchanged. It is not safe for concurrent
// use; what Build returns is immutable and may be shared.
type Incremental struct {
	bind netip.Addr

	rules    map[types.NamespacedName]*ruleEntry
	services map[serviceKey]string // resourceVersion of each Service that exists
	slices   map[sliceKey]*sliceEntry
	pools    map[serviceKey]*poolEntry
	// ports holds the valid rules by frontend port: only rules on one port
	// can compete for a listener (every rule binds the same address).
	ports map[uint16]map[types.NamespacedName]*ruleEntry

	dirtyRules map[types.NamespacedName]struct{}
	dirtyPools map[serviceKey]struct{}
	dirtyPorts map[uint16]struct{}
	// gone are the rules deleted since the previous Build.
	gone map[types.NamespacedName]struct{}

	// What the previous Build returned; never modified once returned.
	snapRules []snapshot.Rule
	results   map[types.NamespacedName]Result

	translations uint64
}

type sliceKey struct{ namespace, name string }

type sliceEntry struct {
	obj *discoveryv1.EndpointSlice
	// service is the pool the slice adds to; ok is false for slices that add
	// to none (no Service label, FQDN addresses).
	service serviceKey
	ok      bool
}

// poolEntry is one Service as rules see it: whether it exists, its slices,
// and the rules whose pool it is.
type poolEntry struct {
	slices map[sliceKey]*discoveryv1.EndpointSlice
	users  map[types.NamespacedName]struct{}
}

type ruleEntry struct {
	key types.NamespacedName
	obj *v1alpha1.LoadBalancerRule
	// service is the Service the rule's pool names, if hasService.
	service    serviceKey
	hasService bool
	// port is the frontend port the rule claims, 0 when its spec is invalid.
	port uint16
	// rule and base are what translateRule built: base is the result before
	// listeners are claimed. changed says rule differs from the one the
	// previous Build returned.
	rule    snapshot.Rule
	base    Result
	changed bool
	// result is the rule's result as last returned, served whether rule is
	// in the snapshot returned.
	result Result
	served bool
	// claim is the outcome of the last listener claim of the rule's port.
	claimed      bool
	conflictWith string
	conflictOn   snapshot.ListenerKey
}

// NewIncremental returns an Incremental with no objects, building snapshots
// whose listeners bind bind. It panics if bind is not a valid address.
func NewIncremental(bind netip.Addr) *Incremental {
	if !bind.IsValid() {
		panic("translate: NewIncremental: bind is not a valid address")
	}
	return &Incremental{
		bind:       bind,
		rules:      map[types.NamespacedName]*ruleEntry{},
		services:   map[serviceKey]string{},
		slices:     map[sliceKey]*sliceEntry{},
		pools:      map[serviceKey]*poolEntry{},
		ports:      map[uint16]map[types.NamespacedName]*ruleEntry{},
		dirtyRules: map[types.NamespacedName]struct{}{},
		dirtyPools: map[serviceKey]struct{}{},
		dirtyPorts: map[uint16]struct{}{},
		gone:       map[types.NamespacedName]struct{}{},
		results:    map[types.NamespacedName]Result{},
	}
}

// Translations counts the rules translated so far, for tests and metrics.
func (c *Incremental) Translations() uint64 { return c.translations }

// Len is the number of rules held.
func (c *Incremental) Len() int { return len(c.rules) }

func sameVersion(a, b string) bool { return a != "" && a == b }

// SetRule adds r or replaces the rule of the same namespace/name.
func (c *Incremental) SetRule(r *v1alpha1.LoadBalancerRule) {
	key := nameOf(r)
	e := c.rules[key]
	if e == nil {
		// A rule deleted and made again since the previous Build stays in
		// gone: its old snapshot rule goes unless the new one replaces it.
		e = &ruleEntry{key: key}
		c.rules[key] = e
	} else if e.obj.UID == r.UID && sameVersion(e.obj.ResourceVersion, r.ResourceVersion) {
		return
	}
	e.obj = r
	c.dirtyRules[key] = struct{}{}
}

// DeleteRule forgets the rule, if held.
func (c *Incremental) DeleteRule(key types.NamespacedName) {
	if key.Namespace == "" {
		key.Namespace = "default"
	}
	e := c.rules[key]
	if e == nil {
		return
	}
	c.unuse(e)
	if e.port != 0 {
		delete(c.ports[e.port], key)
		if len(c.ports[e.port]) == 0 {
			delete(c.ports, e.port)
		}
		c.dirtyPorts[e.port] = struct{}{}
	}
	delete(c.rules, key)
	delete(c.dirtyRules, key)
	c.gone[key] = struct{}{}
}

// SetService records that s exists. Only its existence matters.
func (c *Incremental) SetService(s *corev1.Service) {
	k := serviceKey{namespace: s.Namespace, name: s.Name}
	if _, ok := c.services[k]; ok {
		c.services[k] = s.ResourceVersion
		return // existence did not change
	}
	c.services[k] = s.ResourceVersion
	c.dirtyPools[k] = struct{}{}
}

// DeleteService records that the Service is gone.
func (c *Incremental) DeleteService(namespace, name string) {
	k := serviceKey{namespace: namespace, name: name}
	if _, ok := c.services[k]; !ok {
		return
	}
	delete(c.services, k)
	c.dirtyPools[k] = struct{}{}
	c.dropPoolIfUnused(k)
}

// SetSlice adds es or replaces the EndpointSlice of the same
// namespace/name.
func (c *Incremental) SetSlice(es *discoveryv1.EndpointSlice) {
	k := sliceKey{namespace: es.Namespace, name: es.Name}
	if e := c.slices[k]; e != nil {
		if e.obj.UID == es.UID && sameVersion(e.obj.ResourceVersion, es.ResourceVersion) {
			// The same object: hold the newer copy only.
			e.obj = es
			if p := c.pools[e.service]; e.ok && p != nil {
				p.slices[k] = es
			}
			return
		}
		c.removeSlice(k, e)
	}
	e := &sliceEntry{obj: es}
	e.service, e.ok = sliceService(es)
	c.slices[k] = e
	if e.ok {
		p := c.pool(e.service)
		p.slices[k] = es
		c.dirtyPools[e.service] = struct{}{}
	}
}

// DeleteSlice forgets the EndpointSlice, if held.
func (c *Incremental) DeleteSlice(namespace, name string) {
	k := sliceKey{namespace: namespace, name: name}
	if e := c.slices[k]; e != nil {
		c.removeSlice(k, e)
		delete(c.slices, k)
	}
}

func (c *Incremental) removeSlice(k sliceKey, e *sliceEntry) {
	if !e.ok {
		return
	}
	if p := c.pools[e.service]; p != nil {
		delete(p.slices, k)
		c.dirtyPools[e.service] = struct{}{}
		c.dropPoolIfUnused(e.service)
	}
}

// pool returns the entry of Service k, made if need be.
func (c *Incremental) pool(k serviceKey) *poolEntry {
	p := c.pools[k]
	if p == nil {
		p = &poolEntry{slices: map[sliceKey]*discoveryv1.EndpointSlice{}, users: map[types.NamespacedName]struct{}{}}
		c.pools[k] = p
	}
	return p
}

// dropPoolIfUnused forgets the entry of a Service that has no slices and no
// rules using it (whether it exists is in c.services).
func (c *Incremental) dropPoolIfUnused(k serviceKey) {
	if p := c.pools[k]; p != nil && len(p.slices) == 0 && len(p.users) == 0 {
		delete(c.pools, k)
	}
}

func (c *Incremental) unuse(e *ruleEntry) {
	if !e.hasService {
		return
	}
	if p := c.pools[e.service]; p != nil {
		delete(p.users, e.key)
		c.dropPoolIfUnused(e.service)
	}
	e.hasService = false
}

// Sync makes the held objects those of in (in.Bind and in.Version aside):
// objects not in in are deleted, the others set. Like Translate it keeps one
// rule per namespace/name, the one of the highest generation; EndpointSlices
// must have distinct namespace/names.
func (c *Incremental) Sync(in Input) {
	rules := uniqueRules(in.Rules)
	seen := make(map[types.NamespacedName]struct{}, len(rules))
	for i := range rules {
		seen[nameOf(&rules[i])] = struct{}{}
		c.SetRule(&rules[i])
	}
	for key := range c.rules {
		if _, ok := seen[key]; !ok {
			c.DeleteRule(key)
		}
	}
	services := make(map[serviceKey]struct{}, len(in.Services))
	for i := range in.Services {
		s := &in.Services[i]
		services[serviceKey{namespace: s.Namespace, name: s.Name}] = struct{}{}
		c.SetService(s)
	}
	for k := range c.services {
		if _, ok := services[k]; !ok {
			c.DeleteService(k.namespace, k.name)
		}
	}
	epSlices := make(map[sliceKey]struct{}, len(in.Slices))
	for i := range in.Slices {
		es := &in.Slices[i]
		epSlices[sliceKey{namespace: es.Namespace, name: es.Name}] = struct{}{}
		c.SetSlice(es)
	}
	for k := range c.slices {
		if _, ok := epSlices[k]; !ok {
			c.DeleteSlice(k.namespace, k.name)
		}
	}
}

// Build returns the snapshot and the results Translate would return for
// the objects held, and the rules whose result or snapshot rule changed
// since the previous Build (deleted rules included), sorted. Rules that did
// not change keep their snapshot.Rule, backends and all.
func (c *Incremental) Build(version uint64) (snapshot.Snapshot, map[types.NamespacedName]Result, []types.NamespacedName) {
	// A changed pool makes its rules dirty.
	for k := range c.dirtyPools {
		if p := c.pools[k]; p != nil {
			for u := range p.users {
				c.dirtyRules[u] = struct{}{}
			}
		}
	}
	clear(c.dirtyPools)

	// Pools are merged from their slices once per Build, when a rule needs one.
	merged := map[serviceKey]*pool{}
	lookup := func(k serviceKey) *pool {
		if p, ok := merged[k]; ok {
			return p
		}
		var out *pool
		_, exists := c.services[k]
		if e := c.pools[k]; exists || (e != nil && len(e.slices) > 0) {
			out = &pool{exists: exists, endpoints: map[netip.Addr]endpointState{}}
			if e != nil {
				for _, es := range e.slices {
					out.add(es)
				}
			}
		}
		merged[k] = out
		return out
	}

	touched := make(map[types.NamespacedName]*ruleEntry, len(c.dirtyRules))
	for key := range c.dirtyRules {
		e := c.rules[key]
		c.retranslate(e, lookup)
		touched[key] = e
	}
	clear(c.dirtyRules)

	for port := range c.dirtyPorts {
		c.claim(port, touched)
	}
	clear(c.dirtyPorts)

	// What changed, for the snapshot and the results.
	var changed []types.NamespacedName
	upsert := map[string]*ruleEntry{}
	remove := map[string]struct{}{}
	gone := make([]types.NamespacedName, 0, len(c.gone))
	for key := range c.gone {
		gone = append(gone, key)
		changed = append(changed, key)
		remove[ruleName(key)] = struct{}{}
	}
	clear(c.gone)
	newResults := make(map[types.NamespacedName]Result, len(touched))
	for key, e := range touched {
		res := e.base
		if e.port != 0 {
			if e.claimed {
				res.Accepted = true
			} else {
				res.ConflictWith, res.ConflictOn = e.conflictWith, e.conflictOn
			}
		}
		wasServed := e.served
		e.served = res.Accepted
		if _, had := c.results[key]; !had || res != e.result || wasServed != e.served || (e.served && e.changed) {
			changed = append(changed, key)
		}
		e.result = res
		newResults[key] = res
		switch {
		case e.served && (!wasServed || e.changed):
			upsert[e.rule.Name] = e
		case !e.served && wasServed:
			remove[ruleName(key)] = struct{}{}
		}
		e.changed = false
	}
	slices.SortFunc(changed, compareNames)
	changed = slices.Compact(changed)

	if len(changed) > 0 {
		results := maps.Clone(c.results)
		for _, key := range gone {
			delete(results, key)
		}
		maps.Copy(results, newResults)
		c.results = results
	}
	if len(upsert) > 0 || len(remove) > 0 {
		c.snapRules = c.patchRules(upsert, remove)
	}
	return snapshot.Snapshot{Version: version, Rules: c.snapRules}, c.results, changed
}

// retranslate builds e's rule again from its object and the pools, and
// moves it in the service and port indexes.
func (c *Incremental) retranslate(e *ruleEntry, lookup func(serviceKey) *pool) {
	rule, res := translateRule(e.obj, c.bind, lookup)
	c.translations++
	if res.Invalid == "" {
		rule.Normalize()
	}

	var svc serviceKey
	hasService := e.obj.Spec.BackendPool.ServiceName != ""
	if hasService {
		svc = serviceKey{namespace: namespace(e.obj), name: e.obj.Spec.BackendPool.ServiceName}
	}
	if e.hasService != hasService || e.service != svc {
		c.unuse(e)
		if hasService {
			c.pool(svc).users[e.key] = struct{}{}
		}
		e.service, e.hasService = svc, hasService
	}

	var port uint16
	if res.Invalid == "" {
		port = rule.Port
	}
	// The rule's listeners or age may have changed: its port's claims are
	// made again, old port and new.
	if e.port != 0 {
		c.dirtyPorts[e.port] = struct{}{}
		if port != e.port {
			delete(c.ports[e.port], e.key)
			if len(c.ports[e.port]) == 0 {
				delete(c.ports, e.port)
			}
		}
	}
	if port != 0 {
		c.dirtyPorts[port] = struct{}{}
		group := c.ports[port]
		if group == nil {
			group = map[types.NamespacedName]*ruleEntry{}
			c.ports[port] = group
		}
		group[e.key] = e
	}
	e.port = port
	// A rule equal to the one built before keeps it, backends and all: what
	// the snapshot shares, the proxy need not compare.
	old := &e.rule
	if old.Port != 0 && old.Equal(&rule) && (old.Backends == nil) == (rule.Backends == nil) {
		e.changed = false
	} else {
		e.rule = rule
		e.changed = true
	}
	e.base = res
}

// claim makes the listener claims of the rules on port again, as Translate
// does: oldest first, and a rule that loses one listener claims none.
func (c *Incremental) claim(port uint16, touched map[types.NamespacedName]*ruleEntry) {
	group := c.ports[port]
	members := make([]*ruleEntry, 0, len(group))
	for _, e := range group {
		members = append(members, e)
		touched[e.key] = e
	}
	slices.SortFunc(members, func(a, b *ruleEntry) int {
		if c := a.obj.CreationTimestamp.Time.Compare(b.obj.CreationTimestamp.Time); c != 0 {
			return c
		}
		return compareNames(a.key, b.key)
	})
	owners := map[snapshot.ListenerKey]string{}
	for _, e := range members {
		r := &e.rule
		e.claimed, e.conflictWith, e.conflictOn = false, "", snapshot.ListenerKey{}
		listeners := r.Listeners()
		for _, l := range listeners {
			if owner, taken := owners[l]; taken {
				e.conflictWith, e.conflictOn = owner, l
				break
			}
		}
		if e.conflictWith != "" {
			continue
		}
		for _, l := range listeners {
			owners[l] = r.Name
		}
		e.claimed = true
	}
}

// patchLimit is how many changed rules the previous snapshot's rules are
// patched with at most; beyond it (and a sixteenth of the rules) they are
// collected and sorted anew.
var patchLimit = 64

// patchRules returns the rules of the previous snapshot with upsert put in
// and remove taken out, sorted by name; a copy when anything changed.
func (c *Incremental) patchRules(upsert map[string]*ruleEntry, remove map[string]struct{}) []snapshot.Rule {
	byName := func(r snapshot.Rule, name string) int { return cmp.Compare(r.Name, name) }
	if n := len(upsert) + len(remove); n > patchLimit && n > len(c.snapRules)/16 {
		// Many changes: build from every served rule.
		var out []snapshot.Rule
		for _, e := range c.rules {
			if e.served {
				out = append(out, e.rule)
			}
		}
		slices.SortFunc(out, func(a, b snapshot.Rule) int { return cmp.Compare(a.Name, b.Name) })
		return out
	}
	out := slices.Clone(c.snapRules)
	for name := range remove {
		if _, up := upsert[name]; up {
			continue
		}
		if i, ok := slices.BinarySearchFunc(out, name, byName); ok {
			out = slices.Delete(out, i, i+1)
		}
	}
	for name, e := range upsert {
		i, ok := slices.BinarySearchFunc(out, name, byName)
		if ok {
			out[i] = e.rule
		} else {
			out = slices.Insert(out, i, e.rule)
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// ruleName is the snapshot name of the rule key names.
func ruleName(key types.NamespacedName) string { return key.Namespace + "/" + key.Name }
