package proxy

import (
	"net/netip"
	"sync"

	"github.com/stickylb/stickylb/dataplane/maglev"
)

// clientCounter counts connections per client IP, sharded so that clients
// rarely contend.
type clientCounter struct {
	shards [64]struct {
		sync.Mutex
		n map[netip.Addr]int
	}
}

func (c *clientCounter) init() {
	for i := range c.shards {
		c.shards[i].n = map[netip.Addr]int{}
	}
}

func (c *clientCounter) shard(ip netip.Addr) int {
	return int(maglev.HashClient(ip, "") % uint64(len(c.shards)))
}

// acquire counts one more connection from ip unless it already has max.
func (c *clientCounter) acquire(ip netip.Addr, max int) bool {
	s := &c.shards[c.shard(ip)]
	s.Lock()
	defer s.Unlock()
	if s.n[ip] >= max {
		return false
	}
	s.n[ip]++
	return true
}

func (c *clientCounter) release(ip netip.Addr) {
	s := &c.shards[c.shard(ip)]
	s.Lock()
	defer s.Unlock()
	if s.n[ip] <= 1 {
		delete(s.n, ip)
		return
	}
	s.n[ip]--
}
