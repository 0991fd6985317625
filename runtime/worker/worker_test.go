package worker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/worker"
)

// echo answers with its inputs renamed to the requested outputs, or fails
// on request: an input named "invalid" is a client error, "fail" a model
// error, "sleep" waits for the context.
type echo struct{ calls sync.WaitGroup }

var errClient = errors.New("client fault")

func (e *echo) Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	for _, in := range inputs {
		switch in.Name {
		case "invalid":
			return nil, fmt.Errorf("%w: input %q is wrong", errClient, in.Name)
		case "fail":
			return nil, errors.New("the model broke")
		case "sleep":
			<-ctx.Done()
			return nil, ctx.Err()
		}
	}
	if t := worker.TimingsFrom(ctx); t != nil {
		t.Preprocess = 1234 * time.Microsecond // as a host that decoded images reports
	}
	out := slices.Clone(inputs)
	for i := range out {
		if i < len(outputs) {
			out[i].Name = outputs[i]
		}
	}
	return out, nil
}

func (e *echo) Metadata() worker.Metadata {
	return worker.Metadata{PID: os.Getpid(), Runtime: "echo", Inputs: []worker.TensorInfo{{Name: "x", Datatype: tensor.FP32, Shape: []int64{-1, 2}}}}
}

func serve(t *testing.T) (path string, stop func()) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "w.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	cfg := worker.ServerConfig{Code: func(err error) worker.Code {
		if errors.Is(err, errClient) {
			return worker.CodeInvalidArgument
		}
		return worker.CodeInternal
	}}
	go func() { done <- worker.Serve(ctx, ln, &echo{}, cfg, slog.New(slog.DiscardHandler)) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("serve: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return path, stop
}

// dial connects a client of maxConns to the worker at path and checks
// that it answers health checks.
func dial(t *testing.T, path string, maxConns int) *worker.Client {
	t.Helper()
	cl := worker.NewClient(path, maxConns)
	t.Cleanup(func() { cl.Close() })
	if err := cl.Health(context.Background()); err != nil {
		t.Fatal(err)
	}
	return cl
}

func TestRoundTrip(t *testing.T) {
	t.Parallel()
	path, _ := serve(t)
	cl := dial(t, path, 4)
	ctx := context.Background()
	md, err := cl.Metadata(ctx)
	if err != nil || md.Runtime != "echo" || md.Inputs[0].Shape[0] != -1 {
		t.Fatalf("metadata %+v, %v", md, err)
	}
	var imgs []byte
	imgs = tensor.AppendBytesElement(imgs, []byte("\xff\xd8 first"))
	imgs = tensor.AppendBytesElement(imgs, nil)
	in := []tensor.Tensor{
		{Name: "a", Datatype: tensor.FP32, Shape: []int64{2, 2}, Data: bytes.Repeat([]byte{1, 2, 3, 4}, 4)},
		{Name: "b", Datatype: tensor.Bytes, Shape: []int64{2}, Data: imgs},
		{Name: "empty", Datatype: tensor.Int64, Shape: []int64{0, 3}},
		{Name: "big", Datatype: tensor.Uint8, Shape: []int64{3 << 20}, Data: bytes.Repeat([]byte{7}, 3<<20)},
	}
	var tm worker.Timings
	out, err := cl.Infer(worker.WithTimings(ctx, &tm), in, []string{"y0", "y1"})
	if err != nil {
		t.Fatal(err)
	}
	if tm.Preprocess != 1234*time.Microsecond {
		t.Errorf("preprocess time %v did not come back from the worker", tm.Preprocess)
	}
	if len(out) != len(in) || out[0].Name != "y0" || out[1].Name != "y1" || out[2].Name != "empty" {
		t.Fatalf("names: %v", out)
	}
	for i := range in {
		if out[i].Datatype != in[i].Datatype || !slices.Equal(out[i].Shape, in[i].Shape) || !bytes.Equal(out[i].Data, in[i].Data) {
			t.Fatalf("tensor %d changed: %+v", i, out[i].Shape)
		}
	}
}

func TestErrorsAndConcurrency(t *testing.T) {
	t.Parallel()
	path, _ := serve(t)
	cl := dial(t, path, 2)
	ctx := context.Background()
	x := tensor.Tensor{Name: "x", Datatype: tensor.FP32, Shape: []int64{1}, Data: []byte{0, 0, 128, 63}}
	_, err := cl.Infer(ctx, []tensor.Tensor{{Name: "invalid", Datatype: tensor.Bool, Shape: []int64{1}, Data: []byte{1}}}, nil)
	var re *worker.RemoteError
	if !errors.As(err, &re) || re.Code != worker.CodeInvalidArgument || !errors.Is(err, inferr.ErrInvalidInput) {
		t.Fatalf("client error: %v", err)
	}
	_, err = cl.Infer(ctx, []tensor.Tensor{{Name: "fail", Datatype: tensor.Bool, Shape: []int64{1}, Data: []byte{1}}}, nil)
	if !errors.As(err, &re) || re.Code != worker.CodeInternal || errors.Is(err, inferr.ErrInvalidInput) {
		t.Fatalf("model error: %v", err)
	}
	// A deadline reaches the worker; the client's context ends the wait too.
	dctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	_, err = cl.Infer(dctx, []tensor.Tensor{{Name: "sleep", Datatype: tensor.Bool, Shape: []int64{1}, Data: []byte{1}}}, nil)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("deadline: %v", err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := cl.Infer(ctx, []tensor.Tensor{x}, []string{"y"})
			if err == nil && (len(out) != 1 || out[0].Name != "y") {
				err = fmt.Errorf("bad answer %+v", out)
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestWorkerGone(t *testing.T) {
	t.Parallel()
	path, stop := serve(t)
	cl := dial(t, path, 2)
	ctx := context.Background()
	stop()
	os.Remove(path)
	if err := cl.Health(ctx); !errors.Is(err, worker.ErrWorkerGone) {
		t.Fatalf("after the server stopped: %v", err)
	}
	_, err := cl.Infer(ctx, []tensor.Tensor{{Name: "x", Datatype: tensor.Bool, Shape: []int64{1}, Data: []byte{1}}}, nil)
	if !errors.Is(err, worker.ErrWorkerGone) {
		t.Fatalf("infer after the server stopped: %v", err)
	}
}

// TestMalformedFrames: garbage on the socket closes that connection only.
func TestMalformedFrames(t *testing.T) {
	t.Parallel()
	path, _ := serve(t)
	for _, junk := range [][]byte{
		{0, 0, 0, 0, 1},                // empty frame
		{255, 255, 255, 255, 1},        // over the limit
		{3, 0, 0, 0, 9, 0, 0},          // unknown kind
		{6, 0, 0, 0, 1, 0, 0, 0, 0, 0}, // truncated infer
		{12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 255, 255}, // name overruns
	} {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(junk)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		var b [16]byte
		if n, err := c.Read(b[:]); err == nil {
			t.Errorf("junk %v got an answer %v", junk, b[:n])
		}
		c.Close()
	}
	dial(t, path, 1) // the server, hurt by junk, would fail this
}

func FuzzServerFrame(f *testing.F) {
	f.Add([]byte{1, 0, 0, 0, 5})
	f.Add([]byte{11, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{40, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 'x', 4, 0, 'F', 'P', '3', '2', 1, 1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0})
	path := filepath.Join(f.TempDir(), "f.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		f.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go worker.Serve(ctx, ln, &echo{}, worker.ServerConfig{MaxFrameBytes: 1 << 20}, slog.New(slog.DiscardHandler))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(data)
		c.(*net.UnixConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		var b [4096]byte
		for {
			if _, err := c.Read(b[:]); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatal("the server neither answered nor closed")
				}
				return
			}
		}
	})
}
