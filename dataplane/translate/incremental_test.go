package translate

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// world is a set of objects as an API server holds them: every write gets
// a new resourceVersion.
type world struct {
	rv       int
	rules    map[types.NamespacedName]*v1alpha1.LoadBalancerRule
	services map[types.NamespacedName]*corev1.Service
	slices   map[types.NamespacedName]*discoveryv1.EndpointSlice
}

func newWorld() *world {
	return &world{
		rules:    map[types.NamespacedName]*v1alpha1.LoadBalancerRule{},
		services: map[types.NamespacedName]*corev1.Service{},
		slices:   map[types.NamespacedName]*discoveryv1.EndpointSlice{},
	}
}

func (w *world) version() string { w.rv++; return strconv.Itoa(w.rv) }

// input lists the world, in map order (Translate does not care).
func (w *world) input(version uint64) Input {
	in := Input{Bind: bind, Version: version}
	for _, r := range w.rules {
		in.Rules = append(in.Rules, *r)
	}
	for _, s := range w.services {
		in.Services = append(in.Services, *s)
	}
	for _, s := range w.slices {
		in.Slices = append(in.Slices, *s)
	}
	return in
}

func (w *world) setRule(c *Incremental, r v1alpha1.LoadBalancerRule) {
	r.ResourceVersion = w.version()
	p := &r
	w.rules[nameOf(p)] = p
	c.SetRule(p)
}

func (w *world) deleteRule(c *Incremental, key types.NamespacedName) {
	delete(w.rules, key)
	c.DeleteRule(key)
}

func (w *world) setService(c *Incremental, s corev1.Service) {
	s.ResourceVersion = w.version()
	p := &s
	w.services[types.NamespacedName{Namespace: s.Namespace, Name: s.Name}] = p
	c.SetService(p)
}

func (w *world) deleteService(c *Incremental, key types.NamespacedName) {
	delete(w.services, key)
	c.DeleteService(key.Namespace, key.Name)
}

func (w *world) setSlice(c *Incremental, s discoveryv1.EndpointSlice) {
	s.ResourceVersion = w.version()
	p := &s
	w.slices[types.NamespacedName{Namespace: s.Namespace, Name: s.Name}] = p
	c.SetSlice(p)
}

func (w *world) deleteSlice(c *Incremental, key types.NamespacedName) {
	delete(w.slices, key)
	c.DeleteSlice(key.Namespace, key.Name)
}

// check builds c and compares it with Translate over w; it returns the
// snapshot built.
func check(t *testing.T, c *Incremental, w *world, version uint64, step string) (snapshot.Snapshot, map[types.NamespacedName]Result, []types.NamespacedName) {
	t.Helper()
	snap, results, changed := c.Build(version)
	wantSnap, wantResults := Translate(w.input(version))
	if !reflect.DeepEqual(snap, wantSnap) {
		t.Fatalf("%s: snapshot differs from Translate's:\n got %+v\nwant %+v", step, snap, wantSnap)
	}
	if !reflect.DeepEqual(results, wantResults) {
		t.Fatalf("%s: results differ from Translate's:\n got %+v\nwant %+v", step, results, wantResults)
	}
	if !slices.IsSortedFunc(changed, compareNames) {
		t.Fatalf("%s: changed not sorted: %v", step, changed)
	}
	return snap, results, changed
}

func ruleKey(ns, name string) types.NamespacedName {
	return types.NamespacedName{Namespace: ns, Name: name}
}

// backendsOf is the address of the first backend of every rule that has
// any: rules that share it share their backends.
func backendsOf(s snapshot.Snapshot) map[string]*snapshot.Backend {
	out := map[string]*snapshot.Backend{}
	for i := range s.Rules {
		if len(s.Rules[i].Backends) > 0 {
			out[s.Rules[i].Name] = &s.Rules[i].Backends[0]
		}
	}
	return out
}

func readyEndpoints(prefix string, n int) []discoveryv1.Endpoint {
	var eps []discoveryv1.Endpoint
	for i := range n {
		eps = append(eps, ep(fmt.Sprintf("%s.%d", prefix, i+1), yes, yes, no))
	}
	return eps
}

// TestIncrementalReusesUnchangedRules makes one change at a time to a world
// of rules over Services and IP pools, and checks that only the rules whose
// inputs changed are translated again, that the others keep their built
// rule (the very same backends), and that the outcome is Translate's.
func TestIncrementalReusesUnchangedRules(t *testing.T) {
	setup := func(t *testing.T) (*world, *Incremental) {
		w, c := newWorld(), NewIncremental(bind)
		for i := range 4 {
			ns := "ns"
			svcName := fmt.Sprintf("svc-%d", i)
			w.setService(c, svc(ns, svcName))
			w.setSlice(c, slice(ns, svcName, svcName+"-a", discoveryv1.AddressTypeIPv4, readyEndpoints(fmt.Sprintf("10.0.%d", i), 5)...))
			w.setRule(c, lbr(ns, fmt.Sprintf("svc-rule-%d", i), int32(8000+i), service(svcName)))
		}
		w.setRule(c, lbr("ns", "ip-rule", 9000))
		w.setRule(c, lbr("other", "same-service-name", 9001, service("svc-0"))) // another namespace's svc-0: none
		check(t, c, w, 1, "setup")
		return w, c
	}
	cases := []struct {
		name string
		// change makes one change to the world.
		change func(w *world, c *Incremental)
		// retranslated are the rules translated again; changed those Build
		// reports as changed.
		retranslated int
		changed      []types.NamespacedName
	}{
		{"nothing", func(*world, *Incremental) {}, 0, nil},
		{"one slice's endpoint turns not ready", func(w *world, c *Incremental) {
			es := *w.slices[ruleKey("ns", "svc-1-a")]
			es.Endpoints = slices.Clone(es.Endpoints)
			es.Endpoints[2] = ep(es.Endpoints[2].Addresses[0], no, no, no)
			w.setSlice(c, es)
		}, 1, []types.NamespacedName{ruleKey("ns", "svc-rule-1")}},
		{"a second slice for one Service", func(w *world, c *Incremental) {
			w.setSlice(c, slice("ns", "svc-2", "svc-2-b", discoveryv1.AddressTypeIPv4, readyEndpoints("10.9.2", 2)...))
		}, 1, []types.NamespacedName{ruleKey("ns", "svc-rule-2")}},
		{"a slice rewritten with the same endpoints", func(w *world, c *Incremental) {
			w.setSlice(c, *w.slices[ruleKey("ns", "svc-3-a")])
		}, 1, nil},
		{"an object seen again at the same resourceVersion", func(w *world, c *Incremental) {
			c.SetSlice(w.slices[ruleKey("ns", "svc-3-a")])
			c.SetRule(w.rules[ruleKey("ns", "ip-rule")])
		}, 0, nil},
		{"a Service goes", func(w *world, c *Incremental) {
			w.deleteService(c, ruleKey("ns", "svc-0"))
		}, 1, []types.NamespacedName{ruleKey("ns", "svc-rule-0")}},
		{"a Service appears that only another namespace's rule names", func(w *world, c *Incremental) {
			w.setService(c, svc("other", "svc-0"))
		}, 1, []types.NamespacedName{ruleKey("other", "same-service-name")}},
		{"a slice of a Service no rule uses", func(w *world, c *Incremental) {
			w.setSlice(c, slice("ns", "unused", "unused-a", discoveryv1.AddressTypeIPv4, readyEndpoints("10.8.0", 3)...))
		}, 0, nil},
		{"a rule's spec changes", func(w *world, c *Incremental) {
			r := *w.rules[ruleKey("ns", "ip-rule")]
			r.Generation++
			r.Spec.IdleTimeoutInMinutes = 30
			w.setRule(c, r)
		}, 1, []types.NamespacedName{ruleKey("ns", "ip-rule")}},
		{"a rule moves to another rule's port and loses it", func(w *world, c *Incremental) {
			r := *w.rules[ruleKey("ns", "ip-rule")]
			r.Generation++
			r.CreationTimestamp = metav1.NewTime(epoch.Add(time.Hour))
			r.Spec.Frontend.Port = 8001
			w.setRule(c, r)
		}, 1, []types.NamespacedName{ruleKey("ns", "ip-rule")}},
		{"a rule is deleted", func(w *world, c *Incremental) {
			w.deleteRule(c, ruleKey("ns", "svc-rule-3"))
		}, 0, []types.NamespacedName{ruleKey("ns", "svc-rule-3")}},
		{"a rule is added", func(w *world, c *Incremental) {
			w.setRule(c, lbr("ns", "new", 9100, service("svc-3")))
		}, 1, []types.NamespacedName{ruleKey("ns", "new")}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w, c := setup(t)
			before, _, _ := c.Build(1)
			beforeBackends := backendsOf(before)
			translated := c.Translations()
			tc.change(w, c)
			after, _, changed := check(t, c, w, 2, "after the change")
			if got := c.Translations() - translated; got != uint64(tc.retranslated) {
				t.Errorf("%d rules translated again, want %d", got, tc.retranslated)
			}
			if !slices.Equal(changed, tc.changed) {
				t.Errorf("changed %v, want %v", changed, tc.changed)
			}
			for name, b := range backendsOf(after) {
				ns, n, _ := cutName(name)
				if slices.Contains(tc.changed, ruleKey(ns, n)) {
					continue
				}
				if beforeBackends[name] != b {
					t.Errorf("rule %s is unchanged but its backends were built again", name)
				}
			}
			if len(tc.changed) == 0 && len(before.Rules) > 0 && &before.Rules[0] != &after.Rules[0] {
				t.Error("nothing changed, yet the snapshot's rules were copied")
			}
		})
	}
}

func cutName(s string) (string, string, bool) {
	for i := range len(s) {
		if s[i] == '/' {
			return s[:i], s[i+1:], true
		}
	}
	return s, "", false
}

// TestIncrementalDeleteAndRecreate: a rule deleted and made again between
// two Builds, now losing its port, leaves the snapshot.
func TestIncrementalDeleteAndRecreate(t *testing.T) {
	w, c := newWorld(), NewIncremental(bind)
	w.setRule(c, lbr("ns", "a", 80, createdAfter(time.Minute)))
	check(t, c, w, 1, "a alone")
	w.deleteRule(c, ruleKey("ns", "a"))
	w.setRule(c, lbr("ns", "b", 80))
	w.setRule(c, lbr("ns", "a", 80, createdAfter(time.Hour)))
	_, _, changed := check(t, c, w, 2, "a made again, after b")
	if !slices.Equal(changed, []types.NamespacedName{ruleKey("ns", "a"), ruleKey("ns", "b")}) {
		t.Errorf("changed %v", changed)
	}
}

// TestIncrementalMatchesTranslate makes long random sequences of changes to
// rules, Services and EndpointSlices, in a space small enough that ports
// collide, rules share Services and endpoints appear in several slices, and
// compares the incremental outcome with a full Translate after every step.
func TestIncrementalMatchesTranslate(t *testing.T) {
	for seed := range uint64(40) {
		t.Run(fmt.Sprintf("seed-%d", seed), func(t *testing.T) {
			if seed%2 == 1 { // rebuild the snapshot's rules rather than patch them
				defer func(limit int) { patchLimit = limit }(patchLimit)
				patchLimit = 0
			}
			randomChanges(t, rand.New(rand.NewPCG(seed, 0x5eed)), 300)
		})
	}
}

func randomChanges(t *testing.T, rng *rand.Rand, steps int) {
	w, c := newWorld(), NewIncremental(bind)
	namespaces := []string{"a", "b", ""}
	pick := func(n int) int { return rng.IntN(n) }
	nsName := func() string { return namespaces[pick(len(namespaces))] }
	conds := []cond{unset, yes, no}
	randomRule := func(ns, name string) v1alpha1.LoadBalancerRule {
		r := lbr(ns, name, int32(80+pick(3)), createdAfter(time.Duration(pick(3))*time.Minute))
		r.Generation = int64(1 + pick(5))
		r.UID = types.UID(fmt.Sprintf("uid-%d", pick(1000)))
		r.Spec.Protocol = []v1alpha1.Protocol{v1alpha1.ProtocolTCP, v1alpha1.ProtocolUDP, v1alpha1.ProtocolAll}[pick(3)]
		r.Spec.BackendPort = v1alpha1.PortNumber(8080 + pick(2))
		switch pick(10) {
		case 0:
			r.Spec.BackendPool.Addresses = []string{"192.0.2.9", "192.0.2.1", "192.0.2.9"}
		case 1:
			r.Spec.Protocol = "SCTP" // invalid
		case 2:
			r.Spec.Frontend.Port = 0 // invalid
		default:
			r.Spec.BackendPool = v1alpha1.BackendPool{ServiceName: fmt.Sprintf("svc-%d", pick(4))}
		}
		if pick(4) == 0 {
			r.Spec.Probe = &v1alpha1.Probe{Protocol: v1alpha1.ProbeProtocolTCP}
		}
		if pick(4) == 0 {
			r.Spec.Frontend.Name = "other"
		}
		return r
	}
	randomSlice := func(ns, service, name string) discoveryv1.EndpointSlice {
		family := discoveryv1.AddressTypeIPv4
		if pick(10) == 0 {
			family = discoveryv1.AddressTypeFQDN
		}
		var eps []discoveryv1.Endpoint
		for range pick(5) {
			eps = append(eps, ep(fmt.Sprintf("10.0.0.%d", 1+pick(6)), conds[pick(3)], conds[pick(3)], conds[pick(3)]))
		}
		es := slice(ns, service, name, family, eps...)
		if pick(10) == 0 {
			delete(es.Labels, discoveryv1.LabelServiceName)
		}
		return es
	}
	someKey := func(keys []types.NamespacedName) types.NamespacedName {
		slices.SortFunc(keys, compareNames)
		return keys[pick(len(keys))]
	}
	var prevSnap snapshot.Snapshot
	var prevResults map[types.NamespacedName]Result
	for step := range steps {
		var what string
		switch op := pick(16); {
		case op < 4 || len(w.rules) == 0: // add or replace a rule
			ns, name := nsName(), fmt.Sprintf("r%d", pick(8))
			what = "set rule " + ns + "/" + name
			w.setRule(c, randomRule(ns, name))
		case op < 6: // change one field of a rule
			key := someKey(slices.Collect(mapsKeys(w.rules)))
			r := *w.rules[key]
			r.Spec = *r.Spec.DeepCopy()
			switch pick(4) {
			case 0:
				r.Spec.Frontend.Port = v1alpha1.PortNumber(80 + pick(3))
			case 1:
				r.Spec.BackendPool = v1alpha1.BackendPool{ServiceName: fmt.Sprintf("svc-%d", pick(4))}
			case 2:
				r.Spec.Protocol = []v1alpha1.Protocol{v1alpha1.ProtocolTCP, v1alpha1.ProtocolUDP, v1alpha1.ProtocolAll}[pick(3)]
			case 3:
				r.Generation++ // a new generation, same spec
			}
			what = fmt.Sprintf("modify rule %s", key)
			w.setRule(c, r)
		case op == 6: // a status write: new resourceVersion only
			key := someKey(slices.Collect(mapsKeys(w.rules)))
			what = fmt.Sprintf("status of rule %s", key)
			w.setRule(c, *w.rules[key])
		case op == 7:
			key := someKey(slices.Collect(mapsKeys(w.rules)))
			what = fmt.Sprintf("delete rule %s", key)
			w.deleteRule(c, key)
		case op == 8:
			ns, name := nsName(), fmt.Sprintf("svc-%d", pick(4))
			if _, ok := w.services[ruleKey(ns, name)]; ok {
				what = "delete service " + ns + "/" + name
				w.deleteService(c, ruleKey(ns, name))
			} else {
				what = "add service " + ns + "/" + name
				w.setService(c, svc(ns, name))
			}
		case op < 13: // add or replace a slice, maybe moving it to another Service
			ns, service := nsName(), fmt.Sprintf("svc-%d", pick(4))
			name := fmt.Sprintf("slice-%d", pick(6))
			what = "set slice " + ns + "/" + name + " of " + service
			w.setSlice(c, randomSlice(ns, service, name))
		case op == 13 && len(w.slices) > 0:
			key := someKey(slices.Collect(mapsKeys(w.slices)))
			what = fmt.Sprintf("delete slice %s", key)
			w.deleteSlice(c, key)
		case op == 14:
			// A full pass, as after a resync: nothing may change.
			what = "sync"
			c.Sync(w.input(0))
		default:
			what = "nothing"
		}
		// Now and then several changes go into one Build.
		if pick(4) == 0 && step != steps-1 {
			continue
		}
		version := uint64(step + 1)
		snap, results, changed := check(t, c, w, version, fmt.Sprintf("step %d (%s)", step, what))
		// Every rule whose outcome changed is reported; the others keep
		// their built rule.
		prevBackends := backendsOf(prevSnap)
		for key, res := range results {
			was, had := prevResults[key]
			prevRule, inPrev := prevSnap.Rule(ruleName(key))
			cur, inCur := snap.Rule(ruleName(key))
			differs := !had || was != res || inPrev != inCur || (inCur && !reflect.DeepEqual(*prevRule, *cur))
			if differs && !slices.Contains(changed, key) {
				t.Fatalf("step %d (%s): rule %s changed but is not reported", step, what, key)
			}
			if !slices.Contains(changed, key) && inCur && len(cur.Backends) > 0 && prevBackends[cur.Name] != &cur.Backends[0] {
				t.Fatalf("step %d (%s): rule %s did not change, yet its backends were built again", step, what, key)
			}
		}
		for key := range prevResults {
			if _, ok := results[key]; !ok && !slices.Contains(changed, key) {
				t.Fatalf("step %d (%s): rule %s is gone but not reported", step, what, key)
			}
		}
		prevSnap, prevResults = snap, results
	}
	// Objects without resourceVersions are always taken as changed: a full
	// pass over them translates everything again, to the same outcome.
	in := w.input(0)
	for i := range in.Rules {
		in.Rules[i].ResourceVersion = ""
	}
	for i := range in.Slices {
		in.Slices[i].ResourceVersion = ""
	}
	c.Sync(in)
	before := c.Translations()
	check(t, c, w, uint64(steps+1), "full pass")
	if got := c.Translations() - before; got != uint64(len(w.rules)) {
		t.Errorf("full pass translated %d rules, want %d", got, len(w.rules))
	}
}

func mapsKeys[V any](m map[types.NamespacedName]V) func(func(types.NamespacedName) bool) {
	return func(yield func(types.NamespacedName) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func TestIncrementalPanicsWithoutBindAddress(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("no panic")
		}
	}()
	NewIncremental(netip.Addr{})
}

// benchWorld is rules rules, each over its own Service with one
// EndpointSlice of endpoints ready endpoints, each on its own port.
func benchWorld(rules, endpoints int) Input {
	in := Input{Bind: bind, Version: 1}
	for i := range rules {
		name := fmt.Sprintf("r%05d", i)
		r := lbr("bench", name, int32(20000+i), service(name))
		r.ResourceVersion = "1"
		in.Rules = append(in.Rules, r)
		s := svc("bench", name)
		s.ResourceVersion = "1"
		in.Services = append(in.Services, s)
		var eps []discoveryv1.Endpoint
		for j := range endpoints {
			n := i*endpoints + j
			eps = append(eps, ep(fmt.Sprintf("10.%d.%d.%d", n>>16, (n>>8)&255, n&255), yes, yes, no))
		}
		es := slice("bench", name, name+"-x", discoveryv1.AddressTypeIPv4, eps...)
		es.ResourceVersion = "1"
		in.Slices = append(in.Slices, es)
	}
	return in
}

// BenchmarkTranslateFull is what every change cost before translation was
// incremental: the whole world of 10,000 rules of 100 endpoints.
func BenchmarkTranslateFull(b *testing.B) {
	in := benchWorld(10_000, 100)
	for b.Loop() {
		Translate(in)
	}
}

// BenchmarkIncrementalOneSlice is one EndpointSlice change (an endpoint turns
// not ready) in the same world, then a Build.
func BenchmarkIncrementalOneSlice(b *testing.B) {
	in := benchWorld(10_000, 100)
	c := NewIncremental(bind)
	c.Sync(in)
	c.Build(1)
	i := 0
	for b.Loop() {
		es := in.Slices[(i*7919)%len(in.Slices)].DeepCopy()
		es.ResourceVersion = strconv.Itoa(i + 2)
		e := &es.Endpoints[i%len(es.Endpoints)]
		e.Conditions.Ready = ptr(!*e.Conditions.Ready)
		c.SetSlice(es)
		if _, _, changed := c.Build(uint64(i + 2)); len(changed) != 1 {
			b.Fatalf("changed %v", changed)
		}
		i++
	}
}

// BenchmarkIncrementalFirstBuild is the first Build of that world, from nothing.
func BenchmarkIncrementalFirstBuild(b *testing.B) {
	in := benchWorld(10_000, 100)
	for b.Loop() {
		c := NewIncremental(bind)
		c.Sync(in)
		c.Build(1)
	}
}
