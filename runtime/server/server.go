package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/runtime/batch"
	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/oip"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/supervisor"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/worker"
)

// Pool is what the server needs of the worker processes of one model
// version; *supervisor.Pool is the real one.
type Pool interface {
	// Start launches the workers and returns once they serve.
	Start(ctx context.Context) error
	Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error)
	Ready() bool
	// PIDs of the running workers, for GPU memory per model.
	PIDs() []int
	// Restarts so far by reason.
	Restarts() map[string]uint64
	Close() error
}

var _ Pool = (*supervisor.Pool)(nil)

// PoolFactory makes the (unstarted) pool of one model version.
type PoolFactory func(model *repository.Model, version repository.Version, logger *slog.Logger) (Pool, error)

// GPUSnapshots is the GPU seam's latest view (*gpu.Poller).
type GPUSnapshots interface {
	Snapshot() *gpu.Snapshot
}

// Deps are the server's collaborators.
type Deps struct {
	// NewPool makes worker pools; nil: supervisor pools from cfg.Workers.
	NewPool PoolFactory
	// Groups gives each worker its cgroup (nil: none).
	Groups supervisor.Groups
	// GPUs feeds the GPU memory per model metric (nil: not exported).
	GPUs GPUSnapshots
	// Registerer receives the runtime's metrics (nil: a private registry).
	Registerer prometheus.Registerer
	// Version is reported in server metadata.
	Version string
	// TracerProvider overrides the one built from cfg.Tracing (tests).
	TracerProvider trace.TracerProvider
}

// Server is the inference runtime.
type Server struct {
	cfg     Config
	deps    Deps
	logger  *slog.Logger
	repo    *repository.Repository
	models  map[string]*modelEntry
	metrics *metrics
	front   *oip.Server
	tracing *tracing

	listening chan struct{}
	httpAddr  string
	grpcAddr  string
	loadDone  chan struct{}

	// mu guards models, repo.Models and each entry's versions, which hot
	// reload (reload.go) replaces at run time; hot is its state.
	mu  sync.RWMutex
	hot hotState
}

type modelEntry struct {
	model    *repository.Model
	versions []*modelVersion // ascending
}

// New reads the repository and prepares every served model version; Run
// starts them.
func New(cfg Config, deps Deps, logger *slog.Logger) (*Server, error) {
	if !cfg.Enabled {
		return nil, errors.New("runtime is not enabled")
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Workers.SetDefaults()
	repo, err := repository.Load(cfg.Repository)
	if err != nil {
		return nil, err
	}
	if deps.Registerer == nil {
		deps.Registerer = prometheus.NewRegistry()
	}
	s := &Server{cfg: cfg, deps: deps, logger: logger, repo: repo, models: map[string]*modelEntry{},
		listening: make(chan struct{}), loadDone: make(chan struct{})}
	if s.deps.NewPool == nil {
		s.deps.NewPool = s.supervisorPool
	}
	for _, m := range repo.Models {
		e := &modelEntry{model: m}
		s.models[m.Name] = e
		if m.Err != nil {
			logger.Error("model not served", "model", m.Name, "err", m.Err)
			continue
		}
		served := m.Served()
		versions := make([]string, len(served))
		for i, v := range served {
			versions[i] = strconv.FormatInt(v.Number, 10)
		}
		for i, v := range served {
			e.versions = append(e.versions, &modelVersion{s: s, model: m, v: v, name: m.Name, version: versions[i], md: metadataOf(m, versions[i], versions)})
		}
	}
	if deps.TracerProvider != nil {
		s.tracing = &tracing{provider: deps.TracerProvider, tracer: deps.TracerProvider.Tracer("visionslice/runtime"), on: true}
	} else if s.tracing, err = newTracing(cfg.Tracing); err != nil {
		return nil, err
	}
	if s.metrics, err = newMetrics(deps.Registerer, s); err != nil {
		return nil, fmt.Errorf("register runtime metrics: %w", err)
	}
	s.front = oip.NewServer(s, oip.Options{Name: "visionslice", Version: deps.Version, MaxBodyBytes: cfg.MaxBodyBytes,
		Tracer: s.tracing.tracer, Propagator: propagation.TraceContext{}, Observer: requestObserver{s}}, logger)
	logger.Info("model repository read", "repository", cfg.Repository, "models", len(repo.Models), "versions", len(s.versionsList()))
	return s, nil
}

func (s *Server) supervisorPool(m *repository.Model, v repository.Version, logger *slog.Logger) (Pool, error) {
	model := supervisor.Model{Name: m.Name + "/" + strconv.FormatInt(v.Number, 10), ModelPath: v.Path, Spec: m.Config}
	if limit := s.cfg.WorkerGPULimit(m.Config.Slices); limit > 0 {
		model.Device, model.GPUMemLimitBytes = s.cfg.Device, limit
	}
	return supervisor.New(s.cfg.Workers, model, s.deps.Groups, supervisor.Hooks{}, logger)
}

func metadataOf(m *repository.Model, version string, versions []string) *oip.ModelMetadata {
	c := m.Config
	md := &oip.ModelMetadata{Name: m.Name, Version: version, Versions: versions, Platform: c.Platform, MaxBatchSize: c.MaxBatchSize}
	for i := range c.Inputs {
		md.Inputs = append(md.Inputs, oip.TensorMetadata{Name: c.Inputs[i].Name, Datatype: c.Inputs[i].Datatype, Shape: c.FullDims(&c.Inputs[i])})
	}
	for i := range c.Outputs {
		md.Outputs = append(md.Outputs, oip.TensorMetadata{Name: c.Outputs[i].Name, Datatype: c.Outputs[i].Datatype, Shape: c.FullDims(&c.Outputs[i])})
	}
	return md
}

func (s *Server) versionsList() []*modelVersion {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*modelVersion
	for _, m := range s.repo.Models {
		out = append(out, s.models[m.Name].versions...)
	}
	return out
}

// Handler is the HTTP API (for tests and embedding).
func (s *Server) Handler() http.Handler { return s.repositoryAPI(s.front.Handler()) }

// Listening is closed once the listeners are bound; HTTPAddr and GRPCAddr
// are set then.
func (s *Server) Listening() <-chan struct{} { return s.listening }

// HTTPAddr is the bound HTTP address.
func (s *Server) HTTPAddr() string { return s.httpAddr }

// GRPCAddr is the bound gRPC address.
func (s *Server) GRPCAddr() string { return s.grpcAddr }

// Loaded is closed when every model version finished loading (or failed).
func (s *Server) Loaded() <-chan struct{} { return s.loadDone }

// Ready reports whether every served model version is ready.
func (s *Server) Ready() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, m := range s.repo.Models {
		e := s.models[m.Name]
		if m.Err != nil {
			return false
		}
		for _, v := range e.versions {
			if !v.Ready() {
				return false
			}
		}
	}
	return true
}

// Model implements oip.Backend.
func (s *Server) Model(name, version string) (oip.Model, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	e, ok := s.models[name]
	if !ok {
		return nil, fmt.Errorf("model %q: %w", name, inferr.ErrNotFound)
	}
	if e.model.Err != nil {
		return nil, fmt.Errorf("%w: model %q failed to load: %w", inferr.ErrUnavailable, name, e.model.Err)
	}
	if len(e.versions) == 0 {
		return nil, fmt.Errorf("%w: model %q has no version loaded", inferr.ErrUnavailable, name)
	}
	if version == "" {
		return s.pickDefaultLocked(e), nil
	}
	for _, v := range e.versions {
		if v.version == version {
			return v, nil
		}
	}
	served := make([]string, len(e.versions))
	for i, v := range e.versions {
		served[i] = v.version
	}
	return nil, fmt.Errorf("model %q version %q (served: %s): %w", name, version, strings.Join(served, ", "), inferr.ErrNotFound)
}

// lookup finds a served version as Model does, but without routing:
// version "" is the newest, and a canary's split is left alone.
func (s *Server) lookup(name, version string) *modelVersion {
	s.mu.RLock()
	defer s.mu.RUnlock()
	e := s.models[name]
	if e == nil || e.model.Err != nil || len(e.versions) == 0 {
		return nil
	}
	if version == "" {
		return e.versions[len(e.versions)-1]
	}
	for _, v := range e.versions {
		if v.version == version {
			return v
		}
	}
	return nil
}

// Run binds the listeners, serves at once (readiness says when models are
// loaded), loads every model version, and on ctx's end stops accepting,
// drains, stops batchers and workers.
func (s *Server) Run(ctx context.Context) error {
	var httpLn, grpcLn net.Listener
	var err error
	defer func() {
		if httpLn != nil {
			httpLn.Close()
		}
		if grpcLn != nil {
			grpcLn.Close()
		}
		s.tracing.shutdown(s.logger)
	}()
	if s.cfg.HTTPListen != "" {
		if httpLn, err = net.Listen("tcp", s.cfg.HTTPListen); err != nil {
			return fmt.Errorf("listen http: %w", err)
		}
		s.httpAddr = httpLn.Addr().String()
	}
	if s.cfg.GRPCListen != "" {
		network, addr := "tcp", s.cfg.GRPCListen
		if p, ok := strings.CutPrefix(addr, "unix://"); ok {
			network, addr = "unix", p
		}
		if grpcLn, err = net.Listen(network, addr); err != nil {
			return fmt.Errorf("listen grpc: %w", err)
		}
		s.grpcAddr = grpcLn.Addr().String()
	}
	close(s.listening)
	s.logger.Info("inference runtime listening", "http", s.httpAddr, "grpc", s.grpcAddr)

	serveCtx, stopServing := context.WithCancel(ctx)
	defer stopServing()
	g, gctx := errgroup.WithContext(serveCtx)
	var httpSrv *http.Server
	if httpLn != nil {
		httpSrv = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
		ln := httpLn
		g.Go(func() error {
			if err := httpSrv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("serve http: %w", err)
			}
			return nil
		})
	}
	var grpcSrv *grpc.Server
	if grpcLn != nil {
		opts := s.front.GRPCServerOptions()
		if s.tracing.enabled() {
			opts = append(opts, grpc.StatsHandler(otelgrpc.NewServerHandler(
				otelgrpc.WithTracerProvider(s.tracing.provider), otelgrpc.WithPropagators(propagation.TraceContext{}))))
		}
		grpcSrv = grpc.NewServer(opts...)
		s.front.Register(grpcSrv)
		ln := grpcLn
		g.Go(func() error {
			if err := grpcSrv.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				return fmt.Errorf("serve grpc: %w", err)
			}
			return nil
		})
	}

	// Batchers outlive the listeners so that draining requests complete.
	batchCtx, stopBatchers := context.WithCancel(context.Background())
	var batchers sync.WaitGroup
	s.setLive(gctx, batchCtx, &batchers)
	defer func() {
		stopBatchers()
		batchers.Wait()
		for _, v := range s.versionsList() {
			v.close()
		}
	}()
	go func() {
		defer close(s.loadDone)
		var wg sync.WaitGroup
		for _, v := range s.versionsList() {
			wg.Add(1)
			go func() {
				defer wg.Done()
				v.load(gctx, s.versionCtx(v, batchCtx), &batchers)
			}()
		}
		wg.Wait()
	}()

	<-gctx.Done()
	s.logger.Info("inference runtime stopping")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownGrace)
	defer cancel()
	if httpSrv != nil {
		if err := httpSrv.Shutdown(shutdownCtx); err != nil {
			httpSrv.Close()
		}
	}
	if grpcSrv != nil {
		done := make(chan struct{})
		go func() { grpcSrv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-shutdownCtx.Done():
			grpcSrv.Stop()
		}
	}
	err = g.Wait()
	<-s.loadDone
	return err
}

// modelVersion is one served version: pool + batcher. It implements
// oip.Model.
type modelVersion struct {
	s       *Server
	model   *repository.Model
	v       repository.Version
	name    string
	version string
	md      *oip.ModelMetadata

	mu      sync.Mutex
	pool    Pool
	batcher *batch.Batcher
	loadErr error
	loadDur time.Duration

	life     lifeHolder   // lifecycle state (lifecycle.go)
	inflight atomic.Int64 // requests inside Infer, for draining
}

var _ oip.Model = (*modelVersion)(nil)

func (mv *modelVersion) Metadata() *oip.ModelMetadata { return mv.withLife(mv.md) }

func (mv *modelVersion) Ready() bool {
	mv.mu.Lock()
	defer mv.mu.Unlock()
	return mv.batcher != nil && mv.lifeReady(mv.pool.Ready())
}

func (mv *modelVersion) poolOrNil() Pool {
	mv.mu.Lock()
	defer mv.mu.Unlock()
	return mv.pool
}

func (mv *modelVersion) loadDuration() time.Duration {
	mv.mu.Lock()
	defer mv.mu.Unlock()
	return mv.loadDur
}

func (mv *modelVersion) Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	done, err := mv.enter()
	if err != nil {
		return nil, err
	}
	defer done()
	mv.mu.Lock()
	b, loadErr := mv.batcher, mv.loadErr
	mv.mu.Unlock()
	if b == nil {
		if loadErr != nil {
			return nil, fmt.Errorf("%w: model %s version %s failed to load: %w", inferr.ErrUnavailable, mv.name, mv.version, loadErr)
		}
		return nil, &inferr.RetryAfter{Msg: fmt.Sprintf("model %s version %s is loading", mv.name, mv.version), After: time.Second}
	}
	return b.Infer(ctx, inputs, outputs)
}

// load starts the pool and the batcher; a failure is kept and reported by
// readiness, metrics and inference errors.
func (mv *modelVersion) load(ctx, batchCtx context.Context, batchers *sync.WaitGroup) {
	logger := mv.s.logger.With("model", mv.name, "version", mv.version)
	start := time.Now()
	logger.Info("model loading", "path", mv.v.Path)
	defer mv.trackLoad(logger, start)()
	pool, err := mv.s.deps.NewPool(mv.model, mv.v, logger)
	if err == nil {
		mv.mu.Lock()
		mv.pool = pool
		mv.mu.Unlock()
		err = pool.Start(ctx)
	}
	var b *batch.Batcher
	if err == nil {
		b, err = batch.New(batchConfig(mv.model.Config), tracedPool{pool: pool, tracer: mv.s.tracing.tracer,
			attrs: []attribute.KeyValue{attribute.String("model", mv.name), attribute.String("model.version", mv.version)},
			prep:  mv.s.metrics.prep.WithLabelValues(mv.name, mv.version)},
			logger, batch.WithTracer(mv.s.tracing.tracer), batch.WithObserver(batchObserver{
				queue:   mv.s.metrics.queue.WithLabelValues(mv.name, mv.version),
				compute: mv.s.metrics.compute.WithLabelValues(mv.name, mv.version),
				batch:   mv.s.metrics.batch.WithLabelValues(mv.name, mv.version),
			}))
	}
	mv.mu.Lock()
	defer mv.mu.Unlock()
	mv.loadDur = time.Since(start)
	if err != nil {
		mv.loadErr = err
		logger.Error("model failed to load", "duration_seconds", mv.loadDur.Seconds(), "err", err)
		return
	}
	mv.batcher = b
	batchers.Add(1)
	go func() {
		defer batchers.Done()
		_ = b.Run(batchCtx)
	}()
	logger.Info("model ready", "duration_seconds", mv.loadDur.Seconds())
}

func (mv *modelVersion) close() {
	mv.mu.Lock()
	p := mv.pool
	mv.batcher = nil
	mv.mu.Unlock()
	if p != nil {
		if err := p.Close(); err != nil {
			mv.s.logger.Warn("closing model workers", "model", mv.name, "version", mv.version, "err", err)
		}
	}
}

// batchConfig derives the batcher's settings from the model config.
func batchConfig(c *repository.Config) batch.Config {
	bc := batch.Config{MaxBatchSize: 1, MaxQueueSize: repository.DefaultMaxQueueSize, Concurrency: c.Instances}
	if d := c.DynamicBatching; d != nil {
		bc.MaxBatchSize = c.MaxBatchSize
		bc.MaxQueueDelay = d.MaxQueueDelay
		bc.PreferredBatchSizes = slices.Clone(d.PreferredBatchSizes)
		bc.MaxQueueSize = d.MaxQueueSize
		bc.DefaultTimeout = d.DefaultTimeout
	}
	return bc
}

// tracedPool puts a span around each worker call.
type tracedPool struct {
	pool   Pool
	tracer trace.Tracer
	attrs  []attribute.KeyValue
	// prep observes the worker's preprocessing time of each call.
	prep prometheus.Observer
}

func (t tracedPool) Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	ctx, span := t.tracer.Start(ctx, "worker.infer", trace.WithAttributes(t.attrs...))
	defer span.End()
	var tm worker.Timings
	out, err := t.pool.Infer(worker.WithTimings(ctx, &tm), inputs, outputs)
	if tm.Preprocess > 0 {
		span.SetAttributes(attribute.Float64("preprocess.seconds", tm.Preprocess.Seconds()))
		if t.prep != nil {
			t.prep.Observe(tm.Preprocess.Seconds())
		}
	}
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	return out, err
}
