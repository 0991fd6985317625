package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/client-go/kubernetes"

	"github.com/visionslice/visionslice/scheduler/fit"
	"github.com/visionslice/visionslice/scheduler/promsource"
	"github.com/visionslice/visionslice/scheduler/scrape"
)

// Source gives the latest metrics of a node's agent; scrape.Manager is one.
// A Source that also has Run(ctx) error is run by Extender.Run.
type Source interface {
	Get(node string) (scrape.Node, bool)
}

var (
	_ Source = (*scrape.Manager)(nil)
	_ Source = (*promsource.Source)(nil)
)

type runner interface {
	Run(ctx context.Context) error
}

// Deps are the extender's outside parts.
type Deps struct {
	// Client reaches the API server: bind, the pod view of the failOpen
	// policy, and pod discovery of the agents. Nil: filter and prioritize
	// only (bind answers with an error), static targets only.
	Client kubernetes.Interface
	// Key signs GPU records; the node agents verify with the same key.
	// Required when Client is set.
	Key []byte
	// Source replaces the scrape manager built from the config (tests,
	// benchmarks, or a Prometheus API source).
	Source Source
	// HTTPClient scrapes the agents (default: a plain client).
	HTTPClient *http.Client
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Extender serves the extender protocol. It is an http.Handler; Run drives
// its background work.
type Extender struct {
	cfg     Config
	weights fit.Weights
	deps    Deps
	now     func() time.Time
	logger  *slog.Logger

	source  Source
	pods    *podView // nil without a client
	assumed *assumeCache
	bindMu  sync.Mutex // one bind at a time: the check and the assume are atomic

	reg     *prometheus.Registry
	metrics *metrics
	mux     *http.ServeMux

	synced  chan struct{} // closed when the pod view has synced (at once without one)
	running atomic.Bool
}

// New builds an extender from a completed, valid config.
func New(cfg Config, deps Deps, logger *slog.Logger) (*Extender, error) {
	cfg.Complete()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("scheduler config: %w", err)
	}
	if deps.Client != nil && len(deps.Key) == 0 {
		return nil, errors.New("an assignment key is required to bind: the node agents verify the scheduler's records with it")
	}
	if deps.Now == nil {
		deps.Now = time.Now
	}
	e := &Extender{
		cfg:     cfg,
		weights: *cfg.Weights,
		deps:    deps,
		now:     deps.Now,
		logger:  logger,
		assumed: newAssumeCache(cfg.AssumeTimeout),
		reg:     prometheus.NewRegistry(),
		synced:  make(chan struct{}),
	}
	e.source = deps.Source
	if e.source == nil && cfg.Prometheus != nil {
		var rt http.RoundTripper
		if deps.HTTPClient != nil {
			rt = deps.HTTPClient.Transport
		}
		ps, err := promsource.New(*cfg.Prometheus, rt, deps.Now, logger.With("component", "prometheus"))
		if err != nil {
			return nil, err
		}
		e.source = ps
		e.reg.MustRegister(ps.Collector())
	} else if e.source == nil {
		var disc scrape.Discoverer
		switch {
		case cfg.Targets.Pods != nil:
			if deps.Client == nil {
				return nil, errors.New("targets.pods needs a kubernetes client")
			}
			disc = &scrape.PodDiscovery{Client: deps.Client, Namespace: cfg.Targets.Pods.Namespace,
				Selector: cfg.Targets.Pods.Selector, Port: cfg.Targets.Pods.Port, Path: cfg.Targets.Pods.Path,
				Logger: logger.With("component", "discovery")}
		default:
			st := make(scrape.Static, 0, len(cfg.Targets.Static))
			for node, u := range cfg.Targets.Static {
				st = append(st, scrape.Target{Node: node, URL: u})
			}
			disc = st
		}
		opts := []scrape.Option{scrape.WithClock(deps.Now)}
		if deps.HTTPClient != nil {
			opts = append(opts, scrape.WithHTTPClient(deps.HTTPClient))
		}
		m, err := scrape.NewManager(cfg.Scrape, disc, logger.With("component", "scrape"), opts...)
		if err != nil {
			return nil, err
		}
		e.source = m
		e.reg.MustRegister(m.Collector())
	} else if c, ok := deps.Source.(interface{ Collector() prometheus.Collector }); ok {
		e.reg.MustRegister(c.Collector())
	}
	if deps.Client != nil {
		pv, err := newPodView(deps.Client, e.assumed.remove)
		if err != nil {
			return nil, err
		}
		e.pods = pv
	} else {
		close(e.synced)
	}
	e.metrics = newMetrics(e.reg, e.assumed)
	e.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	e.mux = e.routes()
	return e, nil
}

// Registry is the extender's own metrics registry (served on /metrics).
func (e *Extender) Registry() *prometheus.Registry { return e.reg }

// ServeHTTP serves the extender verbs, /healthz, /readyz and /metrics.
func (e *Extender) ServeHTTP(w http.ResponseWriter, r *http.Request) { e.mux.ServeHTTP(w, r) }

// Run drives the metrics source, the pod view and the expiry of assumed pods
// until ctx ends. It returns the source's error, or nil after ctx ends.
func (e *Extender) Run(ctx context.Context) error {
	if !e.running.CompareAndSwap(false, true) {
		return errors.New("extender is already running")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	if e.pods != nil {
		wg.Go(func() { e.pods.run(ctx, e.synced) })
	}
	errc := make(chan error, 1)
	if r, ok := e.source.(runner); ok {
		wg.Go(func() { errc <- r.Run(ctx) })
	}
	e.logger.Info("scheduler extender running", "strategy", e.cfg.Strategy, "weights", e.weights,
		"staleness_ttl_seconds", e.cfg.Staleness.TTL.Seconds(), "stale_policy", e.cfg.Staleness.Policy,
		"assume_timeout_seconds", e.cfg.AssumeTimeout.Seconds(), "pod_view", e.pods != nil)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			if err != nil {
				return fmt.Errorf("metrics source: %w", err)
			}
		case <-tick.C:
			e.assumed.gc(e.now(), e.sampleOf)
		}
	}
}

func (e *Extender) ready() bool {
	select {
	case <-e.synced:
		return true
	default:
		return false
	}
}

func (e *Extender) sampleOf(node, gpu string) sample {
	n, ok := e.source.Get(node)
	if !ok {
		return sample{}
	}
	return sampleIn(n.GPUs, gpu)
}

// nodeState is what filter, prioritize and bind know of one node.
type nodeState struct {
	gpus []fit.GPU
	// known is false when there is nothing to decide with: failOpen then
	// passes the node (kube-scheduler's node-level count decides) and
	// failClosed filters it out with reason.
	known  bool
	reason string // why the node's metrics are not used, if they are not
}

// state builds a node's GPUs from its agent's metrics and the pods assumed
// on it, or under failOpen from the API server's view when the metrics are
// stale or absent.
//
// buf is scratch space for the GPUs (its capacity is reused; nil is fine):
// filter and prioritize pass one buffer for all their nodes.
func (e *Extender) state(node string, now time.Time, buf []fit.GPU) nodeState {
	n, ok := e.source.Get(node)
	var reason string
	switch {
	case !ok:
		reason = "no metrics from the node's agent"
	case len(n.GPUs) == 0:
		reason = "no successful scrape of the node's agent"
		if n.Err != nil {
			reason += ": " + n.Err.Error()
		}
	default:
		if oldest := n.Oldest(); now.Sub(oldest) > e.cfg.Staleness.TTL {
			reason = fmt.Sprintf("metrics of the node's agent are stale (oldest sample %s old, ttl %s)",
				now.Sub(oldest).Round(time.Second), e.cfg.Staleness.TTL)
		}
	}
	if reason == "" {
		gpus := fitGPUs(buf[:0], n.GPUs)
		if e.assumed.any(node) {
			for _, a := range e.assumed.live(node, now, func(gpu string) sample { return sampleIn(n.GPUs, gpu) }) {
				addAssumed(gpus, a)
			}
		}
		return nodeState{gpus: gpus, known: true}
	}
	if e.cfg.Staleness.Policy == FailClosed || e.pods == nil || len(n.GPUs) == 0 {
		return nodeState{reason: reason}
	}
	pods := e.pods.onNode(node, e.deps.Key)
	gpus := fallbackGPUs(fitGPUs(nil, n.GPUs), pods) // keeps only the inventory
	seen := make(map[string]bool, len(pods))
	for _, p := range pods {
		seen[p.uid] = true
	}
	for _, a := range e.assumed.live(node, now, func(string) sample { return sample{} }) {
		if !seen[a.podUID] {
			addAssumed(gpus, a)
		}
	}
	return nodeState{gpus: gpus, known: true, reason: reason}
}

// fitGPUs appends the agent's GPUs to dst as fit's input.
func fitGPUs(dst []fit.GPU, gs []scrape.GPU) []fit.GPU {
	for _, g := range gs {
		dst = append(dst, fit.GPU{UUID: g.UUID, Index: g.Index, Healthy: g.Healthy, Capacity: g.Capacity,
			Allocated: g.Allocated, SliceBytes: g.SliceBytes, UnaccountedBytes: g.UnaccountedBytes,
			MemoryTotalBytes: g.MemoryTotalBytes, MemoryUsedBytes: g.MemoryUsedBytes, Utilization: g.Utilization})
	}
	return dst
}

func addAssumed(gpus []fit.GPU, a assumed) {
	for i := range gpus {
		if gpus[i].UUID == a.gpu {
			gpus[i].Assumed += a.slices
			return
		}
	}
}

func sampleIn(gpus []scrape.GPU, uuid string) sample {
	for _, g := range gpus {
		if g.UUID == uuid {
			return sample{allocated: g.Allocated, at: g.Timestamp, known: true}
		}
	}
	return sample{}
}
