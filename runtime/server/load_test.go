package server

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
	pb "github.com/visionslice/visionslice/runtime/oip/inferencepb"
	"github.com/visionslice/visionslice/runtime/workertest"
)

// TestGPUMemoryPerModelWorker: the simulated GPUs report memory for the
// workers' PIDs; the metric sums it per model version and GPU.
func TestGPUMemoryPerModelWorker(t *testing.T) {
	gpus, err := sim.New("h100x2", t.Name())
	if err != nil {
		t.Fatal(err)
	}
	reader := gpu.NewReader(gpus.Interface(), workertest.Logger())
	if err := reader.Init(); err != nil {
		t.Fatal(err)
	}
	defer reader.Shutdown()
	poller := gpu.NewPoller(reader, 20*time.Millisecond, workertest.Logger())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go poller.Run(ctx)

	r := startServer(t, tinyRepo(t, strings.Replace(addConfig, "intra_op_threads: 1", "intra_op_threads: 1\ninstances: 2", 1)), Deps{GPUs: poller})
	pids := r.srv.lookup("add", "").poolOrNil().PIDs()
	if len(pids) != 2 {
		t.Fatalf("PIDs %v", pids)
	}
	if err := gpus.SetProcess(1, uint32(pids[0]), 300<<20, gpu.ProcessCompute); err != nil {
		t.Fatal(err)
	}
	if err := gpus.SetProcess(1, uint32(pids[1]), 200<<20, gpu.ProcessCompute); err != nil {
		t.Fatal(err)
	}
	if err := gpus.SetProcess(0, 999999, 1<<30, gpu.ProcessCompute); err != nil { // not ours
		t.Fatal(err)
	}
	want := fmt.Sprintf(`
# HELP visionslice_model_worker_gpu_memory_used_bytes GPU memory used by a model version's worker processes, per GPU, in bytes.
# TYPE visionslice_model_worker_gpu_memory_used_bytes gauge
visionslice_model_worker_gpu_memory_used_bytes{gpu_uuid=%q,model="add",version="2"} %d
`, gpus.UUID(1), 500<<20)
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := testutil.GatherAndCompare(r.reg, strings.NewReader(want), MetricWorkerGPUMemory)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// slowRepo lays out "slow": n chained Adds over 256k floats (milliseconds
// per call), one instance, extra appended to its config.
func slowRepo(t testing.TB, n int, extra string) string {
	t.Helper()
	model := chainModel(t, n, 262144)
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "slow", "config.yaml"), []byte(`version: v1
max_batch_size: 1
intra_op_threads: 1
inputs: [{name: x, datatype: FP32, dims: [262144]}]
outputs: [{name: y, datatype: FP32, dims: [262144]}]
`+extra))
	writeFile(t, filepath.Join(root, "slow", "1", "model.onnx"), model)
	return root
}

// TestQueueFullAndDeadlines: a slow model, one instance, a queue of two:
// a burst gets 503 + Retry-After over HTTP and Unavailable over gRPC for
// what does not fit, every other request succeeds, and a request whose
// deadline passes in the queue gets 504 / DeadlineExceeded.
func TestQueueFullAndDeadlines(t *testing.T) {
	r := startServer(t, slowRepo(t, 40, "dynamic_batching: {max_queue_size: 2}\n"), Deps{})
	x := make([]byte, 4*262144)
	req := &pb.ModelInferRequest{ModelName: "slow", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 262144}}},
		RawInputContents: [][]byte{x}}

	var mu sync.Mutex
	got := map[string]int{}
	var wg sync.WaitGroup
	for i := 0; i < 12; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := r.grpc.ModelInfer(context.Background(), req)
			mu.Lock()
			defer mu.Unlock()
			got["grpc "+status.Code(err).String()]++
		}()
	}
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			hdr := "{\"inputs\":[{\"name\":\"x\",\"shape\":[1,262144],\"datatype\":\"FP32\",\"parameters\":{\"binary_data_size\":1048576}}]," +
				"\"outputs\":[{\"name\":\"y\",\"parameters\":{\"binary_data\":true}}]}"
			resp, _ := post(t, r.http+"/v2/models/slow/infer", "application/octet-stream", append([]byte(hdr), x...),
				"Inference-Header-Content-Length", fmt.Sprint(len(hdr)))
			mu.Lock()
			defer mu.Unlock()
			key := fmt.Sprintf("http %d", resp.StatusCode)
			if resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get("Retry-After") == "" {
				key += " without Retry-After"
			}
			got[key]++
		}()
	}
	wg.Wait()
	t.Logf("burst of 18 on a queue of 2: %v", got)
	if got["grpc Unavailable"] == 0 || got["http 503"] == 0 || got["http 200"]+got["grpc OK"] < 3 {
		t.Fatalf("results %v: want some served and some rejected with 503 / Unavailable", got)
	}
	for k := range got {
		if k != "grpc OK" && k != "grpc Unavailable" && k != "http 200" && k != "http 503" {
			t.Fatalf("unexpected result %q", k)
		}
	}

	// A deadline shorter than the work ahead of it in the queue.
	hold := make(chan struct{})
	go func() { // keep the instance busy
		defer close(hold)
		_, _ = r.grpc.ModelInfer(context.Background(), req)
	}()
	time.Sleep(5 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Millisecond)
	defer cancel()
	if _, err := r.grpc.ModelInfer(ctx, req); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("short deadline: %v", err)
	}
	<-hold
	if n := testutil.ToFloat64(r.srv.metrics.requests.WithLabelValues("slow", "1", "unavailable")); n != float64(got["grpc Unavailable"]+got["http 503"]) {
		t.Errorf("unavailable count %v, rejected %d", n, got["grpc Unavailable"]+got["http 503"])
	}
}

// TestWorkerRestartCounted: a killed worker is restarted by the supervisor,
// requests keep being served, and the restart shows in the metrics with its
// reason.
func TestWorkerRestartCounted(t *testing.T) {
	r := startServer(t, tinyRepo(t, addConfig), Deps{})
	pool := r.srv.lookup("add", "").poolOrNil()
	pids := pool.PIDs()
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	req := &pb.ModelInferRequest{ModelName: "add",
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "a", Datatype: "FP32", Shape: []int64{1, 4}}, {Name: "b", Datatype: "FP32", Shape: []int64{1, 4}}},
		RawInputContents: [][]byte{make([]byte, 16), make([]byte, 16)}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := r.grpc.ModelInfer(ctx, req); err != nil {
		t.Fatalf("request after the kill: %v", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, _ := testutil.GatherAndCount(r.reg, MetricWorkerRestarts)
		if c == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("restart not counted (%d series)", c)
		}
		time.Sleep(20 * time.Millisecond)
	}
	want := `
# HELP visionslice_model_worker_restarts_total Model worker restarts, by the reason the previous worker ended (exited, killed, health, start_failed, replaced).
# TYPE visionslice_model_worker_restarts_total counter
visionslice_model_worker_restarts_total{model="add",reason="killed",version="2"} 1
`
	if err := testutil.GatherAndCompare(r.reg, strings.NewReader(want), MetricWorkerRestarts); err != nil {
		t.Fatal(err)
	}
	if problems, err := testutil.CollectAndLint(r.reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
}

// TestShutdownDrainsAndCleansUp: a request in flight when the runtime is
// told to stop still gets its answer; then no worker process and no socket
// are left.
func TestShutdownDrainsAndCleansUp(t *testing.T) {
	r := startServer(t, slowRepo(t, 60, ""), Deps{})
	pids := r.srv.lookup("slow", "").poolOrNil().PIDs()
	req := &pb.ModelInferRequest{ModelName: "slow", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 262144}}},
		RawInputContents: [][]byte{make([]byte, 4*262144)}}
	res := make(chan error, 1)
	go func() {
		_, err := r.grpc.ModelInfer(context.Background(), req)
		res <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	queued := func() uint64 {
		var m dto.Metric
		_ = r.srv.metrics.queue.WithLabelValues("slow", "1").(prometheus.Metric).Write(&m)
		return m.GetHistogram().GetSampleCount()
	}
	for queued() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond) // until the request reached the worker
	}
	if err := r.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := <-res; err != nil {
		t.Fatalf("request in flight at shutdown: %v", err)
	}
	for _, pid := range pids {
		if syscall.Kill(pid, 0) == nil {
			t.Errorf("worker %d still runs after shutdown", pid)
		}
	}
	if _, err := os.Stat(r.srv.GRPCAddr()); !os.IsNotExist(err) {
		t.Errorf("grpc socket left: %v", err)
	}
}
