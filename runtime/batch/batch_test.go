package batch

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"math"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// doubler multiplies FP32 input "x" by two into "y" and copies BYTES input
// "s" into "t"; it records the batch sizes it saw and the first value of
// every item, and can be held to let the queue fill.
type doubler struct {
	mu      sync.Mutex
	sizes   []int
	seen    []float32
	hold    chan struct{} // nil: run at once
	entered chan struct{}
}

func (d *doubler) Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	if d.entered != nil {
		d.entered <- struct{}{}
	}
	if d.hold != nil {
		<-d.hold
	}
	var out []tensor.Tensor
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, in := range inputs {
		switch in.Datatype {
		case tensor.FP32:
			d.sizes = append(d.sizes, int(in.Shape[0]))
			o := tensor.Tensor{Name: "y", Datatype: tensor.FP32, Shape: in.Shape, Data: make([]byte, len(in.Data))}
			per := len(in.Data) / int(in.Shape[0])
			for i := 0; i+4 <= len(in.Data); i += 4 {
				v := math.Float32frombits(binary.LittleEndian.Uint32(in.Data[i:]))
				if i%per == 0 {
					d.seen = append(d.seen, v)
				}
				binary.LittleEndian.PutUint32(o.Data[i:], math.Float32bits(2*v))
			}
			out = append(out, o)
		case tensor.Bytes:
			out = append(out, tensor.Tensor{Name: "t", Datatype: tensor.Bytes, Shape: in.Shape, Data: in.Data})
		}
	}
	return out, nil
}

func fp32(vals ...float32) tensor.Tensor {
	t := tensor.Tensor{Name: "x", Datatype: tensor.FP32, Shape: []int64{int64(len(vals)) / 2, 2}}
	for _, v := range vals {
		t.Data = binary.LittleEndian.AppendUint32(t.Data, math.Float32bits(v))
	}
	return t
}

func values(t *testing.T, ts tensor.Tensor) []float32 {
	t.Helper()
	var out []float32
	for i := 0; i < len(ts.Data); i += 4 {
		out = append(out, math.Float32frombits(binary.LittleEndian.Uint32(ts.Data[i:])))
	}
	return out
}

func start(t *testing.T, cfg Config, r Runner) *Batcher {
	t.Helper()
	b, err := New(cfg, r, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = b.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return b
}

type reply struct {
	out []tensor.Tensor
	err error
}

func send(b *Batcher, ctx context.Context, in ...tensor.Tensor) chan reply {
	ch := make(chan reply, 1)
	go func() {
		out, err := b.Infer(ctx, in, []string{"y"})
		ch <- reply{out, err}
	}()
	return ch
}

func waitQueue(t *testing.T, b *Batcher, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for b.QueueLen() != n {
		if time.Now().After(deadline) {
			t.Fatalf("queue length %d, want %d", b.QueueLen(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	for _, c := range []Config{
		{MaxBatchSize: -1, MaxQueueSize: 1, Concurrency: 1},
		{MaxBatchSize: 4, MaxQueueSize: 0, Concurrency: 1},
		{MaxBatchSize: 4, MaxQueueSize: 1, Concurrency: 0},
		{MaxBatchSize: 4, MaxQueueSize: 1, Concurrency: 1, PreferredBatchSizes: []int{5}},
		{MaxBatchSize: 4, MaxQueueSize: 1, Concurrency: 1, MaxQueueDelay: -1},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v: no error", c)
		}
	}
}

func TestBatchesWhileBusyAndSplits(t *testing.T) {
	t.Parallel()
	d := &doubler{hold: make(chan struct{}), entered: make(chan struct{}, 16)}
	b := start(t, Config{MaxBatchSize: 8, MaxQueueSize: 16, Concurrency: 1}, d)
	ctx := context.Background()
	first := send(b, ctx, fp32(100, 100))
	<-d.entered // the only instance is busy now
	var replies []chan reply
	for i := range 8 {
		replies = append(replies, send(b, ctx, fp32(float32(i), float32(i)+0.5)))
	}
	waitQueue(t, b, 8)
	close(d.hold)
	if r := <-first; r.err != nil {
		t.Fatal(r.err)
	}
	for i, ch := range replies {
		r := <-ch
		if r.err != nil {
			t.Fatal(r.err)
		}
		got := values(t, r.out[0])
		if len(got) != 2 || got[0] != 2*float32(i) || got[1] != 2*float32(i)+1 || r.out[0].Shape[0] != 1 {
			t.Errorf("request %d: got %v shape %v", i, got, r.out[0].Shape)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.sizes) != 2 || d.sizes[0] != 1 || d.sizes[1] != 8 {
		t.Errorf("batch sizes = %v, want [1 8]", d.sizes)
	}
}

func TestPreferredSizeDispatchesWithoutDelay(t *testing.T) {
	t.Parallel()
	d := &doubler{hold: make(chan struct{}), entered: make(chan struct{}, 16)}
	b := start(t, Config{MaxBatchSize: 8, MaxQueueDelay: time.Hour, PreferredBatchSizes: []int{3}, MaxQueueSize: 16, Concurrency: 1}, d)
	close(d.hold)
	var replies []chan reply
	for i := range 3 {
		// Two items in one request and one in another make 3 too.
		if i == 0 {
			replies = append(replies, send(b, context.Background(), fp32(1, 1, 2, 2)))
			continue
		}
		if i == 1 {
			replies = append(replies, send(b, context.Background(), fp32(3, 3)))
		}
	}
	for _, ch := range replies {
		select {
		case r := <-ch:
			if r.err != nil {
				t.Fatal(r.err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("preferred batch size was not dispatched without waiting out the delay")
		}
	}
}

func TestMaxQueueDelayDispatchesPartialBatch(t *testing.T) {
	t.Parallel()
	d := &doubler{}
	b := start(t, Config{MaxBatchSize: 8, MaxQueueDelay: 30 * time.Millisecond, MaxQueueSize: 16, Concurrency: 1}, d)
	t0 := time.Now()
	r := <-send(b, context.Background(), fp32(1, 2))
	if r.err != nil {
		t.Fatal(r.err)
	}
	if el := time.Since(t0); el < 30*time.Millisecond {
		t.Errorf("dispatched after %s, before the 30ms queue delay", el)
	}
}

func TestQueueFullRetryAfter(t *testing.T) {
	t.Parallel()
	d := &doubler{hold: make(chan struct{}), entered: make(chan struct{}, 16)}
	b := start(t, Config{MaxBatchSize: 1, MaxQueueSize: 2, Concurrency: 1, RetryAfter: 3 * time.Second}, d)
	first := send(b, context.Background(), fp32(1, 1))
	<-d.entered
	q1 := send(b, context.Background(), fp32(2, 2))
	q2 := send(b, context.Background(), fp32(3, 3))
	waitQueue(t, b, 2)
	_, err := b.Infer(context.Background(), []tensor.Tensor{fp32(4, 4)}, nil)
	var ra *inferr.RetryAfter
	if !errors.As(err, &ra) || !errors.Is(err, inferr.ErrUnavailable) || ra.After != 3*time.Second {
		t.Fatalf("err = %v, want RetryAfter 3s", err)
	}
	close(d.hold)
	for _, ch := range []chan reply{first, q1, q2} {
		if r := <-ch; r.err != nil {
			t.Fatal(r.err)
		}
	}
}

func TestExpiredRequestNeverReachesRunner(t *testing.T) {
	t.Parallel()
	d := &doubler{hold: make(chan struct{}), entered: make(chan struct{}, 16)}
	b := start(t, Config{MaxBatchSize: 4, MaxQueueSize: 8, Concurrency: 1, DefaultTimeout: 40 * time.Millisecond}, d)
	first := send(b, context.Background(), fp32(1, 1))
	<-d.entered
	// One request with its own short deadline, one with the default timeout.
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	expired := send(b, short, fp32(666, 666))
	defaulted := send(b, context.Background(), fp32(777, 777))
	for _, ch := range []chan reply{expired, defaulted} {
		if r := <-ch; !errors.Is(r.err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want deadline exceeded", r.err)
		}
	}
	live := send(b, context.Background(), fp32(5, 5))
	close(d.hold)
	for _, ch := range []chan reply{first, live} {
		if r := <-ch; r.err != nil {
			t.Fatal(r.err)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, v := range d.seen {
		if v == 666 || v == 777 {
			t.Fatalf("expired request reached the runner: seen %v", d.seen)
		}
	}
}

func TestBytesAndMismatchedShapesBatchApart(t *testing.T) {
	t.Parallel()
	d := &doubler{hold: make(chan struct{}), entered: make(chan struct{}, 16)}
	b := start(t, Config{MaxBatchSize: 8, MaxQueueDelay: 20 * time.Millisecond, MaxQueueSize: 16, Concurrency: 1}, d)
	first := send(b, context.Background(), fp32(0, 0))
	<-d.entered
	mk := func(els ...string) tensor.Tensor {
		t := tensor.Tensor{Name: "s", Datatype: tensor.Bytes, Shape: []int64{int64(len(els))}}
		for _, e := range els {
			t.Data = tensor.AppendBytesElement(t.Data, []byte(e))
		}
		return t
	}
	a := send(b, context.Background(), mk("a", "bb"))
	c := send(b, context.Background(), mk("ccc"))
	wide := tensor.Tensor{Name: "x", Datatype: tensor.FP32, Shape: []int64{1, 1}, Data: make([]byte, 4)}
	w := send(b, context.Background(), wide)
	waitQueue(t, b, 3)
	close(d.hold)
	<-first
	ra, rc, rw := <-a, <-c, <-w
	if ra.err != nil || rc.err != nil || rw.err != nil {
		t.Fatal(ra.err, rc.err, rw.err)
	}
	els, _ := tensor.BytesElements(ra.out[0].Data)
	if len(els) != 2 || string(els[0]) != "a" || string(els[1]) != "bb" || ra.out[0].Shape[0] != 2 {
		t.Errorf("a: %q %v", els, ra.out[0].Shape)
	}
	els, _ = tensor.BytesElements(rc.out[0].Data)
	if len(els) != 1 || string(els[0]) != "ccc" {
		t.Errorf("c: %q", els)
	}
	if rw.out[0].Shape[1] != 1 {
		t.Errorf("w: shape %v", rw.out[0].Shape)
	}
}

func TestCallerGivesUpAndStopFailsQueued(t *testing.T) {
	t.Parallel()
	d := &doubler{hold: make(chan struct{}), entered: make(chan struct{}, 16)}
	b, err := New(Config{MaxBatchSize: 1, MaxQueueSize: 8, Concurrency: 1}, d, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = b.Run(ctx); close(done) }()
	first := send(b, context.Background(), fp32(1, 1))
	<-d.entered
	gone, cancel := context.WithCancel(context.Background())
	g := send(b, gone, fp32(2, 2))
	queued := send(b, context.Background(), fp32(3, 3))
	waitQueue(t, b, 2)
	cancel()
	if r := <-g; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("cancelled caller: %v", r.err)
	}
	stop()
	if r := <-queued; !errors.Is(r.err, ErrClosed) {
		t.Fatalf("queued at stop: %v", r.err)
	}
	close(d.hold)
	<-done
	if r := <-first; r.err != nil {
		t.Fatal(r.err)
	}
	if _, err := b.Infer(context.Background(), []tensor.Tensor{fp32(1, 1)}, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("after stop: %v", err)
	}
}

func TestTooManyItems(t *testing.T) {
	t.Parallel()
	b := start(t, Config{MaxBatchSize: 2, MaxQueueSize: 8, Concurrency: 1}, &doubler{})
	_, err := b.Infer(context.Background(), []tensor.Tensor{fp32(1, 1, 2, 2, 3, 3)}, nil)
	if !errors.Is(err, inferr.ErrInvalidInput) {
		t.Fatalf("err = %v", err)
	}
}

func TestPassThroughDeadlineNeverReachesRunner(t *testing.T) {
	t.Parallel()
	d := &doubler{hold: make(chan struct{}), entered: make(chan struct{}, 16)}
	b := start(t, Config{MaxBatchSize: 1, MaxQueueSize: 8, Concurrency: 1}, d)
	first := send(b, context.Background(), fp32(1, 1))
	<-d.entered
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if r := <-send(b, short, fp32(666, 666)); !errors.Is(r.err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", r.err)
	}
	close(d.hold)
	if r := <-first; r.err != nil {
		t.Fatal(r.err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if slices.Contains(d.seen, 666) {
		t.Fatalf("expired request reached the runner: %v", d.seen)
	}
}
