package supervisor

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/visionslice/visionslice/runtime/worker"
)

// instance is one slot of the pool: a succession of worker processes
// (generations). Fields other than inflight are guarded by the pool's mu;
// only supervise replaces proc.
type instance struct {
	p        *Pool
	idx      int
	gen      uint64
	proc     *process
	ready    bool
	since    time.Time     // when proc became ready
	replace  chan string   // Replace's requests
	suspect  chan struct{} // a request lost its connection to proc
	inflight atomic.Int64
	hold     holdState // restart gate (hold.go)
}

// lost marks the worker behind cl as gone (a request saw its connection
// break): stop routing to it and let supervise find out why.
func (in *instance) lost(cl *worker.Client) {
	p := in.p
	p.mu.Lock()
	if in.proc == nil || in.proc.client != cl || !in.ready {
		p.mu.Unlock()
		return
	}
	in.ready = false
	p.notifyLocked()
	select {
	case in.suspect <- struct{}{}:
	default:
	}
	p.mu.Unlock()
	// Reported before watch can find the worker alive again (it waits a
	// health timeout first), so the hook sees false, then true.
	p.readyHook(in.idx, false)
}

// supervise watches the instance's worker and replaces it when it ends,
// until the pool closes.
func (in *instance) supervise() {
	p := in.p
	defer p.wg.Done()
	failures := 0
	for {
		reason := in.watch()
		p.mu.Lock()
		pr := in.proc
		wasReady := in.ready
		in.ready = false
		if wasReady {
			p.notifyLocked()
		}
		up := time.Since(in.since)
		p.mu.Unlock()
		if wasReady {
			p.readyHook(in.idx, false)
		}
		// Make sure it is dead (a health failure or a replacement leaves it
		// running), reap it and remove what it left.
		if reason == "" {
			pr.stop(p.cfg.StopGrace)
		} else {
			pr.kill()
			<-pr.exited
		}
		pr.cleanup(p.logger)
		p.mu.Lock()
		in.proc = nil
		p.mu.Unlock()
		if reason == "" { // the pool is closing
			return
		}
		p.logger.Warn("worker ended", "instance", in.idx, "pid", pr.pid(), "reason", reason,
			"exit", exitString(pr.waitErr), "uptime_seconds", up.Seconds(), "last_log", pr.stderr.last())
		if up >= p.cfg.StableAfter {
			failures = 0
		}
		for {
			delay := time.Duration(0)
			if reason != ReasonReplaced {
				delay = backoff(p.cfg.BackoffInitial, p.cfg.BackoffMax, failures)
				failures++
			}
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(delay):
			}
			if !in.waitHold() {
				return
			}
			p.countRestart(reason)
			p.mu.Lock()
			in.gen++
			gen := in.gen
			p.mu.Unlock()
			np, err := p.spawn(p.ctx, in.idx, gen)
			if err != nil {
				if p.ctx.Err() != nil {
					return
				}
				p.logger.Error("worker restart failed", "instance", in.idx, "generation", gen, "err", err)
				reason = ReasonStartFailed
				continue
			}
			p.mu.Lock()
			if p.closed {
				p.mu.Unlock()
				np.stop(p.cfg.StopGrace)
				np.cleanup(p.logger)
				return
			}
			in.proc, in.ready, in.since = np, true, time.Now()
			p.notifyLocked()
			p.mu.Unlock()
			p.readyHook(in.idx, true)
			p.logger.Info("worker restarted", "instance", in.idx, "generation", gen, "pid", np.pid(),
				"load_duration_seconds", np.meta.LoadSeconds)
			break
		}
	}
}

// watch waits until the worker ends ("exited"/"killed"), fails its health
// checks, is to be replaced, or the pool closes (""), and says which.
func (in *instance) watch() string {
	p := in.p
	p.mu.Lock()
	pr := in.proc
	p.mu.Unlock()
	tick := time.NewTicker(p.cfg.HealthInterval)
	defer tick.Stop()
	failed := 0
	for {
		select {
		case <-p.ctx.Done():
			return ""
		case <-pr.exited:
			return exitReason(pr.waitErr)
		case <-in.suspect:
			// Usually the worker is dying; if it lives and answers, the
			// broken connection was its own and it serves again.
			select {
			case <-pr.exited:
				return exitReason(pr.waitErr)
			case <-time.After(p.cfg.HealthTimeout):
			}
			if err := p.health(pr); err != nil {
				return ReasonHealth
			}
			p.mu.Lock()
			back := in.proc == pr && !in.ready
			if back {
				in.ready = true
				p.notifyLocked()
			}
			p.mu.Unlock()
			if back {
				p.readyHook(in.idx, true)
			}
		case r := <-in.replace:
			p.logger.Info("replacing worker", "instance", in.idx, "pid", pr.pid(), "reason", r)
			return ReasonReplaced
		case <-tick.C:
			err := p.health(pr)
			if err == nil {
				failed = 0
				continue
			}
			if p.ctx.Err() != nil {
				return ""
			}
			failed++
			p.logger.Warn("worker health check failed", "instance", in.idx, "pid", pr.pid(), "failures", failed, "err", err)
			if failed >= p.cfg.HealthFailures {
				return ReasonHealth
			}
		}
	}
}

// health checks pr once, within HealthTimeout.
func (p *Pool) health(pr *process) error {
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.HealthTimeout)
	defer cancel()
	return pr.client.Health(ctx)
}

func (p *Pool) countRestart(reason string) {
	p.mu.Lock()
	p.restarts[reason]++
	p.mu.Unlock()
	if p.hooks.OnRestart != nil {
		p.hooks.OnRestart(reason)
	}
}

// backoff is initial * 2^failures, capped at max.
func backoff(initial, max time.Duration, failures int) time.Duration {
	d := initial
	for i := 0; i < failures && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	return d
}
