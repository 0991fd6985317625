package supervisor_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/visionslice/visionslice/nodeagent/cgroup"
	"github.com/visionslice/visionslice/nodeagent/cgroup/cgrouptest"
	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/onnxgen"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/supervisor"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/workertest"
)

// workerBin is the visionslice-worker built for these tests.
var workerBin string

func TestMain(m *testing.M) { os.Exit(workertest.Main(m, "runtime/supervisor", &workerBin)) }

func config(t testing.TB) supervisor.Config {
	t.Helper()
	c := workertest.Config(t, workerBin)
	c.StartTimeout = 30 * time.Second
	c.HealthInterval = 100 * time.Millisecond
	c.HealthTimeout = time.Second
	c.HealthFailures = 2
	c.BackoffInitial = 20 * time.Millisecond
	c.BackoffMax = 500 * time.Millisecond
	c.StopGrace = 2 * time.Second
	return c
}

func logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

func writeModel(t testing.TB, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "model.onnx")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// specOf is a valid model config of one FP32 input x and output y.
func specOf(instances int, dims ...int64) *repository.Config {
	c := &repository.Config{Version: "v1", Instances: instances, IntraOpThreads: 1,
		Inputs:  []repository.TensorSpec{{Name: "x", Datatype: tensor.FP32, Dims: dims}},
		Outputs: []repository.TensorSpec{{Name: "y", Datatype: tensor.FP32, Dims: dims}}}
	c.SetDefaults()
	if err := c.Validate(); err != nil {
		panic(err)
	}
	return c
}

func start(t testing.TB, cfg supervisor.Config, m supervisor.Model, groups supervisor.Groups, hooks supervisor.Hooks) *supervisor.Pool {
	t.Helper()
	p, err := supervisor.New(cfg, m, groups, hooks, logger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// alive reports whether a process with this PID exists (and is not a zombie
// of ours: the supervisor reaps).
func alive(pid int) bool {
	return syscall.Kill(pid, 0) == nil
}

func requireGone(t *testing.T, pids []int) {
	t.Helper()
	for _, pid := range pids {
		if alive(pid) {
			t.Errorf("worker %d still runs after Close", pid)
		}
	}
}

func TestStartInferClose(t *testing.T) {
	cfg := config(t)
	goroutines := runtime.NumGoroutine()
	model := writeModel(t, must(onnxgen.Binary("Add", tensor.FP32, []int64{onnxgen.Dynamic, 2})))
	spec := &repository.Config{Version: "v1", MaxBatchSize: 8, Instances: 2, IntraOpThreads: 1,
		Inputs:  []repository.TensorSpec{{Name: "a", Datatype: tensor.FP32, Dims: []int64{2}}, {Name: "b", Datatype: tensor.FP32, Dims: []int64{2}}},
		Outputs: []repository.TensorSpec{{Name: "c", Datatype: tensor.FP32, Dims: []int64{2}}}}
	spec.SetDefaults()
	p := start(t, cfg, supervisor.Model{Name: "add/1", ModelPath: model, Spec: spec}, nil, supervisor.Hooks{})
	if !p.Ready() {
		t.Fatal("not ready after Start")
	}
	pids := p.PIDs()
	if len(pids) != 2 || pids[0] == pids[1] {
		t.Fatalf("PIDs = %v, want two workers", pids)
	}
	md := p.Metadata()
	if len(md.Inputs) != 2 || md.Inputs[0].Name != "a" || !slices.Equal(md.Inputs[0].Shape, []int64{-1, 2}) || md.Outputs[0].Name != "c" {
		t.Fatalf("metadata %+v", md)
	}
	ctx := context.Background()
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x := float32(i)
			out, err := p.Infer(ctx, []tensor.Tensor{onnxgen.FP32("a", []int64{2, 2}, x, 1, 2, 3), onnxgen.FP32("b", []int64{2, 2}, 10, 10, 10, x)}, nil)
			if err != nil {
				t.Error(err)
				return
			}
			if got := onnxgen.Float32s(out[0]); !slices.Equal(got, []float32{x + 10, 11, 12, 3 + x}) || !slices.Equal(out[0].Shape, []int64{2, 2}) {
				t.Errorf("c = %v %v", got, out[0].Shape)
			}
		}()
	}
	wg.Wait()
	// A client error comes back as such and does not restart anything.
	_, err := p.Infer(ctx, []tensor.Tensor{onnxgen.FP32("a", []int64{1, 3}, 1, 2, 3), onnxgen.FP32("b", []int64{1, 3}, 1, 2, 3)}, nil)
	if !errors.Is(err, inferr.ErrInvalidInput) {
		t.Fatalf("wrong shape: %v", err)
	}
	t.Log(err)
	if r := p.Restarts(); len(r) != 0 {
		t.Fatalf("restarts %v", r)
	}
	p.Close()
	requireGone(t, pids)
	if entries, _ := os.ReadDir(cfg.SocketDir); len(entries) != 0 {
		t.Fatalf("socket dir left: %v", entries)
	}
	for deadline := time.Now().Add(5 * time.Second); runtime.NumGoroutine() > goroutines; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines before Start, %d after Close:\n%s", goroutines, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
	}
	if _, err := p.Infer(ctx, []tensor.Tensor{onnxgen.FP32("a", []int64{1, 2}, 1, 2)}, nil); !errors.Is(err, inferr.ErrUnavailable) {
		t.Fatalf("after Close: %v", err)
	}
}

func TestStartFailureLeavesNothing(t *testing.T) {
	cfg := config(t)
	bad := filepath.Join(t.TempDir(), "model.onnx")
	os.WriteFile(bad, []byte("this is not an onnx model"), 0o644)
	p, err := supervisor.New(cfg, supervisor.Model{Name: "bad/1", ModelPath: bad, Spec: specOf(2, 1)}, nil, supervisor.Hooks{}, logger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	err = p.Start(context.Background())
	if !errors.Is(err, supervisor.ErrStartFailed) || !strings.Contains(err.Error(), "load model") {
		t.Fatalf("err = %v, want ErrStartFailed naming the load error", err)
	}
	t.Log(err)
	if entries, _ := os.ReadDir(cfg.SocketDir); len(entries) != 0 {
		t.Fatalf("left behind: %v", entries)
	}
	if p.Ready() || len(p.PIDs()) != 0 {
		t.Fatal("a failed pool reports workers")
	}
}

// slowModel multiplies x [n, d, d] by itself k times: with x the identity
// the answer is the identity, and it takes long enough to kill mid-way.
func slowModel(k int) ([]byte, error) {
	g := onnxgen.Graph{
		Inputs:  []onnxgen.Value{{Name: "x", Datatype: tensor.FP32, Shape: []int64{onnxgen.Dynamic, 512, 512}}},
		Outputs: []onnxgen.Value{{Name: "y", Datatype: tensor.FP32, Shape: []int64{onnxgen.Dynamic, 512, 512}}},
	}
	prev := "x"
	for i := 0; i < k; i++ {
		out := fmt.Sprintf("m%d", i)
		if i == k-1 {
			out = "y"
		}
		g.Nodes = append(g.Nodes, onnxgen.Node{Op: "MatMul", Inputs: []string{prev, "x"}, Outputs: []string{out}})
		prev = out
	}
	m := onnxgen.Model{Graph: g}
	return m.Marshal()
}

func identity512(n int) tensor.Tensor {
	v := make([]float32, n*512*512)
	for b := 0; b < n; b++ {
		for i := 0; i < 512; i++ {
			v[b*512*512+i*512+i] = 1
		}
	}
	return onnxgen.FP32("x", []int64{int64(n), 512, 512}, v...)
}

func TestWorkerKilledMidRequestIsRetried(t *testing.T) {
	cfg := config(t)
	model := writeModel(t, must(slowModel(40)))
	var mu sync.Mutex
	reasons := map[string]int{}
	spec := specOf(1, 1, 512, 512)
	p := start(t, cfg, supervisor.Model{Name: "slow/1", ModelPath: model, Spec: spec}, nil, supervisor.Hooks{
		OnRestart: func(r string) { mu.Lock(); reasons[r]++; mu.Unlock() },
	})
	first := p.PIDs()
	in := identity512(1)
	// How long one request takes, so the kill lands in the middle of one.
	t0 := time.Now()
	if _, err := p.Infer(context.Background(), []tensor.Tensor{in}, nil); err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	t.Logf("one request takes %s", took)
	if took < 40*time.Millisecond {
		t.Skipf("the slow model runs in %s here, too fast to kill mid-request reliably", took)
	}
	done := make(chan error, 1)
	var out []tensor.Tensor
	go func() {
		var err error
		out, err = p.Infer(context.Background(), []tensor.Tensor{in}, nil)
		done <- err
	}()
	time.Sleep(took / 3)
	if err := syscall.Kill(first[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the request was lost: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the request never finished")
	}
	if y := onnxgen.Float32s(out[0]); y[0] != 1 || y[1] != 0 || y[513] != 1 || len(y) != 512*512 {
		t.Fatal("wrong answer after the retry")
	}
	now := p.PIDs()
	if len(now) != 1 || now[0] == first[0] {
		t.Fatalf("PIDs %v after killing %v", now, first)
	}
	mu.Lock()
	got := reasons[supervisor.ReasonKilled]
	mu.Unlock()
	if got != 1 || p.Restarts()[supervisor.ReasonKilled] != 1 {
		t.Fatalf("restarts %v, hook saw %v", p.Restarts(), reasons)
	}
	if alive(first[0]) {
		t.Fatalf("killed worker %d not reaped", first[0])
	}
	p.Close()
	requireGone(t, now)
}

func TestHealthFailureRestarts(t *testing.T) {
	cfg := config(t)
	model := writeModel(t, must(onnxgen.Unary("Identity", tensor.FP32, []int64{onnxgen.Dynamic})))
	p := start(t, cfg, supervisor.Model{Name: "id/1", ModelPath: model, Spec: specOf(1, 2)}, nil, supervisor.Hooks{})
	first := p.PIDs()[0]
	// A stopped process keeps its socket open but answers nothing.
	if err := syscall.Kill(first, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	for !stopped(first) {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// This request goes to the stopped worker, loses it when the health
	// checks replace it, and is answered by the replacement.
	out, err := p.Infer(ctx, []tensor.Tensor{onnxgen.FP32("x", []int64{2}, 4, 5)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(onnxgen.Float32s(out[0]), []float32{4, 5}) {
		t.Fatalf("y = %v", onnxgen.Float32s(out[0]))
	}
	in := p.Instances()[0]
	if p.Restarts()[supervisor.ReasonHealth] != 1 || in.Generation != 2 || in.PID == first || alive(first) {
		t.Fatalf("restarts %v, instance %+v (first %d alive %v)", p.Restarts(), in, first, alive(first))
	}
}

// stopped reports whether the process is in the stopped state.
func stopped(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] == 'T'
}

func TestReplaceAndCgroups(t *testing.T) {
	cfg := config(t)
	m := cgrouptest.Manager(t)
	groups, err := supervisor.CgroupGroups(m, cgroup.Limits{PidsMax: 512, MemoryMaxBytes: 2 << 30}, logger(t))
	if err != nil {
		t.Fatal(err)
	}
	model := writeModel(t, must(onnxgen.Unary("Identity", tensor.FP32, []int64{onnxgen.Dynamic})))
	p := start(t, cfg, supervisor.Model{Name: "id/1", ModelPath: model, Spec: specOf(2, 1)}, groups, supervisor.Hooks{})
	before := p.Instances()
	for _, in := range before {
		if in.CgroupPath == "" || !in.Ready {
			t.Fatalf("instance %+v has no cgroup", in)
		}
		procs, err := os.ReadFile(filepath.Join(in.CgroupPath, "cgroup.procs"))
		if err != nil || strings.TrimSpace(string(procs)) != fmt.Sprint(in.PID) {
			t.Fatalf("cgroup %s holds %q, want worker %d (%v)", in.CgroupPath, procs, in.PID, err)
		}
	}
	if err := p.Replace(0, "test"); err != nil {
		t.Fatal(err)
	}
	// Instance 1 keeps serving while 0 is replaced.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		if _, err := p.Infer(ctx, []tensor.Tensor{onnxgen.FP32("x", []int64{1}, 1)}, nil); err != nil {
			t.Fatal(err)
		}
		after := p.Instances()
		if after[0].Ready && after[0].Generation == 2 {
			if after[0].PID == before[0].PID || after[0].CgroupPath == before[0].CgroupPath || after[1].PID != before[1].PID {
				t.Fatalf("before %+v after %+v", before, after)
			}
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := os.Stat(before[0].CgroupPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("old cgroup %s not removed: %v", before[0].CgroupPath, err)
	}
	if p.Restarts()[supervisor.ReasonReplaced] != 1 {
		t.Fatalf("restarts %v", p.Restarts())
	}
	last := p.Instances()
	p.Close()
	for _, in := range last {
		if _, err := os.Stat(in.CgroupPath); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left after Close", in.CgroupPath)
		}
		if alive(in.PID) {
			t.Errorf("worker %d left after Close", in.PID)
		}
	}
}
