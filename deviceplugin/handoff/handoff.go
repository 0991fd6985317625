// Package handoff is the node side of the scheduler extender's GPU handoff.
// At bind the extender writes a signed record of the chosen GPU into the
// pod's annotations (slice.Annotation*); when the kubelet asks the device
// plugin for a preferred allocation, the Hinter finds the pending pod that
// request belongs to and names the GPU of its record.
//
// The kubelet does not say which pod a GetPreferredAllocation call is for, so
// the Hinter matches as gpushare does: among the pods bound to this node that
// are still Pending and carry a valid record, the one bound earliest with a
// container asking for exactly the requested slice count and not yet served.
// Two pending pods of the same size may swap GPUs that way; both GPUs still
// get the slice counts the extender planned for them.
//
// A record that does not verify (written or altered by the pod's owner, or
// copied from another pod) or that names another node is refused and logged;
// the plugin then falls back to its own policy.
package handoff

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/visionslice/visionslice/deviceplugin"
	"github.com/visionslice/visionslice/deviceplugin/slice"
)

// Hinter implements deviceplugin.GPUHinter over the API server's view of
// the pods bound to one node.
type Hinter struct {
	client kubernetes.Interface
	node   string
	key    []byte
	logger *slog.Logger

	factory informers.SharedInformerFactory
	inf     cache.SharedIndexInformer

	mu       sync.Mutex
	consumed map[types.UID]map[int]bool // pod -> container indexes already served
	refused  map[types.UID]string       // pod -> signature refused (log once per record)
}

var _ deviceplugin.GPUHinter = (*Hinter)(nil)

// New returns a Hinter for the pods on node, verifying records with key.
func New(client kubernetes.Interface, node string, key []byte, logger *slog.Logger) (*Hinter, error) {
	switch {
	case client == nil:
		return nil, errors.New("handoff needs a kubernetes client")
	case node == "":
		return nil, errors.New("handoff needs the node name")
	case len(key) == 0:
		return nil, errors.New("handoff needs the assignment key shared with the scheduler extender")
	}
	h := &Hinter{client: client, node: node, key: key, logger: logger,
		consumed: map[types.UID]map[int]bool{}, refused: map[types.UID]string{}}
	h.factory = informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = h.fieldSelector() }))
	h.inf = h.factory.Core().V1().Pods().Informer()
	if _, err := h.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if p, ok := obj.(*v1.Pod); ok {
				h.forget(p.UID)
			}
		},
		UpdateFunc: func(_, obj any) {
			if p, ok := obj.(*v1.Pod); ok && p.Status.Phase != v1.PodPending {
				h.forget(p.UID)
			}
		},
	}); err != nil {
		return nil, fmt.Errorf("watch pods on node %s: %w", node, err)
	}
	return h, nil
}

func (h *Hinter) fieldSelector() string {
	return fields.OneTermEqualSelector("spec.nodeName", h.node).String()
}

// Run watches the node's pods until ctx ends.
func (h *Hinter) Run(ctx context.Context) error {
	h.factory.Start(ctx.Done())
	defer h.factory.Shutdown()
	<-ctx.Done()
	return nil
}

func (h *Hinter) forget(uid types.UID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.consumed, uid)
	delete(h.refused, uid)
}

// PreferredGPU names the GPU the scheduler chose for the oldest pending pod
// on this node with an unserved container of size slices, and marks that
// container served. ok is false when no pod with a valid record matches.
func (h *Hinter) PreferredGPU(ctx context.Context, size int) (string, bool) {
	if size <= 0 {
		return "", false
	}
	var pods []*v1.Pod
	if h.inf.HasSynced() {
		for _, o := range h.inf.GetStore().List() {
			if p, ok := o.(*v1.Pod); ok {
				pods = append(pods, p)
			}
		}
		if gpu, ok := h.match(pods, size); ok {
			return gpu, true
		}
	}
	// The kubelet may admit a pod before this watch delivers its record: ask
	// the API server directly before giving up.
	list, err := h.client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: h.fieldSelector()})
	if err != nil {
		h.logger.Warn("list pods for gpu handoff", "node", h.node, "err", err)
		return "", false
	}
	pods = pods[:0]
	for i := range list.Items {
		pods = append(pods, &list.Items[i])
	}
	return h.match(pods, size)
}

type candidate struct {
	pod       *v1.Pod
	gpu       string
	container int
	boundAt   time.Time
}

func (h *Hinter) match(pods []*v1.Pod, size int) (string, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var cands []candidate
	for _, p := range pods {
		if p.Spec.NodeName != h.node || p.Status.Phase != v1.PodPending || p.DeletionTimestamp != nil {
			continue
		}
		a, ok := h.verified(p)
		if !ok {
			continue
		}
		for i, n := range containerSlices(p) {
			if n == size && !h.consumed[p.UID][i] {
				cands = append(cands, candidate{pod: p, gpu: a.GPU, container: i, boundAt: boundAt(p)})
				break
			}
		}
	}
	if len(cands) == 0 {
		return "", false
	}
	sort.Slice(cands, func(i, j int) bool {
		if !cands[i].boundAt.Equal(cands[j].boundAt) {
			return cands[i].boundAt.Before(cands[j].boundAt)
		}
		if cands[i].pod.Namespace != cands[j].pod.Namespace {
			return cands[i].pod.Namespace < cands[j].pod.Namespace
		}
		return cands[i].pod.Name < cands[j].pod.Name
	})
	c := cands[0]
	if h.consumed[c.pod.UID] == nil {
		h.consumed[c.pod.UID] = map[int]bool{}
	}
	h.consumed[c.pod.UID][c.container] = true
	h.logger.Info("gpu handoff honoured", "namespace", c.pod.Namespace, "pod", c.pod.Name, "gpu_uuid", c.gpu, "slices", size)
	return c.gpu, true
}

// verified returns the pod's record if it verifies and names this node,
// logging a refusal once per record. h.mu is held.
func (h *Hinter) verified(p *v1.Pod) (slice.Assignment, bool) {
	a, ok, err := slice.AssignmentFromAnnotations(string(p.UID), p.Annotations, h.key)
	if err == nil && ok && a.Node != h.node {
		err = fmt.Errorf("record names node %q", a.Node)
	}
	if err != nil {
		sig := p.Annotations[slice.AnnotationAssignmentSignature]
		if h.refused[p.UID] != sig {
			h.refused[p.UID] = sig
			h.logger.Warn("gpu record refused; the device plugin's own policy decides", "namespace", p.Namespace,
				"pod", p.Name, "gpu_uuid", p.Annotations[slice.AnnotationAssignedGPU], "err", err)
		}
		return slice.Assignment{}, false
	}
	return a, ok
}

// containerSlices lists the slices each container asks for, init containers
// first (the kubelet admits them first), indexed as one list.
func containerSlices(p *v1.Pod) []int {
	out := make([]int, 0, len(p.Spec.InitContainers)+len(p.Spec.Containers))
	for i := range p.Spec.InitContainers {
		out = append(out, slices(&p.Spec.InitContainers[i]))
	}
	for i := range p.Spec.Containers {
		out = append(out, slices(&p.Spec.Containers[i]))
	}
	return out
}

func slices(c *v1.Container) int {
	if q, ok := c.Resources.Limits[slice.ResourceName]; ok {
		return int(q.Value())
	}
	if q, ok := c.Resources.Requests[slice.ResourceName]; ok {
		return int(q.Value())
	}
	return 0
}

// boundAt is when the pod was bound: the PodScheduled condition's transition
// time, which the API server sets on binding, else its creation time.
func boundAt(p *v1.Pod) time.Time {
	for _, c := range p.Status.Conditions {
		if c.Type == v1.PodScheduled && c.Status == v1.ConditionTrue {
			return c.LastTransitionTime.Time
		}
	}
	return p.CreationTimestamp.Time
}
