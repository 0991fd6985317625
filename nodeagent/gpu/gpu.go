// Package gpu is the agent's GPU seam: an inventory of devices, the processes
// that hold GPU memory on them, and their health, read through one adapter over
// go-nvml's nvml.Interface. The real NVML library and the simulated backend in
// package sim both plug in beneath that adapter; nothing above it knows which
// one runs.
package gpu

import (
	"errors"
	"sort"
	"time"
)

// ProcessKind tells whether NVML listed a process as a compute or a graphics
// context. A process listed as both is reported once, as compute.
type ProcessKind string

const (
	ProcessCompute  ProcessKind = "compute"
	ProcessGraphics ProcessKind = "graphics"
)

// Device is one GPU as seen by one poll.
type Device struct {
	Index    int    `json:"index"`
	UUID     string `json:"uuid"`
	Name     string `json:"name"`
	PCIBusID string `json:"pciBusID"` // canonical form, e.g. 0000:3b:00.0
	// NUMANode is the NUMA node the GPU is attached to, -1 when unknown.
	NUMANode int `json:"numaNode"`

	MemoryTotalBytes uint64 `json:"memoryTotalBytes"`
	MemoryUsedBytes  uint64 `json:"memoryUsedBytes"`
	MemoryFreeBytes  uint64 `json:"memoryFreeBytes"`
	// Utilization is the fraction of the last sample period during which a
	// kernel ran, 0..1; negative when the driver does not report it.
	Utilization float64 `json:"utilization"`

	Healthy bool `json:"healthy"`
	// HealthReason says why a device is unhealthy ("gpu_lost", "xid_79", ...).
	HealthReason string `json:"healthReason"`
}

// Process is one process holding memory on one GPU.
type Process struct {
	PID             uint32      `json:"pid"`
	GPUUUID         string      `json:"gpuUUID"`
	UsedMemoryBytes uint64      `json:"usedMemoryBytes"`
	Kind            ProcessKind `json:"kind"`
}

// Snapshot is the GPU state at one poll. It is immutable once published:
// readers may keep and share it without locking.
type Snapshot struct {
	// Seq increases by one for every published snapshot.
	Seq uint64 `json:"seq"`
	// Time is when the poll that made this snapshot finished.
	Time time.Time `json:"time"`
	// Devices are ordered by Index.
	Devices []Device `json:"devices"`
	// Processes are ordered by GPU index, then PID.
	Processes []Process `json:"processes"`
}

// Device returns the device with the given UUID.
func (s *Snapshot) Device(uuid string) (Device, bool) {
	if s == nil {
		return Device{}, false
	}
	for _, d := range s.Devices {
		if d.UUID == uuid {
			return d, true
		}
	}
	return Device{}, false
}

// ProcessesOn returns the processes holding memory on the given GPU.
func (s *Snapshot) ProcessesOn(uuid string) []Process {
	if s == nil {
		return nil
	}
	var out []Process
	for _, p := range s.Processes {
		if p.GPUUUID == uuid {
			out = append(out, p)
		}
	}
	return out
}

// ProcessesOf returns every GPU entry held by the given PID (one per GPU).
func (s *Snapshot) ProcessesOf(pid uint32) []Process {
	if s == nil {
		return nil
	}
	var out []Process
	for _, p := range s.Processes {
		if p.PID == pid {
			out = append(out, p)
		}
	}
	return out
}

func sortSnapshot(devs []Device, procs []Process) {
	sort.Slice(devs, func(i, j int) bool { return devs[i].Index < devs[j].Index })
	order := make(map[string]int, len(devs))
	for _, d := range devs {
		order[d.UUID] = d.Index
	}
	sort.Slice(procs, func(i, j int) bool {
		a, b := order[procs[i].GPUUUID], order[procs[j].GPUUUID]
		if a != b {
			return a < b
		}
		return procs[i].PID < procs[j].PID
	})
}

// ErrLibraryNotFound is returned when the NVML library cannot be loaded (no
// driver on this host). Callers may offer the simulated backend instead.
var ErrLibraryNotFound = errors.New("nvml library not found")
