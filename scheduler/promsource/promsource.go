// Package promsource is the extender's alternative metrics source: instead
// of scraping the agents itself, it asks an existing Prometheus (which
// already scrapes them, e.g. through the PodMonitor in manifests/monitoring)
// over its HTTP API with client_golang's api package.
//
// One range query per interval fetches the raw samples of the agent's GPU
// metrics over the last Lookback; the newest sample of each series is kept
// with its own timestamp, so the extender's TTL judges staleness by when the
// agent was last scraped, not by when this source asked.
package promsource

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/api"
	promv1 "github.com/prometheus/client_golang/api/prometheus/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/scheduler/scrape"
)

// Config of the Prometheus source.
type Config struct {
	// URL of the Prometheus server, e.g. http://prometheus-operated.monitoring.svc:9090.
	URL string `yaml:"url"`
	// NodeLabel is the target label that names the node (the PodMonitor in
	// manifests/monitoring relabels the pod's node name into "node").
	NodeLabel string `yaml:"nodeLabel"`
	// Interval between queries, Timeout of one query.
	Interval time.Duration `yaml:"interval"`
	Timeout  time.Duration `yaml:"timeout"`
	// Lookback is the range of the query: series with no sample in it are
	// gone. Make it longer than Prometheus' scrape interval.
	Lookback time.Duration `yaml:"lookback"`
}

// Complete fills defaults: node label "node", 5 s interval and timeout
// 2 s, 2 min lookback.
func (c *Config) Complete() {
	if c.NodeLabel == "" {
		c.NodeLabel = "node"
	}
	if c.Interval == 0 {
		c.Interval = 5 * time.Second
	}
	if c.Timeout == 0 {
		c.Timeout = min(2*time.Second, c.Interval)
	}
	if c.Lookback == 0 {
		c.Lookback = 2 * time.Minute
	}
}

// Validate checks a completed config.
func (c Config) Validate() error {
	var errs []error
	if !strings.HasPrefix(c.URL, "http://") && !strings.HasPrefix(c.URL, "https://") {
		errs = append(errs, fmt.Errorf("prometheus.url %q is not an http(s) URL", c.URL))
	}
	if !model.LabelName(c.NodeLabel).IsValidLegacy() {
		errs = append(errs, fmt.Errorf("prometheus.nodeLabel %q is not a label name", c.NodeLabel))
	}
	if c.Interval <= 0 || c.Timeout <= 0 || c.Timeout > c.Interval || c.Lookback <= 0 {
		errs = append(errs, fmt.Errorf("prometheus: interval %s and lookback %s must be positive, timeout %s positive and at most the interval",
			c.Interval, c.Lookback, c.Timeout))
	}
	return errors.Join(errs...)
}

// Source answers Get from the latest query result.
type Source struct {
	cfg    Config
	api    promv1.API
	query  string
	now    func() time.Time
	logger *slog.Logger

	mu          sync.RWMutex
	nodes       map[string]scrape.Node
	lastErr     error
	lastSuccess time.Time
	duration    time.Duration
	series      int
}

// New returns a Source querying cfg.URL; rt may be nil (default transport).
func New(cfg Config, rt http.RoundTripper, now func() time.Time, logger *slog.Logger) (*Source, error) {
	cfg.Complete()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if now == nil {
		now = time.Now
	}
	client, err := api.NewClient(api.Config{Address: cfg.URL, RoundTripper: rt})
	if err != nil {
		return nil, fmt.Errorf("prometheus client: %w", err)
	}
	names := scrape.WantedNames()
	for i, n := range names {
		names[i] = regexp.QuoteMeta(n)
	}
	q := fmt.Sprintf(`{__name__=~"%s"}[%s]`, strings.Join(names, "|"), model.Duration(cfg.Lookback))
	return &Source{cfg: cfg, api: promv1.NewAPI(client), query: q, now: now, logger: logger, nodes: map[string]scrape.Node{}}, nil
}

// Get returns the node's GPUs from the latest successful query.
func (s *Source) Get(node string) (scrape.Node, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	n, ok := s.nodes[node]
	return n, ok
}

// Run queries every interval until ctx ends.
func (s *Source) Run(ctx context.Context) error {
	t := time.NewTicker(s.cfg.Interval)
	defer t.Stop()
	for {
		s.Refresh(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Refresh runs one query and replaces the node table when it succeeds.
func (s *Source) Refresh(ctx context.Context) {
	start := s.now()
	nodes, series, err := s.fetch(ctx, start)
	dur := s.now().Sub(start)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lastErr, s.duration = err, dur
	if err != nil {
		s.logger.Warn("prometheus query failed; keeping the last result", "url", s.cfg.URL, "err", err)
		return
	}
	s.nodes, s.lastSuccess, s.series = nodes, start, series
}

func (s *Source) fetch(ctx context.Context, at time.Time) (map[string]scrape.Node, int, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	v, warnings, _, err := s.api.Query(ctx, s.query, at, promv1.WithTimeout(s.cfg.Timeout))
	if err != nil {
		return nil, 0, fmt.Errorf("query prometheus: %w", err)
	}
	if len(warnings) > 0 {
		s.logger.Debug("prometheus query warnings", "warnings", strings.Join(warnings, "; "))
	}
	m, ok := v.(model.Matrix)
	if !ok {
		return nil, 0, fmt.Errorf("query prometheus: got a %s, want a matrix", v.Type())
	}
	builders := map[string]*scrape.Builder{}
	var errs []error
	for _, ss := range m {
		if len(ss.Values) == 0 {
			continue
		}
		node := string(ss.Metric[model.LabelName(s.cfg.NodeLabel)])
		if node == "" {
			continue // a series Prometheus did not label with a node
		}
		last := ss.Values[len(ss.Values)-1]
		b := builders[node]
		if b == nil {
			b = &scrape.Builder{}
			builders[node] = b
		}
		if err := b.Add(string(ss.Metric[model.MetricNameLabel]), string(ss.Metric[slice.LabelGPUUUID]),
			string(ss.Metric[slice.LabelGPUIndex]), float64(last.Value), last.Timestamp.Time()); err != nil {
			errs = append(errs, fmt.Errorf("node %s: %w", node, err))
		}
	}
	nodes := make(map[string]scrape.Node, len(builders))
	for node, b := range builders {
		gpus, err := b.GPUs()
		if err != nil {
			errs = append(errs, fmt.Errorf("node %s: %w", node, err))
			continue
		}
		nodes[node] = scrape.Node{Target: scrape.Target{Node: node, URL: s.cfg.URL}, GPUs: gpus}
	}
	if len(errs) > 0 {
		// One bad node must not blind the extender to the others.
		s.logger.Warn("prometheus samples refused", "err", errors.Join(errs...))
	}
	return nodes, len(m), nil
}

// Collector exports the source's health: up, duration, last success, series.
func (s *Source) Collector() prometheus.Collector { return (*collector)(s) }

type collector Source

var (
	descUp = prometheus.NewDesc("visionslice_scheduler_prometheus_up",
		"1 if the last query of Prometheus succeeded, 0 otherwise.", nil, nil)
	descDuration = prometheus.NewDesc("visionslice_scheduler_prometheus_query_duration_seconds",
		"Duration of the last query of Prometheus.", nil, nil)
	descLastSuccess = prometheus.NewDesc("visionslice_scheduler_prometheus_last_success_timestamp_seconds",
		"Unix time of the last successful query of Prometheus (0 if none).", nil, nil)
	descSeries = prometheus.NewDesc("visionslice_scheduler_prometheus_series",
		"Series returned by the last successful query of Prometheus.", nil, nil)
	descNodes = prometheus.NewDesc("visionslice_scheduler_prometheus_nodes",
		"Nodes with GPUs in the last successful query of Prometheus.", nil, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descUp, descDuration, descLastSuccess, descSeries, descNodes} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := (*Source)(c)
	s.mu.RLock()
	defer s.mu.RUnlock()
	up, last := 0.0, 0.0
	if s.lastErr == nil && !s.lastSuccess.IsZero() {
		up = 1
	}
	if !s.lastSuccess.IsZero() {
		last = float64(s.lastSuccess.UnixNano()) / 1e9
	}
	ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, up)
	ch <- prometheus.MustNewConstMetric(descDuration, prometheus.GaugeValue, s.duration.Seconds())
	ch <- prometheus.MustNewConstMetric(descLastSuccess, prometheus.GaugeValue, last)
	ch <- prometheus.MustNewConstMetric(descSeries, prometheus.GaugeValue, float64(s.series))
	ch <- prometheus.MustNewConstMetric(descNodes, prometheus.GaugeValue, float64(len(s.nodes)))
}
