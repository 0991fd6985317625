package server

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/visionslice/visionslice/runtime/oip/inferencepb"
	"github.com/visionslice/visionslice/runtime/onnxgen"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/supervisor"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/workertest"
)

// workerBin is visionslice-worker built for these tests ("" when ONNX
// Runtime is not installed).
var workerBin string

func TestMain(m *testing.M) { os.Exit(workertest.Main(m, "runtime/server", &workerBin)) }

func workersConfig(t testing.TB) supervisor.Config {
	t.Helper()
	return workertest.Config(t, workerBin)
}

func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

const addConfig = `version: v1
max_batch_size: 8
inputs:
  - {name: a, datatype: FP32, dims: [4]}
  - {name: b, datatype: FP32, dims: [4]}
outputs:
  - {name: c, datatype: FP32, dims: [4]}
intra_op_threads: 1
dynamic_batching:
  max_queue_delay: 500us
  max_queue_size: 128
`

// tinyRepo lays out "add" (c = a + b, batching) in two versions and a
// "broken" model whose config has an unknown key.
func tinyRepo(t testing.TB, addCfg string) string {
	t.Helper()
	root := t.TempDir()
	model, err := onnxgen.Binary("Add", tensor.FP32, []int64{onnxgen.Dynamic, 4})
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(root, "add", "config.yaml"), []byte(addCfg))
	writeFile(t, filepath.Join(root, "add", "1", "model.onnx"), model)
	writeFile(t, filepath.Join(root, "add", "2", "model.onnx"), model)
	writeFile(t, filepath.Join(root, "broken", "config.yaml"), []byte(addConfig+"colour: red\n"))
	writeFile(t, filepath.Join(root, "broken", "1", "model.onnx"), model)
	return root
}

type running struct {
	srv  *Server
	reg  *prometheus.Registry
	http string
	grpc pb.GRPCInferenceServiceClient
	// stop ends Run and returns its error (once; later calls return nil).
	stop func() error
}

func startServer(t testing.TB, repo string, deps Deps) *running {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Enabled = true
	cfg.Repository = repo
	cfg.HTTPListen = "127.0.0.1:0"
	cfg.GRPCListen = "unix://" + filepath.Join(t.TempDir(), "grpc.sock")
	cfg.Workers = workersConfig(t)
	reg := prometheus.NewRegistry()
	deps.Registerer = reg
	srv, err := New(cfg, deps, workertest.Logger())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	var once sync.Once
	stop := func() (err error) {
		once.Do(func() {
			cancel()
			err = <-done
		})
		return err
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	select {
	case <-srv.Listening():
	case err := <-done:
		t.Fatal(err)
	}
	<-srv.Loaded()
	conn, err := grpc.NewClient("unix://"+srv.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &running{srv: srv, reg: reg, http: "http://" + srv.HTTPAddr(), grpc: pb.NewGRPCInferenceServiceClient(conn), stop: stop}
}

func post(t testing.TB, url, ctype string, body []byte, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
	req.Header.Set("Content-Type", ctype)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func TestServeTinyModelWithWorkers(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	r := startServer(t, tinyRepo(t, addConfig), Deps{TracerProvider: tp, Version: "test"})

	// Readiness: "broken" never loads, so the server is not ready, "add" is.
	resp, err := http.Get(r.http + "/v2/health/ready")
	if err != nil || resp.StatusCode != 503 {
		t.Fatalf("server ready: %v %v", resp.StatusCode, err)
	}
	for _, path := range []string{"/v2/models/add/ready", "/v2/models/add/versions/2/ready"} {
		if resp, err := http.Get(r.http + path); err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", path, resp.StatusCode, err)
		}
	}
	resp, b := post(t, r.http+"/v2/models/broken/infer", "application/json", []byte(`{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":[1]}]}`))
	if resp.StatusCode != 503 || !strings.Contains(string(b), "field colour not found") {
		t.Fatalf("broken model: %d %s", resp.StatusCode, b)
	}

	// Metadata comes from the repository config; "latest" serves version 2 only.
	mresp, err := http.Get(r.http + "/v2/models/add")
	if err != nil {
		t.Fatal(err)
	}
	var md struct {
		Versions []string
		Inputs   []struct{ Shape []int64 }
	}
	_ = json.NewDecoder(mresp.Body).Decode(&md)
	mresp.Body.Close()
	if !slices.Equal(md.Versions, []string{"2"}) || !slices.Equal(md.Inputs[0].Shape, []int64{-1, 4}) {
		t.Fatalf("metadata %+v", md)
	}

	// HTTP JSON with a trace parent.
	body := `{"inputs":[{"name":"a","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]},{"name":"b","shape":[1,4],"datatype":"FP32","data":[10,20,30,40]}]}`
	resp, b = post(t, r.http+"/v2/models/add/infer", "application/json", []byte(body), "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"data":[11,22,33,44]`) || !strings.Contains(string(b), `"model_version":"2"`) {
		t.Fatalf("infer: %d %s", resp.StatusCode, b)
	}
	// gRPC, with a trace parent in the metadata.
	gctx := metadata.AppendToOutgoingContext(context.Background(), "traceparent", "00-1bf7651916cd43dd8448eb211c80319c-a7ad6b7169203331-01")
	g, err := r.grpc.ModelInfer(gctx, &pb.ModelInferRequest{ModelName: "add",
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "a", Datatype: "FP32", Shape: []int64{2, 4}}, {Name: "b", Datatype: "FP32", Shape: []int64{2, 4}}},
		RawInputContents: [][]byte{onnxgen.FP32("a", nil, 1, 1, 1, 1, 2, 2, 2, 2).Data, onnxgen.FP32("b", nil, 1, 2, 3, 4, 5, 6, 7, 8).Data}})
	if err != nil {
		t.Fatal(err)
	}
	if got := onnxgen.Float32s(tensor.Tensor{Data: g.GetRawOutputContents()[0]}); !slices.Equal(got, []float32{2, 3, 4, 5, 7, 8, 9, 10}) {
		t.Fatalf("grpc c = %v", got)
	}
	if _, err := r.grpc.ModelInfer(context.Background(), &pb.ModelInferRequest{ModelName: "add", ModelVersion: "1",
		Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "a", Datatype: "FP32", Shape: []int64{1, 4}}}, RawInputContents: [][]byte{make([]byte, 16)}}); status.Code(err) != codes.NotFound {
		t.Fatalf("unserved version: %v", err)
	}
	if _, err := r.grpc.ModelInfer(context.Background(), &pb.ModelInferRequest{ModelName: "add",
		Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "a", Datatype: "FP32", Shape: []int64{1, 4}}}, RawInputContents: [][]byte{make([]byte, 16)}}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("missing input: %v", err)
	}

	// One trace from the HTTP request through the queue to the worker call.
	byName := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range rec.Ended() {
		if s.SpanContext().TraceID().String() == "0af7651916cd43dd8448eb211c80319c" {
			byName[s.Name()] = s
		}
	}
	for _, name := range []string{"POST /v2/models/{model}/infer", "queue", "batch", "worker.infer"} {
		if _, ok := byName[name]; !ok {
			t.Errorf("no %q span in the request's trace (have %v)", name, keys(byName))
		}
	}
	if w, b := byName["worker.infer"], byName["batch"]; w != nil && b != nil && w.Parent().SpanID() != b.SpanContext().SpanID() {
		t.Error("worker.infer is not a child of batch")
	}
	grpcSpans := map[string]bool{}
	for _, s := range rec.Ended() {
		if s.SpanContext().TraceID().String() == "1bf7651916cd43dd8448eb211c80319c" {
			grpcSpans[s.Name()] = true
		}
	}
	if !grpcSpans["inference.GRPCInferenceService/ModelInfer"] || !grpcSpans["worker.infer"] {
		t.Errorf("grpc trace spans = %v", grpcSpans)
	}

	// Metrics: lint, and the counts of what happened above.
	if problems, err := testutil.CollectAndLint(r.reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	if n := testutil.ToFloat64(r.srv.metrics.requests.WithLabelValues("add", "2", "success")); n != 2 {
		t.Errorf("successes = %v", n)
	}
	if n := testutil.ToFloat64(r.srv.metrics.requests.WithLabelValues("_unknown", "", "not_found")); n != 1 {
		t.Errorf("unknown version requests = %v", n)
	}
	if n := testutil.ToFloat64(r.srv.metrics.requests.WithLabelValues("add", "2", "invalid_input")); n != 1 {
		t.Errorf("invalid requests = %v", n)
	}
	if err := testutil.GatherAndCompare(r.reg, strings.NewReader(`
# HELP visionslice_model_ready 1 when a model version serves, 0 when it is loading or failed.
# TYPE visionslice_model_ready gauge
visionslice_model_ready{model="add",version="2"} 1
`), MetricModelReady); err != nil {
		t.Error(err)
	}
	if c, _ := testutil.GatherAndCount(r.reg, MetricLoadDuration, MetricBatchSize, MetricQueueDuration, MetricComputeDuration); c != 4 {
		t.Errorf("load/batch/queue/compute series = %d, want 4", c)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	c := DefaultConfig()
	if err := c.Validate(); err != nil {
		t.Fatalf("disabled default: %v", err)
	}
	c.Enabled = true
	c.MaxBodyBytes = 10
	c.Tracing.SampleRatio = 2
	err := c.Validate()
	for _, want := range []string{"repository is empty", "maxBodyBytes 10", "sampleRatio 2", "worker binary path is empty"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("err = %v, want %q", err, want)
		}
	}
	if _, err := New(c, Deps{}, workertest.Logger()); err == nil {
		t.Error("New accepted an invalid config")
	}
}

func TestOTLPTracingStartsWithoutCollector(t *testing.T) {
	t.Parallel()
	tr, err := newTracing(TracingConfig{OTLPEndpoint: "127.0.0.1:1", Insecure: true, SampleRatio: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !tr.enabled() {
		t.Fatal("tracing with an endpoint is not enabled")
	}
	_, span := tr.tracer.Start(context.Background(), "x")
	if !span.SpanContext().IsSampled() {
		t.Error("span not sampled")
	}
	span.End()
	start := time.Now()
	tr.shutdown(workertest.Logger())
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("shutdown took %s", d)
	}
	off, _ := newTracing(TracingConfig{})
	if off.enabled() {
		t.Error("tracing without an endpoint is enabled")
	}
}

func TestWorkerDevice(t *testing.T) {
	t.Parallel()
	tests := []struct {
		device  string
		slices  int
		limit   uint64
		wantErr string
	}{
		{device: "", slices: 4, limit: 0},
		{device: "cpu", slices: 4, limit: 0},
		{device: "cuda:0", slices: 4, limit: 4 << 30},
		{device: "cuda:1", slices: 0, limit: 0},
		{device: "cuda:x", wantErr: `runtime.device "cuda:x"`},
		{device: "gpu", wantErr: `runtime.device "gpu"`},
	}
	for _, tc := range tests {
		c := DefaultConfig()
		c.Enabled, c.Repository = true, t.TempDir()
		c.Workers.WorkerBinary, c.Workers.ORTLibrary = "/bin/true", "/bin/true"
		c.Device, c.SliceBytes = tc.device, 1<<30
		err := c.Validate()
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("device %q: err = %v, want %q", tc.device, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("device %q: %v", tc.device, err)
		}
		if got := c.WorkerGPULimit(tc.slices); got != tc.limit {
			t.Errorf("device %q, %d slices: limit %d, want %d", tc.device, tc.slices, got, tc.limit)
		}
	}
}

// TestLookupLeavesCanaryAlone: naming a request's version for metrics does
// not route it, so requests that fail before routing do not move a
// canary's split.
func TestLookupLeavesCanaryAlone(t *testing.T) {
	t.Parallel()
	md := &repository.Model{Name: "m"}
	e := &modelEntry{model: md, versions: []*modelVersion{
		{name: "m", version: "1", v: repository.Version{Number: 1}},
		{name: "m", version: "2", v: repository.Version{Number: 2}},
	}}
	s := &Server{models: map[string]*modelEntry{"m": e}}
	c := canaryState{Percent: 50, n: new(atomic.Uint64)}
	s.hot.canary = map[string]canaryState{"m": c}
	for range 3 {
		if mv := s.lookup("m", ""); mv == nil || mv.version != "2" {
			t.Fatalf("lookup(m, \"\") = %v, want version 2", mv)
		}
	}
	if mv := s.lookup("m", "1"); mv == nil || mv.version != "1" {
		t.Fatalf("lookup(m, 1) = %v", mv)
	}
	if s.lookup("m", "3") != nil || s.lookup("x", "") != nil {
		t.Fatal("lookup found a version not served")
	}
	if n := c.n.Load(); n != 0 {
		t.Errorf("lookups moved the canary's split by %d", n)
	}
}
