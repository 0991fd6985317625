package enforce

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/visionslice/visionslice/nodeagent/accounting"
	"github.com/visionslice/visionslice/nodeagent/cgroup"
	"github.com/visionslice/visionslice/nodeagent/podresources"
	"github.com/visionslice/visionslice/nodeagent/procfs"
)

// Section is the agent's `enforcement:` config section.
type Section struct {
	// Enabled turns accounting and enforcement on.
	Enabled bool `yaml:"enabled"`
	// CgroupRoot is the cgroup v2 mount point; empty finds it
	// (/sys/fs/cgroup on a pure v2 host, /sys/fs/cgroup/unified on a hybrid one).
	CgroupRoot string `yaml:"cgroupRoot"`
	// KubeAPI is "" (no Kubernetes client: no Events, no per-pod
	// annotations), "in-cluster", or the path of a kubeconfig file.
	KubeAPI string `yaml:"kubeAPI"`
	// Accounting is PID -> container -> slices (sliceBytes and
	// refreshInterval are live).
	Accounting accounting.Config `yaml:"accounting"`
	// Policy is the overrun policy (live).
	Policy Config `yaml:"policy"`
}

// DefaultSection returns the defaults.
func DefaultSection() Section {
	return Section{Enabled: true, Accounting: accounting.DefaultConfig(), Policy: DefaultConfig()}
}

// Validate names every wrong field.
func (s Section) Validate() error {
	if !s.Enabled {
		return nil
	}
	var errs []error
	if s.CgroupRoot != "" && !filepath.IsAbs(s.CgroupRoot) {
		errs = append(errs, fmt.Errorf("cgroupRoot %q: must be an absolute path", s.CgroupRoot))
	}
	if err := s.Accounting.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("accounting: %w", err))
	}
	if err := s.Policy.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("policy: %w", err))
	}
	return errors.Join(errs...)
}

// Component runs accounting and enforcement in the agent.
type Component struct {
	Tracker  *accounting.Tracker
	Enforcer *Enforcer

	logger  *slog.Logger
	lister  *lazyLister
	pods    *KubePods
	events  *KubeEvents
	closeMu sync.Mutex
}

// NewComponent builds accounting and enforcement over the GPU poller.
// Nothing is started until Run.
func NewComponent(sec Section, node string, snaps SnapshotSource, reg prometheus.Registerer, logger *slog.Logger) (*Component, error) {
	if err := sec.Validate(); err != nil {
		return nil, err
	}
	c := &Component{logger: logger, lister: &lazyLister{socket: sec.Accounting.PodResourcesSocket}}
	resolver := accounting.NewLogDirs(sec.Accounting.PodLogsDir, sec.Accounting.ContainerLogsDir, sec.Accounting.RefreshInterval/10)
	c.Tracker = accounting.New(sec.Accounting, procfs.NewReader(sec.Accounting.HostProc), resolver, c.lister, logger)
	if err := reg.Register(c.Tracker.Collector()); err != nil {
		return nil, fmt.Errorf("register accounting metrics: %w", err)
	}

	var groups cgroup.Groups
	if m, err := cgroup.Open(sec.CgroupRoot); err != nil {
		logger.Error("no cgroup v2 hierarchy: freeze and kill will fail and be audited as failed", "err", err)
		groups = noCgroups{err: err}
	} else {
		logger.Info("cgroup v2 hierarchy for enforcement", "root", m.Root())
		groups = m
	}

	deps := Deps{Snapshots: snaps, Accounting: c.Tracker, Cgroups: groups, Registerer: reg}
	if sec.KubeAPI != "" {
		client, err := kubeClient(sec.KubeAPI)
		if err != nil {
			return nil, err
		}
		c.pods = NewKubePods(client, node)
		c.events = NewKubeEvents(client, node)
		deps.Pods, deps.Events = c.pods, c.events
	}
	enf, err := New(sec.Policy, deps, logger)
	if err != nil {
		c.Close()
		return nil, err
	}
	c.Enforcer = enf
	logger.Info("enforcement configured", "default_action", sec.Policy.DefaultAction, "allowed_actions", sec.Policy.AllowedActions,
		"grace_period", sec.Policy.GracePeriod.String(), "over_for", sec.Policy.Hysteresis.OverFor.String(),
		"slice_bytes", sec.Accounting.SliceBytes, "kube_api", sec.KubeAPI != "")
	return c, nil
}

// Reload applies the live fields of a new section.
func (c *Component) Reload(sec Section) error {
	c.Tracker.SetConfig(sec.Accounting)
	return c.Enforcer.SetPolicy(sec.Policy)
}

// Run runs the slice cache, the pod cache and the enforcer until ctx ends.
func (c *Component) Run(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return c.Tracker.Run(gctx) })
	g.Go(func() error { return c.Enforcer.Run(gctx) })
	if c.pods != nil {
		g.Go(func() error { return c.pods.Run(gctx) })
	}
	err := g.Wait()
	c.Close()
	return err
}

// Close releases the pod-resources connection and the event broadcaster.
func (c *Component) Close() {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	c.lister.close()
	if c.events != nil {
		c.events.Shutdown()
		c.events = nil
	}
}

type noCgroups struct{ err error }

func (n noCgroups) Create(string, cgroup.Limits) (cgroup.Group, error) { return nil, n.err }
func (n noCgroups) Open(string) (cgroup.Group, error)                  { return nil, n.err }

func kubeClient(api string) (kubernetes.Interface, error) {
	var (
		cfg *rest.Config
		err error
	)
	if api == "in-cluster" {
		cfg, err = rest.InClusterConfig()
	} else {
		if _, statErr := os.Stat(api); statErr != nil {
			return nil, fmt.Errorf("kubeAPI kubeconfig: %w", statErr)
		}
		cfg, err = clientcmd.BuildConfigFromFlags("", api)
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client (%s): %w", api, err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return client, nil
}

// lazyLister dials the pod-resources socket on first use and again after a
// failure, so the agent starts before the kubelet and survives its restarts.
type lazyLister struct {
	socket string
	mu     sync.Mutex
	client *podresources.Client
}

var _ accounting.SliceLister = (*lazyLister)(nil)

func (l *lazyLister) List(ctx context.Context) ([]podresources.ContainerDevices, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.client == nil {
		c, err := podresources.Dial(ctx, l.socket)
		if err != nil {
			return nil, err
		}
		l.client = c
	}
	out, err := l.client.List(ctx)
	if err != nil {
		_ = l.client.Close()
		l.client = nil
	}
	return out, err
}

func (l *lazyLister) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.client != nil {
		_ = l.client.Close()
		l.client = nil
	}
}
