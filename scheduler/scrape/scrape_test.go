package scrape

import (
	"context"
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

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func agentText(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "agent.prom"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func fastConfig() Config {
	return Config{Interval: 500 * time.Millisecond, Timeout: 500 * time.Millisecond, MaxBodyBytes: 64 << 10}
}

// waitScrapes runs m until each node was scraped at least n times.
func waitScrapes(t *testing.T, ctx context.Context, scraped <-chan string, counts map[string]int, n int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		done := true
		for _, c := range counts {
			if c < n {
				done = false
			}
		}
		if done {
			return
		}
		select {
		case node := <-scraped:
			if _, ok := counts[node]; ok {
				counts[node]++
			}
		case <-deadline:
			t.Fatalf("scrapes not seen in time: %v", counts)
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		}
	}
}

func TestManagerScrapesStaticTargets(t *testing.T) {
	t.Parallel()
	text := agentText(t)
	var failing atomic.Bool
	good := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.Contains(r.Header.Get("Accept"), "text/plain") {
			t.Errorf("accept header %q offers no text format", r.Header.Get("Accept"))
		}
		if failing.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		_, _ = w.Write(text)
	}))
	defer good.Close()
	big := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		for range 300 { // ~ 150 KiB > the 64 KiB cap
			_, _ = w.Write([]byte("# padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding\n"))
		}
		_, _ = w.Write(text)
	}))
	defer big.Close()

	scraped := make(chan string, 64)
	m, err := NewManager(fastConfig(), Static{
		{Node: "node-a", URL: good.URL + "/metrics"},
		{Node: "node-big", URL: big.URL + "/metrics"},
		{Node: "node-closed", URL: "http://127.0.0.1:1/metrics"},
	}, discard(), WithScrapeHook(func(n string) {
		select {
		case scraped <- n:
		default:
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	waitScrapes(t, ctx, scraped, map[string]int{"node-a": 0, "node-big": 0, "node-closed": 0}, 1)

	a, ok := m.Get("node-a")
	if !ok || a.Err != nil || len(a.GPUs) != 2 || a.GPUs[0].Allocated != 16 || a.Samples != 19 {
		t.Fatalf("node-a: %+v", a)
	}
	if b, _ := m.Get("node-big"); b.Err == nil || !strings.Contains(b.Err.Error(), "larger than") {
		t.Fatalf("node-big: err %v, want the size cap", b.Err)
	}
	if c, _ := m.Get("node-closed"); c.Err == nil || !c.LastSuccess.IsZero() {
		t.Fatalf("node-closed: %+v", c)
	}
	if _, ok := m.Get("node-unknown"); ok {
		t.Fatal("unknown node found")
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m.Collector())
	if problems, err := testutil.CollectAndLint(m.Collector()); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", err, problems)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP visionslice_scheduler_scrape_up 1 if the last scrape of the node's agent succeeded, 0 otherwise.
# TYPE visionslice_scheduler_scrape_up gauge
visionslice_scheduler_scrape_up{node="node-a"} 1
visionslice_scheduler_scrape_up{node="node-big"} 0
visionslice_scheduler_scrape_up{node="node-closed"} 0
# HELP visionslice_scheduler_scrape_targets Scrape targets with at least one finished scrape.
# TYPE visionslice_scheduler_scrape_targets gauge
visionslice_scheduler_scrape_targets 3
`), "visionslice_scheduler_scrape_up", "visionslice_scheduler_scrape_targets"); err != nil {
		t.Fatal(err)
	}

	// A failing scrape keeps the last good GPUs (with their old timestamps)
	// and records the error; readers judge staleness by the timestamps.
	failing.Store(true)
	waitScrapes(t, ctx, scraped, map[string]int{"node-a": 0}, 2)
	a2, _ := m.Get("node-a")
	if a2.Err == nil || len(a2.GPUs) != 2 || !a2.LastSuccess.Equal(a.LastSuccess) {
		t.Fatalf("after failure: err %v gpus %d last success %v (was %v)", a2.Err, len(a2.GPUs), a2.LastSuccess, a.LastSuccess)
	}
}

func TestOffsetSpreadsTargets(t *testing.T) {
	t.Parallel()
	iv := 10 * time.Second
	now := time.Unix(1_700_000_000, 123)
	phases := map[time.Duration]bool{}
	for i := range 50 {
		tg := Target{Node: "node-" + string(rune('a'+i%26)) + string(rune('a'+i/26)), URL: "http://10.0.0.1:9402/metrics"}
		o := offset(tg, iv, now)
		if o < 0 || o > iv {
			t.Fatalf("offset %s outside [0, %s]", o, iv)
		}
		if o2 := offset(tg, iv, now); o2 != o {
			t.Fatalf("offset not deterministic: %s then %s", o, o2)
		}
		// The phase (time of scrape within the interval) is fixed per target.
		phase := time.Duration((now.UnixNano() + int64(o)) % int64(iv))
		if later := offset(tg, iv, now.Add(3*time.Second)); time.Duration((now.Add(3*time.Second).UnixNano()+int64(later))%int64(iv)) != phase {
			t.Fatalf("phase moved with the start time")
		}
		phases[phase/time.Second] = true
	}
	if len(phases) < 6 {
		t.Fatalf("50 targets landed in only %d of 10 one-second buckets", len(phases))
	}
}

func TestPodDiscovery(t *testing.T) {
	t.Parallel()
	pod := func(name, node, ip string, phase v1.PodPhase, lbl string) *v1.Pod {
		return &v1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "visionslice", Labels: map[string]string{"app": lbl}},
			Spec:       v1.PodSpec{NodeName: node},
			Status:     v1.PodStatus{Phase: phase, PodIP: ip},
		}
	}
	client := fake.NewClientset(
		pod("agent-1", "node-1", "10.0.0.1", v1.PodRunning, "agent"),
		pod("agent-2", "node-2", "", v1.PodPending, "agent"),
		pod("other", "node-1", "10.0.0.9", v1.PodRunning, "other"),
	)
	d := &PodDiscovery{Client: client, Namespace: "visionslice", Selector: "app=agent", Port: 9402, Logger: discard()}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	up := make(chan []Target, 1)
	errc := make(chan error, 1)
	go func() { errc <- d.Run(ctx, up) }()
	next := func() []Target {
		t.Helper()
		select {
		case ts := <-up:
			return ts
		case err := <-errc:
			t.Fatalf("Run returned %v", err)
		case <-time.After(10 * time.Second):
			t.Fatal("no targets sent")
		}
		return nil
	}
	if ts := next(); len(ts) != 1 || ts[0] != (Target{Node: "node-1", URL: "http://10.0.0.1:9402/metrics"}) {
		t.Fatalf("targets %v", ts)
	}
	p2 := pod("agent-2", "node-2", "10.0.0.2", v1.PodRunning, "agent")
	if _, err := client.CoreV1().Pods("visionslice").UpdateStatus(ctx, p2, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if ts := next(); len(ts) != 2 || ts[1].URL != "http://10.0.0.2:9402/metrics" {
		t.Fatalf("targets after agent-2 started %v", ts)
	}
	if err := client.CoreV1().Pods("visionslice").Delete(ctx, "agent-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if ts := next(); len(ts) != 1 || ts[0].Node != "node-2" {
		t.Fatalf("targets after agent-1 deleted %v", ts)
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	for _, c := range []Config{
		{Interval: 0, Timeout: time.Second, MaxBodyBytes: 1},
		{Interval: time.Second, Timeout: 2 * time.Second, MaxBodyBytes: 1},
		{Interval: time.Second, Timeout: time.Second, MaxBodyBytes: 0},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
	if err := DefaultConfig().Validate(); err != nil {
		t.Error(err)
	}
	if err := (&PodDiscovery{Client: fake.NewClientset(), Selector: "", Port: 1}).Validate(); err == nil {
		t.Error("empty selector accepted")
	}
}

// TestAgentMoves: when a node's agent comes back at a new address, the node
// keeps its last good scrape (old timestamps and all) until the new target
// answers, instead of vanishing for an interval.
func TestAgentMoves(t *testing.T) {
	t.Parallel()
	text := agentText(t)
	old := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(text) }))
	defer old.Close()
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "starting", http.StatusServiceUnavailable)
	}))
	defer down.Close()
	scraped := make(chan string, 16)
	m, err := NewManager(fastConfig(), Static{}, discard(), WithScrapeHook(func(n string) { scraped <- n }))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	loops := map[Target]*loop{}
	defer m.sync(ctx, loops, nil)
	m.sync(ctx, loops, map[Target]bool{{Node: "n1", URL: old.URL}: true})
	waitScrapes(t, ctx, scraped, map[string]int{"n1": 0}, 1)
	before, _ := m.Get("n1")

	m.sync(ctx, loops, map[Target]bool{{Node: "n1", URL: down.URL}: true})
	if n, ok := m.Get("n1"); !ok || len(n.GPUs) != 2 {
		t.Fatalf("node dropped while its agent moved: %+v", n)
	}
	for len(scraped) > 0 { // the old loop has stopped; forget its last notices
		<-scraped
	}
	waitScrapes(t, ctx, scraped, map[string]int{"n1": 0}, 1)
	n, _ := m.Get("n1")
	if n.Target.URL != down.URL || n.Err == nil || len(n.GPUs) != 2 || !n.LastSuccess.Equal(before.LastSuccess) {
		t.Fatalf("after the new target failed: %+v", n)
	}
	m.sync(ctx, loops, nil)
	if _, ok := m.Get("n1"); ok {
		t.Fatal("node kept after its target went away")
	}
}
