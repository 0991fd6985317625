package deviceplugin

import (
	"sort"
	"sync"
	"time"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/podresources"
)

// Owner is the container that holds a slice.
type Owner struct {
	Namespace string
	Pod       string
	Container string
}

// Allocation is one slice of the ledger. Owner is zero while the slice is
// allocated but the kubelet's pod-resources API does not list it yet.
type Allocation struct {
	SliceID string
	GPU     string
	Owner   Owner
}

// pendingGrace is how long a slice given out by Allocate is counted as held
// without pod-resources listing it. The kubelet records a container's devices
// right after Allocate returns; a slice still unlisted after this long was
// released (the pod's admission failed or it was deleted).
const pendingGrace = 30 * time.Second

type ledgerEntry struct {
	gpu      string
	owner    Owner
	resolved bool      // owner known from pod-resources
	at       time.Time // when Allocate recorded it (pending entries)
}

// ledger records which slices are held by which container. Allocate adds
// slices as pending (the kubelet does not say for which pod it allocates);
// sync with pod-resources List resolves owners and drops released slices.
type ledger struct {
	mu      sync.Mutex
	entries map[string]ledgerEntry // by slice ID
}

func newLedger() *ledger { return &ledger{entries: map[string]ledgerEntry{}} }

// recordAllocate marks ids as held, owner pending.
func (l *ledger) recordAllocate(ids []slice.ID, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, id := range ids {
		l.entries[id.String()] = ledgerEntry{gpu: id.GPU, at: now}
	}
}

// sync makes the ledger agree with the kubelet's pod-resources List: listed
// slices of resource are held by their container; resolved slices no longer
// listed and pending slices older than pendingGrace are released. It returns
// how many entries it released.
func (l *ledger) sync(list []podresources.ContainerDevices, resource string, now time.Time) (released int) {
	listed := map[string]ledgerEntry{}
	for _, c := range list {
		if c.ResourceName != resource {
			continue
		}
		for _, s := range c.DeviceIDs {
			id, err := slice.ParseID(s)
			if err != nil {
				continue
			}
			listed[s] = ledgerEntry{gpu: id.GPU, owner: Owner{c.Namespace, c.Pod, c.Container}, resolved: true}
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, e := range l.entries {
		if _, ok := listed[k]; ok {
			continue
		}
		if e.resolved || now.Sub(e.at) > pendingGrace {
			delete(l.entries, k)
			released++
		}
	}
	for k, e := range listed {
		l.entries[k] = e
	}
	return released
}

// releasePending drops pending entries among ids: the kubelet offered them
// as available, so it does not hold them for any container.
func (l *ledger) releasePending(ids []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range ids {
		if e, ok := l.entries[k]; ok && !e.resolved {
			delete(l.entries, k)
		}
	}
}

// heldByContainer returns those of ids that pod-resources lists as held.
func (l *ledger) heldByContainer(ids []string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, k := range ids {
		if e, ok := l.entries[k]; ok && e.resolved {
			out = append(out, k)
		}
	}
	return out
}

// perGPU counts held slices by GPU UUID.
func (l *ledger) perGPU() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]int{}
	for _, e := range l.entries {
		out[e.gpu]++
	}
	return out
}

// list returns the ledger ordered by slice ID.
func (l *ledger) list() []Allocation {
	l.mu.Lock()
	out := make([]Allocation, 0, len(l.entries))
	for k, e := range l.entries {
		out = append(out, Allocation{SliceID: k, GPU: e.gpu, Owner: e.owner})
	}
	l.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].SliceID < out[j].SliceID })
	return out
}
