// Package nodeagent is the composition root of the visionslice node agent: it
// builds the GPU seam and every component from one Config, serves metrics and
// health on one port, supervises the components with an errgroup and stops
// them within the shutdown timeout.
package nodeagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/visionslice/visionslice/deviceplugin"
	"github.com/visionslice/visionslice/deviceplugin/handoff"
	"github.com/visionslice/visionslice/nodeagent/accounting"
	"github.com/visionslice/visionslice/nodeagent/cgroup"
	"github.com/visionslice/visionslice/nodeagent/enforce"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
	"github.com/visionslice/visionslice/runtime/lifecycle"
	"github.com/visionslice/visionslice/runtime/server"
	"github.com/visionslice/visionslice/runtime/supervisor"
)

// Version is set at build time with -ldflags.
var Version = "dev"

// Agent is one node's visionslice agent.
type Agent struct {
	logger *slog.Logger
	level  *slog.LevelVar

	mu  sync.Mutex
	cfg Config

	reg    *prometheus.Registry
	mux    *http.ServeMux
	reader *gpu.Reader
	poller *gpu.Poller
	sim    *sim.GPUs
	// accounting is nil when enforcement is disabled.
	accounting *accounting.Tracker

	components []component
	ready      []readyCheck
	reloaders  []func(Config)
	closers    []func()
}

type component struct {
	name string
	run  func(ctx context.Context) error
}

type readyCheck struct {
	name  string
	check func() error
}

// Option adjusts how New builds the agent.
type Option func(*options)

type options struct {
	nvml nvml.Interface
}

// WithNVML makes the agent read GPUs through lib instead of the library the
// config names (tests, or an embedding program).
func WithNVML(lib nvml.Interface) Option { return func(o *options) { o.nvml = lib } }

// New builds the agent. On error, whatever was opened is closed again.
func New(cfg Config, logger *slog.Logger, level *slog.LevelVar, opts ...Option) (_ *Agent, err error) {
	cfg.DeriveSliceBytes(logger)
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid config: %w", err)
	}
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if level == nil {
		level = new(slog.LevelVar)
	}
	if l, err := ParseLevel(cfg.Log.Level); err == nil {
		level.Set(l)
	}
	a := &Agent{logger: logger, level: level, cfg: cfg, reg: prometheus.NewRegistry(), mux: http.NewServeMux()}
	defer func() {
		if err != nil {
			a.close()
		}
	}()

	a.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{Namespace: "visionslice_agent"}),
		buildInfo(),
	)

	lib := o.nvml
	if lib == nil {
		if cfg.GPU.IsSim() {
			a.sim, err = sim.New(cfg.GPU.Backend, cfg.NodeName)
			if err != nil {
				return nil, err
			}
			lib = a.sim.Interface()
			if cfg.GPU.SimDebug {
				a.mux.Handle("/debug/sim", a.sim.Handler())
				a.mux.Handle("/debug/sim/", a.sim.Handler())
			}
		} else {
			lib = nvml.New()
		}
	}
	a.reader = gpu.NewReader(lib, logger.With("component", "gpu"), gpu.WithXIDRecovery(cfg.GPU.XIDRecovery))
	if err := a.reader.Init(); err != nil {
		if errors.Is(err, gpu.ErrLibraryNotFound) {
			return nil, fmt.Errorf("gpu backend %s: %w (no NVIDIA driver on this host? use --gpu-backend=sim:h100x2 to simulate)", cfg.GPU.Backend, err)
		}
		return nil, fmt.Errorf("gpu backend %s: %w", cfg.GPU.Backend, err)
	}
	a.closers = append(a.closers, a.reader.Shutdown)

	pollDuration := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "visionslice_agent_poll_duration_seconds",
		Help:    "Time taken by one poll of every GPU and its processes.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 14),
	})
	a.reg.MustRegister(pollDuration)
	a.poller = gpu.NewPoller(a.reader, cfg.GPU.PollInterval, logger.With("component", "poller"), gpu.WithPollDuration(pollDuration))
	gpuCollector := gpu.NewCollector(a.poller, a.reader)
	a.reg.MustRegister(gpuCollector)
	a.add("poller", a.poller.Run)
	a.addReady("gpu_inventory", a.poller.Ready)
	a.onReload(func(c Config) { a.poller.SetInterval(c.GPU.PollInterval) })

	// components: build each component here, register its metrics on a.reg,
	// then a.add / a.addReady / a.onReload / a.closers as it needs.
	if cfg.Enforcement.Enabled {
		enf, err := enforce.NewComponent(cfg.Enforcement, cfg.NodeName, a.poller, a.reg, logger.With("component", "enforcement"))
		if err != nil {
			return nil, fmt.Errorf("enforcement: %w", err)
		}
		a.accounting = enf.Tracker
		gpuCollector.SetGrouper(enf.Tracker)
		a.add("enforcement", enf.Run)
		a.closers = append(a.closers, enf.Close)
		a.onReload(func(c Config) {
			if err := enf.Reload(c.Enforcement); err != nil {
				logger.Warn("enforcement config not reloaded", "err", err)
			}
		})
	}

	if cfg.DevicePlugin.Enabled {
		var dpOpts []deviceplugin.Option
		if cfg.Handoff.Enabled {
			h, err := handoff.NewFromConfig(cfg.Handoff, cfg.NodeName, logger.With("component", "handoff"))
			if err != nil {
				return nil, fmt.Errorf("handoff: %w", err)
			}
			a.add("handoff", h.Run)
			dpOpts = append(dpOpts, deviceplugin.WithHinter(h))
		}
		dp, err := deviceplugin.New(cfg.DevicePlugin, a.poller, a.reg, logger.With("component", "deviceplugin"), dpOpts...)
		if err != nil {
			return nil, fmt.Errorf("device plugin: %w", err)
		}
		a.add("deviceplugin", dp.Run)
	}

	if cfg.Runtime.Enabled {
		deps := server.Deps{GPUs: a.poller, Registerer: a.reg, Version: Version}
		if groups, err := workerCgroups(cfg.Enforcement.CgroupRoot, logger.With("component", "runtime")); err != nil {
			logger.Warn("model workers run without cgroups of their own: an overrun kills the worker's process group instead", "err", err)
		} else {
			deps.Groups = groups
		}
		rt, err := server.New(cfg.Runtime, deps, logger.With("component", "runtime"))
		if err != nil {
			return nil, fmt.Errorf("runtime: %w", err)
		}
		a.add("runtime", rt.Run)
		if a.accounting != nil {
			// The runtime's model workers are accounted as workers of their model.
			a.accounting.SetWorkerSource(func() map[uint32]string {
				out := map[uint32]string{}
				for _, v := range rt.ModelVersions() {
					if pool := v.Pool(); pool != nil {
						for _, pid := range pool.PIDs() {
							out[uint32(pid)] = v.Model()
						}
					}
				}
				return out
			})
		}
		if cfg.Lifecycle.Enabled {
			life, err := lifecycle.New(cfg.Lifecycle, rt, a.poller, a.reg, logger.With("component", "lifecycle"))
			if err != nil {
				return nil, fmt.Errorf("lifecycle: %w", err)
			}
			a.add("lifecycle", life.Run)
		}
	}

	a.mux.Handle("GET /metrics", promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn)}))
	a.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	a.mux.HandleFunc("GET /readyz", a.serveReady)
	a.mux.HandleFunc("GET /debug/gpu", a.serveSnapshot)
	return a, nil
}

func (a *Agent) add(name string, run func(ctx context.Context) error) {
	a.components = append(a.components, component{name: name, run: run})
}

func (a *Agent) addReady(name string, check func() error) {
	a.ready = append(a.ready, readyCheck{name: name, check: check})
}

func (a *Agent) onReload(f func(Config)) { a.reloaders = append(a.reloaders, f) }

// Registry returns the agent's metrics registry.
func (a *Agent) Registry() *prometheus.Registry { return a.reg }

// Poller returns the GPU poller every component subscribes to.
func (a *Agent) Poller() *gpu.Poller { return a.poller }

// Accounting returns the GPU memory accounting (the runtime registers its
// model workers there), nil when enforcement is disabled.
func (a *Agent) Accounting() *accounting.Tracker { return a.accounting }

// Sim returns the simulated GPUs, nil for the nvml backend.
func (a *Agent) Sim() *sim.GPUs { return a.sim }

func (a *Agent) serveReady(w http.ResponseWriter, _ *http.Request) {
	var failed []string
	for _, r := range a.ready {
		if err := r.check(); err != nil {
			failed = append(failed, r.name+": "+err.Error())
		}
	}
	if len(failed) > 0 {
		w.WriteHeader(http.StatusServiceUnavailable)
		for _, f := range failed {
			fmt.Fprintln(w, f)
		}
		return
	}
	fmt.Fprintln(w, "ok")
}

// serveSnapshot shows the latest GPU snapshot, per-process memory included
// (PIDs belong here, never in metric labels).
func (a *Agent) serveSnapshot(w http.ResponseWriter, _ *http.Request) {
	s := a.poller.Snapshot()
	if s == nil {
		http.Error(w, "gpu inventory not read yet", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(s)
}

// Reload applies a new configuration: live fields take effect at once, the
// names of other changed fields are returned as needing a restart.
func (a *Agent) Reload(cfg Config) ([]string, error) {
	cfg.DeriveSliceBytes(a.logger)
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid config: %w", err)
	}
	a.mu.Lock()
	old := a.cfg
	a.cfg = cfg
	a.mu.Unlock()
	if l, err := ParseLevel(cfg.Log.Level); err == nil && cfg.Log.Level != old.Log.Level {
		a.level.Set(l)
	}
	for _, f := range a.reloaders {
		f(cfg)
	}
	needRestart := restartRequired(old, cfg)
	a.logger.Info("config reloaded", "poll_interval", cfg.GPU.PollInterval.String(), "log_level", cfg.Log.Level, "restart_required", needRestart)
	return needRestart, nil
}

// Run serves until ctx ends, then stops every component within the
// shutdown timeout. Whatever New opened is closed when Run returns.
func (a *Agent) Run(ctx context.Context) error {
	defer a.close()
	ln, err := net.Listen("tcp", a.cfg.Metrics.Listen)
	if err != nil {
		return fmt.Errorf("listen metrics: %w", err)
	}
	a.logger.Info("metrics server listening", "addr", ln.Addr().String())

	srv := &http.Server{Handler: a.mux, ReadHeaderTimeout: 10 * time.Second}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(runCtx)
	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("metrics server: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		sctx, scancel := context.WithTimeout(context.Background(), a.cfg.ShutdownTimeout)
		defer scancel()
		return srv.Shutdown(sctx)
	})
	for _, c := range a.components {
		g.Go(func() error {
			if err := c.run(gctx); err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			return nil
		})
	}

	done := make(chan error, 1)
	go func() { done <- g.Wait() }()
	select {
	case err := <-done:
		return err
	case <-gctx.Done():
	}
	a.logger.Info("shutting down", "timeout", a.cfg.ShutdownTimeout.String())
	select {
	case err := <-done:
		if ctx.Err() != nil {
			a.logger.Info("stopped")
		}
		return err
	case <-time.After(a.cfg.ShutdownTimeout):
		return fmt.Errorf("components did not stop within %s", a.cfg.ShutdownTimeout)
	}
}

func (a *Agent) close() {
	for i := len(a.closers) - 1; i >= 0; i-- {
		a.closers[i]()
	}
	a.closers = nil
}

// workerCgroups gives each model worker a cgroup of its own under
// <root>/visionslice, root being the enforcement's cgroup v2 hierarchy (found
// as enforcement does when unset).
func workerCgroups(root string, logger *slog.Logger) (supervisor.Groups, error) {
	m, err := cgroup.Open(root)
	if err != nil {
		return nil, err
	}
	return supervisor.CgroupGroups(m, cgroup.Limits{}, logger)
}

func buildInfo() prometheus.Collector {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "visionslice_agent_build_info",
		Help:        "Build information of the running agent; always 1.",
		ConstLabels: prometheus.Labels{"version": Version, "goversion": runtime.Version()},
	})
	g.Set(1)
	return g
}
