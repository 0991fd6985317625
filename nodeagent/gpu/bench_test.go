package gpu_test

import (
	"context"
	"io"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
)

// perPID puts every process in a group of its own: the worst case for the
// group series (one per container).
type perPID struct{}

func (perPID) GroupOf(pid uint32) (gpu.GroupKind, string) {
	return gpu.GroupContainer, "ns/pod/c" + string(rune('a'+pid%26)) + string(rune('a'+pid/26%26))
}

func bigNode(b *testing.B) (*sim.GPUs, *gpu.Reader) {
	s, err := sim.New("h100x8", "bench")
	if err != nil {
		b.Fatal(err)
	}
	for g := 0; g < 8; g++ {
		for i := 0; i < 64; i++ {
			if err := s.SetProcess(g, uint32(1000+g*64+i), uint64(256+i)<<20, gpu.ProcessCompute); err != nil {
				b.Fatal(err)
			}
		}
	}
	r := gpu.NewReader(s.Interface(), discard())
	if err := r.Init(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(r.Shutdown)
	return s, r
}

// BenchmarkRead is one poll of 8 GPUs x 64 processes through the adapter.
func BenchmarkRead(b *testing.B) {
	_, r := bigNode(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.Read(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRenderMetrics gathers and encodes the GPU metrics of 8 GPUs x 64
// processes, each process its own group.
func BenchmarkRenderMetrics(b *testing.B) {
	_, r := bigNode(b)
	snap, err := r.Read(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	c := gpu.NewCollector(fixedPoller{snap}, r)
	c.SetGrouper(perPID{})
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	b.ReportAllocs()
	for b.Loop() {
		mfs, err := reg.Gather()
		if err != nil {
			b.Fatal(err)
		}
		enc := expfmt.NewEncoder(io.Discard, expfmt.NewFormat(expfmt.TypeTextPlain))
		for _, mf := range mfs {
			if err := enc.Encode(mf); err != nil {
				b.Fatal(err)
			}
		}
	}
}
