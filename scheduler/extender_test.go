package scheduler

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	extenderv1 "k8s.io/kube-scheduler/extender/v1"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/scheduler/fit"
	"github.com/visionslice/visionslice/scheduler/scrape"
)

const gib = 1 << 30

var testKey = []byte("test-assignment-key")

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// memSource is an in-memory metrics source.
type memSource struct {
	mu    sync.RWMutex
	nodes map[string]scrape.Node
}

func (s *memSource) Get(node string) (scrape.Node, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	n, ok := s.nodes[node]
	return n, ok
}

func (s *memSource) set(node string, gpus ...scrape.GPU) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.nodes == nil {
		s.nodes = map[string]scrape.Node{}
	}
	s.nodes[node] = scrape.Node{Target: scrape.Target{Node: node}, GPUs: gpus}
}

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

var t0 = time.Date(2026, 11, 26, 15, 0, 0, 0, time.UTC)

func sgpu(i, capacity, allocated int, at time.Time) scrape.GPU {
	return scrape.GPU{UUID: "GPU-" + string(rune('a'+i)), Index: i, Healthy: true, Capacity: capacity, Allocated: allocated,
		SliceBytes: gib, MemoryTotalBytes: uint64(capacity) * gib, MemoryUsedBytes: uint64(allocated) * gib, Timestamp: at}
}

func slicePod(name string, n int64) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name)},
		Spec: v1.PodSpec{Containers: []v1.Container{{Name: "c", Resources: v1.ResourceRequirements{
			Limits: v1.ResourceList{slice.ResourceName: *resource.NewQuantity(n, resource.DecimalSI)}}}}},
	}
}

type fixture struct {
	ext    *Extender
	src    *memSource
	clock  *fakeClock
	client *fake.Clientset
	bound  map[string]string // pod name -> node, from created Bindings
	mu     sync.Mutex
}

func newFixture(t *testing.T, policy Policy, objs ...runtime.Object) *fixture {
	t.Helper()
	f := &fixture{src: &memSource{}, clock: &fakeClock{t: t0}, client: fake.NewClientset(objs...), bound: map[string]string{}}
	f.client.PrependReactor("create", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		ca, ok := a.(k8stesting.CreateAction)
		if !ok || a.GetSubresource() != "binding" {
			return false, nil, nil
		}
		b := ca.GetObject().(*v1.Binding)
		f.mu.Lock()
		f.bound[b.Name] = b.Target.Name
		f.mu.Unlock()
		return true, nil, nil
	})
	cfg := DefaultConfig()
	cfg.Staleness.Policy = policy
	cfg.Staleness.TTL = 15 * time.Second
	cfg.AssumeTimeout = time.Minute
	ext, err := New(cfg, Deps{Client: f.client, Key: testKey, Source: f.src, Now: f.clock.now}, discard())
	if err != nil {
		t.Fatal(err)
	}
	f.ext = ext
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ext.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	select {
	case <-ext.synced:
	case <-time.After(10 * time.Second):
		t.Fatal("pod view did not sync")
	}
	return f
}

func post(t *testing.T, h http.Handler, path string, body []byte) (int, []byte) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body)))
	return rec.Code, rec.Body.Bytes()
}

func filterNames(t *testing.T, h http.Handler, pod *v1.Pod, nodes ...string) extenderv1.ExtenderFilterResult {
	t.Helper()
	body, _ := json.Marshal(extenderv1.ExtenderArgs{Pod: pod, NodeNames: &nodes})
	code, out := post(t, h, "/filter", body)
	if code != http.StatusOK {
		t.Fatalf("filter: http %d: %s", code, out)
	}
	var res extenderv1.ExtenderFilterResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("filter answer %s: %v", out, err)
	}
	if res.Error != "" {
		t.Fatalf("filter error %q", res.Error)
	}
	return res
}

// allFailed merges the failed and the failed-and-unresolvable nodes.
func allFailed(r extenderv1.ExtenderFilterResult) map[string]string {
	out := map[string]string{}
	for k, v := range r.FailedNodes {
		out[k] = v
	}
	for k, v := range r.FailedAndUnresolvableNodes {
		out[k] = v
	}
	return out
}

// TestFilterPolicy runs the fit rules through the filter verb, under both
// staleness policies.
func TestFilterPolicy(t *testing.T) {
	t.Parallel()
	setup := func(f *fixture) {
		now := f.clock.now()
		f.src.set("frag", sgpu(0, 8, 5, now), sgpu(1, 8, 5, now))
		f.src.set("roomy", sgpu(0, 8, 5, now), sgpu(1, 8, 2, now))
		sick := sgpu(0, 8, 0, now)
		sick.Healthy = false
		f.src.set("sick", sick, sgpu(1, 8, 6, now))
		out := sgpu(0, 8, 2, now)
		out.UnaccountedBytes = 3 * gib
		f.src.set("outside", out)
		f.src.set("stale", sgpu(0, 8, 0, now.Add(-time.Minute))) // says empty, but old
	}
	// The API server's view: pods bound to "stale" hold 6 slices, one with a
	// verified record, one without.
	onStale := slicePod("on-stale-1", 4)
	onStale.Spec.NodeName = "stale"
	rec := slice.Assignment{PodUID: string(onStale.UID), Node: "stale", GPU: "GPU-a"}
	onStale.Annotations = map[string]string{slice.AnnotationAssignedGPU: "GPU-a", slice.AnnotationAssignedNode: "stale",
		slice.AnnotationAssignmentSignature: rec.Sign(testKey)}
	onStale2 := slicePod("on-stale-2", 2)
	onStale2.Spec.NodeName = "stale"

	all := []string{"frag", "roomy", "sick", "outside", "stale", "unknown"}
	tests := []struct {
		name   string
		policy Policy
		n      int64
		pass   []string
		why    map[string]string // node -> part of the reason
	}{
		{name: "4 slices, fail closed", policy: FailClosed, n: 4, pass: []string{"roomy"}, why: map[string]string{
			"frag": "free per gpu: 3, 3", "sick": "unhealthy, 2", "outside": "free per gpu: 3",
			"stale": "stale", "unknown": "no metrics"}},
		{name: "4 slices, fail open", policy: FailOpen, n: 4, pass: []string{"roomy", "unknown"}, why: map[string]string{
			"frag": "free per gpu: 3, 3", "sick": "unhealthy, 2", "outside": "free per gpu: 3",
			"stale": "free per gpu: 2"}}, // 8 - 4 (record) - 2 (no record)
		{name: "2 slices, fail open", policy: FailOpen, n: 2, pass: []string{"frag", "roomy", "sick", "outside", "stale", "unknown"}},
		{name: "2 slices, fail closed", policy: FailClosed, n: 2, pass: []string{"frag", "roomy", "sick", "outside"},
			why: map[string]string{"stale": "stale", "unknown": "no metrics"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, tc.policy, onStale, onStale2)
			setup(f)
			res := filterNames(t, f.ext, slicePod("p", tc.n), all...)
			failed := allFailed(res)
			if got := strings.Join(*res.NodeNames, ","); got != strings.Join(tc.pass, ",") {
				t.Errorf("passed %s, want %s (failed: %v)", got, strings.Join(tc.pass, ","), failed)
			}
			if len(failed) != len(all)-len(tc.pass) {
				t.Errorf("failed nodes %v", failed)
			}
			for node, want := range tc.why {
				if !strings.Contains(failed[node], want) {
					t.Errorf("node %s: reason %q does not say %q", node, failed[node], want)
				}
			}
			// Preemption cannot bring metrics back; it can free slices.
			for node := range res.FailedAndUnresolvableNodes {
				if node != "stale" && node != "unknown" {
					t.Errorf("node %s marked unresolvable: %q", node, res.FailedAndUnresolvableNodes[node])
				}
			}
		})
	}
}

func TestAssumedPods(t *testing.T) {
	t.Parallel()
	f := newFixture(t, FailClosed, slicePod("first", 5), slicePod("second", 3))
	f.src.set("n1", sgpu(0, 8, 0, t0))
	res, err := f.ext.Bind(context.Background(), extenderv1.ExtenderBindingArgs{PodName: "first", PodNamespace: "default", PodUID: "uid-first", Node: "n1"})
	if err != nil || res != "GPU-a" {
		t.Fatalf("bind: %q %v", res, err)
	}
	// Metrics still show 0 allocated: the assumed 5 slices leave 3.
	if r := filterNames(t, f.ext, slicePod("p", 4), "n1"); len(*r.NodeNames) != 0 {
		t.Fatalf("4 slices passed with 5 assumed: %v", r)
	}
	if r := filterNames(t, f.ext, slicePod("p", 3), "n1"); len(*r.NodeNames) != 1 {
		t.Fatalf("3 slices failed: %v", r.FailedNodes)
	}
	// A sample newer than the bind shows the pod: the assumption ends and
	// the slices are not counted twice.
	f.clock.add(2 * time.Second)
	f.src.set("n1", sgpu(0, 8, 5, f.clock.now()))
	if r := filterNames(t, f.ext, slicePod("p", 3), "n1"); len(*r.NodeNames) != 1 {
		t.Fatalf("3 slices failed after the pod showed in metrics: %v", r.FailedNodes)
	}
	f.ext.assumed.gc(f.clock.now(), f.ext.sampleOf)
	if n := f.ext.assumed.count(); n != 0 {
		t.Fatalf("%d pods still assumed after they showed", n)
	}

	// A bound pod that never shows stops counting after the timeout.
	if _, err := f.ext.Bind(context.Background(), extenderv1.ExtenderBindingArgs{PodName: "second", PodNamespace: "default", PodUID: "uid-second", Node: "n1"}); err != nil {
		t.Fatal(err)
	}
	f.clock.add(time.Second)
	f.src.set("n1", sgpu(0, 8, 5, f.clock.now())) // newer sample, count has not risen
	if r := filterNames(t, f.ext, slicePod("p", 1), "n1"); len(*r.NodeNames) != 0 {
		t.Fatalf("1 slice passed on a full gpu (5 + 3 assumed): %v", r)
	}
	f.clock.add(time.Minute)
	f.src.set("n1", sgpu(0, 8, 5, f.clock.now()))
	if r := filterNames(t, f.ext, slicePod("p", 1), "n1"); len(*r.NodeNames) != 1 {
		t.Fatalf("assumption did not time out: %v", r.FailedNodes)
	}
}

func TestAssumedPodDeleted(t *testing.T) {
	t.Parallel()
	f := newFixture(t, FailClosed, slicePod("gone", 8))
	f.src.set("n1", sgpu(0, 8, 0, t0))
	if _, err := f.ext.Bind(context.Background(), extenderv1.ExtenderBindingArgs{PodName: "gone", PodNamespace: "default", PodUID: "uid-gone", Node: "n1"}); err != nil {
		t.Fatal(err)
	}
	if err := f.client.CoreV1().Pods("default").Delete(context.Background(), "gone", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for f.ext.assumed.count() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("deleted pod still assumed")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestBindWritesSignedRecord(t *testing.T) {
	t.Parallel()
	forged := slicePod("forged", 2)
	// The pod's owner wrote a record of their own choosing.
	forged.Annotations = map[string]string{slice.AnnotationAssignedGPU: "GPU-b", slice.AnnotationAssignedNode: "n1",
		slice.AnnotationAssignmentSignature: strings.Repeat("ab", 32)}
	f := newFixture(t, FailClosed, slicePod("web", 2), forged, slicePod("cpu", 0), slicePod("big", 9))
	f.src.set("n1", sgpu(0, 8, 6, t0), sgpu(1, 8, 1, t0))

	bind := func(name, uid, node string) extenderv1.ExtenderBindingResult {
		body, _ := json.Marshal(extenderv1.ExtenderBindingArgs{PodName: name, PodNamespace: "default", PodUID: types.UID(uid), Node: node})
		code, out := post(t, f.ext, "/bind", body)
		var res extenderv1.ExtenderBindingResult
		if err := json.Unmarshal(out, &res); err != nil || code != http.StatusOK {
			t.Fatalf("bind answer %d %s: %v", code, out, err)
		}
		return res
	}
	for _, name := range []string{"web", "forged"} {
		if res := bind(name, "uid-"+name, "n1"); res.Error != "" {
			t.Fatalf("bind %s: %s", name, res.Error)
		}
		pod, err := f.client.CoreV1().Pods("default").Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		a, ok, err := slice.AssignmentFromAnnotations(string(pod.UID), pod.Annotations, testKey)
		if err != nil || !ok {
			t.Fatalf("%s: record does not verify: %v %v", name, ok, err)
		}
		// binpack: GPU-a has 2 free, the fullest that fits; then it is full.
		want := map[string]string{"web": "GPU-a", "forged": "GPU-b"}[name]
		if a.Node != "n1" || a.GPU != want {
			t.Fatalf("%s: record %+v, want %s on n1", name, a, want)
		}
		if f.bound[name] != "n1" {
			t.Fatalf("%s: no binding to n1 (%v)", name, f.bound)
		}
	}
	// Moving a valid record to another pod does not verify there.
	web, _ := f.client.CoreV1().Pods("default").Get(context.Background(), "web", metav1.GetOptions{})
	if _, _, err := slice.AssignmentFromAnnotations("uid-other", web.Annotations, testKey); err == nil {
		t.Fatal("a record copied to another pod verified")
	}

	if res := bind("cpu", "uid-cpu", "n1"); res.Error != "" || f.bound["cpu"] != "n1" {
		t.Fatalf("pod without slices: %q, bound %v", res.Error, f.bound)
	}
	if res := bind("big", "uid-big", "n1"); !strings.Contains(res.Error, "no longer hold") {
		t.Fatalf("9 slices on 8-slice gpus: error %q", res.Error)
	}
	if res := bind("web", "uid-stale", "n1"); !strings.Contains(res.Error, "replaced") {
		t.Fatalf("uid mismatch: error %q", res.Error)
	}
	if res := bind("missing", "uid-missing", "n1"); !strings.Contains(res.Error, "get pod") {
		t.Fatalf("missing pod: error %q", res.Error)
	}
	if err := testutil.GatherAndCompare(f.ext.Registry(), strings.NewReader(`
# HELP visionslice_scheduler_binds_total Binds by result (ok, no_fit, error).
# TYPE visionslice_scheduler_binds_total counter
visionslice_scheduler_binds_total{result="error"} 2
visionslice_scheduler_binds_total{result="no_fit"} 1
visionslice_scheduler_binds_total{result="ok"} 3
`), "visionslice_scheduler_binds_total"); err != nil {
		t.Fatal(err)
	}
}

func TestHandlerBadRequests(t *testing.T) {
	t.Parallel()
	cfg := DefaultConfig()
	cfg.MaxRequestBytes = 4096
	src := &memSource{}
	src.set("n1", sgpu(0, 8, 0, time.Now()))
	ext, err := New(cfg, Deps{Source: src}, discard())
	if err != nil {
		t.Fatal(err)
	}
	names := []string{"n1"}
	good, _ := json.Marshal(extenderv1.ExtenderArgs{Pod: slicePod("p", 1), NodeNames: &names})
	huge := append([]byte(`{"pod":{"metadata":{"name":"`), bytes.Repeat([]byte("x"), 8192)...)
	huge = append(huge, `"}},"nodenames":["n1"]}`...)
	tests := []struct {
		name, path string
		body       []byte
		code       int
		want       string
	}{
		{"filter malformed", "/filter", []byte(`{"pod": {`), 400, "malformed request body"},
		{"filter wrong type", "/filter", []byte(`{"pod": 7}`), 400, "malformed request body"},
		{"filter oversized", "/filter", huge, 413, "larger than 4096 bytes"},
		{"filter no pod", "/filter", []byte(`{"nodenames":["n1"]}`), 400, "no pod"},
		{"filter no nodes", "/filter", []byte(`{"pod":{}}`), 400, "names no nodes"},
		{"prioritize malformed", "/prioritize", []byte(`[`), 400, "malformed request body"},
		{"prioritize oversized", "/prioritize", huge, 413, "larger than"},
		{"bind malformed", "/bind", []byte(`nope`), 400, "malformed request body"},
		{"bind missing fields", "/bind", []byte(`{"podName":"p"}`), 400, "needs podName"},
		{"bind without client", "/bind", []byte(`{"podName":"p","podNamespace":"d","podUID":"u","node":"n1"}`), 200, "no API server client"},
		{"filter good", "/filter", good, 200, `"NodeNames":["n1"]`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			code, out := post(t, ext, tc.path, tc.body)
			if code != tc.code || !strings.Contains(string(out), tc.want) {
				t.Fatalf("http %d %s; want %d and %q", code, out, tc.code, tc.want)
			}
			if !json.Valid(out) {
				t.Fatalf("answer is not JSON: %s", out)
			}
		})
	}
	rec := httptest.NewRecorder()
	ext.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/filter", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Fatalf("GET /filter: %d", rec.Code)
	}
}

// TestFilterNodesForm covers kube-scheduler without nodeCacheCapable: whole
// Node objects in, the passing ones out.
func TestFilterNodesForm(t *testing.T) {
	t.Parallel()
	src := &memSource{}
	now := time.Now()
	src.set("fits", sgpu(0, 8, 0, now))
	src.set("full", sgpu(0, 8, 8, now))
	ext, err := New(DefaultConfig(), Deps{Source: src}, discard())
	if err != nil {
		t.Fatal(err)
	}
	nodes := &v1.NodeList{Items: []v1.Node{{ObjectMeta: metav1.ObjectMeta{Name: "fits", Labels: map[string]string{"k": "v"}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "full"}}, {ObjectMeta: metav1.ObjectMeta{Name: "ghost"}}}}
	body, _ := json.Marshal(extenderv1.ExtenderArgs{Pod: slicePod("p", 2), Nodes: nodes})
	code, out := post(t, ext, "/filter", body)
	var res extenderv1.ExtenderFilterResult
	if err := json.Unmarshal(out, &res); err != nil || code != 200 {
		t.Fatalf("%d %s %v", code, out, err)
	}
	if res.NodeNames != nil || res.Nodes == nil || len(res.Nodes.Items) != 1 || res.Nodes.Items[0].Labels["k"] != "v" {
		t.Fatalf("nodes %+v", res.Nodes)
	}
	if !strings.Contains(res.FailedAndUnresolvableNodes["ghost"], "no metrics") || !strings.Contains(res.FailedNodes["full"], "free per gpu: 0") {
		t.Fatalf("failed %v, unresolvable %v", res.FailedNodes, res.FailedAndUnresolvableNodes)
	}
}

func TestPrioritize(t *testing.T) {
	t.Parallel()
	src := &memSource{}
	now := time.Now()
	src.set("empty", sgpu(0, 8, 0, now))
	src.set("half", sgpu(0, 8, 4, now))
	src.set("full", sgpu(0, 8, 8, now))
	for _, tc := range []struct {
		strategy string
		best     string
	}{{"binpack", "half"}, {"spread", "empty"}} {
		cfg := DefaultConfig()
		cfg.Strategy = fitStrategy(tc.strategy)
		ext, err := New(cfg, Deps{Source: src}, discard())
		if err != nil {
			t.Fatal(err)
		}
		names := []string{"empty", "half", "full", "ghost"}
		body, _ := json.Marshal(extenderv1.ExtenderArgs{Pod: slicePod("p", 2), NodeNames: &names})
		code, out := post(t, ext, "/prioritize", body)
		var list extenderv1.HostPriorityList
		if err := json.Unmarshal(out, &list); err != nil || code != 200 || len(list) != 4 {
			t.Fatalf("%d %s %v", code, out, err)
		}
		scores := map[string]int64{}
		for _, h := range list {
			if h.Score < extenderv1.MinExtenderPriority || h.Score > extenderv1.MaxExtenderPriority {
				t.Fatalf("score %d out of range", h.Score)
			}
			scores[h.Host] = h.Score
		}
		for host, s := range scores {
			if host != tc.best && s >= scores[tc.best] {
				t.Errorf("%s: %s scored %d, not below %s's %d (%v)", tc.strategy, host, s, tc.best, scores[tc.best], scores)
			}
		}
		if scores["full"] != 0 || scores["ghost"] != 0 {
			t.Errorf("%s: nodes that do not fit scored %v", tc.strategy, scores)
		}
	}
}

func TestHealthAndMetricsEndpoints(t *testing.T) {
	t.Parallel()
	f := newFixture(t, FailClosed)
	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		rec := httptest.NewRecorder()
		f.ext.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		if rec.Code != 200 {
			t.Fatalf("%s: %d %s", path, rec.Code, rec.Body)
		}
	}
	problems, err := testutil.GatherAndLint(f.ext.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "visionslice_") {
			t.Errorf("lint %s: %s", p.Metric, p.Text)
		}
	}
}

func fitStrategy(s string) fit.Strategy { return fit.Strategy(s) }

// TestExtenderScrapesAgent runs the extender with its own scrape manager
// against an agent endpoint serving the real agent's exposition.
func TestExtenderScrapesAgent(t *testing.T) {
	t.Parallel()
	expo, err := os.ReadFile(filepath.Join("scrape", "testdata", "agent-sim-h100x2.prom"))
	if err != nil {
		t.Fatal(err)
	}
	agent := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		_, _ = w.Write(expo)
	}))
	defer agent.Close()
	cfg := DefaultConfig()
	cfg.Scrape.Interval, cfg.Scrape.Timeout = 500*time.Millisecond, 500*time.Millisecond
	cfg.Staleness.TTL = time.Minute
	cfg.Targets.Static = map[string]string{"node-1": agent.URL + "/metrics"}
	ext, err := New(cfg, Deps{}, discard())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ext.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := filterNames(t, ext, slicePod("p", 80), "node-1")
		if len(*r.NodeNames) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node never passed: %v", r.FailedNodes)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// 81 slices exceed any GPU's capacity: preemption cannot help.
	if r := filterNames(t, ext, slicePod("p", 81), "node-1"); !strings.Contains(r.FailedAndUnresolvableNodes["node-1"], "free per gpu: 80, 80") {
		t.Fatalf("81 slices: %v %v", r.FailedNodes, r.FailedAndUnresolvableNodes)
	}
	rec := httptest.NewRecorder()
	ext.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if !strings.Contains(rec.Body.String(), `visionslice_scheduler_scrape_up{node="node-1"} 1`) {
		t.Fatalf("scrape health not exported:\n%s", rec.Body)
	}
}

// FuzzVerbs feeds arbitrary bodies to every verb: each answer must be JSON
// with a 200, 400 or 413, never a panic.
func FuzzVerbs(f *testing.F) {
	names := []string{"n1", "ghost"}
	good, _ := json.Marshal(extenderv1.ExtenderArgs{Pod: slicePod("p", 2), NodeNames: &names})
	f.Add("/filter", good)
	f.Add("/prioritize", good)
	f.Add("/bind", []byte(`{"podName":"p","podNamespace":"d","podUID":"u","node":"n1"}`))
	f.Add("/filter", []byte(`{"pod":{"spec":{"containers":[{"resources":{"limits":{"visionslice.io/gpu-slice":"-3"}}}]}},"nodes":{"items":[{}]}}`))
	src := &memSource{}
	src.set("n1", sgpu(0, 8, 3, time.Now()))
	cfg := DefaultConfig()
	cfg.MaxRequestBytes = 1 << 16
	ext, err := New(cfg, Deps{Source: src}, discard())
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, path string, body []byte) {
		switch path {
		case "/filter", "/prioritize", "/bind":
		default:
			return
		}
		code, out := post(t, ext, path, body)
		if code != 200 && code != 400 && code != 413 {
			t.Fatalf("%s: http %d", path, code)
		}
		if !json.Valid(out) {
			t.Fatalf("%s: answer is not JSON: %s", path, out)
		}
	})
}
