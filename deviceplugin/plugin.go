package deviceplugin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/podresources"
)

// GPUSource is the GPU state the plugin reads: gpu.Poller implements it.
type GPUSource interface {
	// Snapshot returns the latest snapshot, nil before the first poll.
	Snapshot() *gpu.Snapshot
	// Subscribe delivers snapshots as they change (newest replaces unread).
	Subscribe() (<-chan *gpu.Snapshot, func())
}

var _ GPUSource = (*gpu.Poller)(nil)

// GPUHinter names the GPU the scheduler chose for the container being
// admitted, if any. GetPreferredAllocation takes its slices from that GPU when
// the GPU can hold them and falls back to its own policy otherwise (ok=false,
// an unknown GPU, or one without enough free slices). Calls are bounded by a
// one-second context.
type GPUHinter interface {
	PreferredGPU(ctx context.Context, size int) (gpuUUID string, ok bool)
}

// Option configures a Plugin.
type Option func(*Plugin)

// WithHinter makes GetPreferredAllocation follow h's GPU choice.
func WithHinter(h GPUHinter) Option { return func(p *Plugin) { p.hinter = h } }

// podLister is what the ledger needs of the kubelet's pod-resources API.
type podLister interface {
	List(ctx context.Context) ([]podresources.ContainerDevices, error)
	Allocatable(ctx context.Context) (map[string][]string, error)
}

var _ podLister = (*podresources.Client)(nil)

// Plugin is the visionslice.io/gpu-slice device plugin.
type Plugin struct {
	pluginapi.UnimplementedDevicePluginServer

	cfg     Config
	src     GPUSource
	hinter  GPUHinter
	logger  *slog.Logger
	metrics *metrics
	ledger  *ledger

	mu      sync.Mutex
	inv     *inventory
	changed chan struct{} // closed and replaced when inv's devices change

	listerMu      sync.Mutex
	lister        podLister
	listerFailing bool // last pod-resources call failed (log state changes only)

	// Serving state, owned by Run's goroutine.
	srv      *grpc.Server
	serveErr chan error
}

var _ pluginapi.DevicePluginServer = (*Plugin)(nil)

// New returns a plugin reading GPUs from src. cfg gets its defaults and is
// validated; reg (may be nil) receives the plugin's metrics.
func New(cfg Config, src GPUSource, reg prometheus.Registerer, logger *slog.Logger, opts ...Option) (*Plugin, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("device plugin config: %w", err)
	}
	if src == nil {
		return nil, errors.New("device plugin: no gpu source")
	}
	p := &Plugin{
		cfg:     cfg,
		src:     src,
		logger:  logger,
		ledger:  newLedger(),
		inv:     buildInventory(nil, nil, cfg.sliceBytes(), cfg.reservedBytes()),
		changed: make(chan struct{}),
	}
	for _, o := range opts {
		o(p)
	}
	m, err := newMetrics(p, reg)
	if err != nil {
		return nil, err
	}
	p.metrics = m
	return p, nil
}

// SocketPath is where the plugin serves the DevicePlugin service.
func (p *Plugin) SocketPath() string { return filepath.Join(p.cfg.SocketDir, p.cfg.PluginSocket) }

func (p *Plugin) kubeletSocket() string { return filepath.Join(p.cfg.SocketDir, p.cfg.KubeletSocket) }

// Allocations returns the ledger: every held slice and its owner, when known.
func (p *Plugin) Allocations() []Allocation { return p.ledger.list() }

// AllocatedSlices returns how many slices are held on each GPU, by UUID.
func (p *Plugin) AllocatedSlices() map[string]int { return p.ledger.perGPU() }

// current returns the advertised inventory and a channel closed when it changes.
func (p *Plugin) current() (*inventory, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.inv, p.changed
}

// update rebuilds the inventory from s and wakes ListAndWatch streams when
// the advertised devices changed.
func (p *Plugin) update(s *gpu.Snapshot) {
	p.mu.Lock()
	defer p.mu.Unlock()
	next := buildInventory(s, p.inv, p.cfg.sliceBytes(), p.cfg.reservedBytes())
	if sameDevices(p.inv, next) {
		p.inv = next
		return
	}
	for _, g := range next.gpus {
		if old, ok := p.inv.gpu(g.UUID); !ok || old.Healthy != g.Healthy {
			p.logger.Info("gpu slices advertised", "gpu_uuid", g.UUID, "gpu", g.Index,
				"slices", g.Slices, "healthy", g.Healthy, "reason", g.Reason)
		}
	}
	p.inv = next
	close(p.changed)
	p.changed = make(chan struct{})
}

// Run serves the plugin until ctx ends: it rebuilds the ledger from
// pod-resources, waits for the first GPU snapshot, serves its socket,
// registers with the kubelet, and re-serves and re-registers whenever the
// kubelet restarts (its socket is re-created or ours removed). On return the
// socket is gone.
func (p *Plugin) Run(ctx context.Context) error {
	p.logger.Info("device plugin starting", "resource", slice.ResourceName, "socket", p.SocketPath(),
		"kubelet_socket", p.kubeletSocket(), "slice_mib", p.cfg.SliceMiB, "reserved_mib", p.cfg.ReservedMiB,
		"policy", p.cfg.Policy, "cdi", p.cfg.CDI.Enabled, "hinter", p.hinter != nil)
	defer p.closeLister()

	snaps, unsubscribe := p.src.Subscribe()
	defer unsubscribe()

	if err := p.waitForDir(ctx); err != nil || ctx.Err() != nil {
		return err
	}
	watcher, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch device plugin folder: %w", err)
	}
	defer watcher.Close()
	if err := watcher.Add(p.cfg.SocketDir); err != nil {
		return fmt.Errorf("watch device plugin folder %s: %w", p.cfg.SocketDir, err)
	}

	if s := p.src.Snapshot(); s != nil {
		p.update(s)
	} else {
		select {
		case <-ctx.Done():
			return nil
		case s := <-snaps:
			p.update(s)
		}
	}
	p.rebuild(ctx)

	p.serveErr = make(chan error, 1)
	if err := p.serve(); err != nil {
		return err
	}
	defer p.stopServing()

	kick := make(chan struct{}, 1)
	kickRegister := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	regCtx, stopRegistrar := context.WithCancel(ctx)
	defer stopRegistrar()
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.registrar(regCtx, kick)
	}()
	kickRegister()

	reconcile := time.NewTicker(p.cfg.ReconcileInterval)
	defer reconcile.Stop()
	for {
		select {
		case <-ctx.Done():
			p.logger.Info("device plugin stopping")
			return nil
		case s, ok := <-snaps:
			if ok {
				p.update(s)
			}
		case ev, ok := <-watcher.Events:
			if !ok {
				return errors.New("device plugin folder watch closed")
			}
			switch {
			case ev.Name == p.kubeletSocket() && ev.Has(fsnotify.Create):
				p.logger.Info("kubelet socket created; registering again")
				kickRegister()
			case ev.Name == p.SocketPath() && (ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename)):
				if _, err := os.Lstat(p.SocketPath()); err == nil {
					continue // re-created since (by us)
				}
				p.logger.Info("plugin socket removed; serving again")
				if err := p.reserve(); err != nil {
					return err
				}
				kickRegister()
			}
		case err := <-watcher.Errors:
			p.logger.Warn("device plugin folder watch error", "err", err)
		case err := <-p.serveErr:
			p.logger.Warn("device plugin server stopped; serving again", "err", err)
			if err := p.reserve(); err != nil {
				return err
			}
			kickRegister()
		case <-reconcile.C:
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			p.reconcile(rctx)
			cancel()
		}
	}
}

// waitForDir waits until the device-plugins folder exists: the kubelet
// makes it, and an agent started before the kubelet (or on a host without
// one, with simulated GPUs) should wait rather than fail.
func (p *Plugin) waitForDir(ctx context.Context) error {
	logged := false
	for {
		fi, err := os.Stat(p.cfg.SocketDir)
		switch {
		case err == nil && fi.IsDir():
			return nil
		case err == nil:
			return fmt.Errorf("device plugin folder %s is not a folder", p.cfg.SocketDir)
		case !errors.Is(err, os.ErrNotExist):
			return fmt.Errorf("device plugin folder: %w", err)
		}
		if !logged {
			p.logger.Warn("device plugin folder missing; waiting for the kubelet to make it", "socket_dir", p.cfg.SocketDir)
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// serve listens on the plugin socket and serves the DevicePlugin service.
func (p *Plugin) serve() error {
	path := p.SocketPath()
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale plugin socket %s: %w", path, err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("listen on plugin socket %s: %w", path, err)
	}
	srv := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(srv, p)
	p.srv = srv
	errCh := p.serveErr
	go func() {
		if err := srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			select {
			case errCh <- err:
			default:
			}
		}
	}()
	return nil
}

// stopServing stops the server (ending ListAndWatch streams) and removes
// the socket.
func (p *Plugin) stopServing() {
	if p.srv == nil {
		return
	}
	p.srv.Stop()
	p.srv = nil
	if err := os.Remove(p.SocketPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		p.logger.Warn("remove plugin socket", "err", err)
	}
}

func (p *Plugin) reserve() error {
	p.stopServing()
	return p.serve()
}

// registrar registers with the kubelet after every kick, retrying with a
// short backoff until it succeeds or the next kick comes.
func (p *Plugin) registrar(ctx context.Context, kick <-chan struct{}) {
	const minBackoff, maxBackoff = 10 * time.Millisecond, 5 * time.Second
	var retry <-chan time.Time
	backoff := minBackoff
	for {
		select {
		case <-ctx.Done():
			return
		case <-kick:
			backoff = minBackoff
		case <-retry:
		}
		retry = nil
		err := p.register(ctx)
		if err == nil {
			p.metrics.registrations.WithLabelValues(resultSuccess).Inc()
			p.logger.Info("registered with kubelet", "resource", slice.ResourceName, "kubelet_socket", p.kubeletSocket())
			continue
		}
		if ctx.Err() != nil {
			return
		}
		p.metrics.registrations.WithLabelValues("error").Inc()
		level := slog.LevelDebug
		if backoff == minBackoff {
			level = slog.LevelWarn // first failure since the last kick
		}
		p.logger.Log(ctx, level, "register with kubelet failed; retrying", "err", err, "retry_seconds", backoff.Seconds())
		retry = time.After(backoff)
		backoff = min(backoff*2, maxBackoff)
	}
}

// register calls the kubelet's Registration service once.
func (p *Plugin) register(ctx context.Context) error {
	sock := p.kubeletSocket()
	if _, err := os.Stat(sock); err != nil {
		return fmt.Errorf("kubelet socket: %w", err)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("dial kubelet socket %s: %w", sock, err)
	}
	defer conn.Close()
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(rctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     p.cfg.PluginSocket,
		ResourceName: slice.ResourceName,
		Options:      &pluginapi.DevicePluginOptions{GetPreferredAllocationAvailable: true},
	})
	if err != nil {
		return fmt.Errorf("register %s with kubelet at %s: %w", slice.ResourceName, sock, err)
	}
	return nil
}

// podResources returns the pod-resources client, dialling it on first use.
// The caller holds listerMu.
func (p *Plugin) podResources(ctx context.Context) (podLister, error) {
	if p.lister != nil {
		return p.lister, nil
	}
	c, err := podresources.Dial(ctx, p.cfg.PodResourcesSocket)
	if err != nil {
		return nil, err
	}
	p.lister = c
	return c, nil
}

func (p *Plugin) closeLister() {
	p.listerMu.Lock()
	defer p.listerMu.Unlock()
	if c, ok := p.lister.(*podresources.Client); ok {
		_ = c.Close()
	}
	p.lister = nil
}

// rebuild fills the ledger from pod-resources at start, so that slices held
// by running containers are never preferred for new ones, and reports slices
// the kubelet holds that the plugin no longer advertises (sliceMiB changed).
func (p *Plugin) rebuild(ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if !p.reconcile(rctx) {
		return
	}
	p.listerMu.Lock()
	lister := p.lister
	p.listerMu.Unlock()
	alloc, err := lister.Allocatable(rctx)
	if err != nil {
		p.logger.Warn("read allocatable devices from pod-resources", "err", err)
		return
	}
	inv, _ := p.current()
	held, stale := p.ledger.list(), 0
	for _, a := range held {
		if _, err := p.known(inv, a.SliceID); err != nil {
			stale++
		}
	}
	p.logger.Info("allocation ledger rebuilt from pod-resources", "held_slices", len(held),
		"kubelet_allocatable_slices", len(alloc[slice.ResourceName]), "advertised_slices", len(inv.devices))
	if stale > 0 {
		p.logger.Warn("containers hold slices this plugin no longer advertises (sliceMiB, reservedMiB or GPUs changed); they count as held until the containers end",
			"slices", stale)
	}
}

// reconcile syncs the ledger with pod-resources List. It reports success.
func (p *Plugin) reconcile(ctx context.Context) bool {
	p.listerMu.Lock()
	defer p.listerMu.Unlock()
	lister, err := p.podResources(ctx)
	if err == nil {
		var list []podresources.ContainerDevices
		list, err = lister.List(ctx)
		if err == nil {
			if n := p.ledger.sync(list, slice.ResourceName, time.Now()); n > 0 {
				p.logger.Debug("released slices no longer held", "slices", n)
			}
		}
	}
	switch {
	case err != nil && !p.listerFailing:
		p.logger.Warn("pod-resources unavailable; ledger keeps its last state", "socket", p.cfg.PodResourcesSocket, "err", err)
	case err == nil && p.listerFailing:
		p.logger.Info("pod-resources reachable again", "socket", p.cfg.PodResourcesSocket)
	}
	p.listerFailing = err != nil
	return err == nil
}
