// Package supervisor runs the worker processes of one model version for the
// agent: it launches visionslice-worker per instance (each in its own cgroup
// when the host allows), waits until it is ready, checks its health,
// restarts it with exponential backoff when it dies, and routes inferences
// to ready instances. A request whose worker dies under it is retried once
// on a fresh worker, so a crash costs latency, not the request.
//
// The agent does not link ONNX Runtime or OpenCV: only the worker does.
package supervisor

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/worker"
)

// Restart reasons, the label values of the worker restarts metric.
const (
	// ReasonExited: the worker exited on its own.
	ReasonExited = "exited"
	// ReasonKilled: the worker died of a signal (a crash, the OOM killer, a
	// kill from outside).
	ReasonKilled = "killed"
	// ReasonHealth: the worker stopped answering health checks.
	ReasonHealth = "health"
	// ReasonStartFailed: a restarted worker did not become ready.
	ReasonStartFailed = "start_failed"
	// ReasonReplaced: Replace asked for a fresh worker (e.g. a GPU memory
	// overrun).
	ReasonReplaced = "replaced"
)

// ErrStartFailed: a worker exited or timed out before it was ready.
var ErrStartFailed = errors.New("model worker failed to start")

// ErrClosed: the pool is closed.
var ErrClosed = errors.New("model worker pool is closed")

// Config holds the agent-wide worker settings.
type Config struct {
	// WorkerBinary is the path of visionslice-worker.
	WorkerBinary string `yaml:"workerBinary"`
	// ORTLibrary is the path of libonnxruntime.so passed to workers.
	ORTLibrary string `yaml:"ortLibrary"`
	// SocketDir is where each pool makes its private directory of sockets
	// (default os.TempDir()).
	SocketDir string `yaml:"socketDir"`
	// StartTimeout bounds loading and warming a model (default 2m).
	StartTimeout time.Duration `yaml:"startTimeout"`
	// HealthInterval between health checks (default 2s); HealthTimeout
	// bounds one (default 2s); HealthFailures in a row restart the worker
	// (default 3).
	HealthInterval time.Duration `yaml:"healthInterval"`
	HealthTimeout  time.Duration `yaml:"healthTimeout"`
	HealthFailures int           `yaml:"healthFailures"`
	// BackoffInitial and BackoffMax bound the delay before a restart,
	// doubling per consecutive failure (defaults 100ms, 30s); a worker that
	// stayed up StableAfter (default 30s) resets it.
	BackoffInitial time.Duration `yaml:"backoffInitial"`
	BackoffMax     time.Duration `yaml:"backoffMax"`
	StableAfter    time.Duration `yaml:"stableAfter"`
	// StopGrace is how long Close waits after SIGTERM (default 5s).
	StopGrace time.Duration `yaml:"stopGrace"`
	// MaxConnsPerWorker bounds the idle connections kept per worker
	// (default 16).
	MaxConnsPerWorker int `yaml:"maxConnsPerWorker"`
	// WorkerLogLevel is passed to workers (default info).
	WorkerLogLevel string `yaml:"workerLogLevel"`
}

// SetDefaults fills zero fields.
func (c *Config) SetDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	if c.SocketDir == "" {
		c.SocketDir = os.TempDir()
	}
	def(&c.StartTimeout, 2*time.Minute)
	def(&c.HealthInterval, 2*time.Second)
	def(&c.HealthTimeout, 2*time.Second)
	def(&c.BackoffInitial, 100*time.Millisecond)
	def(&c.BackoffMax, 30*time.Second)
	def(&c.StableAfter, 30*time.Second)
	def(&c.StopGrace, 5*time.Second)
	if c.HealthFailures == 0 {
		c.HealthFailures = 3
	}
	if c.MaxConnsPerWorker == 0 {
		c.MaxConnsPerWorker = 16
	}
	if c.WorkerLogLevel == "" {
		c.WorkerLogLevel = "info"
	}
}

// Validate reports a config that cannot work (after SetDefaults).
func (c *Config) Validate() error {
	switch {
	case c.WorkerBinary == "":
		return errors.New("worker binary path is empty")
	case c.ORTLibrary == "":
		return errors.New("onnx runtime library path is empty")
	case c.StartTimeout < 0 || c.HealthInterval < 0 || c.HealthTimeout < 0 || c.BackoffInitial < 0 ||
		c.BackoffMax < c.BackoffInitial || c.StableAfter < 0 || c.StopGrace < 0:
		return errors.New("durations must not be negative and backoffMax must be at least backoffInitial")
	case c.HealthFailures < 1 || c.MaxConnsPerWorker < 1:
		return errors.New("healthFailures and maxConnsPerWorker must be at least 1")
	}
	if _, err := os.Stat(c.WorkerBinary); err != nil {
		return fmt.Errorf("worker binary: %w", err)
	}
	return nil
}

// Model is one model version to serve.
type Model struct {
	// Name labels logs and cgroups, e.g. "ppocr-det/1".
	Name string
	// ModelPath is the model.onnx file.
	ModelPath string
	// Spec is the model's config (instances, threads, preprocessing);
	// nil: one instance, no image inputs.
	Spec *repository.Config
	// Device is "cpu" (default) or "cuda:<n>"; GPUMemLimitBytes is the
	// worker's quota on it.
	Device           string
	GPUMemLimitBytes uint64
}

func (m *Model) instances() int {
	if m.Spec == nil || m.Spec.Instances < 1 {
		return 1
	}
	return m.Spec.Instances
}

func (m *Model) threads() int {
	if m.Spec == nil {
		return 0
	}
	return m.Spec.IntraOpThreads
}

func (m *Model) device() string {
	if m.Device == "" {
		return "cpu"
	}
	return m.Device
}

// Hooks let the front end observe the pool. Calls are synchronous; keep
// them short.
type Hooks struct {
	// OnRestart is called when a worker is restarted, with the reason the
	// previous one ended.
	OnRestart func(reason string)
	// OnReady is called when an instance becomes ready or stops being
	// ready.
	OnReady func(instance int, ready bool)
}

// Pool is the workers of one model version.
type Pool struct {
	cfg    Config
	model  Model
	groups Groups
	hooks  Hooks
	logger *slog.Logger
	id     string
	dir    string

	mu        sync.Mutex
	changed   chan struct{} // closed and replaced when readiness changes
	instances []*instance
	meta      worker.Metadata
	closed    bool
	restarts  map[string]uint64

	rr     atomic.Uint64
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New validates the configs and returns a pool that has started nothing.
// groups may be nil (no cgroups).
func New(cfg Config, model Model, groups Groups, hooks Hooks, logger *slog.Logger) (*Pool, error) {
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("supervisor config: %w", err)
	}
	if model.ModelPath == "" {
		return nil, errors.New("model path is empty")
	}
	if model.Name == "" {
		model.Name = "model"
	}
	var rnd [4]byte
	rand.Read(rnd[:])
	ctx, cancel := context.WithCancel(context.Background())
	return &Pool{
		cfg: cfg, model: model, groups: groups, hooks: hooks,
		logger:   logger.With("pool", model.Name),
		id:       cgroupSafe(model.Name) + "-" + hex.EncodeToString(rnd[:]),
		changed:  make(chan struct{}),
		restarts: map[string]uint64{},
		ctx:      ctx, cancel: cancel,
	}, nil
}

func cgroupSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' {
			return r
		}
		return '_'
	}, s)
}

// Start launches every instance and waits until all are ready. If one
// fails, everything started is stopped and removed, and the error says why
// (ErrStartFailed with the worker's last log lines).
func (p *Pool) Start(ctx context.Context) error {
	p.mu.Lock()
	if p.closed || p.instances != nil {
		p.mu.Unlock()
		return errors.New("pool already started or closed")
	}
	p.mu.Unlock()
	dir, err := os.MkdirTemp(p.cfg.SocketDir, "vsw-")
	if err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	p.dir = dir
	n := p.model.instances()
	procs := make([]*process, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			procs[i], errs[i] = p.spawn(ctx, i, 1)
		}()
	}
	wg.Wait()
	// undo stops and removes whatever was started.
	undo := func(err error) error {
		for _, pr := range procs {
			if pr != nil {
				pr.stop(p.cfg.StopGrace)
				pr.cleanup(p.logger)
			}
		}
		os.RemoveAll(dir)
		return err
	}
	if err := errors.Join(errs...); err != nil {
		return undo(err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return undo(ErrClosed)
	}
	p.meta = procs[0].meta
	for i, pr := range procs {
		in := &instance{p: p, idx: i, gen: 1, proc: pr, ready: true, replace: make(chan string, 1), suspect: make(chan struct{}, 1), since: time.Now()}
		p.instances = append(p.instances, in)
		p.logger.Info("worker ready", "instance", i, "pid", pr.pid(), "load_duration_seconds", pr.meta.LoadSeconds)
		p.wg.Add(1)
		go in.supervise()
	}
	p.notifyLocked()
	for i := range procs {
		p.readyHook(i, true)
	}
	return nil
}

func (p *Pool) readyHook(i int, ready bool) {
	if p.hooks.OnReady != nil {
		p.hooks.OnReady(i, ready)
	}
}

// notifyLocked wakes everyone waiting for a readiness change.
func (p *Pool) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// Metadata is what the first worker reported about the model.
func (p *Pool) Metadata() worker.Metadata {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.meta
}

// Ready reports whether at least one instance serves.
func (p *Pool) Ready() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, in := range p.instances {
		if in.ready {
			return true
		}
	}
	return false
}

// PIDs returns the process IDs of the running workers (for GPU memory
// accounting).
func (p *Pool) PIDs() []int {
	p.mu.Lock()
	defer p.mu.Unlock()
	var pids []int
	for _, in := range p.instances {
		if in.proc != nil {
			pids = append(pids, in.proc.pid())
		}
	}
	return pids
}

// InstanceInfo describes one instance.
type InstanceInfo struct {
	Index      int
	Generation uint64
	PID        int
	Ready      bool
	// CgroupPath is empty when the worker has no cgroup of its own.
	CgroupPath string
}

// Instances describes every instance.
func (p *Pool) Instances() []InstanceInfo {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]InstanceInfo, 0, len(p.instances))
	for _, in := range p.instances {
		info := InstanceInfo{Index: in.idx, Generation: in.gen, Ready: in.ready}
		if in.proc != nil {
			info.PID = in.proc.pid()
			if in.proc.group != nil {
				info.CgroupPath = in.proc.group.Path()
			}
		}
		out = append(out, info)
	}
	return out
}

// Restarts returns the restarts so far by reason.
func (p *Pool) Restarts() map[string]uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]uint64, len(p.restarts))
	for k, v := range p.restarts {
		out[k] = v
	}
	return out
}

// Replace stops routing to instance idx, kills its worker (its whole
// cgroup) and starts a fresh one without backoff; requests in flight on it
// are retried on the fresh worker or another instance. It returns at once.
func (p *Pool) Replace(idx int, reason string) error { return p.replace(idx, reason, nil) }

// replace is Replace that first sets the instance's hold when hold is not
// nil, under the same lock.
func (p *Pool) replace(idx int, reason string, hold *holdState) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	in, err := p.instanceLocked(idx)
	if err != nil {
		return err
	}
	if hold != nil {
		in.setHoldLocked(hold.until, hold.parked)
	}
	if in.ready {
		in.ready = false
		p.notifyLocked()
	}
	select {
	case in.replace <- reason:
	default: // a replacement is already pending
	}
	return nil
}

// Close stops every worker (SIGTERM, then SIGKILL after StopGrace), waits
// for them to be reaped and removes their sockets and cgroups. Requests
// waiting for a worker fail with ErrClosed.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.notifyLocked()
	p.mu.Unlock()
	p.cancel()
	p.wg.Wait()
	if p.dir != "" {
		os.RemoveAll(p.dir)
	}
	return nil
}

// Infer runs one (batched) request on a ready instance, waiting for one if
// none is ready. If the worker dies during the request, it is retried once
// on another (or the restarted) worker.
func (p *Pool) Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	var avoid *worker.Client
	var lastErr error
	for attempt := 0; attempt < 2; attempt++ {
		in, cl, err := p.pick(ctx, avoid)
		if err != nil {
			if lastErr != nil {
				return nil, fmt.Errorf("%w: retry after a lost worker: %w", err, lastErr)
			}
			return nil, err
		}
		in.inflight.Add(1)
		res, err := cl.Infer(ctx, inputs, outputs)
		in.inflight.Add(-1)
		if err == nil || !errors.Is(err, worker.ErrWorkerGone) {
			return res, err
		}
		p.logger.Warn("worker lost during a request", "instance", in.idx, "attempt", attempt+1, "err", err)
		in.lost(cl)
		avoid, lastErr = cl, err
	}
	return nil, fmt.Errorf("%w: the worker was lost twice: %w", inferr.ErrUnavailable, lastErr)
}

// pick returns the ready instance with the fewest requests in flight
// (round robin among equals), never the client avoid; it waits for a
// readiness change when none is ready.
func (p *Pool) pick(ctx context.Context, avoid *worker.Client) (*instance, *worker.Client, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, nil, fmt.Errorf("%w: %w", inferr.ErrUnavailable, ErrClosed)
		}
		var best *instance
		n := len(p.instances)
		start := int(p.rr.Add(1))
		for k := 0; k < n; k++ {
			in := p.instances[(start+k)%n]
			if !in.ready || in.proc.client == avoid {
				continue
			}
			if best == nil || in.inflight.Load() < best.inflight.Load() {
				best = in
			}
		}
		if best != nil {
			cl := best.proc.client
			p.mu.Unlock()
			return best, cl, nil
		}
		wait := p.changed
		p.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("no model worker became ready: %w", ctx.Err())
		}
	}
}
