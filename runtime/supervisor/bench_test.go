package supervisor_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/visionslice/visionslice/runtime/onnxgen"
	"github.com/visionslice/visionslice/runtime/ort"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/supervisor"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/workertest"
)

// benchPair measures the same model and input in this process (ONNX
// Runtime directly) and through a worker process (supervisor pool),
// alternating the two so that load on the machine hits both alike. It
// reports each median and their ratio (in-process time over worker time:
// the served/raw throughput ratio for one stream) and the added latency.
func benchPair(b *testing.B, model []byte, spec *repository.Config, in []tensor.Tensor) {
	cfg := config(b)
	if err := ort.Init(cfg.ORTLibrary); err != nil {
		b.Fatal(err)
	}
	s, err := ort.NewSession(model, ort.Options{IntraOpThreads: spec.IntraOpThreads})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	p := start(b, cfg, supervisor.Model{Name: "bench/1", ModelPath: writeModel(b, model), Spec: spec}, nil, supervisor.Hooks{})
	ctx := context.Background()
	for i := 0; i < 3; i++ { // warm both
		s.Run(in, nil)
		p.Infer(ctx, in, nil)
	}
	direct := make([]time.Duration, 0, b.N)
	served := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := s.Run(in, nil); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := p.Infer(ctx, in, nil); err != nil {
			b.Fatal(err)
		}
		direct = append(direct, t1.Sub(t0))
		served = append(served, time.Since(t1))
	}
	b.StopTimer()
	slices.Sort(direct)
	slices.Sort(served)
	d, w := direct[len(direct)/2], served[len(served)/2]
	b.ReportMetric(float64(d.Nanoseconds())/1e3, "in-process-p50-us")
	b.ReportMetric(float64(w.Nanoseconds())/1e3, "worker-p50-us")
	b.ReportMetric(float64(w-d)/1e3, "added-p50-us")
	b.ReportMetric(float64(d)/float64(w), "served/raw")
}

// BenchmarkPPOCRDet640: PP-OCRv4 det on one 640x640 frame with 2 intra-op
// threads, in process and through the worker; the ratio of the two is the
// served/raw throughput ratio.
func BenchmarkPPOCRDet640(b *testing.B) {
	_, model := workertest.PPOCRModel(b)
	spec := specOf(1, 3, -1, -1)
	spec.Inputs[0].Dims = []int64{1, 3, -1, -1}
	spec.IntraOpThreads = 2
	v := make([]float32, 3*640*640)
	for i := range v {
		v[i] = float32(i%251)/251 - 0.5
	}
	benchPair(b, model, spec, []tensor.Tensor{onnxgen.FP32("x", []int64{1, 3, 640, 640}, v...)})
}

// BenchmarkTinyModelRoundTrip: an Identity on 4 floats, so the difference
// between in_process and worker is the worker's added latency per request.
func BenchmarkTinyModelRoundTrip(b *testing.B) {
	model, err := onnxgen.Unary("Identity", tensor.FP32, []int64{onnxgen.Dynamic, 4})
	if err != nil {
		b.Fatal(err)
	}
	benchPair(b, model, specOf(1, 4), []tensor.Tensor{onnxgen.FP32("x", []int64{1, 4}, 1, 2, 3, 4)})
}
