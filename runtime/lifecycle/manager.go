package lifecycle

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/server"
	"github.com/visionslice/visionslice/runtime/supervisor"
)

// States of a model version, the label values of the model state metric.
const (
	StateServing    = "serving"
	StateRecovering = "recovering"
	StateFailed     = "failed_over_quota"
)

var allStates = []string{server.StateLoading, StateServing, StateRecovering, StateFailed, server.StateLoadFailed}

// ReasonOverrun is the restart reason given to the supervisor.
const ReasonOverrun = "gpu_memory_overrun"

// Source lists the served model versions (*server.Server).
type Source interface {
	ModelVersions() []server.VersionHandle
}

// Snapshots is the GPU seam (*gpu.Poller).
type Snapshots interface {
	Subscribe() (<-chan *gpu.Snapshot, func())
	// Snapshot is the latest (nil before the first poll).
	Snapshot() *gpu.Snapshot
}

// Pool is what the manager needs of a model version's workers
// (*supervisor.Pool).
type Pool interface {
	Instances() []supervisor.InstanceInfo
	ReplaceAfter(idx int, reason string, delay time.Duration) error
	Park(idx int, reason string) error
	Resume(idx int) error
}

var _ Pool = (*supervisor.Pool)(nil)

// Manager watches model workers' GPU memory and replaces the ones over
// quota.
type Manager struct {
	cfg     Config
	src     Source
	gpus    Snapshots
	logger  *slog.Logger
	metrics *metrics
	now     func() time.Time

	mu       sync.Mutex
	versions map[string]*versionState // by model + "/" + version
	ctx      context.Context
}

// versionState is the manager's view of one model version; guarded by
// Manager.mu.
type versionState struct {
	h          server.VersionHandle
	slices     int
	quota      uint64         // bytes; 0: not checked
	overruns   []time.Time    // within the window
	total      uint64         // overruns ever
	acted      map[int]uint64 // instance -> generation already replaced
	pending    map[int]bool   // instances being replaced
	epoch      uint64         // bumps when the version fails or resumes
	failedWith uint64         // the quota it failed with
}

// New validates cfg and registers the metrics on reg.
func New(cfg Config, src Source, gpus Snapshots, reg prometheus.Registerer, logger *slog.Logger) (*Manager, error) {
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg, src: src, gpus: gpus, logger: logger, now: time.Now, versions: map[string]*versionState{}}
	var err error
	if m.metrics, err = newMetrics(reg, m); err != nil {
		return nil, fmt.Errorf("register lifecycle metrics: %w", err)
	}
	return m, nil
}

// Run acts on every GPU snapshot and re-reads model configs every
// ConfigInterval, until ctx ends.
func (m *Manager) Run(ctx context.Context) error {
	m.mu.Lock()
	m.ctx = ctx
	m.mu.Unlock()
	snaps, cancel := m.gpus.Subscribe()
	defer cancel()
	if r, ok := m.src.(Reloader); ok && *m.cfg.HotReload {
		w := NewWatcher(r, m.cfg.ReloadDebounce, m.logger.With("part", "watcher"))
		done := make(chan struct{})
		wctx, stop := context.WithCancel(ctx)
		go func() {
			if err := w.Run(wctx); err != nil {
				m.logger.Error("model repository not watched; hot reload is off", "err", err)
			}
			close(done)
		}()
		defer func() { stop(); <-done }()
	}
	tick := time.NewTicker(m.cfg.ConfigInterval)
	defer tick.Stop()
	m.logger.Info("model lifecycle running", "slice_bytes", m.cfg.SliceBytes, "overrun_window_seconds", m.cfg.OverrunWindow.Seconds(),
		"max_overruns", m.cfg.MaxOverruns)
	for {
		select {
		case <-ctx.Done():
			return nil
		case s := <-snaps:
			m.Check(s)
		case <-tick.C:
			m.Reconfigure()
			// Snapshots come only when usage changes: look again at the
			// latest, for workers that started after an overrun began.
			m.Check(m.gpus.Snapshot())
		}
	}
}

// sync adds versions not seen yet; called with mu held.
func (m *Manager) syncLocked() []*versionState {
	hs := m.src.ModelVersions()
	out := make([]*versionState, 0, len(hs))
	for _, h := range hs {
		key := h.Model() + "/" + h.Version()
		vs := m.versions[key]
		if vs != nil && vs.h != h { // reloaded: a new version in the same place
			vs.epoch++
			vs = nil
		}
		if vs == nil {
			vs = &versionState{h: h, acted: map[int]uint64{}, pending: map[int]bool{}}
			if c := h.Config(); c != nil {
				vs.slices = c.Slices
				vs.quota = uint64(c.Slices) * m.cfg.SliceBytes
			}
			m.versions[key] = vs
		}
		out = append(out, vs)
	}
	if len(m.versions) > len(out) { // versions retired by hot reload
		for key, vs := range m.versions {
			if !slices.Contains(out, vs) {
				vs.epoch++
				delete(m.versions, key)
			}
		}
	}
	return out
}

// Check compares every model worker's GPU memory in snap with its quota
// and acts on overruns.
func (m *Manager) Check(snap *gpu.Snapshot) {
	if snap == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, vs := range m.syncLocked() {
		if vs.quota == 0 || vs.state() == StateFailed {
			continue
		}
		pool, ok := vs.h.Pool().(Pool)
		if !ok {
			continue
		}
		for _, in := range pool.Instances() {
			if in.PID <= 0 || vs.acted[in.Index] == in.Generation {
				continue
			}
			var used uint64
			for _, p := range snap.ProcessesOf(uint32(in.PID)) {
				used += p.UsedMemoryBytes
			}
			if used > vs.quota {
				vs.acted[in.Index] = in.Generation
				m.overrunLocked(vs, pool, in, used)
			}
		}
	}
}

func (m *Manager) overrunLocked(vs *versionState, pool Pool, in supervisor.InstanceInfo, used uint64) {
	now := m.now()
	detected := time.Now()
	kept := vs.overruns[:0]
	for _, t := range vs.overruns {
		if now.Sub(t) < m.cfg.OverrunWindow {
			kept = append(kept, t)
		}
	}
	vs.overruns = append(kept, now)
	vs.total++
	n := len(vs.overruns)
	log := m.logger.With("model", vs.h.Model(), "version", vs.h.Version(), "instance", in.Index)
	log.Warn("model worker over its gpu memory quota", "pid", in.PID, "generation", in.Generation, "used_bytes", used,
		"quota_bytes", vs.quota, "slices", vs.slices, "overruns_in_window", n)
	if n > m.cfg.MaxOverruns {
		vs.epoch++
		vs.failedWith = vs.quota
		reason := fmt.Sprintf("over quota: a worker used %d bytes, quota is %d bytes (%d slices); %d overruns within %s; raise slices in %s to recover",
			used, vs.quota, vs.slices, n, m.cfg.OverrunWindow, repository.ConfigFile)
		vs.pending = map[int]bool{}
		vs.h.SetState(&server.LifecycleState{State: StateFailed, Reason: reason, Failed: true})
		for _, i := range pool.Instances() {
			if err := pool.Park(i.Index, ReasonOverrun); err != nil {
				log.Warn("parking model worker", "err", err)
			}
		}
		log.Error("model failed over quota", "reason", reason)
		return
	}
	delay := time.Duration(0)
	if n > 1 {
		delay = m.cfg.BackoffInitial << (n - 2)
		if delay > m.cfg.BackoffMax || delay <= 0 {
			delay = m.cfg.BackoffMax
		}
	}
	vs.pending[in.Index] = true
	vs.h.SetState(&server.LifecycleState{State: StateRecovering, Recovering: true,
		Reason: fmt.Sprintf("replacing worker %d after a gpu memory overrun (%d of %d bytes)", in.Index, used, vs.quota)})
	if err := pool.ReplaceAfter(in.Index, ReasonOverrun, delay); err != nil {
		log.Error("replacing model worker", "err", err)
		return
	}
	log.Info("replacing model worker", "delay_seconds", delay.Seconds())
	m.track(vs, vs.epoch, pool, detected, func(is []supervisor.InstanceInfo) bool {
		for _, i := range is {
			if i.Index == in.Index {
				return i.Generation > in.Generation && i.Ready
			}
		}
		return false
	}, func() {
		delete(vs.pending, in.Index)
		log.Info("model worker serving again", "recovery_seconds", time.Since(detected).Seconds())
	})
}

// track waits (in its own goroutine) until done(instances) holds, then
// records the recovery and calls after with mu held; it gives up when the
// version's epoch moves on or the manager stops.
func (m *Manager) track(vs *versionState, epoch uint64, pool Pool, start time.Time, done func([]supervisor.InstanceInfo) bool, after func()) {
	ctx := m.ctx
	if ctx == nil {
		ctx = context.Background()
	}
	go func() {
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for !done(pool.Instances()) {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			m.mu.Lock()
			stale := vs.epoch != epoch
			m.mu.Unlock()
			if stale {
				return
			}
		}
		d := time.Since(start)
		m.mu.Lock()
		defer m.mu.Unlock()
		if vs.epoch != epoch {
			return
		}
		m.metrics.recovery.WithLabelValues(vs.h.Model(), vs.h.Version()).Observe(d.Seconds())
		after()
		if len(vs.pending) == 0 && vs.state() == StateRecovering {
			vs.h.SetState(&server.LifecycleState{State: StateServing})
		}
	}()
}

// Reconfigure re-reads each model's config for its slices: a changed
// quota applies from the next snapshot, and a failed version whose quota
// was raised is resumed.
func (m *Manager) Reconfigure() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, vs := range m.syncLocked() {
		md := repository.LoadModel(vs.h.Dir())
		if md.Err != nil || md.Config == nil {
			continue
		}
		m.setSlicesLocked(vs, md.Config.Slices)
	}
}

func (m *Manager) setSlicesLocked(vs *versionState, slices int) {
	if slices == vs.slices {
		return
	}
	quota := uint64(slices) * m.cfg.SliceBytes
	log := m.logger.With("model", vs.h.Model(), "version", vs.h.Version())
	log.Info("model gpu memory quota changed", "slices", slices, "quota_bytes", quota, "previous_quota_bytes", vs.quota)
	vs.slices, vs.quota = slices, quota
	if vs.state() != StateFailed || (quota != 0 && quota <= vs.failedWith) {
		return
	}
	pool, ok := vs.h.Pool().(Pool)
	if !ok {
		return
	}
	vs.epoch++
	vs.overruns = nil
	vs.h.SetState(&server.LifecycleState{State: StateRecovering, Reason: "quota raised; starting workers", Recovering: true})
	for _, i := range pool.Instances() {
		vs.pending[i.Index] = true
		if err := pool.Resume(i.Index); err != nil {
			log.Warn("resuming model worker", "err", err)
		}
	}
	log.Info("model resumed after its quota was raised")
	m.track(vs, vs.epoch, pool, time.Now(), func(is []supervisor.InstanceInfo) bool {
		for _, i := range is {
			if !i.Ready {
				return false
			}
		}
		return true
	}, func() { vs.pending = map[int]bool{} })
}

// State returns a model version's state and reason.
func (m *Manager) State(model, version string) (string, string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	vs := m.versions[model+"/"+version]
	if vs == nil {
		return StateServing, ""
	}
	if st := vs.h.State(); st != nil {
		return st.State, st.Reason
	}
	return StateServing, ""
}

// state is the version's state as the server holds it (serving when it
// holds none).
func (vs *versionState) state() string {
	if st := vs.h.State(); st != nil {
		return st.State
	}
	return StateServing
}
