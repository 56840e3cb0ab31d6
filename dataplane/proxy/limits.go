package proxy

import (
	"context"
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

// flowSet tracks established TCP flows so Shutdown can wait for or close them.
type flowSet struct {
	mu    sync.Mutex
	flows map[*tcpFlow]struct{}
	empty chan struct{} // closed while the set is empty
}

func (s *flowSet) init() {
	s.flows = map[*tcpFlow]struct{}{}
	s.empty = make(chan struct{})
	close(s.empty)
}

func (s *flowSet) add(f *tcpFlow) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.flows) == 0 {
		s.empty = make(chan struct{})
	}
	s.flows[f] = struct{}{}
}

func (s *flowSet) remove(f *tcpFlow) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.flows, f)
	if len(s.flows) == 0 {
		close(s.empty)
	}
}

func (s *flowSet) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.flows)
}

func (s *flowSet) wait(ctx context.Context) error {
	s.mu.Lock()
	empty := s.empty
	s.mu.Unlock()
	select {
	case <-empty:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *flowSet) closeAll() {
	s.mu.Lock()
	all := make([]*tcpFlow, 0, len(s.flows))
	for f := range s.flows {
		all = append(all, f)
	}
	s.mu.Unlock()
	for _, f := range all {
		f.abort()
	}
}
