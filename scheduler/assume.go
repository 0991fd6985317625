package scheduler

import (
	"sync"
	"time"
)

// assumed is a pod this extender bound to a GPU that the agent's metrics may
// not show yet. It stops counting when a sample newer than the bind shows
// the GPU's allocated count at expectedAllocated or more, when the pod goes
// away, or after the assume timeout (pods can leave in the meantime and
// keep the count from ever rising that far).
type assumed struct {
	podUID string
	node   string
	gpu    string
	slices int
	at     time.Time
	// expectedAllocated is the GPU's allocated count once this pod shows:
	// allocated in the latest sample at bind, plus slices of pods assumed
	// before it, plus its own.
	expectedAllocated int
}

// assumeCache holds assumed pods by node. Reads are on the filter path, so
// they take a read lock and touch only the node asked about.
type assumeCache struct {
	timeout time.Duration
	mu      sync.RWMutex
	byNode  map[string][]assumed
	byPod   map[string]string // pod UID -> node
}

func newAssumeCache(timeout time.Duration) *assumeCache {
	return &assumeCache{timeout: timeout, byNode: map[string][]assumed{}, byPod: map[string]string{}}
}

func (c *assumeCache) add(a assumed) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.byPod[a.podUID]; ok {
		c.removeLocked(a.podUID, old)
	}
	c.byNode[a.node] = append(c.byNode[a.node], a)
	c.byPod[a.podUID] = a.node
}

func (c *assumeCache) remove(podUID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if node, ok := c.byPod[podUID]; ok {
		c.removeLocked(podUID, node)
	}
}

func (c *assumeCache) removeLocked(podUID, node string) {
	list := c.byNode[node]
	out := list[:0]
	for _, a := range list {
		if a.podUID != podUID {
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		delete(c.byNode, node)
	} else {
		c.byNode[node] = out
	}
	delete(c.byPod, podUID)
}

// sample is what the cache needs of a GPU's latest metrics.
type sample struct {
	allocated int
	at        time.Time
	known     bool
}

// live returns the pods still assumed on node: not timed out and not yet
// seen in a sample. sampleOf gives the latest sample of a GPU on the node.
func (c *assumeCache) live(node string, now time.Time, sampleOf func(gpu string) sample) []assumed {
	c.mu.RLock()
	defer c.mu.RUnlock()
	list := c.byNode[node]
	if len(list) == 0 {
		return nil
	}
	var out []assumed
	for _, a := range list {
		if c.done(a, now, sampleOf(a.gpu)) {
			continue
		}
		out = append(out, a)
	}
	return out
}

func (c *assumeCache) done(a assumed, now time.Time, s sample) bool {
	if now.Sub(a.at) >= c.timeout {
		return true
	}
	return s.known && s.at.After(a.at) && s.allocated >= a.expectedAllocated
}

// gc drops finished entries; sampleOf is as for live, per node.
func (c *assumeCache) gc(now time.Time, sampleOf func(node, gpu string) sample) {
	c.mu.Lock()
	defer c.mu.Unlock()
	type key struct{ pod, node string }
	var drop []key
	for node, list := range c.byNode {
		for _, a := range list {
			if c.done(a, now, sampleOf(node, a.gpu)) {
				drop = append(drop, key{a.podUID, node})
			}
		}
	}
	for _, k := range drop {
		c.removeLocked(k.pod, k.node)
	}
}

// any reports whether node has assumed pods (cheap, for the filter path).
func (c *assumeCache) any(node string) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.byNode[node]) > 0
}

func (c *assumeCache) count() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.byPod)
}
