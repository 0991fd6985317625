package lifecycle_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
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

	"github.com/visionslice/visionslice/nodeagent/cgroup"
	"github.com/visionslice/visionslice/nodeagent/cgroup/cgrouptest"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
	"github.com/visionslice/visionslice/runtime/lifecycle"
	"github.com/visionslice/visionslice/runtime/onnxgen"
	"github.com/visionslice/visionslice/runtime/server"
	"github.com/visionslice/visionslice/runtime/supervisor"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/workertest"
)

// workerBin is visionslice-worker built for these tests ("" without ONNX
// Runtime).
var workerBin string

func TestMain(m *testing.M) { os.Exit(workertest.Main(m, "runtime/lifecycle", &workerBin)) }

const gib = 1 << 30

// addConfig is c = a + b with dynamic batching; %d instances, %d slices.
const addConfig = `version: v1
max_batch_size: 8
inputs:
  - {name: a, datatype: FP32, dims: [4]}
  - {name: b, datatype: FP32, dims: [4]}
outputs:
  - {name: c, datatype: FP32, dims: [4]}
intra_op_threads: 1
instances: %d
slices: %d
dynamic_batching:
  max_queue_delay: 500us
  max_queue_size: 256
`

type harness struct {
	t      *testing.T
	repo   string
	sim    *sim.GPUs
	srv    *server.Server
	mgr    *lifecycle.Manager
	reg    *prometheus.Registry
	http   string
	client *http.Client
	// The request load() and infer() send, and the answer they expect.
	path, ctype string
	body        []byte
	want        string
	// lost counts requests whose worker died under them (each retried once).
	lost atomic.Int64
}

// countLost counts the supervisor's "worker lost during a request" records.
type countLost struct {
	slog.Handler
	n *atomic.Int64
}

func (c countLost) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "worker lost during a request" {
		c.n.Add(1)
	}
	return c.Handler.Handle(ctx, r)
}

func (c countLost) WithAttrs(as []slog.Attr) slog.Handler {
	return countLost{c.Handler.WithAttrs(as), c.n}
}
func (c countLost) WithGroup(g string) slog.Handler { return countLost{c.Handler.WithGroup(g), c.n} }

func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// start serves "add" with instances workers of slices slices each (1 GiB
// per slice) on one simulated H100, with the lifecycle manager on.
func start(t *testing.T, instances, slicesN int, lc lifecycle.Config) *harness {
	t.Helper()
	if workerBin == "" {
		t.Skip("VISIONSLICE_ORT_LIB is not set (run `make deps` and use `make test`)")
	}
	repo := t.TempDir()
	model, err := onnxgen.Binary("Add", tensor.FP32, []int64{onnxgen.Dynamic, 4})
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(repo, "add", "config.yaml"), fmt.Appendf(nil, addConfig, instances, slicesN))
	writeFile(t, filepath.Join(repo, "add", "1", "model.onnx"), model)
	h := &harness{t: t, repo: repo, path: "/v2/models/add/infer", ctype: "application/json", body: inferBody, want: `"data":[11,22,33,44]`}
	h.run(lc)
	return h
}

// run serves h.repo on one simulated H100 with the lifecycle manager on.
func (h *harness) run(lc lifecycle.Config) {
	t := h.t
	logger := slog.New(countLost{workertest.Logger().Handler(), &h.lost})
	h.reg = prometheus.NewRegistry()
	h.client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	var err error
	if h.sim, err = sim.New("h100x1", t.Name()); err != nil {
		t.Fatal(err)
	}
	reader := gpu.NewReader(h.sim.Interface(), logger)
	if err := reader.Init(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(reader.Shutdown)
	poller := gpu.NewPoller(reader, 10*time.Millisecond, logger)

	var groups supervisor.Groups
	if _, err := cgrouptest.WritableRoot(); err == nil {
		if groups, err = supervisor.CgroupGroups(cgrouptest.Manager(t), cgroup.Limits{PidsMax: 512}, logger); err != nil {
			t.Fatal(err)
		}
	} else {
		t.Logf("workers run without cgroups: %v", err)
	}

	cfg := server.DefaultConfig()
	cfg.Enabled = true
	cfg.Repository = h.repo
	cfg.HTTPListen = "127.0.0.1:0"
	cfg.GRPCListen = ""
	cfg.Workers = workertest.Config(t, workerBin)
	if h.srv, err = server.New(cfg, server.Deps{GPUs: poller, Groups: groups, Registerer: h.reg}, logger); err != nil {
		t.Fatal(err)
	}
	lc.SliceBytes = gib
	if h.mgr, err = lifecycle.New(lc, h.srv, poller, h.reg, logger); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for _, run := range []func(context.Context) error{poller.Run, h.srv.Run, h.mgr.Run} {
		wg.Add(1)
		go func() { defer wg.Done(); errs <- run(ctx) }()
	}
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Errorf("run: %v", err)
			}
		}
	})
	<-h.srv.Listening()
	<-h.srv.Loaded()
	h.http = "http://" + h.srv.HTTPAddr()
	if !h.srv.Ready() {
		t.Fatal("model did not load")
	}
}

func (h *harness) pool() *supervisor.Pool {
	return h.srv.ModelVersions()[0].Pool().(*supervisor.Pool)
}

// use scripts instance idx's worker to hold bytes of GPU memory and
// returns its PID and generation.
func (h *harness) use(idx int, bytes uint64) (int, uint64) {
	h.t.Helper()
	in := h.pool().Instances()[idx]
	if in.PID == 0 {
		h.t.Fatalf("instance %d has no worker", idx)
	}
	if err := h.sim.SetProcess(0, uint32(in.PID), bytes, gpu.ProcessCompute); err != nil {
		h.t.Fatal(err)
	}
	return in.PID, in.Generation
}

// waitFor polls cond for up to 30s.
func (h *harness) waitFor(what string, cond func() bool) time.Duration {
	h.t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > 30*time.Second {
			h.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
	return time.Since(start)
}

func (h *harness) replaced(idx int, gen uint64) func() bool {
	return func() bool {
		in := h.pool().Instances()[idx]
		return in.Generation > gen && in.Ready
	}
}

var inferBody = []byte(`{"inputs":[{"name":"a","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]},` +
	`{"name":"b","shape":[1,4],"datatype":"FP32","data":[10,20,30,40]}]}`)

// infer sends one request and checks the answer.
func (h *harness) infer() (int, string) {
	resp, err := h.client.Post(h.http+h.path, h.ctype, bytes.NewReader(h.body))
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return resp.StatusCode, string(b)
	}
	if !strings.Contains(string(b), h.want) {
		return resp.StatusCode, "wrong answer: " + string(b)
	}
	return 200, ""
}

// load runs clients in a loop until stop is called, which returns the
// latencies of successful requests and the failures.
func (h *harness) load(clients int) (stop func() ([]time.Duration, []string)) {
	var (
		mu    sync.Mutex
		lats  []time.Duration
		fails []string
		done  atomic.Bool
		wg    sync.WaitGroup
	)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !done.Load() {
				t0 := time.Now()
				code, msg := h.infer()
				d := time.Since(t0)
				mu.Lock()
				if code == 200 {
					lats = append(lats, d)
				} else {
					fails = append(fails, fmt.Sprintf("%d %s", code, msg))
				}
				mu.Unlock()
			}
		}()
	}
	return func() ([]time.Duration, []string) {
		done.Store(true)
		wg.Wait()
		return lats, fails
	}
}

func pct(lats []time.Duration, p float64) time.Duration {
	if len(lats) == 0 {
		return 0
	}
	s := slices.Clone(lats)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

func (h *harness) metric(name string, labels ...string) float64 {
	h.t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		h.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
						found = true
					}
				}
				if !found {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			case m.Histogram != nil:
				return m.Histogram.GetSampleSum()
			}
		}
	}
	return -1
}

// TestOverrunReplacesWorkerUnderLoad: 20 clients send requests steadily;
// the GPU seam shows one worker above its 1-slice quota; the worker is
// killed and replaced, its queued and in-flight requests are served by the
// fresh one (or the other instance), and not one request fails.
func TestOverrunReplacesWorkerUnderLoad(t *testing.T) {
	for _, instances := range []int{1, 2} {
		t.Run(fmt.Sprintf("instances=%d", instances), func(t *testing.T) {
			h := start(t, instances, 1, lifecycle.Config{})
			h.overrunUnderLoad(instances, 20, time.Second)
		})
	}
}

// TestOverrunReplacesPPOCRWorker is the same with the PP-OCRv4 det model
// on real JPEGs (4 clients: ~85 ms a frame on this CPU), where loading
// the model is a visible part of the recovery.
func TestOverrunReplacesPPOCRWorker(t *testing.T) {
	model := os.Getenv("VISIONSLICE_PPOCR_MODEL")
	if model == "" || workerBin == "" {
		t.Skip("VISIONSLICE_PPOCR_MODEL or VISIONSLICE_ORT_LIB is not set (run `make deps` and use `make test`)")
	}
	cfg, err := os.ReadFile("../repository/testdata/ppocr-det/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	img := workertest.TextImage(t)
	repo := t.TempDir()
	writeFile(t, filepath.Join(repo, "ppocr-det", "config.yaml"), cfg)
	if err := os.MkdirAll(filepath.Join(repo, "ppocr-det", "1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(model, filepath.Join(repo, "ppocr-det", "1", "model.onnx")); err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, repo: repo, path: "/v2/models/ppocr-det/infer", ctype: "image/jpeg", body: img, want: `"model_name":"ppocr-det"`}
	h.run(lifecycle.Config{})
	h.overrunUnderLoad(1, 4, 5*time.Second)
}

// overrunUnderLoad runs clients for settle, scripts instance 0 over its
// quota, waits for its replacement and settle again, and checks that
// nothing failed.
func (h *harness) overrunUnderLoad(instances, clients int, settle time.Duration) {
	t := h.t
	for i := range instances {
		h.use(i, gib/2) // within quota: nothing happens
	}
	stop := h.load(clients)
	time.Sleep(settle)
	var otherPID int
	if instances > 1 {
		otherPID = h.pool().Instances()[1].PID
	}
	before := h.pool().Instances()[0]
	_, gen := h.use(0, 3*gib/2)
	took := h.waitFor("the worker to be replaced", h.replaced(0, gen))
	time.Sleep(settle)
	lats, fails := stop()
	if len(fails) > 0 {
		t.Fatalf("%d of %d requests failed, first: %s", len(fails), len(fails)+len(lats), fails[0])
	}
	after := h.pool().Instances()[0]
	if after.PID == before.PID {
		t.Fatalf("worker %d was not replaced", before.PID)
	}
	if !zombieOrGone(before.PID) {
		t.Errorf("overrunning worker %d still runs", before.PID)
	}
	if before.CgroupPath != "" {
		// Killed with its whole cgroup, which is gone; the fresh worker has its own.
		if _, err := os.Stat(before.CgroupPath); err == nil {
			t.Errorf("cgroup %s of the killed worker is still there", before.CgroupPath)
		}
		if after.CgroupPath == "" || after.CgroupPath == before.CgroupPath {
			t.Errorf("fresh worker's cgroup %q", after.CgroupPath)
		}
	} else {
		t.Log("workers ran without cgroups of their own")
	}
	if instances > 1 && h.pool().Instances()[1].PID != otherPID {
		t.Errorf("the other instance was restarted too")
	}
	if got := h.pool().Restarts()[supervisor.ReasonReplaced]; got != 1 {
		t.Errorf("replaced restarts = %d, want 1", got)
	}
	// The tracker may lag the poll above by a tick.
	h.waitFor("serving state", func() bool { st, _ := h.mgr.State(h.modelName(), "1"); return st == lifecycle.StateServing })
	if got := h.metric(lifecycle.MetricOverruns, "model", h.modelName()); got != 1 {
		t.Errorf("overruns metric = %v", got)
	}
	if got := h.metric(lifecycle.MetricModelState, "model", h.modelName(), "state", lifecycle.StateServing); got != 1 {
		t.Errorf("serving state metric = %v", got)
	}
	recovery := h.metric(lifecycle.MetricRecoveryDuration, "model", h.modelName())
	t.Logf("%s instances=%d clients=%d: %d requests, 0 failed, %d retried after their worker was killed; overrun scripted -> serving again %.1f ms "+
		"(manager's detection -> serving %.1f ms; model load+warm-up in a worker at start %.1f ms); latency p50 %.2f ms p99 %.2f ms max %.2f ms",
		h.modelName(), instances, clients, len(lats), h.lost.Load(), ms(took), recovery*1000, h.pool().Metadata().LoadSeconds*1000,
		ms(pct(lats, 0.5)), ms(pct(lats, 0.99)), ms(pct(lats, 1)))
}

func (h *harness) modelName() string {
	return strings.TrimSuffix(strings.TrimPrefix(h.path, "/v2/models/"), "/infer")
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// zombieOrGone: a killed child not yet reaped shows as Z.
func zombieOrGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] == 'Z'
}

// TestRepeatedOverrunFailsThenRecovers: a model whose quota is too small
// overruns again after each replacement; after backoff it ends in
// failed_over_quota (not ready, reason in metadata and errors, metrics),
// and raising its slices in config.yaml brings it back.
func TestRepeatedOverrunFailsThenRecovers(t *testing.T) {
	h := start(t, 1, 1, lifecycle.Config{MaxOverruns: 2, BackoffInitial: 100 * time.Millisecond, BackoffMax: 400 * time.Millisecond,
		ConfigInterval: 50 * time.Millisecond})
	var gaps []time.Duration
	for i := range 2 {
		_, gen := h.use(0, 2*gib)
		t0 := time.Now()
		h.waitFor("replacement", h.replaced(0, gen))
		gaps = append(gaps, time.Since(t0))
		if code, msg := h.infer(); code != 200 {
			t.Fatalf("after replacement %d: %d %s", i+1, code, msg)
		}
	}
	if gaps[1] < 100*time.Millisecond {
		t.Errorf("second replacement after %v: no backoff", gaps[1])
	}
	pid, _ := h.use(0, 2*gib)
	h.waitFor("failed state", func() bool { st, _ := h.mgr.State("add", "1"); return st == lifecycle.StateFailed })
	h.waitFor("the worker to be killed", func() bool { return h.pool().Instances()[0].PID == 0 })
	if !zombieOrGone(pid) {
		t.Errorf("worker %d still runs", pid)
	}
	time.Sleep(200 * time.Millisecond)
	if in := h.pool().Instances()[0]; in.PID != 0 || in.Ready {
		t.Fatalf("a failed model's worker was restarted: %+v", in)
	}

	resp, err := http.Get(h.http + "/v2/models/add/ready")
	if err != nil || resp.StatusCode != 503 {
		t.Fatalf("ready: %v %v", resp.StatusCode, err)
	}
	resp.Body.Close()
	resp, err = http.Get(h.http + "/v2/models/add")
	if err != nil {
		t.Fatal(err)
	}
	var md struct {
		State       string `json:"state"`
		StateReason string `json:"state_reason"`
	}
	json.NewDecoder(resp.Body).Decode(&md)
	resp.Body.Close()
	if md.State != lifecycle.StateFailed || !strings.Contains(md.StateReason, "over quota") || !strings.Contains(md.StateReason, "3 overruns") {
		t.Fatalf("metadata: %+v", md)
	}
	if code, msg := h.infer(); code != 503 || !strings.Contains(msg, "failed_over_quota: over quota") {
		t.Fatalf("infer while failed: %d %s", code, msg)
	}
	if got := h.metric(lifecycle.MetricModelState, "model", "add", "state", lifecycle.StateFailed); got != 1 {
		t.Errorf("failed state metric = %v", got)
	}
	if got := h.metric(lifecycle.MetricOverruns, "model", "add"); got != 3 {
		t.Errorf("overruns metric = %v", got)
	}
	if problems, err := testutil.GatherAndLint(h.reg); err != nil || len(problems) > 0 {
		t.Fatal(problems, err)
	}

	// Raise the quota to 4 slices: the model comes back and serves.
	writeFile(t, filepath.Join(h.repo, "add", "config.yaml"), fmt.Appendf(nil, addConfig, 1, 4))
	took := h.waitFor("recovery", func() bool { st, _ := h.mgr.State("add", "1"); return st == lifecycle.StateServing })
	if code, msg := h.infer(); code != 200 {
		t.Fatalf("after raising the quota: %d %s", code, msg)
	}
	resp, err = http.Get(h.http + "/v2/models/add/ready")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("ready after recovery: %v %v", resp.StatusCode, err)
	}
	resp.Body.Close()
	if got := h.metric(lifecycle.MetricQuota, "model", "add"); got != 4*gib {
		t.Errorf("quota metric = %v", got)
	}
	// 2 GiB is within the new quota: no action.
	h.use(0, 2*gib)
	time.Sleep(100 * time.Millisecond)
	if st, _ := h.mgr.State("add", "1"); st != lifecycle.StateServing {
		t.Errorf("state %s after usage within the raised quota", st)
	}
	t.Logf("replacement gaps %v (backoff), quota raise -> serving %v", gaps, took)
}
