package supervisor

import (
	"fmt"
	"time"
)

// holdState gates the restart of one instance: not before until (a backoff
// the caller chose, e.g. after repeated GPU memory overruns), or not at all
// while parked (until Resume). Guarded by the pool's mu.
type holdState struct {
	until  time.Time
	parked bool
	wake   chan struct{} // closed when the hold changes; nil before the first
}

func (in *instance) setHoldLocked(until time.Time, parked bool) {
	if in.hold.wake != nil {
		close(in.hold.wake)
	}
	in.hold = holdState{until: until, parked: parked, wake: make(chan struct{})}
}

func (p *Pool) instanceLocked(idx int) (*instance, error) {
	if idx < 0 || idx >= len(p.instances) {
		return nil, fmt.Errorf("instance %d does not exist", idx)
	}
	return p.instances[idx], nil
}

// ReplaceAfter is Replace with the fresh worker started no sooner than
// delay from now; the instance takes no traffic meanwhile.
func (p *Pool) ReplaceAfter(idx int, reason string, delay time.Duration) error {
	return p.replace(idx, reason, &holdState{until: time.Now().Add(delay)})
}

// Park stops routing to instance idx, kills its worker (its whole cgroup)
// and starts no new one until Resume. Requests in flight on it are retried
// on another instance, or wait for one.
func (p *Pool) Park(idx int, reason string) error {
	return p.replace(idx, reason, &holdState{parked: true})
}

// Resume lifts Park (or a pending ReplaceAfter delay): a fresh worker
// starts at once.
func (p *Pool) Resume(idx int) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	in, err := p.instanceLocked(idx)
	if err != nil {
		return err
	}
	if in.proc == nil {
		// No worker runs: a replacement request left by Park is stale and
		// would kill the fresh worker.
		select {
		case <-in.replace:
		default:
		}
	}
	in.setHoldLocked(time.Time{}, false)
	return nil
}

// waitHold blocks a restart while the instance is held; false when the
// pool closes.
func (in *instance) waitHold() bool {
	p := in.p
	for {
		p.mu.Lock()
		h := in.hold
		p.mu.Unlock()
		var timeout <-chan time.Time
		if !h.parked {
			d := time.Until(h.until)
			if d <= 0 {
				return true
			}
			timeout = time.After(d)
		}
		select {
		case <-p.ctx.Done():
			return false
		case <-h.wake:
		case <-timeout:
		}
	}
}
