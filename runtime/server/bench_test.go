package server

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/visionslice/visionslice/runtime/oip/inferencepb"
	"github.com/visionslice/visionslice/runtime/onnxgen"
	"github.com/visionslice/visionslice/runtime/ort"
	"github.com/visionslice/visionslice/runtime/tensor"
)

func p50(d []time.Duration) time.Duration {
	slices.Sort(d)
	return d[len(d)/2]
}

// BenchmarkAddedLatency: an Identity on 4 floats served over HTTP (JSON)
// and gRPC, alternated per iteration with a direct call on the model's
// worker pool and with bare HTTP and gRPC servers that answer at once, so
// that load on the machine hits all alike. added-*-us is what the front end
// adds to the worker call (protocol, validation, queue, tracing, metrics)
// at the median; own-*-us is that minus the bare protocol round trip, the
// cost of visionslice's own code. The worker's IPC is measured by the
// supervisor's BenchmarkTinyModelRoundTrip.
func BenchmarkAddedLatency(b *testing.B) {
	model, err := onnxgen.Unary("Identity", tensor.FP32, []int64{onnxgen.Dynamic, 4})
	if err != nil {
		b.Fatal(err)
	}
	root := b.TempDir()
	writeFile(b, filepath.Join(root, "tiny", "config.yaml"), []byte("version: v1\nmax_batch_size: 8\nintra_op_threads: 1\n"+
		"inputs: [{name: x, datatype: FP32, dims: [4]}]\noutputs: [{name: y, datatype: FP32, dims: [4]}]\n"))
	writeFile(b, filepath.Join(root, "tiny", "1", "model.onnx"), model)
	r := startServer(b, root, Deps{})
	pool := r.srv.lookup("tiny", "").poolOrNil()
	ctx := context.Background()
	in := []tensor.Tensor{onnxgen.FP32("x", []int64{1, 4}, 1, 2, 3, 4)}
	body := []byte(`{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}`)
	greq := &pb.ModelInferRequest{ModelName: "tiny", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 4}}},
		RawInputContents: [][]byte{in[0].Data}}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	httpOnce := func() error {
		resp, err := client.Post(r.http+"/v2/models/tiny/infer", "application/json", bytes.NewReader(body))
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	// The protocol floor: bare Go HTTP and gRPC servers on the same machine
	// that answer at once (no model, no validation, no queue).
	floorHTTP := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"model_name":"tiny","outputs":[{"name":"y","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}`))
	}))
	defer floorHTTP.Close()
	floorGRPC := startEcho(b)
	floorOnce := func() error {
		resp, err := client.Post(floorHTTP.URL, "application/json", bytes.NewReader(body))
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.Body.Close()
	}
	for i := 0; i < 20; i++ { // warm connections and the worker
		if err := floorOnce(); err != nil {
			b.Fatal(err)
		}
		if _, err := floorGRPC.ModelInfer(ctx, greq); err != nil {
			b.Fatal(err)
		}
		if err := httpOnce(); err != nil {
			b.Fatal(err)
		}
		if _, err := r.grpc.ModelInfer(ctx, greq); err != nil {
			b.Fatal(err)
		}
	}
	direct := make([]time.Duration, 0, b.N)
	viaHTTP := make([]time.Duration, 0, b.N)
	viaGRPC := make([]time.Duration, 0, b.N)
	bareHTTP := make([]time.Duration, 0, b.N)
	bareGRPC := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := pool.Infer(ctx, in, []string{"y"}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := httpOnce(); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		if _, err := r.grpc.ModelInfer(ctx, greq); err != nil {
			b.Fatal(err)
		}
		t3 := time.Now()
		if err := floorOnce(); err != nil {
			b.Fatal(err)
		}
		t4 := time.Now()
		if _, err := floorGRPC.ModelInfer(ctx, greq); err != nil {
			b.Fatal(err)
		}
		t5 := time.Now()
		bareHTTP = append(bareHTTP, t4.Sub(t3))
		bareGRPC = append(bareGRPC, t5.Sub(t4))
		direct = append(direct, t1.Sub(t0))
		viaHTTP = append(viaHTTP, t2.Sub(t1))
		viaGRPC = append(viaGRPC, t3.Sub(t2))
	}
	b.StopTimer()
	d, h, g := p50(direct), p50(viaHTTP), p50(viaGRPC)
	b.ReportMetric(float64(d.Nanoseconds())/1e3, "worker-p50-us")
	b.ReportMetric(float64(h.Nanoseconds())/1e3, "http-p50-us")
	b.ReportMetric(float64(g.Nanoseconds())/1e3, "grpc-p50-us")
	b.ReportMetric(float64((h-d).Nanoseconds())/1e3, "added-http-p50-us")
	b.ReportMetric(float64((g-d).Nanoseconds())/1e3, "added-grpc-p50-us")
	fh, fg := p50(bareHTTP), p50(bareGRPC)
	b.ReportMetric(float64(fh.Nanoseconds())/1e3, "bare-http-p50-us")
	b.ReportMetric(float64(fg.Nanoseconds())/1e3, "bare-grpc-p50-us")
	b.ReportMetric(float64((h-d-fh).Nanoseconds())/1e3, "own-http-p50-us")
	b.ReportMetric(float64((g-d-fg).Nanoseconds())/1e3, "own-grpc-p50-us")
}

type echoService struct {
	pb.UnimplementedGRPCInferenceServiceServer
}

func (echoService) ModelInfer(_ context.Context, r *pb.ModelInferRequest) (*pb.ModelInferResponse, error) {
	return &pb.ModelInferResponse{ModelName: r.GetModelName(), Outputs: []*pb.ModelInferResponse_InferOutputTensor{{Name: "y", Datatype: "FP32", Shape: []int64{1, 4}}},
		RawOutputContents: r.GetRawInputContents()}, nil
}

// startEcho serves a bare gRPC service on a unix socket.
func startEcho(b *testing.B) pb.GRPCInferenceServiceClient {
	sock := filepath.Join(b.TempDir(), "echo.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	g := grpc.NewServer()
	pb.RegisterGRPCInferenceServiceServer(g, echoService{})
	go func() { _ = g.Serve(lis) }()
	b.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return pb.NewGRPCInferenceServiceClient(conn)
}

// chainModel is y = x + 1 + 1 ... (n Add nodes) on [batch, width]. With a
// small width its cost is per call (one kernel launch per node, as small
// models on a GPU), not per item, which is the case dynamic batching is
// for; with a large one it is slow.
func chainModel(b testing.TB, n int, width int64) []byte {
	one := onnxgen.FP32("one", []int64{1}, 1)
	g := onnxgen.Graph{Name: "chain",
		Inputs:       []onnxgen.Value{{Name: "x", Datatype: tensor.FP32, Shape: []int64{onnxgen.Dynamic, width}}},
		Outputs:      []onnxgen.Value{{Name: "y", Datatype: tensor.FP32, Shape: []int64{onnxgen.Dynamic, width}}},
		Initializers: []onnxgen.Initializer{{Name: "one", Datatype: tensor.FP32, Dims: []int64{1}, Raw: one.Data}},
	}
	prev := "x"
	for i := 0; i < n; i++ {
		out := fmt.Sprintf("t%d", i)
		if i == n-1 {
			out = "y"
		}
		g.Nodes = append(g.Nodes, onnxgen.Node{Op: "Add", Inputs: []string{prev, "one"}, Outputs: []string{out}})
		prev = out
	}
	m := onnxgen.Model{Graph: g}
	data, err := m.Marshal()
	if err != nil {
		b.Fatal(err)
	}
	return data
}

// BenchmarkDynamicBatchingGain: 8 concurrent gRPC clients on the same
// per-call-cost model served twice, without and with dynamic batching (one
// instance each); reports both throughputs and their ratio.
func BenchmarkDynamicBatchingGain(b *testing.B) {
	model := chainModel(b, 200, 16)
	root := b.TempDir()
	base := "version: v1\nmax_batch_size: 8\nintra_op_threads: 1\ninputs: [{name: x, datatype: FP32, dims: [16]}]\noutputs: [{name: y, datatype: FP32, dims: [16]}]\n"
	writeFile(b, filepath.Join(root, "plain", "config.yaml"), []byte(base))
	writeFile(b, filepath.Join(root, "plain", "1", "model.onnx"), model)
	writeFile(b, filepath.Join(root, "batched", "config.yaml"), []byte(base+"dynamic_batching: {max_queue_delay: 1ms, preferred_batch_sizes: [8]}\n"))
	writeFile(b, filepath.Join(root, "batched", "1", "model.onnx"), model)
	r := startServer(b, root, Deps{})
	x := make([]float32, 16)
	data := onnxgen.FP32("x", []int64{1, 16}, x...).Data
	const clients = 8
	run := func(name string, perClient int) (float64, error) {
		req := &pb.ModelInferRequest{ModelName: name, Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 16}}},
			RawInputContents: [][]byte{data}}
		var wg sync.WaitGroup
		errs := make(chan error, clients)
		t0 := time.Now()
		for c := 0; c < clients; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < perClient; i++ {
					if _, err := r.grpc.ModelInfer(context.Background(), req); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		if err := <-errs; err != nil {
			return 0, err
		}
		return float64(clients*perClient) / time.Since(t0).Seconds(), nil
	}
	for _, m := range []string{"plain", "batched"} { // warm
		if _, err := run(m, 5); err != nil {
			b.Fatal(err)
		}
	}
	var plain, batched float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p, err := run("plain", 50)
		if err != nil {
			b.Fatal(err)
		}
		q, err := run("batched", 50)
		if err != nil {
			b.Fatal(err)
		}
		plain += p
		batched += q
	}
	b.StopTimer()
	b.ReportMetric(plain/float64(b.N), "plain-req/s")
	b.ReportMetric(batched/float64(b.N), "batched-req/s")
	b.ReportMetric(batched/plain, "gain")
}

// BenchmarkServedOverRaw: PP-OCRv4 det on a 640x640 tensor with 2 intra-op
// threads, served over gRPC (raw tensor, one client) against ONNX Runtime in
// this process with the same threads, alternated; served/raw is the
// throughput ratio (raw p50 over served p50).
func BenchmarkServedOverRaw(b *testing.B) {
	modelPath := os.Getenv("VISIONSLICE_PPOCR_MODEL")
	if modelPath == "" {
		b.Skip("VISIONSLICE_PPOCR_MODEL is not set")
	}
	root := b.TempDir()
	writeFile(b, filepath.Join(root, "det", "config.yaml"), []byte("version: v1\nmax_batch_size: 1\nintra_op_threads: 2\n"+
		"inputs: [{name: x, datatype: FP32, dims: [3, -1, -1]}]\noutputs: [{name: sigmoid_0.tmp_0, datatype: FP32, dims: [1, -1, -1]}]\n"))
	if err := os.MkdirAll(filepath.Join(root, "det", "1"), 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.Symlink(modelPath, filepath.Join(root, "det", "1", "model.onnx")); err != nil {
		b.Fatal(err)
	}
	r := startServer(b, root, Deps{})
	if err := ort.Init(os.Getenv("VISIONSLICE_ORT_LIB")); err != nil {
		b.Fatal(err)
	}
	model, err := os.ReadFile(modelPath)
	if err != nil {
		b.Fatal(err)
	}
	sess, err := ort.NewSession(model, ort.Options{IntraOpThreads: 2})
	if err != nil {
		b.Fatal(err)
	}
	defer sess.Close()
	v := make([]float32, 3*640*640)
	for i := range v {
		v[i] = float32(i%251)/251 - 0.5
	}
	x := onnxgen.FP32("x", []int64{1, 3, 640, 640}, v...)
	req := &pb.ModelInferRequest{ModelName: "det", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: x.Shape}},
		RawInputContents: [][]byte{x.Data}}
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if _, err := sess.Run([]tensor.Tensor{x}, nil); err != nil {
			b.Fatal(err)
		}
		if _, err := r.grpc.ModelInfer(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
	raw := make([]time.Duration, 0, b.N)
	served := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := sess.Run([]tensor.Tensor{x}, nil); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := r.grpc.ModelInfer(ctx, req); err != nil {
			b.Fatal(err)
		}
		raw = append(raw, t1.Sub(t0))
		served = append(served, time.Since(t1))
	}
	b.StopTimer()
	rp, sp := p50(raw), p50(served)
	b.ReportMetric(float64(rp.Microseconds())/1e3, "raw-p50-ms")
	b.ReportMetric(float64(sp.Microseconds())/1e3, "served-p50-ms")
	b.ReportMetric(float64(rp)/float64(sp), "served/raw")
}
