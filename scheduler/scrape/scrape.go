package scrape

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
)

// Target is one agent to scrape: the node it runs on and its metrics URL.
type Target struct {
	Node string
	URL  string
}

// Discoverer finds targets. Run sends the full current set on up whenever it
// changes (a newer set replaces an older one) until ctx ends.
type Discoverer interface {
	Run(ctx context.Context, up chan<- []Target) error
}

// Config of the scrape loop.
type Config struct {
	// Interval between two scrapes of one target (Prometheus' scrape_interval).
	Interval time.Duration `yaml:"interval"`
	// Timeout of one scrape; at most Interval.
	Timeout time.Duration `yaml:"timeout"`
	// MaxBodyBytes caps one exposition.
	MaxBodyBytes int64 `yaml:"maxBodyBytes"`
}

// DefaultConfig scrapes every 5 s with a 2 s timeout and a 4 MiB cap.
func DefaultConfig() Config {
	return Config{Interval: 5 * time.Second, Timeout: 2 * time.Second, MaxBodyBytes: 4 << 20}
}

// Validate checks the durations and the cap.
func (c Config) Validate() error {
	switch {
	case c.Interval <= 0:
		return fmt.Errorf("scrape interval %s must be positive", c.Interval)
	case c.Timeout <= 0 || c.Timeout > c.Interval:
		return fmt.Errorf("scrape timeout %s must be positive and at most the interval %s", c.Timeout, c.Interval)
	case c.MaxBodyBytes <= 0:
		return fmt.Errorf("scrape maxBodyBytes %d must be positive", c.MaxBodyBytes)
	}
	return nil
}

// Node is the latest scrape of one node's agent.
type Node struct {
	Target Target
	// GPUs from the last successful scrape (kept when a later scrape fails,
	// with their old timestamps, so a reader can decide they are stale).
	GPUs []GPU
	// LastScrape is when the last scrape started, LastSuccess when the last
	// successful one did; Err is the last scrape's error (nil when it worked).
	LastScrape, LastSuccess time.Time
	Err                     error
	Duration                time.Duration
	Samples                 int
}

// Oldest returns the oldest sample timestamp among the node's GPUs (zero
// without GPUs): the node's metrics are as fresh as this.
func (n Node) Oldest() time.Time {
	var o time.Time
	for i, g := range n.GPUs {
		if i == 0 || g.Timestamp.Before(o) {
			o = g.Timestamp
		}
	}
	return o
}

// Manager runs the scrape loops of the discovered targets and holds their
// results. It is safe for concurrent use.
type Manager struct {
	cfg    Config
	disc   Discoverer
	client *http.Client
	now    func() time.Time
	logger *slog.Logger

	mu    sync.RWMutex
	nodes map[string]*Node // by node name

	scraped func(node string) // test hook, called after each stored scrape
}

// Option adjusts a Manager.
type Option func(*Manager)

// WithHTTPClient sets the client used to scrape (default: a plain client;
// the per-scrape timeout comes from Config.Timeout).
func WithHTTPClient(c *http.Client) Option { return func(m *Manager) { m.client = c } }

// WithClock sets the clock that stamps scrapes.
func WithClock(now func() time.Time) Option { return func(m *Manager) { m.now = now } }

// WithScrapeHook sets a function called after every stored scrape.
func WithScrapeHook(f func(node string)) Option { return func(m *Manager) { m.scraped = f } }

// NewManager returns a Manager scraping what disc finds.
func NewManager(cfg Config, disc Discoverer, logger *slog.Logger, opts ...Option) (*Manager, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if disc == nil {
		return nil, errors.New("scrape manager needs a discoverer")
	}
	m := &Manager{cfg: cfg, disc: disc, client: &http.Client{}, now: time.Now, logger: logger, nodes: map[string]*Node{}}
	for _, o := range opts {
		o(m)
	}
	return m, nil
}

// Get returns the latest scrape of a node's agent.
func (m *Manager) Get(node string) (Node, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	n, ok := m.nodes[node]
	if !ok {
		return Node{}, false
	}
	return *n, true
}

type loop struct {
	target Target
	cancel context.CancelFunc
	done   chan struct{}
}

// Run discovers targets and scrapes them until ctx ends. It returns the
// discoverer's error, or nil after ctx ends.
func (m *Manager) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	up := make(chan []Target, 1)
	discErr := make(chan error, 1)
	go func() { discErr <- m.disc.Run(ctx, up) }()

	loops := map[Target]*loop{}
	defer func() {
		for _, l := range loops {
			l.cancel()
			<-l.done
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-discErr:
			if err != nil && ctx.Err() == nil {
				return fmt.Errorf("discover scrape targets: %w", err)
			}
			<-ctx.Done()
			return nil
		case ts := <-up:
			m.sync(ctx, loops, dedupe(ts, m.logger))
		}
	}
}

// dedupe keeps one target per node (the first URL in order): a node runs one
// agent, and two during a rolling update serve the same GPUs.
func dedupe(ts []Target, logger *slog.Logger) map[Target]bool {
	sorted := append([]Target(nil), ts...)
	sortTargets(sorted)
	out := map[Target]bool{}
	prev := ""
	for _, t := range sorted {
		if t.Node == "" || t.URL == "" {
			continue
		}
		if t.Node == prev {
			logger.Warn("several scrape targets for one node, keeping the first", "node", t.Node, "ignored_url", t.URL)
			continue
		}
		prev = t.Node
		out[t] = true
	}
	return out
}

func (m *Manager) sync(ctx context.Context, loops map[Target]*loop, want map[Target]bool) {
	wantNode := make(map[string]bool, len(want))
	for t := range want {
		wantNode[t.Node] = true
	}
	for t, l := range loops {
		if !want[t] {
			l.cancel()
			<-l.done
			delete(loops, t)
			// A node whose agent moved (a new pod IP) keeps its last scrape,
			// with its timestamps, until the new target's first scrape.
			m.mu.Lock()
			if n, ok := m.nodes[t.Node]; ok && n.Target == t && !wantNode[t.Node] {
				delete(m.nodes, t.Node)
			}
			m.mu.Unlock()
			m.logger.Info("scrape target removed", "node", t.Node, "url", t.URL)
		}
	}
	for t := range want {
		if _, ok := loops[t]; ok {
			continue
		}
		lctx, cancel := context.WithCancel(ctx)
		l := &loop{target: t, cancel: cancel, done: make(chan struct{})}
		loops[t] = l
		go func() {
			defer close(l.done)
			m.runLoop(lctx, t)
		}()
		m.logger.Info("scrape target added", "node", t.Node, "url", t.URL)
	}
}

// offset returns how long to wait before the first scrape of t, so that
// target scrapes land at a fixed, hash-derived phase of the interval, as
// Prometheus places them.
func offset(t Target, interval time.Duration, now time.Time) time.Duration {
	h := fnv.New64a()
	h.Write([]byte(t.Node))
	h.Write([]byte{0})
	h.Write([]byte(t.URL))
	iv := int64(interval)
	base := iv - now.UnixNano()%iv
	next := base + int64(h.Sum64()%uint64(iv))
	if next > iv {
		next -= iv
	}
	return time.Duration(next)
}

func (m *Manager) runLoop(ctx context.Context, t Target) {
	timer := time.NewTimer(offset(t, m.cfg.Interval, m.now()))
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return
	case <-timer.C:
	}
	ticker := time.NewTicker(m.cfg.Interval)
	defer ticker.Stop()
	for {
		m.scrapeOnce(ctx, t)
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

const acceptHeader = `application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`

func (m *Manager) scrapeOnce(ctx context.Context, t Target) {
	start := m.now()
	gpus, samples, err := m.fetch(ctx, t, start)
	if ctx.Err() != nil {
		return // target removed or shutting down: a cancelled scrape says nothing
	}
	dur := m.now().Sub(start)
	m.mu.Lock()
	n := m.nodes[t.Node]
	if n == nil || n.Target != t {
		prev := n
		n = &Node{Target: t}
		if prev != nil { // the node's agent moved: its last good GPUs stay until replaced
			n.GPUs, n.LastSuccess = prev.GPUs, prev.LastSuccess
		}
		m.nodes[t.Node] = n
	}
	n.LastScrape, n.Err, n.Duration, n.Samples = start, err, dur, samples
	if err == nil {
		n.GPUs, n.LastSuccess = gpus, start
	}
	m.mu.Unlock()
	if err != nil {
		m.logger.Warn("scrape failed", "node", t.Node, "url", t.URL, "err", err)
	}
	if m.scraped != nil {
		m.scraped(t.Node)
	}
}

func (m *Manager) fetch(ctx context.Context, t Target, start time.Time) ([]GPU, int, error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.URL, nil)
	if err != nil {
		return nil, 0, fmt.Errorf("build scrape request: %w", err)
	}
	req.Header.Set("Accept", acceptHeader)
	req.Header.Set("X-Prometheus-Scrape-Timeout-Seconds", fmt.Sprintf("%g", m.cfg.Timeout.Seconds()))
	resp, err := m.client.Do(req)
	if err != nil {
		return nil, 0, fmt.Errorf("scrape: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		return nil, 0, fmt.Errorf("scrape: http status %s", resp.Status)
	}
	body := &capped{r: resp.Body, left: m.cfg.MaxBodyBytes}
	gpus, samples, err := Parse(body, expfmt.ResponseFormat(resp.Header), start)
	if body.over {
		return nil, samples, fmt.Errorf("scrape: exposition larger than %d bytes", m.cfg.MaxBodyBytes)
	}
	return gpus, samples, err
}

// capped reads at most left bytes and notes an attempt to read past them.
type capped struct {
	r    io.Reader
	left int64
	over bool
}

func (c *capped) Read(p []byte) (int, error) {
	if c.left <= 0 {
		var one [1]byte
		if n, _ := c.r.Read(one[:]); n > 0 {
			c.over = true
			return 0, errors.New("exposition too large")
		}
		return 0, io.EOF
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	return n, err
}

// Collector returns a collector exporting the health of every scrape target,
// read at collection time: up, duration, last success and sample count.
func (m *Manager) Collector() prometheus.Collector { return (*healthCollector)(m) }

type healthCollector Manager

var (
	descUp = prometheus.NewDesc("visionslice_scheduler_scrape_up",
		"1 if the last scrape of the node's agent succeeded, 0 otherwise.", []string{"node"}, nil)
	descDuration = prometheus.NewDesc("visionslice_scheduler_scrape_duration_seconds",
		"Duration of the last scrape of the node's agent.", []string{"node"}, nil)
	descLastSuccess = prometheus.NewDesc("visionslice_scheduler_scrape_last_success_timestamp_seconds",
		"Unix time of the last successful scrape of the node's agent (0 if none).", []string{"node"}, nil)
	descSamples = prometheus.NewDesc("visionslice_scheduler_scrape_samples",
		"Samples read in the last scrape of the node's agent.", []string{"node"}, nil)
	descTargets = prometheus.NewDesc("visionslice_scheduler_scrape_targets",
		"Scrape targets with at least one finished scrape.", nil, nil)
)

func (c *healthCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descUp, descDuration, descLastSuccess, descSamples, descTargets} {
		ch <- d
	}
}

func (c *healthCollector) Collect(ch chan<- prometheus.Metric) {
	m := (*Manager)(c)
	m.mu.RLock()
	defer m.mu.RUnlock()
	ch <- prometheus.MustNewConstMetric(descTargets, prometheus.GaugeValue, float64(len(m.nodes)))
	for name, n := range m.nodes {
		up := 0.0
		if n.Err == nil {
			up = 1
		}
		last := 0.0
		if !n.LastSuccess.IsZero() {
			last = float64(n.LastSuccess.UnixNano()) / 1e9
		}
		ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, up, name)
		ch <- prometheus.MustNewConstMetric(descDuration, prometheus.GaugeValue, n.Duration.Seconds(), name)
		ch <- prometheus.MustNewConstMetric(descLastSuccess, prometheus.GaugeValue, last, name)
		ch <- prometheus.MustNewConstMetric(descSamples, prometheus.GaugeValue, float64(n.Samples), name)
	}
}

func sortTargets(ts []Target) {
	sort.Slice(ts, func(i, j int) bool {
		if ts[i].Node != ts[j].Node {
			return ts[i].Node < ts[j].Node
		}
		return ts[i].URL < ts[j].URL
	})
}

// Static is a Discoverer of a fixed target list.
type Static []Target

// Run sends the targets once and waits for ctx.
func (s Static) Run(ctx context.Context, up chan<- []Target) error {
	select {
	case up <- append([]Target(nil), s...):
	case <-ctx.Done():
		return nil
	}
	<-ctx.Done()
	return nil
}

var _ Discoverer = Static(nil)
