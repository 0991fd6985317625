package server

import (
	"fmt"
	"sync/atomic"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/oip"
	"github.com/visionslice/visionslice/runtime/repository"
)

// LifecycleState is what the model lifecycle manager (runtime/lifecycle)
// says about one model version; the server shows it in model metadata and
// readiness and acts on it when requests come.
type LifecycleState struct {
	// State names it ("serving", "recovering", "failed_over_quota", ...).
	State string
	// Reason explains a state other than serving, for operators.
	Reason string
	// Recovering: a worker is being replaced; the version stays ready and
	// requests wait in its queue for the fresh worker.
	Recovering bool
	// Failed: the version is not ready and requests fail at once with
	// Reason.
	Failed bool
}

// lifeHolder is embedded state of a modelVersion (see modelVersion.life).
type lifeHolder = atomic.Pointer[LifecycleState]

// VersionHandle is one served model version as the lifecycle manager sees
// it.
type VersionHandle struct{ mv *modelVersion }

// Model is the model's name.
func (h VersionHandle) Model() string { return h.mv.name }

// Version is the version number as text.
func (h VersionHandle) Version() string { return h.mv.version }

// Dir is the model's directory in the repository.
func (h VersionHandle) Dir() string { return h.mv.model.Dir }

// Config is the model's config as loaded at start.
func (h VersionHandle) Config() *repository.Config { return h.mv.model.Config }

// Pool is the version's worker pool, nil before it is made.
func (h VersionHandle) Pool() Pool { return h.mv.poolOrNil() }

// SetState records the lifecycle state (nil: none, plain pool readiness).
func (h VersionHandle) SetState(st *LifecycleState) { h.mv.life.Store(st) }

// State returns the recorded lifecycle state (nil: none).
func (h VersionHandle) State() *LifecycleState { return h.mv.life.Load() }

// ModelVersions lists every served model version.
func (s *Server) ModelVersions() []VersionHandle {
	vs := s.versionsList()
	out := make([]VersionHandle, len(vs))
	for i, v := range vs {
		out[i] = VersionHandle{v}
	}
	return out
}

// lifeReady combines the pool's readiness with the lifecycle state.
func (mv *modelVersion) lifeReady(poolReady bool) bool {
	st := mv.life.Load()
	switch {
	case st == nil:
		return poolReady
	case st.Failed:
		return false
	case st.Recovering:
		return true
	}
	return poolReady
}

// enter fails a request at once when the version is in a failed state,
// and otherwise counts it in flight until done is called.
func (mv *modelVersion) enter() (done func(), err error) {
	if st := mv.life.Load(); st != nil && st.Failed {
		return nil, fmt.Errorf("%w: model %s version %s is %s: %s", inferr.ErrUnavailable, mv.name, mv.version, st.State, st.Reason)
	}
	mv.inflight.Add(1)
	return func() { mv.inflight.Add(-1) }, nil
}

// withLife adds the lifecycle state and the versions served now (hot
// reload changes them) to the metadata.
func (mv *modelVersion) withLife(md *oip.ModelMetadata) *oip.ModelMetadata {
	c := *md
	c.Versions = mv.s.servedVersions(mv.name)
	if st := mv.life.Load(); st != nil {
		c.State, c.StateReason = st.State, st.Reason
	}
	return &c
}
