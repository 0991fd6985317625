package gpu_test

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"

	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
)

var update = flag.Bool("update", false, "rewrite golden files")

// fixedPoller serves one snapshot, as the poller would after a poll.
type fixedPoller struct{ s *gpu.Snapshot }

func (f fixedPoller) Snapshot() *gpu.Snapshot { return f.s }
func (f fixedPoller) Failures() uint64        { return 2 }

type groups map[uint32]string

func (g groups) GroupOf(pid uint32) (gpu.GroupKind, string) {
	if name, ok := g[pid]; ok {
		return gpu.GroupContainer, name
	}
	return gpu.GroupUnattributed, ""
}

func goldenCollector(t *testing.T) *gpu.Collector {
	t.Helper()
	s, err := sim.New("h100x1+a100x1", "golden")
	if err != nil {
		t.Fatal(err)
	}
	r := gpu.NewReader(s.Interface(), discard())
	if err := r.Init(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Shutdown)
	must(t, s.SetProcess(0, 10, 4<<30, gpu.ProcessCompute))
	must(t, s.SetProcess(0, 11, 1<<30, gpu.ProcessCompute))
	must(t, s.SetProcess(1, 12, 2<<30, gpu.ProcessGraphics))
	must(t, s.SetUtilization(0, 75))
	must(t, s.SetUnhealthy(1, "gpu_lost"))
	snap, err := r.Read(context.Background())
	must(t, err)
	c := gpu.NewCollector(fixedPoller{snap}, r)
	c.SetGrouper(groups{10: "vision/detector-0/model"})
	return c
}

func TestCollectorLint(t *testing.T) {
	t.Parallel()
	problems, err := testutil.CollectAndLint(goldenCollector(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint %s: %s", p.Metric, p.Text)
	}
}

// TestCollectorGolden compares the exposition with testdata/collector.golden
// (regenerate with -update), leaving out the poll timestamp.
func TestCollectorGolden(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(goldenCollector(t))
	mfs, err := reg.Gather()
	must(t, err)
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if mf.GetName() == "visionslice_agent_last_poll_timestamp_seconds" {
			continue
		}
		must(t, enc.Encode(mf))
	}
	golden := filepath.Join("testdata", "collector.golden")
	if *update {
		must(t, os.WriteFile(golden, buf.Bytes(), 0o644))
	}
	want, err := os.ReadFile(golden)
	must(t, err)
	if !bytes.Equal(buf.Bytes(), want) {
		t.Errorf("exposition differs from %s (run with -update to accept):\n%s", golden, buf.String())
	}
}
