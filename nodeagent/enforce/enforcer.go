package enforce

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"

	"github.com/visionslice/visionslice/nodeagent/accounting"
	"github.com/visionslice/visionslice/nodeagent/cgroup"
	"github.com/visionslice/visionslice/nodeagent/gpu"
)

// SnapshotSource is what the enforcer needs of the GPU poller.
type SnapshotSource interface {
	Snapshot() *gpu.Snapshot
	Subscribe() (<-chan *gpu.Snapshot, func())
}

// Accountant turns a snapshot into per-container usage against quota;
// *accounting.Tracker is one.
type Accountant interface {
	Account(s *gpu.Snapshot) *accounting.Report
}

var (
	_ SnapshotSource = (*gpu.Poller)(nil)
	_ Accountant     = (*accounting.Tracker)(nil)
)

// Deps are the enforcer's collaborators. Pods and Events may be nil (no
// Kubernetes client): then every pod gets the default action and Events are
// dropped, which is logged once.
type Deps struct {
	Snapshots  SnapshotSource
	Accounting Accountant
	Cgroups    cgroup.Groups
	Pods       PodAnnotations
	Events     EventRecorder
	Registerer prometheus.Registerer
}

// procPathResolver turns a path shown in /proc/<pid>/cgroup into one below
// the hierarchy root (the agent may run in a private cgroup namespace);
// *cgroup.Manager is one.
type procPathResolver interface {
	ResolveProcPath(p string) (string, error)
}

var _ procPathResolver = (*cgroup.Manager)(nil)

// Record is one audit record: an action taken (or refused) on a container.
type Record struct {
	Time         time.Time
	Namespace    string
	Pod          string
	PodUID       string
	Container    string
	GPUUUID      string
	QuotaBytes   uint64
	UsageBytes   uint64
	Action       Action
	Result       string // "ok", "failed" or "rejected"
	Reason       string
	CgroupPath   string
	SnapshotSeq  uint64
	SnapshotTime time.Time
	// ActionDuration is how long the cgroup operation took (a freeze
	// returns once the kernel reports the group frozen).
	ActionDuration time.Duration
}

// Results of an action.
const (
	ResultOK       = "ok"
	ResultFailed   = "failed"
	ResultRejected = "rejected"
)

type phase int

const (
	phaseNormal   phase = iota
	phaseObserved       // over quota, observed; waits for usage to drop
	phaseFrozen
	phaseKilled
)

type groupState struct {
	overSince time.Time // snapshot time of the first poll over quota; zero when not over
	phase     phase
	deadline  time.Time // frozen: kill after
	lastKill  time.Time
	usage     accounting.Usage
	seen      uint64
}

// Enforcer watches accounting reports and applies the policy.
type Enforcer struct {
	logger *slog.Logger
	deps   Deps
	policy atomic.Pointer[Config]
	hooks  []func(Record)

	mu       sync.Mutex
	states   map[string]*groupState
	rejected map[string]string // pod uid -> annotation value already audited
	report   *accounting.Report
	lastAct  time.Duration // duration of the latest cgroup operation

	overruns *prometheus.CounterVec
	actions  *prometheus.CounterVec
	frozen   prometheus.GaugeFunc
}

// Option adjusts an Enforcer.
type Option func(*Enforcer)

// WithHook calls f with every audit record, after it is logged (tests and
// benchmarks time actions with it).
func WithHook(f func(Record)) Option { return func(e *Enforcer) { e.hooks = append(e.hooks, f) } }

// New returns an enforcer. Its metrics are registered on deps.Registerer.
func New(cfg Config, deps Deps, logger *slog.Logger, opts ...Option) (*Enforcer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("enforcement policy: %w", err)
	}
	if deps.Accounting == nil || deps.Cgroups == nil {
		return nil, errors.New("enforcer needs accounting and cgroups")
	}
	e := &Enforcer{logger: logger, deps: deps, states: map[string]*groupState{}, rejected: map[string]string{}}
	if e.deps.Events == nil {
		e.deps.Events = &noEvents{logger: logger}
	}
	if e.deps.Pods == nil {
		logger.Info("per-pod enforcement annotations disabled: no kubernetes client configured; every pod gets the default action",
			"default_action", cfg.DefaultAction)
	}
	e.policy.Store(&cfg)
	for _, o := range opts {
		o(e)
	}
	e.overruns = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "visionslice_gpu_overruns_total",
		Help: "Times a container's GPU memory went over its slice quota (after hysteresis), by GPU.",
	}, []string{"gpu_uuid"})
	e.actions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "visionslice_enforcement_actions_total",
		Help: "Enforcement actions taken or refused, by action and result.",
	}, []string{"action", "result"})
	e.frozen = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "visionslice_enforcement_frozen_containers",
		Help: "Containers frozen for a GPU memory overrun right now.",
	}, func() float64 { return float64(e.countFrozen()) })
	if deps.Registerer != nil {
		for _, c := range []prometheus.Collector{e.overruns, e.actions, e.frozen} {
			if err := deps.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register enforcement metrics: %w", err)
			}
		}
	}
	return e, nil
}

// SetPolicy replaces the policy; it applies from the next evaluation. Groups
// already frozen keep their deadline.
func (e *Enforcer) SetPolicy(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("enforcement policy: %w", err)
	}
	old := e.policy.Swap(&cfg)
	e.mu.Lock()
	clear(e.rejected) // re-audit annotations against the new policy
	e.mu.Unlock()
	e.logger.Info("enforcement policy set", "default_action", cfg.DefaultAction, "allowed_actions", cfg.AllowedActions,
		"grace_period", cfg.GracePeriod.String(), "over_for", cfg.Hysteresis.OverFor.String(),
		"previous_default_action", old.DefaultAction)
	return nil
}

// Policy returns the current policy.
func (e *Enforcer) Policy() Config { return *e.policy.Load() }

// Run evaluates every new GPU snapshot, and checks deadlines and sustained
// overruns every CheckInterval, until ctx ends. On the way out it thaws the
// groups it froze: a stopped agent must not leave containers frozen.
func (e *Enforcer) Run(ctx context.Context) error {
	if e.deps.Snapshots == nil {
		return errors.New("enforcer needs a snapshot source")
	}
	ch, cancel := e.deps.Snapshots.Subscribe()
	defer cancel()
	defer e.thawAll("agent stopping")
	tick := time.NewTicker(e.Policy().CheckInterval)
	defer tick.Stop()
	interval := e.Policy().CheckInterval
	for {
		var s *gpu.Snapshot
		select {
		case <-ctx.Done():
			return nil
		case s = <-ch:
		case <-tick.C:
			s = e.deps.Snapshots.Snapshot()
			if iv := e.Policy().CheckInterval; iv != interval {
				interval = iv
				tick.Reset(iv)
			}
		}
		e.Step(s, time.Now())
	}
}

// Step accounts s (unless it was already) and evaluates the result at now.
func (e *Enforcer) Step(s *gpu.Snapshot, now time.Time) {
	if s == nil {
		return
	}
	e.mu.Lock()
	r := e.report
	fresh := r == nil || s.Seq != r.Seq
	e.mu.Unlock()
	if fresh {
		r = e.deps.Accounting.Account(s)
	}
	e.Evaluate(r, now)
}

// Evaluate applies the policy to one report at now. Evaluating the same
// report again only advances deadlines.
func (e *Enforcer) Evaluate(r *accounting.Report, now time.Time) {
	pol := e.Policy()
	e.mu.Lock()
	defer e.mu.Unlock()
	e.report = r
	present := map[string]bool{}
	for _, u := range r.Groups {
		if u.Kind != gpu.GroupContainer {
			continue
		}
		k := u.Key()
		present[k] = true
		st, ok := e.states[k]
		if !ok {
			st = &groupState{}
			e.states[k] = st
		}
		st.usage, st.seen = u, r.Seq
		e.step(pol, r, st, u, now)
	}
	for k, st := range e.states {
		if present[k] {
			continue
		}
		// The group holds no GPU memory any more: its processes exited or
		// released it. A frozen group is thawed so nothing stays frozen.
		if st.phase == phaseFrozen {
			u := st.usage
			u.UsageBytes = 0
			e.thaw(r, u, now, "group holds no gpu memory any more")
		}
		delete(e.states, k)
	}
}

func (e *Enforcer) step(pol Config, r *accounting.Report, st *groupState, u accounting.Usage, now time.Time) {
	over := u.UsageBytes > u.QuotaBytes+pol.Hysteresis.MarginBytes
	if over && st.overSince.IsZero() {
		st.overSince = r.Time
	}
	switch st.phase {
	case phaseNormal:
		if !over {
			st.overSince = time.Time{}
			return
		}
		if r.Time.Sub(st.overSince) < pol.Hysteresis.OverFor {
			return
		}
		e.overruns.WithLabelValues(u.GPUUUID).Inc()
		d := e.decideFor(pol, r, u, now)
		switch d.action {
		case ActionObserve:
			e.record(r, u, now, ActionObserve, ResultOK, "usage over quota; observed ("+d.source+" action)", nil)
			e.deps.Events.Event(podRef(u), corev1.EventTypeWarning, "GPUMemoryOverQuota", overMessage(u, "observed"))
			st.phase = phaseObserved
		case ActionFreeze:
			if err := e.act(u, cgroup.Group.Freeze); err != nil {
				e.record(r, u, now, ActionFreeze, ResultFailed, "freeze failed", err)
				st.phase = phaseObserved
				return
			}
			e.record(r, u, now, ActionFreeze, ResultOK, fmt.Sprintf("usage over quota; frozen for up to %s (%s action)", pol.GracePeriod, d.source), nil)
			e.deps.Events.Event(podRef(u), corev1.EventTypeWarning, "GPUMemoryOverQuotaFrozen",
				overMessage(u, fmt.Sprintf("frozen; killed in %s unless usage drops under quota", pol.GracePeriod)))
			st.phase, st.deadline = phaseFrozen, now.Add(pol.GracePeriod)
		case ActionKill:
			e.kill(r, st, u, now, "usage over quota ("+d.source+" action)")
		}
	case phaseObserved:
		if !over {
			st.phase, st.overSince = phaseNormal, time.Time{}
		}
	case phaseFrozen:
		release := float64(u.UsageBytes) <= float64(u.QuotaBytes)*pol.Hysteresis.ReleaseRatio
		switch {
		case release:
			e.thaw(r, u, now, "usage back under quota")
			st.phase, st.overSince = phaseNormal, time.Time{}
		case !now.Before(st.deadline):
			e.kill(r, st, u, now, fmt.Sprintf("still over quota after a %s grace period", pol.GracePeriod))
		}
	case phaseKilled:
		switch {
		case !over:
			st.phase, st.overSince = phaseNormal, time.Time{}
		case now.Sub(st.lastKill) >= pol.KillRetry:
			e.kill(r, st, u, now, "still over quota after kill")
		}
	}
}

func (e *Enforcer) kill(r *accounting.Report, st *groupState, u accounting.Usage, now time.Time, why string) {
	st.phase, st.lastKill = phaseKilled, now
	if err := e.act(u, cgroup.Group.Kill); err != nil {
		e.record(r, u, now, ActionKill, ResultFailed, why, err)
		return
	}
	e.record(r, u, now, ActionKill, ResultOK, why, nil)
	e.deps.Events.Event(podRef(u), corev1.EventTypeWarning, "GPUMemoryOverQuotaKilled", overMessage(u, "killed ("+why+")"))
}

func (e *Enforcer) thaw(r *accounting.Report, u accounting.Usage, now time.Time, why string) {
	if err := e.act(u, cgroup.Group.Thaw); err != nil {
		e.record(r, u, now, actionThaw, ResultFailed, why, err)
		return
	}
	e.record(r, u, now, actionThaw, ResultOK, why, nil)
	e.deps.Events.Event(podRef(u), corev1.EventTypeNormal, "GPUMemoryThawed", fmt.Sprintf("container %s thawed: %s", u.Container, why))
}

// act opens the container's cgroup and applies op; e.lastAct keeps how
// long it took for the audit record that follows.
func (e *Enforcer) act(u accounting.Usage, op func(cgroup.Group) error) error {
	start := time.Now()
	defer func() { e.lastAct = time.Since(start) }()
	if u.CgroupPath == "" {
		return errors.New("container has no cgroup v2 path (cgroup v1 only)")
	}
	p := u.CgroupPath
	if r, ok := e.deps.Cgroups.(procPathResolver); ok {
		var err error
		if p, err = r.ResolveProcPath(p); err != nil {
			return err
		}
	}
	g, err := e.deps.Cgroups.Open(p)
	if err != nil {
		return err
	}
	return op(g)
}

// decideFor resolves the pod's action, auditing a rejected annotation once
// per pod and value.
func (e *Enforcer) decideFor(pol Config, r *accounting.Report, u accounting.Usage, now time.Time) decision {
	var ann map[string]string
	if e.deps.Pods != nil {
		ann, _ = e.deps.Pods.Annotations(u.Namespace, u.Pod)
	}
	d := pol.decide(ann)
	if d.rejected != "" && e.rejected[u.PodUID] != d.rejected {
		e.rejected[u.PodUID] = d.rejected
		e.record(r, u, now, actionRejectAnnotation, ResultRejected,
			fmt.Sprintf("annotation %q rejected: %s; using default action %s", d.rejected, d.reason, pol.DefaultAction), nil)
		e.deps.Events.Event(podRef(u), corev1.EventTypeWarning, "EnforcementAnnotationRejected",
			fmt.Sprintf("visionslice.io/enforcement-action %q rejected: %s; the node's default action %s applies", d.rejected, d.reason, pol.DefaultAction))
	}
	return d
}

// record writes the audit record and counts it.
func (e *Enforcer) record(r *accounting.Report, u accounting.Usage, now time.Time, a Action, result, reason string, err error) {
	rec := Record{
		Time: now, Namespace: u.Namespace, Pod: u.Pod, PodUID: u.PodUID, Container: u.Container,
		GPUUUID: u.GPUUUID, QuotaBytes: u.QuotaBytes, UsageBytes: u.UsageBytes,
		Action: a, Result: result, Reason: reason, CgroupPath: u.CgroupPath,
		SnapshotSeq: r.Seq, SnapshotTime: r.Time,
	}
	if a != ActionObserve && a != actionRejectAnnotation {
		rec.ActionDuration = e.lastAct
	}
	attrs := []any{
		"audit", true, "namespace", rec.Namespace, "pod", rec.Pod, "pod_uid", rec.PodUID, "container", rec.Container,
		"gpu_uuid", rec.GPUUUID, "quota_bytes", rec.QuotaBytes, "usage_bytes", rec.UsageBytes,
		"action", string(rec.Action), "result", rec.Result, "reason", rec.Reason, "cgroup", rec.CgroupPath,
		"snapshot_seq", rec.SnapshotSeq, "action_duration_seconds", rec.ActionDuration.Seconds(),
	}
	level := slog.LevelInfo
	if result == ResultRejected {
		level = slog.LevelWarn
	}
	if err != nil {
		rec.Reason = reason + ": " + err.Error()
		attrs = append(attrs, "err", err.Error())
		level = slog.LevelError
	}
	e.logger.Log(context.Background(), level, "enforcement action", attrs...)
	e.actions.WithLabelValues(string(a), result).Inc()
	for _, h := range e.hooks {
		h(rec)
	}
}

// thawAll thaws every group the enforcer froze.
func (e *Enforcer) thawAll(why string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	r := e.report
	if r == nil {
		r = &accounting.Report{}
	}
	for k, st := range e.states {
		if st.phase == phaseFrozen {
			e.thaw(r, st.usage, time.Now(), why)
			delete(e.states, k)
		}
	}
}

func (e *Enforcer) countFrozen() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, st := range e.states {
		if st.phase == phaseFrozen {
			n++
		}
	}
	return n
}

func podRef(u accounting.Usage) PodRef {
	return PodRef{Namespace: u.Namespace, Name: u.Pod, UID: u.PodUID}
}

func overMessage(u accounting.Usage, what string) string {
	return fmt.Sprintf("container %s uses %d bytes of GPU memory on %s, over its quota of %d bytes (%d slices): %s",
		u.Container, u.UsageBytes, u.GPUUUID, u.QuotaBytes, u.Slices, what)
}
