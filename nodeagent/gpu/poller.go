package gpu

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Source takes one sample of the GPUs. *Reader is the production Source.
type Source interface {
	Read(ctx context.Context) (*Snapshot, error)
}

var _ Source = (*Reader)(nil)

// PollerOption configures a Poller.
type PollerOption func(*Poller)

// WithPollDuration observes every poll's duration in seconds.
func WithPollDuration(h prometheus.Observer) PollerOption {
	return func(p *Poller) { p.pollDuration = h }
}

// Poller samples a Source at an interval, keeps the latest immutable
// Snapshot and tells subscribers when it changes.
type Poller struct {
	src          Source
	logger       *slog.Logger
	pollDuration prometheus.Observer

	interval atomic.Int64 // nanoseconds
	reset    chan struct{}

	latest atomic.Pointer[Snapshot]
	seq    uint64

	mu   sync.Mutex
	subs map[int]chan *Snapshot
	next int

	failures atomic.Uint64
}

// NewPoller returns a poller over src; interval must be positive.
func NewPoller(src Source, interval time.Duration, logger *slog.Logger, opts ...PollerOption) *Poller {
	p := &Poller{src: src, logger: logger, reset: make(chan struct{}, 1), subs: map[int]chan *Snapshot{}}
	p.interval.Store(int64(interval))
	for _, o := range opts {
		o(p)
	}
	return p
}

// SetInterval changes the poll interval while the poller runs.
func (p *Poller) SetInterval(d time.Duration) {
	if d <= 0 || time.Duration(p.interval.Swap(int64(d))) == d {
		return
	}
	select {
	case p.reset <- struct{}{}:
	default:
	}
}

// Interval returns the current poll interval.
func (p *Poller) Interval() time.Duration { return time.Duration(p.interval.Load()) }

// Snapshot returns the latest snapshot, nil before the first successful poll.
func (p *Poller) Snapshot() *Snapshot { return p.latest.Load() }

// Failures returns how many polls failed.
func (p *Poller) Failures() uint64 { return p.failures.Load() }

// Ready reports whether an inventory has been read.
func (p *Poller) Ready() error {
	if p.latest.Load() == nil {
		return errors.New("gpu inventory not read yet")
	}
	return nil
}

// Subscribe returns a channel that receives the snapshot after every poll
// whose devices or processes changed, starting with the current one when
// there is one. The channel holds one snapshot: a newer one replaces an
// unread older one, so a slow subscriber sees the latest state, never a
// backlog. cancel stops the subscription and closes the channel.
func (p *Poller) Subscribe() (<-chan *Snapshot, func()) {
	ch := make(chan *Snapshot, 1)
	p.mu.Lock()
	id := p.next
	p.next++
	p.subs[id] = ch
	if s := p.latest.Load(); s != nil {
		ch <- s
	}
	p.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			p.mu.Lock()
			delete(p.subs, id)
			p.mu.Unlock()
			close(ch)
		})
	}
}

// Run polls until ctx ends. It polls once at start.
func (p *Poller) Run(ctx context.Context) error {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-p.reset:
			t.Reset(p.Interval())
			continue
		case <-t.C:
		}
		start := time.Now()
		p.poll(ctx)
		if p.pollDuration != nil {
			p.pollDuration.Observe(time.Since(start).Seconds())
		}
		next := p.Interval() - time.Since(start)
		if next < 0 {
			next = 0
		}
		t.Reset(next)
	}
}

func (p *Poller) poll(ctx context.Context) {
	s, err := p.src.Read(ctx)
	if err != nil {
		if ctx.Err() == nil {
			p.failures.Add(1)
			p.logger.Warn("gpu poll failed", "err", err)
		}
		return
	}
	prev := p.latest.Load()
	p.seq++
	s.Seq = p.seq
	p.latest.Store(s)
	if prev != nil && sameContent(prev, s) {
		return
	}
	if prev != nil {
		for _, d := range s.Devices {
			if pd, ok := prev.Device(d.UUID); !ok || pd.Healthy != d.Healthy {
				p.logger.Info("gpu health changed", "gpu_uuid", d.UUID, "gpu", d.Index, "healthy", d.Healthy, "reason", d.HealthReason)
			}
		}
	}
	p.publish(s)
}

func (p *Poller) publish(s *Snapshot) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, ch := range p.subs {
		select {
		case <-ch: // drop the unread older snapshot
		default:
		}
		ch <- s
	}
}

// sameContent reports whether two snapshots hold the same devices and
// processes (time and sequence aside).
func sameContent(a, b *Snapshot) bool {
	return slices.Equal(a.Devices, b.Devices) && slices.Equal(a.Processes, b.Processes)
}
