package server

import (
	"fmt"
	"log/slog"
	"os"
	"time"
)

// Load states shown in model metadata while a version loads or after its
// load failed.
const (
	StateLoading    = "loading"
	StateLoadFailed = "load_failed"
)

// Progress reporting periods.
const (
	progressUpdate = 250 * time.Millisecond
	progressLog    = 5 * time.Second
)

// trackLoad shows a loading version's progress in its metadata (state
// "loading", elapsed time, model size, workers) and logs it every few
// seconds; the returned func ends it with the outcome.
func (mv *modelVersion) trackLoad(logger *slog.Logger, start time.Time) func() {
	var size int64
	if st, err := os.Stat(mv.v.Path); err == nil {
		size = st.Size()
	}
	workers := 1
	if c := mv.model.Config; c != nil && c.Instances > 1 {
		workers = c.Instances
	}
	state := func() *LifecycleState {
		return &LifecycleState{State: StateLoading, Reason: fmt.Sprintf("loading for %.1f s: %d worker(s) loading and warming up a %.1f MiB model",
			time.Since(start).Seconds(), workers, float64(size)/(1<<20))}
	}
	last := state()
	mv.life.Store(last)
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(progressUpdate)
		defer tick.Stop()
		logged := start
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				next := state()
				if !mv.life.CompareAndSwap(last, next) {
					return // someone else owns the state now
				}
				last = next
				if time.Since(logged) >= progressLog {
					logged = time.Now()
					logger.Info("model still loading", "elapsed_seconds", time.Since(start).Seconds(), "model_bytes", size, "workers", workers)
				}
			}
		}
	}()
	return func() {
		close(stop)
		<-done
		mv.mu.Lock()
		err := mv.loadErr
		mv.mu.Unlock()
		cur := mv.life.Load()
		if cur != nil && cur.State != StateLoading {
			return
		}
		if err != nil {
			mv.life.CompareAndSwap(cur, &LifecycleState{State: StateLoadFailed, Reason: err.Error(), Failed: true})
			return
		}
		mv.life.CompareAndSwap(cur, nil)
	}
}
