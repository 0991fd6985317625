package promsource

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/visionslice/visionslice/scheduler/scrape"
)

type series struct {
	Metric map[string]string `json:"metric"`
	Values [][2]any          `json:"values"`
}

// agentSeries turns the exposition captured from the real agent into the
// series Prometheus would hold for it on node, with two samples each.
func agentSeries(t *testing.T, node string, last time.Time) []series {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "scrape", "testdata", "agent-sim-h100x2.prom"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := expfmt.NewDecoder(f, expfmt.NewFormat(expfmt.TypeTextPlain))
	var out []series
	for {
		var mf dto.MetricFamily
		if err := dec.Decode(&mf); err != nil {
			break
		}
		if !scrape.Wanted(mf.GetName()) {
			continue
		}
		for _, m := range mf.GetMetric() {
			lbl := map[string]string{"__name__": mf.GetName(), "node": node, "job": "visionslice-agent"}
			for _, l := range m.GetLabel() {
				lbl[l.GetName()] = l.GetValue()
			}
			v := fmt.Sprint(m.GetGauge().GetValue())
			out = append(out, series{Metric: lbl, Values: [][2]any{
				{float64(last.Add(-5*time.Second).UnixMilli()) / 1000, "0"}, {float64(last.UnixMilli()) / 1000, v}}})
		}
	}
	return out
}

func TestSource(t *testing.T) {
	t.Parallel()
	last := time.Date(2026, 11, 26, 15, 0, 0, 0, time.UTC)
	result := agentSeries(t, "n1", last)
	result = append(result,
		series{Metric: map[string]string{"__name__": "visionslice_gpu_slices_capacity", "gpu_uuid": "G", "gpu": "0"}, // no node label
			Values: [][2]any{{float64(last.Unix()), "8"}}},
		series{Metric: map[string]string{"__name__": "visionslice_gpu_slices_capacity", "gpu_uuid": "G", "gpu": "x", "node": "bad"},
			Values: [][2]any{{float64(last.Unix()), "8"}}})
	var failing atomic.Bool
	var gotQuery atomic.Value
	prom := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/v1/query" {
			http.NotFound(w, r)
			return
		}
		_ = r.ParseForm()
		gotQuery.Store(r.Form.Get("query"))
		w.Header().Set("Content-Type", "application/json")
		if failing.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte(`{"status":"error","errorType":"unavailable","error":"tsdb not ready"}`))
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"status": "success",
			"data": map[string]any{"resultType": "matrix", "result": result}})
	}))
	defer prom.Close()

	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	s, err := New(Config{URL: prom.URL, Lookback: time.Minute}, nil, func() time.Time { return last.Add(time.Second) }, logger)
	if err != nil {
		t.Fatal(err)
	}
	s.Refresh(context.Background())
	q, _ := gotQuery.Load().(string)
	if !strings.Contains(q, "visionslice_gpu_slices_capacity") || !strings.HasSuffix(q, "[1m]") {
		t.Fatalf("query %q", q)
	}
	n, ok := s.Get("n1")
	if !ok || len(n.GPUs) != 2 {
		t.Fatalf("n1: %+v %v", n, ok)
	}
	for _, g := range n.GPUs {
		// The newest sample wins, with its own timestamp.
		if g.Capacity != 80 || !g.Healthy || !g.Timestamp.Equal(last) || !n.Oldest().Equal(last) {
			t.Fatalf("gpu %+v", g)
		}
	}
	if _, ok := s.Get("bad"); ok {
		t.Fatal("node with a malformed gpu index accepted")
	}
	if err := testutil.CollectAndCompare(s.Collector(), strings.NewReader(`
# HELP visionslice_scheduler_prometheus_up 1 if the last query of Prometheus succeeded, 0 otherwise.
# TYPE visionslice_scheduler_prometheus_up gauge
visionslice_scheduler_prometheus_up 1
# HELP visionslice_scheduler_prometheus_nodes Nodes with GPUs in the last successful query of Prometheus.
# TYPE visionslice_scheduler_prometheus_nodes gauge
visionslice_scheduler_prometheus_nodes 1
`), "visionslice_scheduler_prometheus_up", "visionslice_scheduler_prometheus_nodes"); err != nil {
		t.Fatal(err)
	}

	// A failed query keeps the last result and reports down.
	failing.Store(true)
	s.Refresh(context.Background())
	if _, ok := s.Get("n1"); !ok {
		t.Fatal("last result dropped after a failed query")
	}
	if err := testutil.CollectAndCompare(s.Collector(), strings.NewReader(`
# HELP visionslice_scheduler_prometheus_up 1 if the last query of Prometheus succeeded, 0 otherwise.
# TYPE visionslice_scheduler_prometheus_up gauge
visionslice_scheduler_prometheus_up 0
`), "visionslice_scheduler_prometheus_up"); err != nil {
		t.Fatal(err)
	}
	if problems, err := testutil.CollectAndLint(s.Collector()); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", err, problems)
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	for _, c := range []Config{{URL: "prometheus:9090"}, {URL: "http://p:9090", NodeLabel: "no-dash"}, {URL: "http://p", Interval: time.Second, Timeout: 2 * time.Second}} {
		c.Complete()
		if err := c.Validate(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
}
