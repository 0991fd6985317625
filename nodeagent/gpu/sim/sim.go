// Package sim is the simulated GPU backend: go-nvml's own mock NVML servers
// (the DGX A100/H100 device models) with a scriptable process table, health
// and XID events. It produces an nvml.Interface, so the agent reads it through
// the very adapter that reads a real GPU.
//
// The agent runs on it with `--gpu-backend=sim:h100x2`; tests and the debug
// endpoint (Handler) change its processes and health while it runs.
package sim

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/gpus"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
	"github.com/google/uuid"

	"github.com/visionslice/visionslice/nodeagent/gpu"
)

// Models are the GPU kinds a spec may name.
var models = map[string]gpus.Config{
	"a100":    gpus.A100_SXM4_40GB,
	"a100-40": gpus.A100_SXM4_40GB,
	"a100-80": gpus.A100_SXM4_80GB,
	"a30":     gpus.A30_PCIE_24GB,
	"h100":    gpus.H100_SXM5_80GB,
	"h200":    gpus.H200_SXM5_141GB,
	"b200":    gpus.B200_SXM5_180GB,
}

// baseUsedBytes is what the driver holds on an idle simulated GPU.
const baseUsedBytes = 512 << 20

// GPUs is a simulated node's set of GPUs.
type GPUs struct {
	srv *server.Server

	mu     sync.Mutex
	devs   []*simDevice
	events chan nvml.EventData
}

type simDevice struct {
	d     *server.Device
	procs map[uint32]proc
	lost  bool
	util  uint32
}

type proc struct {
	used uint64
	kind gpu.ProcessKind
}

// ParseSpec parses a spec such as "h100x2", "a100x8" or "h100x2+a100-80x1"
// (an optional "sim:" prefix is accepted) into GPU configurations.
func ParseSpec(spec string) ([]gpus.Config, error) {
	spec = strings.TrimPrefix(strings.TrimSpace(spec), "sim:")
	if spec == "" {
		return nil, fmt.Errorf("empty sim spec: want e.g. h100x2")
	}
	var out []gpus.Config
	for _, part := range strings.Split(spec, "+") {
		name, count, ok := strings.Cut(part, "x")
		if !ok {
			count = "1"
		}
		cfg, known := models[name]
		if !known {
			return nil, fmt.Errorf("sim spec %q: unknown gpu model %q (known: %s)", spec, name, knownModels())
		}
		n, err := strconv.Atoi(count)
		if err != nil || n < 1 || n > 64 {
			return nil, fmt.Errorf("sim spec %q: count %q must be 1..64", spec, count)
		}
		out = append(out, gpus.Multiple(n, cfg)...)
	}
	return out, nil
}

func knownModels() string {
	names := make([]string, 0, len(models))
	for k := range models {
		names = append(names, k)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// New builds simulated GPUs from spec. UUIDs are derived from seed (use the
// node name), so they are stable across restarts and differ between nodes.
func New(spec, seed string) (*GPUs, error) {
	cfgs, err := ParseSpec(spec)
	if err != nil {
		return nil, err
	}
	srv, err := server.New(
		server.WithGPUs(cfgs...),
		server.WithDriverVersion("550.54.15"),
		server.WithNVMLVersion("12.550.54.15"),
		server.WithCUDADriverVersion(12040),
	)
	if err != nil {
		return nil, fmt.Errorf("build mock nvml server: %w", err)
	}
	g := &GPUs{srv: srv, events: make(chan nvml.EventData, 64)}
	for i, h := range srv.Devices {
		d := h.(*server.Device)
		d.UUID = "GPU-" + uuid.NewSHA1(uuid.NameSpaceOID, []byte("visionslice-sim/"+seed+"/"+strconv.Itoa(i))).String()
		d.PciBusID = fmt.Sprintf("0000:%02x:00.0", 0x10+i*0x10)
		sd := &simDevice{d: d, procs: map[uint32]proc{}}
		g.devs = append(g.devs, sd)
		g.script(i, sd, len(srv.Devices))
	}
	srv.EventSetCreateFunc = func() (nvml.EventSet, nvml.Return) {
		return &mock.EventSet{
			WaitFunc: g.wait,
			FreeFunc: func() nvml.Return { return nvml.SUCCESS },
		}, nvml.SUCCESS
	}
	return g, nil
}

// script replaces the mock's per-device functions that visionslice reads with
// ones backed by the process table.
func (g *GPUs) script(i int, sd *simDevice, n int) {
	d := sd.d
	d.GetPciInfoFunc = func() (nvml.PciInfo, nvml.Return) {
		p := nvml.PciInfo{PciDeviceId: d.Config.PciDeviceId, Bus: uint32(0x10 + i*0x10)}
		id := fmt.Sprintf("%08X:%02X:00.0", 0, 0x10+i*0x10)
		for j := 0; j < len(id) && j < len(p.BusId)-1; j++ {
			p.BusId[j] = int8(id[j])
		}
		return p, nvml.SUCCESS
	}
	d.GetNumaNodeIdFunc = func() (int, nvml.Return) {
		// Two sockets: the first half of the GPUs on node 0, the rest on node 1.
		if n > 1 && i >= n/2 {
			return 1, nvml.SUCCESS
		}
		return 0, nvml.SUCCESS
	}
	d.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
		g.mu.Lock()
		defer g.mu.Unlock()
		if sd.lost {
			return nvml.Memory{}, nvml.ERROR_GPU_IS_LOST
		}
		total := d.Config.MemoryMB << 20
		used := uint64(baseUsedBytes)
		for _, p := range sd.procs {
			used += p.used
		}
		if used > total {
			used = total
		}
		return nvml.Memory{Total: total, Used: used, Free: total - used}, nvml.SUCCESS
	}
	d.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) {
		g.mu.Lock()
		defer g.mu.Unlock()
		if sd.lost {
			return nvml.Utilization{}, nvml.ERROR_GPU_IS_LOST
		}
		return nvml.Utilization{Gpu: sd.util, Memory: sd.util}, nvml.SUCCESS
	}
	list := func(kind gpu.ProcessKind) func() ([]nvml.ProcessInfo, nvml.Return) {
		return func() ([]nvml.ProcessInfo, nvml.Return) {
			g.mu.Lock()
			defer g.mu.Unlock()
			if sd.lost {
				return nil, nvml.ERROR_GPU_IS_LOST
			}
			var out []nvml.ProcessInfo
			for pid, p := range sd.procs {
				if p.kind == kind {
					out = append(out, nvml.ProcessInfo{Pid: pid, UsedGpuMemory: p.used})
				}
			}
			sort.Slice(out, func(a, b int) bool { return out[a].Pid < out[b].Pid })
			return out, nvml.SUCCESS
		}
	}
	d.GetComputeRunningProcessesFunc = list(gpu.ProcessCompute)
	d.GetGraphicsRunningProcessesFunc = list(gpu.ProcessGraphics)
	d.RegisterEventsFunc = func(uint64, nvml.EventSet) nvml.Return { return nvml.SUCCESS }
}

func (g *GPUs) wait(timeoutMs uint32) (nvml.EventData, nvml.Return) {
	select {
	case e := <-g.events:
		return e, nvml.SUCCESS
	case <-time.After(time.Duration(timeoutMs) * time.Millisecond):
		return nvml.EventData{}, nvml.ERROR_TIMEOUT
	}
}

// Interface returns the simulated library, to be read by gpu.NewReader.
func (g *GPUs) Interface() nvml.Interface { return g.srv }

// Count returns the number of simulated GPUs.
func (g *GPUs) Count() int { return len(g.devs) }

// UUID returns the UUID of GPU i.
func (g *GPUs) UUID(i int) string { return g.devs[i].d.UUID }

// MemoryTotalBytes returns the memory size of GPU i.
func (g *GPUs) MemoryTotalBytes(i int) uint64 { return g.devs[i].d.Config.MemoryMB << 20 }

func (g *GPUs) dev(i int) (*simDevice, error) {
	if i < 0 || i >= len(g.devs) {
		return nil, fmt.Errorf("no simulated gpu %d (have %d)", i, len(g.devs))
	}
	return g.devs[i], nil
}

// SetProcess adds a process on GPU i or changes its memory.
func (g *GPUs) SetProcess(i int, pid uint32, usedBytes uint64, kind gpu.ProcessKind) error {
	sd, err := g.dev(i)
	if err != nil {
		return err
	}
	if pid == 0 {
		return fmt.Errorf("pid must be positive")
	}
	switch kind {
	case "":
		kind = gpu.ProcessCompute
	case gpu.ProcessCompute, gpu.ProcessGraphics:
	default:
		return fmt.Errorf("unknown process kind %q (want compute or graphics)", kind)
	}
	if total := sd.d.Config.MemoryMB << 20; usedBytes > total {
		return fmt.Errorf("process memory %d exceeds gpu %d's %d bytes", usedBytes, i, total)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	sd.procs[pid] = proc{used: usedBytes, kind: kind}
	return nil
}

// RemoveProcess removes a process from GPU i; removing an absent one is a no-op.
func (g *GPUs) RemoveProcess(i int, pid uint32) {
	sd, err := g.dev(i)
	if err != nil {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(sd.procs, pid)
}

// SetUtilization sets GPU i's utilization in percent (0..100).
func (g *GPUs) SetUtilization(i int, percent uint32) error {
	sd, err := g.dev(i)
	if err != nil {
		return err
	}
	if percent > 100 {
		return fmt.Errorf("utilization %d%% is over 100", percent)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	sd.util = percent
	return nil
}

// SetUnhealthy makes GPU i unhealthy. reason "gpu_lost" makes every NVML
// query of the device fail with GPU_IS_LOST until SetHealthy; "xid_N"
// delivers a critical XID event N through the event set, after which the
// reader holds the device unhealthy for its XID recovery period.
func (g *GPUs) SetUnhealthy(i int, reason string) error {
	sd, err := g.dev(i)
	if err != nil {
		return err
	}
	switch {
	case reason == "gpu_lost":
		g.mu.Lock()
		sd.lost = true
		g.mu.Unlock()
		return nil
	case strings.HasPrefix(reason, "xid_"):
		xid, err := strconv.ParseUint(strings.TrimPrefix(reason, "xid_"), 10, 64)
		if err != nil {
			return fmt.Errorf("bad xid in %q", reason)
		}
		select {
		case g.events <- nvml.EventData{Device: sd.d, EventType: nvml.EventTypeXidCriticalError, EventData: xid}:
			return nil
		default:
			return fmt.Errorf("xid event queue full")
		}
	}
	return fmt.Errorf("unknown unhealthy reason %q (want gpu_lost or xid_<n>)", reason)
}

// SetHealthy undoes SetUnhealthy(i, "gpu_lost").
func (g *GPUs) SetHealthy(i int) error {
	sd, err := g.dev(i)
	if err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	sd.lost = false
	return nil
}
