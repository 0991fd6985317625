package deviceplugin

import (
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/gpu"
)

// gpuSlices is one GPU as the plugin advertises it.
type gpuSlices struct {
	UUID       string
	Index      int
	NUMANode   int
	TotalBytes uint64
	Slices     int
	Healthy    bool
	Reason     string
}

// inventory is the set of advertised GPUs at one snapshot. It is immutable
// once built.
type inventory struct {
	seq     uint64
	gpus    []gpuSlices // ordered by Index
	byUUID  map[string]int
	devices []*pluginapi.Device // the ListAndWatch answer
}

// buildInventory derives the advertised slices from a GPU snapshot. A GPU
// that was advertised before and is missing from the snapshot stays
// advertised, unhealthy, so the kubelet stops placing containers on it
// rather than forgetting slices that containers hold.
func buildInventory(s *gpu.Snapshot, prev *inventory, sliceBytes, reservedBytes uint64) *inventory {
	inv := &inventory{byUUID: map[string]int{}}
	if s != nil {
		inv.seq = s.Seq
		for _, d := range s.Devices {
			g := gpuSlices{
				UUID:       d.UUID,
				Index:      d.Index,
				NUMANode:   d.NUMANode,
				TotalBytes: d.MemoryTotalBytes,
				Slices:     slice.Count(d.MemoryTotalBytes, reservedBytes, sliceBytes),
				Healthy:    d.Healthy,
				Reason:     d.HealthReason,
			}
			if d.MemoryTotalBytes == 0 && prev != nil {
				// A lost GPU reports no memory: keep advertising its
				// slices, unhealthy, instead of dropping them.
				if old, ok := prev.gpu(d.UUID); ok {
					g.TotalBytes, g.Slices = old.TotalBytes, old.Slices
				}
			}
			inv.add(g)
		}
	}
	if prev != nil {
		for _, g := range prev.gpus {
			if _, ok := inv.byUUID[g.UUID]; !ok {
				g.Healthy, g.Reason = false, "missing"
				inv.add(g)
			}
		}
	}
	for _, g := range inv.gpus {
		health := pluginapi.Healthy
		if !g.Healthy {
			health = pluginapi.Unhealthy
		}
		var topo *pluginapi.TopologyInfo
		if g.NUMANode >= 0 {
			topo = &pluginapi.TopologyInfo{Nodes: []*pluginapi.NUMANode{{ID: int64(g.NUMANode)}}}
		}
		for n := 0; n < g.Slices; n++ {
			inv.devices = append(inv.devices, &pluginapi.Device{
				ID:       slice.ID{GPU: g.UUID, Index: n}.String(),
				Health:   health,
				Topology: topo,
			})
		}
	}
	return inv
}

func (inv *inventory) add(g gpuSlices) {
	// Keep gpus ordered by index; snapshots are ordered already, so this
	// only moves GPUs carried over from prev.
	i := len(inv.gpus)
	for i > 0 && inv.gpus[i-1].Index > g.Index {
		i--
	}
	inv.gpus = append(inv.gpus, gpuSlices{})
	copy(inv.gpus[i+1:], inv.gpus[i:])
	inv.gpus[i] = g
	for j := i; j < len(inv.gpus); j++ {
		inv.byUUID[inv.gpus[j].UUID] = j
	}
}

// gpu returns the advertised GPU with the given UUID.
func (inv *inventory) gpu(uuid string) (gpuSlices, bool) {
	i, ok := inv.byUUID[uuid]
	if !ok {
		return gpuSlices{}, false
	}
	return inv.gpus[i], true
}

// sameDevices reports whether two inventories advertise the same devices
// with the same health and topology, i.e. whether ListAndWatch must send.
func sameDevices(a, b *inventory) bool {
	if a == nil || b == nil || len(a.gpus) != len(b.gpus) {
		return false
	}
	for i := range a.gpus {
		x, y := a.gpus[i], b.gpus[i]
		if x.UUID != y.UUID || x.Slices != y.Slices || x.Healthy != y.Healthy || x.NUMANode != y.NUMANode {
			return false
		}
	}
	return true
}
