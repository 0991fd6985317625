// Package accounting attributes GPU memory to the containers and agent model
// workers that use it, and sets it against their quota.
//
// Per poll: every process NVML lists on a GPU is mapped PID -> pod UID and
// container ID (package procfs, from <host proc>/<pid>/cgroup) -> namespace,
// pod and container names (a Resolver: the kubelet's log directories) -> the
// slices the kubelet assigned that container (pod-resources API List,
// cached). Quota is slices on that GPU × slice bytes; usage is the sum of the
// NVML per-process memory of the container's PIDs on that GPU. A process of
// no container with visionslice slices is unaccounted usage of its GPU,
// reported, never dropped. Processes registered as agent workers are their
// own kind of group, labelled by model.
package accounting

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/podresources"
	"github.com/visionslice/visionslice/nodeagent/procfs"
)

// Config configures accounting.
type Config struct {
	// SliceBytes is the size of one slice (default slice.DefaultSliceMiB MiB);
	// it must match the device plugin's.
	SliceBytes uint64 `yaml:"sliceBytes"`
	// HostProc is the host's /proc as the agent sees it (hostPID).
	HostProc string `yaml:"hostProc"`
	// PodLogsDir and ContainerLogsDir are the kubelet's log directories,
	// mounted read-only, used to name a process's container.
	PodLogsDir       string `yaml:"podLogsDir"`
	ContainerLogsDir string `yaml:"containerLogsDir"`
	// PodResourcesSocket is the kubelet's pod-resources socket.
	PodResourcesSocket string `yaml:"podResourcesSocket"`
	// RefreshInterval is how often the slice assignments are re-read even
	// when nothing changed (live).
	RefreshInterval time.Duration `yaml:"refreshInterval"`
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		SliceBytes:         slice.DefaultSliceMiB << 20,
		HostProc:           procfs.DefaultRoot,
		PodLogsDir:         "/var/log/pods",
		ContainerLogsDir:   "/var/log/containers",
		PodResourcesSocket: podresources.DefaultSocket,
		RefreshInterval:    10 * time.Second,
	}
}

// Validate names every wrong field.
func (c Config) Validate() error {
	var errs []error
	if c.SliceBytes < 1<<20 {
		errs = append(errs, fmt.Errorf("sliceBytes %d: must be at least 1 MiB", c.SliceBytes))
	}
	for name, v := range map[string]string{"hostProc": c.HostProc, "podLogsDir": c.PodLogsDir,
		"containerLogsDir": c.ContainerLogsDir, "podResourcesSocket": c.PodResourcesSocket} {
		if !strings.HasPrefix(v, "/") {
			errs = append(errs, fmt.Errorf("%s %q: must be an absolute path", name, v))
		}
	}
	if c.RefreshInterval < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("refreshInterval %s: must be at least 100ms", c.RefreshInterval))
	}
	return errors.Join(errs...)
}

// SliceLister lists the devices the kubelet assigned; *podresources.Client
// is one.
type SliceLister interface {
	List(ctx context.Context) ([]podresources.ContainerDevices, error)
}

// PIDReader maps a PID to its container; *procfs.Reader is one.
type PIDReader interface {
	Container(pid int) (procfs.Container, error)
}

var (
	_ SliceLister = (*podresources.Client)(nil)
	_ PIDReader   = (*procfs.Reader)(nil)
)

// Usage is one group's memory on one GPU.
type Usage struct {
	Kind     gpu.GroupKind // GroupContainer or GroupWorker
	GPUUUID  string
	GPUIndex int

	// Container groups.
	Identity
	PodUID      string
	ContainerID string
	// CgroupPath is the container's cgroup v2 path (relative to the
	// hierarchy root); empty when only v1 lines named it.
	CgroupPath string
	// Slices is how many slices the container holds on this GPU.
	Slices int

	// Worker groups.
	Model string

	QuotaBytes uint64 // 0 for a worker without a budget
	UsageBytes uint64
	PIDs       []uint32
}

// Over reports whether usage exceeds quota (a worker without quota never is).
func (u Usage) Over() bool {
	return u.Kind == gpu.GroupContainer && u.UsageBytes > u.QuotaBytes
}

// Key identifies the group across reports.
func (u Usage) Key() string {
	if u.Kind == gpu.GroupWorker {
		return "worker/" + u.Model + "@" + u.GPUUUID
	}
	return u.Identity.String() + "@" + u.GPUUUID
}

// Report is the accounting of one snapshot.
type Report struct {
	Seq  uint64
	Time time.Time
	// Groups are ordered by GPU index, then namespace, pod, container, model.
	Groups []Usage
	// Unaccounted is the memory of processes of no group, by GPU UUID; every
	// GPU of the snapshot is present.
	Unaccounted map[string]uint64
	// GPUIndex maps a GPU UUID to its index.
	GPUIndex map[string]int
}

type pidInfo struct {
	c   procfs.Container
	err error
}

// Tracker keeps the slice assignments and the PID cache, and accounts
// snapshots. It is safe for concurrent use.
type Tracker struct {
	logger   *slog.Logger
	procs    PIDReader
	resolver Resolver
	lister   SliceLister

	sliceBytes      atomic.Uint64
	refreshInterval atomic.Int64
	minRefresh      time.Duration
	refreshReq      chan struct{}

	mu          sync.Mutex
	slices      map[Identity][]slice.ID // visionslice slices per container
	listErrLogd bool
	pids        map[uint32]pidInfo
	workers     map[uint32]string

	workerSource atomic.Pointer[WorkerSource]

	latest atomic.Pointer[Report]
}

// New returns a tracker. lister may be nil (no slices known: every process
// is unaccounted).
func New(cfg Config, procs PIDReader, resolver Resolver, lister SliceLister, logger *slog.Logger) *Tracker {
	t := &Tracker{
		logger: logger, procs: procs, resolver: resolver, lister: lister,
		minRefresh: time.Second, refreshReq: make(chan struct{}, 1),
		slices: map[Identity][]slice.ID{},
		pids:   map[uint32]pidInfo{}, workers: map[uint32]string{},
	}
	t.SetConfig(cfg)
	return t
}

// SetConfig applies the live fields (slice bytes, refresh interval).
func (t *Tracker) SetConfig(cfg Config) {
	t.sliceBytes.Store(cfg.SliceBytes)
	t.refreshInterval.Store(int64(cfg.RefreshInterval))
}

// RegisterWorker marks pid as an agent-owned model worker serving model.
func (t *Tracker) RegisterWorker(pid int, model string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.workers[uint32(pid)] = model
}

// WorkerSource lists the agent's model workers at accounting time: PID ->
// model name (the inference runtime's worker pools).
type WorkerSource func() map[uint32]string

// SetWorkerSource adds a source of agent workers, consulted at every
// Account besides the registered ones.
func (t *Tracker) SetWorkerSource(f WorkerSource) { t.workerSource.Store(&f) }

// UnregisterWorker forgets a worker.
func (t *Tracker) UnregisterWorker(pid int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.workers, uint32(pid))
}

// Refresh re-reads the slice assignments now.
func (t *Tracker) Refresh(ctx context.Context) error {
	if t.lister == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	list, err := t.lister.List(ctx)
	if err != nil {
		return fmt.Errorf("refresh slice assignments: %w", err)
	}
	m := map[Identity][]slice.ID{}
	var bad []string
	for _, cd := range list {
		if cd.ResourceName != slice.ResourceName {
			continue
		}
		id := Identity{Namespace: cd.Namespace, Pod: cd.Pod, Container: cd.Container}
		for _, d := range cd.DeviceIDs {
			sid, err := slice.ParseID(d)
			if err != nil {
				bad = append(bad, d)
				continue
			}
			m[id] = append(m[id], sid)
		}
	}
	t.mu.Lock()
	t.slices, t.listErrLogd = m, false
	t.mu.Unlock()
	if len(bad) > 0 {
		t.logger.Warn("pod-resources lists malformed slice ids; ignored", "device_ids", bad)
	}
	return nil
}

// Run refreshes the slice assignments every RefreshInterval and whenever
// accounting meets a container it has no assignment for (at most once a
// second), until ctx ends.
func (t *Tracker) Run(ctx context.Context) error {
	if t.lister == nil {
		<-ctx.Done()
		return nil
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		case <-t.refreshReq:
			if wait := t.minRefresh - time.Since(last); wait > 0 {
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(wait):
				}
			}
		}
		last = time.Now()
		if err := t.Refresh(ctx); err != nil && ctx.Err() == nil {
			t.mu.Lock()
			logd := t.listErrLogd
			t.listErrLogd = true
			t.mu.Unlock()
			if !logd {
				t.logger.Warn("slice assignments not refreshed; keeping the last ones", "err", err)
			}
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(time.Duration(t.refreshInterval.Load()))
	}
}

func (t *Tracker) requestRefresh() {
	select {
	case t.refreshReq <- struct{}{}:
	default:
	}
}

// Account attributes the snapshot's processes and stores the result as the
// latest report.
func (t *Tracker) Account(s *gpu.Snapshot) *Report {
	r := &Report{Unaccounted: map[string]uint64{}, GPUIndex: map[string]int{}}
	if s == nil {
		return r
	}
	r.Seq, r.Time = s.Seq, s.Time
	for _, d := range s.Devices {
		r.Unaccounted[d.UUID] = 0
		r.GPUIndex[d.UUID] = d.Index
	}
	sliceBytes := t.sliceBytes.Load()
	var listed map[uint32]string
	if f := t.workerSource.Load(); f != nil {
		listed = (*f)()
	}

	t.mu.Lock()
	live := make(map[uint32]bool, len(s.Processes))
	groups := map[string]*Usage{}
	missing := false
	for _, p := range s.Processes {
		live[p.PID] = true
		model, ok := t.workers[p.PID]
		if !ok {
			model, ok = listed[p.PID]
		}
		if ok {
			u := Usage{Kind: gpu.GroupWorker, GPUUUID: p.GPUUUID, GPUIndex: r.GPUIndex[p.GPUUUID], Model: model}
			t.add(groups, u, p)
			continue
		}
		id, c, ok := t.identify(p.PID)
		if !ok {
			r.Unaccounted[p.GPUUUID] += p.UsedMemoryBytes
			continue
		}
		ids, has := t.slices[id]
		if !has {
			// No visionslice slices: outside visionslice, or assigned so
			// recently that the cache has not seen it yet.
			missing = true
			r.Unaccounted[p.GPUUUID] += p.UsedMemoryBytes
			continue
		}
		n := 0
		for _, sid := range ids {
			if sid.GPU == p.GPUUUID {
				n++
			}
		}
		u := Usage{Kind: gpu.GroupContainer, GPUUUID: p.GPUUUID, GPUIndex: r.GPUIndex[p.GPUUUID],
			Identity: id, PodUID: c.PodUID, ContainerID: c.ID, CgroupPath: c.CgroupPath,
			Slices: n, QuotaBytes: uint64(n) * sliceBytes}
		t.add(groups, u, p)
	}
	for pid := range t.pids {
		if !live[pid] {
			delete(t.pids, pid)
		}
	}
	t.mu.Unlock()
	if missing {
		t.requestRefresh()
	}

	r.Groups = make([]Usage, 0, len(groups))
	for _, u := range groups {
		r.Groups = append(r.Groups, *u)
	}
	slices.SortFunc(r.Groups, func(a, b Usage) int {
		return cmp.Or(cmp.Compare(a.GPUIndex, b.GPUIndex), cmp.Compare(a.Kind, b.Kind),
			cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Pod, b.Pod),
			cmp.Compare(a.Container, b.Container), cmp.Compare(a.Model, b.Model))
	})
	t.latest.Store(r)
	return r
}

func (t *Tracker) add(groups map[string]*Usage, u Usage, p gpu.Process) {
	k := u.Key()
	g, ok := groups[k]
	if !ok {
		g = &u
		groups[k] = g
	}
	g.UsageBytes += p.UsedMemoryBytes
	g.PIDs = append(g.PIDs, p.PID)
}

// identify maps a PID to its container; t.mu is held.
func (t *Tracker) identify(pid uint32) (Identity, procfs.Container, bool) {
	info, ok := t.pids[pid]
	if !ok {
		c, err := t.procs.Container(int(pid))
		info = pidInfo{c: c, err: err}
		t.pids[pid] = info
		if err != nil && !errors.Is(err, procfs.ErrNotContainer) && !errors.Is(err, procfs.ErrNoProcess) {
			t.logger.Warn("gpu process cgroup unreadable; counted as unaccounted", "pid", pid, "err", err)
		}
	}
	if info.err != nil {
		return Identity{}, procfs.Container{}, false
	}
	id, err := t.resolver.Resolve(info.c)
	if err != nil {
		t.logger.Debug("gpu process container not resolved; counted as unaccounted", "pid", pid, "err", err)
		return Identity{}, procfs.Container{}, false
	}
	return id, info.c, true
}

// Latest returns the latest report, nil before the first Account.
func (t *Tracker) Latest() *Report { return t.latest.Load() }

// GroupOf implements gpu.ProcessGrouper from the latest report.
func (t *Tracker) GroupOf(pid uint32) (gpu.GroupKind, string) {
	if r := t.latest.Load(); r != nil {
		for _, g := range r.Groups {
			for _, p := range g.PIDs {
				if p != pid {
					continue
				}
				if g.Kind == gpu.GroupWorker {
					return gpu.GroupWorker, g.Model
				}
				return gpu.GroupContainer, g.Identity.String()
			}
		}
	}
	return gpu.GroupUnattributed, ""
}

var _ gpu.ProcessGrouper = (*Tracker)(nil)
