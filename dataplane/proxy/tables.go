package proxy

import (
	"runtime"
	"slices"
	"sync"
	"weak"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickylb/stickylb/dataplane/maglev"
)

// sharedTables is the process's cache of Maglev tables: rules whose pools
// hold the same backend keys (their IPs; see ruleState.tableKey) get the
// same *maglev.Table. A table is immutable, so sharing it is safe; only the
// table is shared, each rule keeps its own backends (their metric series
// are per rule).
var sharedTables tableCache

// tableCache hands out one table per distinct (backends, size). It holds
// its tables by weak pointer: a table lives while some pool uses it, and
// when the last pool that used it is gone the garbage collector frees it
// and a cleanup drops its entry. It is used only when a pool is rebuilt,
// never on the packet path.
type tableCache struct {
	mu      sync.Mutex
	entries map[tableKey]weak.Pointer[maglev.Table]
	// tables, slots and bytes describe the live entries, for the gauges.
	tables, slots, bytes int64
}

// tableKey names a pool: a hash of its sorted, distinct backend keys, their
// number and the requested size. A hash match is checked against the
// table's own keys before a table is shared.
type tableKey struct {
	hash uint64
	n    int
	size uint64
}

// released is what a table's cleanup needs, without the table itself.
type released struct {
	key          tableKey
	wp           weak.Pointer[maglev.Table]
	slots, bytes int64
}

// get returns the table for backends (in any order, duplicates ignored) at
// size (0 for maglev's automatic size), shared with every other caller
// asking for the same pool while that table is in use. It is safe for
// concurrent use; the build itself runs outside the cache's lock.
func (c *tableCache) get(backends []string, size uint64) (*maglev.Table, error) {
	keys := slices.Clone(backends)
	slices.Sort(keys)
	keys = slices.Compact(keys)
	key := poolKey(keys, size)
	if t := c.lookup(key, keys); t != nil {
		return t, nil
	}
	built, err := maglev.Build(keys, size)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if wp, ok := c.entries[key]; ok {
		if t := wp.Value(); t != nil {
			if sameBackends(t, keys) {
				return t, nil // built concurrently by another rule
			}
			// Another pool with the same hash holds the entry: serve this
			// one unshared rather than evict it.
			return built, nil
		}
	}
	if c.entries == nil {
		c.entries = make(map[tableKey]weak.Pointer[maglev.Table])
	}
	wp := weak.Make(built)
	c.entries[key] = wp
	r := released{key: key, wp: wp, bytes: int64(built.Bytes())}
	if built.Len() > 0 {
		r.slots = int64(built.Size())
	}
	c.tables++
	c.slots += r.slots
	c.bytes += r.bytes
	runtime.AddCleanup(built, c.release, r)
	return built, nil
}

// lookup returns the live table cached for key if it holds exactly keys.
func (c *tableCache) lookup(key tableKey, keys []string) *maglev.Table {
	c.mu.Lock()
	wp, ok := c.entries[key]
	c.mu.Unlock()
	if !ok {
		return nil
	}
	if t := wp.Value(); t != nil && sameBackends(t, keys) {
		return t
	}
	return nil
}

// release runs after the garbage collector freed a cached table.
func (c *tableCache) release(r released) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries[r.key] == r.wp {
		delete(c.entries, r.key)
	}
	c.tables--
	c.slots -= r.slots
	c.bytes -= r.bytes
}

// stats returns the number of live cached tables and the slots and bytes
// they hold. A table no pool uses counts until the collector frees it.
func (c *tableCache) stats() (tables, slots, bytes int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tables, c.slots, c.bytes
}

// poolKey hashes sorted, distinct backend keys and a size.
func poolKey(keys []string, size uint64) tableKey {
	var h maglev.Hasher
	for _, k := range keys {
		// The length first, so that no two lists hash the same bytes.
		h.WriteUint64(uint64(len(k)))
		h.WriteString(k)
	}
	h.WriteUint64(size)
	return tableKey{hash: h.Sum64(), n: len(keys), size: size}
}

// sameBackends reports whether t was built from exactly keys (sorted, distinct).
func sameBackends(t *maglev.Table, keys []string) bool {
	if t.Len() != len(keys) {
		return false
	}
	for i, k := range keys {
		if t.Backend(i) != k {
			return false
		}
	}
	return true
}

// tableCollector exports the shared tables' gauges.
type tableCollector struct {
	c                    *tableCache
	tables, slots, bytes *prometheus.Desc
}

func newTableCollector(c *tableCache) *tableCollector {
	d := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, nil, nil)
	}
	return &tableCollector{
		c:      c,
		tables: d("maglev_tables", "Maglev lookup tables held by the process; rules over the same backend IPs share one."),
		slots:  d("maglev_table_slots", "Slots of all the Maglev lookup tables held by the process."),
		bytes:  d("maglev_table_bytes", "Memory of the slots of all the Maglev lookup tables held by the process."),
	}
}

func (tc *tableCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- tc.tables
	ch <- tc.slots
	ch <- tc.bytes
}

func (tc *tableCollector) Collect(ch chan<- prometheus.Metric) {
	tables, slots, bytes := tc.c.stats()
	ch <- prometheus.MustNewConstMetric(tc.tables, prometheus.GaugeValue, float64(tables))
	ch <- prometheus.MustNewConstMetric(tc.slots, prometheus.GaugeValue, float64(slots))
	ch <- prometheus.MustNewConstMetric(tc.bytes, prometheus.GaugeValue, float64(bytes))
}
