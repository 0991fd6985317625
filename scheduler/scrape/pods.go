package scrape

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// PodDiscovery finds the agents as the running pods of their DaemonSet: each
// pod with an IP is a target at http://<pod IP>:<Port><Path>, for the node in
// its spec.nodeName.
type PodDiscovery struct {
	Client    kubernetes.Interface
	Namespace string
	// Selector is a label selector of the agent pods, e.g.
	// "app.kubernetes.io/name=visionslice-agent".
	Selector string
	Port     int
	Path     string
	// Resync is the informer's resync period (0: none).
	Resync time.Duration
	Logger *slog.Logger
}

var _ Discoverer = (*PodDiscovery)(nil)

// Validate checks the discovery settings.
func (d *PodDiscovery) Validate() error {
	if d.Client == nil {
		return fmt.Errorf("pod discovery needs a kubernetes client")
	}
	if _, err := labels.Parse(d.Selector); err != nil || d.Selector == "" {
		return fmt.Errorf("pod discovery selector %q is not a non-empty label selector: %v", d.Selector, err)
	}
	if d.Port <= 0 || d.Port > 65535 {
		return fmt.Errorf("pod discovery port %d is not a TCP port", d.Port)
	}
	return nil
}

// Run watches the agent pods and sends the target set whenever it changes.
func (d *PodDiscovery) Run(ctx context.Context, up chan<- []Target) error {
	if err := d.Validate(); err != nil {
		return err
	}
	f := informers.NewSharedInformerFactoryWithOptions(d.Client, d.Resync,
		informers.WithNamespace(d.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = d.Selector }))
	inf := f.Core().V1().Pods()
	changed := make(chan struct{}, 1)
	poke := func(any) {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	if _, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    poke,
		UpdateFunc: func(_, n any) { poke(n) },
		DeleteFunc: poke,
	}); err != nil {
		return fmt.Errorf("watch agent pods: %w", err)
	}
	f.Start(ctx.Done())
	defer f.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), inf.Informer().HasSynced) {
		return nil // ctx ended first
	}
	lister := inf.Lister()
	sel, _ := labels.Parse(d.Selector)
	var last []Target
	for {
		pods, err := lister.Pods(d.Namespace).List(sel)
		if err != nil {
			return fmt.Errorf("list agent pods: %w", err)
		}
		ts := d.targets(pods)
		if !slices.Equal(ts, last) {
			last = ts
			sendLatest(ctx, up, ts)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

func (d *PodDiscovery) targets(pods []*v1.Pod) []Target {
	path := d.Path
	if path == "" {
		path = "/metrics"
	}
	var ts []Target
	for _, p := range pods {
		if p.Spec.NodeName == "" || p.Status.PodIP == "" || p.DeletionTimestamp != nil || p.Status.Phase != v1.PodRunning {
			continue
		}
		u := "http://" + net.JoinHostPort(p.Status.PodIP, strconv.Itoa(d.Port)) + path
		ts = append(ts, Target{Node: p.Spec.NodeName, URL: u})
	}
	sortTargets(ts)
	return ts
}

// sendLatest sends ts on a buffer-1 channel, replacing an unread older set.
func sendLatest(ctx context.Context, up chan<- []Target, ts []Target) {
	for {
		select {
		case up <- ts:
			return
		case <-ctx.Done():
			return
		default:
		}
		select { // full: wait briefly for the reader rather than spin
		case up <- ts:
			return
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}
