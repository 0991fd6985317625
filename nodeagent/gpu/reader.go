package gpu

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// ignoredXIDs are XIDs caused by the application, not the GPU (the same
// default set as NVIDIA's device plugin): they never mark a device unhealthy.
var ignoredXIDs = map[uint64]bool{13: true, 31: true, 43: true, 45: true, 68: true, 109: true}

// ReaderOption configures a Reader.
type ReaderOption func(*Reader)

// WithXIDRecovery sets how long a device stays unhealthy after its last
// critical XID. Unlike NVIDIA's device plugin, a device recovers on its own
// once the driver stops reporting errors. Zero keeps it unhealthy until the
// agent restarts.
func WithXIDRecovery(d time.Duration) ReaderOption { return func(r *Reader) { r.xidRecovery = d } }

// Reader is the one adapter between visionslice and NVML. It works the same
// over the real library and over the simulated backend, since both are an
// nvml.Interface.
type Reader struct {
	lib         nvml.Interface
	logger      *slog.Logger
	xidRecovery time.Duration
	now         func() time.Time

	devices []staticInfo

	mu      sync.Mutex
	lastXID map[string]xidMark // by UUID

	errMu  sync.Mutex
	errors map[string]uint64 // by NVML call

	stopEvents context.CancelFunc
	eventsDone chan struct{}
}

type staticInfo struct {
	handle   nvml.Device
	index    int
	uuid     string
	name     string
	pciBusID string
	numa     int
}

type xidMark struct {
	xid uint64
	at  time.Time
}

// NewReader returns a Reader over lib. Call Init before Read.
func NewReader(lib nvml.Interface, logger *slog.Logger, opts ...ReaderOption) *Reader {
	r := &Reader{
		lib:         lib,
		logger:      logger,
		xidRecovery: time.Minute,
		now:         time.Now,
		lastXID:     map[string]xidMark{},
		errors:      map[string]uint64{},
	}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Init loads the library, reads each device's static information and starts
// watching XID events where the driver offers them.
func (r *Reader) Init() error {
	if ret := r.lib.Init(); ret != nvml.SUCCESS {
		if ret == nvml.ERROR_LIBRARY_NOT_FOUND {
			return ErrLibraryNotFound
		}
		return fmt.Errorf("nvml init: %w", nvmlError(ret))
	}
	n, ret := r.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		r.lib.Shutdown()
		return fmt.Errorf("count devices: %w", nvmlError(ret))
	}
	devs := make([]staticInfo, 0, n)
	for i := 0; i < n; i++ {
		d, err := r.static(i)
		if err != nil {
			r.lib.Shutdown()
			return fmt.Errorf("device %d: %w", i, err)
		}
		devs = append(devs, d)
	}
	r.devices = devs
	r.startEvents()
	return nil
}

func (r *Reader) static(i int) (staticInfo, error) {
	h, ret := r.lib.DeviceGetHandleByIndex(i)
	if ret != nvml.SUCCESS {
		return staticInfo{}, fmt.Errorf("get handle: %w", nvmlError(ret))
	}
	uuid, ret := h.GetUUID()
	if ret != nvml.SUCCESS {
		return staticInfo{}, fmt.Errorf("get uuid: %w", nvmlError(ret))
	}
	s := staticInfo{handle: h, index: i, uuid: uuid, numa: -1}
	if name, ret := h.GetName(); ret == nvml.SUCCESS {
		s.name = name
	}
	if pci, ret := h.GetPciInfo(); ret == nvml.SUCCESS {
		s.pciBusID = busID(pci)
	}
	if node, ret := h.GetNumaNodeId(); ret == nvml.SUCCESS && node >= 0 {
		s.numa = node
	}
	return s, nil
}

// busID formats the PCI bus ID NVML returns ("00000000:3B:00.0") in the
// canonical lower-case sysfs form ("0000:3b:00.0").
func busID(p nvml.PciInfo) string {
	var b strings.Builder
	for _, c := range p.BusId {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	s := strings.ToLower(b.String())
	if len(s) == 16 && strings.HasPrefix(s, "0000") { // 8-digit domain
		s = s[4:]
	}
	return s
}

// Shutdown stops the event watcher and unloads the library.
func (r *Reader) Shutdown() {
	if r.stopEvents != nil {
		r.stopEvents()
		<-r.eventsDone
		r.stopEvents = nil
	}
	r.lib.Shutdown()
}

// Read takes one sample of every device and its processes.
func (r *Reader) Read(ctx context.Context) (*Snapshot, error) {
	devs := make([]Device, 0, len(r.devices))
	var procs []Process
	now := r.now()
	for _, s := range r.devices {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		d := Device{Index: s.index, UUID: s.uuid, Name: s.name, PCIBusID: s.pciBusID, NUMANode: s.numa, Healthy: true, Utilization: -1}
		mem, ret := s.handle.GetMemoryInfo()
		if ret != nvml.SUCCESS {
			r.countError("GetMemoryInfo")
			d.Healthy, d.HealthReason = false, healthReason(ret)
			devs = append(devs, d)
			continue
		}
		d.MemoryTotalBytes, d.MemoryUsedBytes, d.MemoryFreeBytes = mem.Total, mem.Used, mem.Free
		switch u, ret := s.handle.GetUtilizationRates(); ret {
		case nvml.SUCCESS:
			d.Utilization = float64(u.Gpu) / 100
		case nvml.ERROR_NOT_SUPPORTED:
		default:
			r.countError("GetUtilizationRates")
		}
		seen := map[uint32]bool{}
		for _, q := range []struct {
			call string
			kind ProcessKind
			get  func() ([]nvml.ProcessInfo, nvml.Return)
		}{
			{"GetComputeRunningProcesses", ProcessCompute, s.handle.GetComputeRunningProcesses},
			{"GetGraphicsRunningProcesses", ProcessGraphics, s.handle.GetGraphicsRunningProcesses},
		} {
			list, ret := q.get()
			if ret == nvml.ERROR_NOT_SUPPORTED {
				continue
			}
			if ret != nvml.SUCCESS {
				r.countError(q.call)
				if ret == nvml.ERROR_GPU_IS_LOST {
					d.Healthy, d.HealthReason = false, healthReason(ret)
				}
				continue
			}
			for _, p := range list {
				if seen[p.Pid] {
					continue
				}
				seen[p.Pid] = true
				used := p.UsedGpuMemory
				if used == math.MaxUint64 { // NVML_VALUE_NOT_AVAILABLE
					used = 0
				}
				procs = append(procs, Process{PID: p.Pid, GPUUUID: s.uuid, UsedMemoryBytes: used, Kind: q.kind})
			}
		}
		if d.Healthy {
			if reason, bad := r.xidState(s.uuid, now); bad {
				d.Healthy, d.HealthReason = false, reason
			}
		}
		devs = append(devs, d)
	}
	sortSnapshot(devs, procs)
	return &Snapshot{Time: now, Devices: devs, Processes: procs}, nil
}

func healthReason(ret nvml.Return) string {
	if ret == nvml.ERROR_GPU_IS_LOST {
		return "gpu_lost"
	}
	return "nvml_error_" + strconv.Itoa(int(ret))
}

func (r *Reader) xidState(uuid string, now time.Time) (string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m, ok := r.lastXID[uuid]
	if !ok {
		return "", false
	}
	if r.xidRecovery > 0 && now.Sub(m.at) >= r.xidRecovery {
		delete(r.lastXID, uuid)
		r.logger.Info("gpu recovered from xid", "gpu_uuid", uuid, "xid", m.xid)
		return "", false
	}
	return "xid_" + strconv.FormatUint(m.xid, 10), true
}

func (r *Reader) countError(call string) {
	r.errMu.Lock()
	r.errors[call]++
	r.errMu.Unlock()
}

// ErrorCounts returns how many NVML calls failed, by call name.
func (r *Reader) ErrorCounts() map[string]uint64 {
	r.errMu.Lock()
	defer r.errMu.Unlock()
	return maps.Clone(r.errors)
}

// startEvents registers every device for critical XID events and watches
// them. A driver without event support is logged once, not an error.
func (r *Reader) startEvents() {
	set, ret := r.lib.EventSetCreate()
	if ret != nvml.SUCCESS {
		r.logger.Info("nvml events unavailable, xid health disabled", "err", nvmlError(ret))
		return
	}
	registered := 0
	for _, d := range r.devices {
		if ret := d.handle.RegisterEvents(nvml.EventTypeXidCriticalError, set); ret != nvml.SUCCESS {
			r.logger.Info("xid events unavailable for device", "gpu_uuid", d.uuid, "err", nvmlError(ret))
			continue
		}
		registered++
	}
	if registered == 0 {
		set.Free()
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.stopEvents = cancel
	r.eventsDone = make(chan struct{})
	go r.watchEvents(ctx, set)
}

func (r *Reader) watchEvents(ctx context.Context, set nvml.EventSet) {
	defer close(r.eventsDone)
	defer set.Free()
	for ctx.Err() == nil {
		e, ret := set.Wait(100)
		switch ret {
		case nvml.SUCCESS:
		case nvml.ERROR_TIMEOUT:
			continue
		default:
			r.countError("EventSetWait")
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		if e.EventType != nvml.EventTypeXidCriticalError || ignoredXIDs[e.EventData] || e.Device == nil {
			continue
		}
		uuid, ret := e.Device.GetUUID()
		if ret != nvml.SUCCESS {
			r.countError("GetUUID")
			continue
		}
		r.mu.Lock()
		r.lastXID[uuid] = xidMark{xid: e.EventData, at: r.now()}
		r.mu.Unlock()
		r.logger.Warn("gpu critical xid", "gpu_uuid", uuid, "xid", e.EventData)
	}
}

// nvmlError turns an nvml.Return into an error that keeps the code.
func nvmlError(ret nvml.Return) error {
	return &Error{Return: ret}
}

// Error is an NVML failure.
type Error struct{ Return nvml.Return }

func (e *Error) Error() string { return "nvml: " + e.Return.Error() }
