// Package batch is the dynamic batcher of one model version: it queues
// requests (bounded), groups compatible ones into one batch along dimension 0
// up to a maximum size, waits at most a configured delay for more (or not at
// all once a preferred size is reached), drops requests whose deadline passed
// before they reach the worker, and splits the outputs back per request.
package batch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// Runner executes one (batched) inference; the supervisor's worker pool is
// the real one. It may be called concurrently up to Config.Concurrency times.
type Runner interface {
	Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error)
}

// Observer receives measurements; the server turns them into metrics.
type Observer interface {
	// Queued is the time a request waited in the queue before dispatch.
	Queued(d time.Duration)
	// Dispatched is one batch handed to the runner with its size in items
	// and how long the runner took.
	Dispatched(items int, compute time.Duration, err error)
}

// Config of one batcher.
type Config struct {
	// MaxBatchSize in items along dimension 0; 0 or 1 disables batching
	// (requests pass through one at a time, still queued).
	MaxBatchSize int
	// MaxQueueDelay the oldest request may wait for more to join it.
	MaxQueueDelay time.Duration
	// PreferredBatchSizes dispatch at once when reached.
	PreferredBatchSizes []int
	// MaxQueueSize bounds the queue in requests.
	MaxQueueSize int
	// DefaultTimeout is the deadline of a request whose context has none.
	DefaultTimeout time.Duration
	// Concurrency is how many batches may run at once (model instances).
	Concurrency int
	// RetryAfter is the hint returned with a full queue (default 1s).
	RetryAfter time.Duration
}

// Validate checks cfg.
func (c *Config) Validate() error {
	switch {
	case c.MaxBatchSize < 0:
		return fmt.Errorf("max batch size %d is negative", c.MaxBatchSize)
	case c.MaxQueueSize < 1:
		return fmt.Errorf("max queue size %d must be at least 1", c.MaxQueueSize)
	case c.Concurrency < 1:
		return fmt.Errorf("concurrency %d must be at least 1", c.Concurrency)
	case c.MaxQueueDelay < 0 || c.DefaultTimeout < 0:
		return errors.New("durations must not be negative")
	}
	for _, p := range c.PreferredBatchSizes {
		if p < 1 || p > max(c.MaxBatchSize, 1) {
			return fmt.Errorf("preferred batch size %d is outside 1..%d", p, max(c.MaxBatchSize, 1))
		}
	}
	return nil
}

// ErrClosed is returned to requests queued when the batcher stops.
var ErrClosed = fmt.Errorf("batcher stopped: %w", inferr.ErrUnavailable)

type result struct {
	outputs []tensor.Tensor
	err     error
}

type request struct {
	ctx      context.Context
	inputs   []tensor.Tensor
	outputs  []string
	items    int
	key      string
	enqueued time.Time
	deadline time.Time // zero: none
	span     trace.Span
	// state: 0 queued, 1 taken by the scheduler, 2 abandoned by the caller.
	state atomic.Int32
	done  chan result
}

// Batcher queues and batches requests for one runner.
type Batcher struct {
	cfg    Config
	runner Runner
	obs    Observer
	tracer trace.Tracer
	logger *slog.Logger
	slots  chan struct{}

	mu      sync.Mutex
	queue   []*request
	closed  bool
	wake    chan struct{}
	stopped chan struct{}
	wg      sync.WaitGroup

	// Pass-through mode (MaxBatchSize 1): callers run the runner in their
	// own goroutine once they hold a slot; waiting counts those queued.
	waiting  atomic.Int64
	closing  chan struct{}
	closeOne sync.Once
}

// Option customises a Batcher.
type Option func(*Batcher)

// WithTracer sets the tracer for queue and batch spans.
func WithTracer(t trace.Tracer) Option { return func(b *Batcher) { b.tracer = t } }

// WithObserver sets the measurement sink.
func WithObserver(o Observer) Option { return func(b *Batcher) { b.obs = o } }

// New returns a batcher; call Run to start dispatching.
func New(cfg Config, runner Runner, logger *slog.Logger, opts ...Option) (*Batcher, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("batch config: %w", err)
	}
	if cfg.MaxBatchSize == 0 {
		cfg.MaxBatchSize = 1
	}
	if cfg.RetryAfter == 0 {
		cfg.RetryAfter = time.Second
	}
	cfg.PreferredBatchSizes = slices.Clone(cfg.PreferredBatchSizes)
	slices.Sort(cfg.PreferredBatchSizes)
	b := &Batcher{
		cfg:     cfg,
		runner:  runner,
		obs:     nopObserver{},
		tracer:  noop.NewTracerProvider().Tracer(""),
		logger:  logger,
		slots:   make(chan struct{}, cfg.Concurrency),
		wake:    make(chan struct{}, 1),
		stopped: make(chan struct{}),
		closing: make(chan struct{}),
	}
	for _, o := range opts {
		o(b)
	}
	return b, nil
}

type nopObserver struct{}

func (nopObserver) Queued(time.Duration)                 {}
func (nopObserver) Dispatched(int, time.Duration, error) {}

// Infer queues one request and waits for its outputs. inputs carry the
// batch dimension first when MaxBatchSize > 1 (the front end has checked
// shapes against the model). A full queue returns an *inferr.RetryAfter; a
// deadline that passes while queued returns context.DeadlineExceeded and the
// request never reaches the runner.
func (b *Batcher) Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	r := &request{ctx: ctx, inputs: inputs, outputs: outputs, enqueued: time.Now(), done: make(chan result, 1)}
	if d, ok := ctx.Deadline(); ok {
		r.deadline = d
	} else if b.cfg.DefaultTimeout > 0 {
		r.deadline = r.enqueued.Add(b.cfg.DefaultTimeout)
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, r.deadline)
		defer cancel()
		r.ctx = ctx
	}
	r.items, r.key = 1, ""
	if b.cfg.MaxBatchSize == 1 {
		return b.passThrough(r)
	}
	if b.cfg.MaxBatchSize > 1 {
		var err error
		if r.items, r.key, err = batchKey(inputs, outputs); err != nil {
			return nil, err
		}
		if r.items > b.cfg.MaxBatchSize {
			return nil, fmt.Errorf("%w: batch of %d exceeds the model's max batch size %d", inferr.ErrInvalidInput, r.items, b.cfg.MaxBatchSize)
		}
	}
	_, r.span = b.tracer.Start(ctx, "queue", trace.WithAttributes(attribute.Int("batch.items", r.items)))

	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		r.span.End()
		return nil, ErrClosed
	}
	if len(b.queue) >= b.cfg.MaxQueueSize {
		b.mu.Unlock()
		r.span.End()
		return nil, &inferr.RetryAfter{Msg: fmt.Sprintf("queue full (%d requests)", b.cfg.MaxQueueSize), After: b.cfg.RetryAfter}
	}
	b.queue = append(b.queue, r)
	b.mu.Unlock()
	b.signal()

	select {
	case res := <-r.done:
		return res.outputs, res.err
	case <-ctx.Done():
		if r.state.CompareAndSwap(0, 2) {
			r.span.End()
			b.signal() // let the scheduler drop it
			return nil, ctx.Err()
		}
		// Taken already: the result is coming.
		res := <-r.done
		return res.outputs, res.err
	}
}

func (b *Batcher) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// QueueLen returns the number of queued requests.
func (b *Batcher) QueueLen() int {
	if b.cfg.MaxBatchSize == 1 {
		return int(b.waiting.Load())
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.queue)
}

// passThrough runs one request without batching in the caller's goroutine,
// which saves the hand-offs to and from the scheduler: it waits (bounded by
// MaxQueueSize waiters) for a free instance slot, and never calls the
// runner once the request's deadline has passed or the caller gave up.
func (b *Batcher) passThrough(r *request) ([]tensor.Tensor, error) {
	if b.waiting.Add(1) > int64(b.cfg.MaxQueueSize) {
		b.waiting.Add(-1)
		return nil, &inferr.RetryAfter{Msg: fmt.Sprintf("queue full (%d requests)", b.cfg.MaxQueueSize), After: b.cfg.RetryAfter}
	}
	_, qspan := b.tracer.Start(r.ctx, "queue")
	select {
	case b.slots <- struct{}{}:
	case <-r.ctx.Done():
		b.waiting.Add(-1)
		qspan.End()
		if errors.Is(r.ctx.Err(), context.DeadlineExceeded) {
			return nil, fmt.Errorf("deadline passed after %s in the queue: %w", time.Since(r.enqueued).Round(time.Microsecond), context.DeadlineExceeded)
		}
		return nil, r.ctx.Err()
	case <-b.closing:
		b.waiting.Add(-1)
		qspan.End()
		return nil, ErrClosed
	}
	b.waiting.Add(-1)
	qspan.End()
	defer func() { <-b.slots }()
	select {
	case <-b.closing:
		return nil, ErrClosed
	default:
	}
	if err := r.ctx.Err(); err != nil { // lost the race with the deadline
		return nil, err
	}
	start := time.Now()
	b.obs.Queued(start.Sub(r.enqueued))
	ctx, span := b.tracer.Start(r.ctx, "batch", trace.WithAttributes(attribute.Int("batch.items", 1), attribute.Int("batch.requests", 1)))
	defer span.End()
	out, err := b.runner.Infer(ctx, r.inputs, r.outputs)
	b.obs.Dispatched(1, time.Since(start), err)
	return out, err
}

// Run dispatches batches until ctx ends, then fails what is queued with
// ErrClosed and waits for running batches.
func (b *Batcher) Run(ctx context.Context) error {
	defer close(b.stopped)
	if b.cfg.MaxBatchSize == 1 {
		<-ctx.Done()
		b.closeOne.Do(func() { close(b.closing) })
		b.mu.Lock()
		b.closed = true
		b.mu.Unlock()
		for i := 0; i < cap(b.slots); i++ { // wait for running requests
			b.slots <- struct{}{}
		}
		return nil
	}
	defer b.wg.Wait()
	defer b.drain()
	for {
		// A free instance first: while all are busy the queue grows and
		// batches get bigger.
		select {
		case b.slots <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		batch, ok := b.collect(ctx)
		if !ok {
			<-b.slots
			return nil
		}
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			defer func() { <-b.slots }()
			b.execute(batch)
		}()
	}
}

func (b *Batcher) drain() {
	b.mu.Lock()
	b.closed = true
	q := b.queue
	b.queue = nil
	b.mu.Unlock()
	for _, r := range q {
		if r.state.CompareAndSwap(0, 1) {
			r.span.End()
			r.done <- result{err: ErrClosed}
		}
	}
}

// collect waits for the next batch: the oldest live request plus compatible
// ones, up to the max size, dispatching early on a preferred size.
func (b *Batcher) collect(ctx context.Context) ([]*request, bool) {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		now := time.Now()
		b.mu.Lock()
		b.pruneLocked(now)
		var batch []*request
		items := 0
		if len(b.queue) > 0 {
			head := b.queue[0]
			for _, r := range b.queue {
				if r.key != head.key || items+r.items > b.cfg.MaxBatchSize {
					continue
				}
				batch = append(batch, r)
				items += r.items
				if items == b.cfg.MaxBatchSize {
					break
				}
			}
			waitUntil := head.enqueued.Add(b.cfg.MaxQueueDelay)
			if b.cfg.MaxBatchSize == 1 || items == b.cfg.MaxBatchSize || slices.Contains(b.cfg.PreferredBatchSizes, items) || !now.Before(waitUntil) {
				b.takeLocked(batch)
				b.mu.Unlock()
				return batch, true
			}
			if timer == nil {
				timer = time.NewTimer(waitUntil.Sub(now))
			} else {
				timer.Reset(waitUntil.Sub(now))
			}
		}
		b.mu.Unlock()
		var tc <-chan time.Time
		if timer != nil {
			tc = timer.C
		}
		select {
		case <-ctx.Done():
			return nil, false
		case <-b.wake:
		case <-tc:
		}
	}
}

// pruneLocked drops abandoned requests and fails expired ones.
func (b *Batcher) pruneLocked(now time.Time) {
	keep := b.queue[:0]
	for _, r := range b.queue {
		if r.state.Load() == 2 {
			continue
		}
		if !r.deadline.IsZero() && !now.Before(r.deadline) {
			if r.state.CompareAndSwap(0, 1) {
				r.span.End()
				r.done <- result{err: fmt.Errorf("deadline passed after %s in the queue: %w", now.Sub(r.enqueued).Round(time.Microsecond), context.DeadlineExceeded)}
			}
			continue
		}
		keep = append(keep, r)
	}
	clear(b.queue[len(keep):])
	b.queue = keep
}

// takeLocked removes batch from the queue and marks it taken; requests the
// caller abandoned meanwhile are left out.
func (b *Batcher) takeLocked(batch []*request) {
	taken := map[*request]bool{}
	for _, r := range batch {
		taken[r] = true
	}
	keep := b.queue[:0]
	for _, r := range b.queue {
		if !taken[r] {
			keep = append(keep, r)
		}
	}
	clear(b.queue[len(keep):])
	b.queue = keep
}

func (b *Batcher) execute(batch []*request) {
	now := time.Now()
	live := batch[:0]
	for _, r := range batch {
		if !r.state.CompareAndSwap(0, 1) {
			continue // abandoned between collect and here
		}
		r.span.End()
		if !r.deadline.IsZero() && !now.Before(r.deadline) {
			r.done <- result{err: fmt.Errorf("deadline passed after %s in the queue: %w", now.Sub(r.enqueued).Round(time.Microsecond), context.DeadlineExceeded)}
			continue
		}
		b.obs.Queued(now.Sub(r.enqueued))
		live = append(live, r)
	}
	if len(live) == 0 {
		return
	}
	items := 0
	links := make([]trace.Link, 0, len(live))
	for _, r := range live {
		items += r.items
		links = append(links, trace.LinkFromContext(r.ctx))
	}
	// The batch runs under the first request's context (its trace and
	// deadline); the latest deadline of the batch bounds the call.
	ctx, cancel := batchContext(live)
	defer cancel()
	ctx, span := b.tracer.Start(ctx, "batch", trace.WithLinks(links...), trace.WithAttributes(attribute.Int("batch.items", items), attribute.Int("batch.requests", len(live))))
	defer span.End()

	if len(live) == 1 {
		r := live[0]
		start := time.Now()
		out, err := b.runner.Infer(ctx, r.inputs, r.outputs)
		b.obs.Dispatched(items, time.Since(start), err)
		r.done <- result{outputs: out, err: err}
		return
	}
	inputs, err := concat(live)
	if err != nil {
		b.failAll(live, err)
		return
	}
	start := time.Now()
	out, err := b.runner.Infer(ctx, inputs, live[0].outputs)
	b.obs.Dispatched(items, time.Since(start), err)
	if err != nil {
		b.failAll(live, err)
		return
	}
	parts, err := split(out, live)
	if err != nil {
		b.failAll(live, err)
		return
	}
	for i, r := range live {
		r.done <- result{outputs: parts[i]}
	}
}

func (b *Batcher) failAll(rs []*request, err error) {
	for _, r := range rs {
		r.done <- result{err: err}
	}
}

// batchContext keeps the first request's values (trace) and ends at the
// latest deadline of the batch, or never when one request has none.
func batchContext(rs []*request) (context.Context, context.CancelFunc) {
	base := context.WithoutCancel(rs[0].ctx)
	var latest time.Time
	for _, r := range rs {
		if r.deadline.IsZero() {
			return context.WithCancel(base)
		}
		if r.deadline.After(latest) {
			latest = r.deadline
		}
	}
	return context.WithDeadline(base, latest)
}

// batchKey returns the number of items (dimension 0, equal across inputs)
// and a key that only requests which can share a batch have in common.
func batchKey(inputs []tensor.Tensor, outputs []string) (int, string, error) {
	var sb strings.Builder
	items := -1
	for _, in := range inputs {
		if len(in.Shape) == 0 {
			return 0, "", fmt.Errorf("%w: input %q has no batch dimension", inferr.ErrInvalidInput, in.Name)
		}
		if items >= 0 && int(in.Shape[0]) != items {
			return 0, "", fmt.Errorf("%w: input %q has batch dimension %d, another input %d", inferr.ErrInvalidInput, in.Name, in.Shape[0], items)
		}
		items = int(in.Shape[0])
		fmt.Fprintf(&sb, "%s:%s:%v;", in.Name, in.Datatype, in.Shape[1:])
	}
	if items < 1 {
		return 0, "", fmt.Errorf("%w: batch dimension must be at least 1", inferr.ErrInvalidInput)
	}
	sb.WriteString("->")
	sb.WriteString(strings.Join(outputs, ","))
	return items, sb.String(), nil
}

// concat joins the requests' inputs along dimension 0.
func concat(rs []*request) ([]tensor.Tensor, error) {
	out := make([]tensor.Tensor, len(rs[0].inputs))
	for i, first := range rs[0].inputs {
		size := 0
		items := 0
		for _, r := range rs {
			in := r.inputs[i]
			if in.Name != first.Name {
				return nil, fmt.Errorf("batch: input %d is %q in one request and %q in another", i, first.Name, in.Name)
			}
			size += len(in.Data)
			items += int(in.Shape[0])
		}
		data := make([]byte, 0, size)
		for _, r := range rs {
			data = append(data, r.inputs[i].Data...)
		}
		shape := slices.Clone(first.Shape)
		shape[0] = int64(items)
		out[i] = tensor.Tensor{Name: first.Name, Datatype: first.Datatype, Shape: shape, Data: data}
	}
	return out, nil
}

// split cuts each output along dimension 0 back into the requests' parts.
func split(outs []tensor.Tensor, rs []*request) ([][]tensor.Tensor, error) {
	total := 0
	for _, r := range rs {
		total += r.items
	}
	parts := make([][]tensor.Tensor, len(rs))
	for _, o := range outs {
		if len(o.Shape) == 0 || int(o.Shape[0]) != total {
			return nil, fmt.Errorf("batch: output %q has shape %v, want %d items first", o.Name, o.Shape, total)
		}
		var offs []int // byte offset of each item, plus the end
		if o.Datatype == tensor.Bytes {
			els, err := tensor.BytesElements(o.Data)
			if err != nil {
				return nil, fmt.Errorf("batch: output %q: %w", o.Name, err)
			}
			per := 0
			if total > 0 {
				per = len(els) / total
			}
			if per*total != len(els) {
				return nil, fmt.Errorf("batch: output %q has %d elements for %d items", o.Name, len(els), total)
			}
			offs = make([]int, 0, total+1)
			pos := 0
			for i := 0; i <= total; i++ {
				offs = append(offs, pos)
				if i < total {
					for _, el := range els[i*per : (i+1)*per] {
						pos += 4 + len(el)
					}
				}
			}
		} else {
			if len(o.Data)%total != 0 {
				return nil, fmt.Errorf("batch: output %q has %d bytes for %d items", o.Name, len(o.Data), total)
			}
			per := len(o.Data) / total
			offs = make([]int, total+1)
			for i := range offs {
				offs[i] = i * per
			}
		}
		item := 0
		for i, r := range rs {
			shape := slices.Clone(o.Shape)
			shape[0] = int64(r.items)
			parts[i] = append(parts[i], tensor.Tensor{Name: o.Name, Datatype: o.Datatype, Shape: shape, Data: o.Data[offs[item]:offs[item+r.items]:offs[item+r.items]]})
			item += r.items
		}
	}
	return parts, nil
}
