package scheduler

import (
	"context"
	"fmt"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/scheduler/fit"
)

const nodeIndex = "spec.nodeName"

// podView is the API server's view of pods bound to nodes, for the failOpen
// fallback, and to forget assumed pods that were deleted.
type podView struct {
	factory informers.SharedInformerFactory
	inf     cache.SharedIndexInformer
}

func newPodView(client kubernetes.Interface, onDelete func(uid string)) (*podView, error) {
	f := informers.NewSharedInformerFactory(client, 0)
	inf := f.Core().V1().Pods().Informer()
	if err := inf.AddIndexers(cache.Indexers{nodeIndex: func(obj any) ([]string, error) {
		p, ok := obj.(*v1.Pod)
		if !ok || p.Spec.NodeName == "" {
			return nil, nil
		}
		return []string{p.Spec.NodeName}, nil
	}}); err != nil {
		return nil, fmt.Errorf("index pods by node: %w", err)
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if p, ok := obj.(*v1.Pod); ok {
				onDelete(string(p.UID))
			}
		},
	}); err != nil {
		return nil, fmt.Errorf("watch pods: %w", err)
	}
	return &podView{factory: f, inf: inf}, nil
}

// run starts the informer and blocks until ctx ends; synced is closed once
// the cache has synced.
func (v *podView) run(ctx context.Context, synced chan<- struct{}) {
	v.factory.Start(ctx.Done())
	if cache.WaitForCacheSync(ctx.Done(), v.inf.HasSynced) {
		close(synced)
	}
	<-ctx.Done()
	v.factory.Shutdown()
}

// boundPod is a pod on a node holding slices, with the GPU of its verified
// record ("" when it has none or the record does not verify).
type boundPod struct {
	uid    string
	slices int
	gpu    string
}

// onNode lists the live pods on node that hold slices.
func (v *podView) onNode(node string, key []byte) []boundPod {
	objs, err := v.inf.GetIndexer().ByIndex(nodeIndex, node)
	if err != nil {
		return nil
	}
	var out []boundPod
	for _, o := range objs {
		p, ok := o.(*v1.Pod)
		if !ok || p.Status.Phase == v1.PodSucceeded || p.Status.Phase == v1.PodFailed {
			continue
		}
		n := fit.PodSlices(p)
		if n == 0 {
			continue
		}
		bp := boundPod{uid: string(p.UID), slices: n}
		if a, ok, err := slice.AssignmentFromAnnotations(string(p.UID), p.Annotations, key); err == nil && ok && a.Node == node {
			bp.gpu = a.GPU
		}
		out = append(out, bp)
	}
	return out
}

// fallbackGPUs rebuilds a node's GPUs from the API server's view: capacity
// and health from the last inventory the agent reported, allocations from
// the pods bound there. A pod with a verified record counts on its GPU; one
// without (bound by someone else, or the record was forged) counts on the
// first GPU with room, in index order, as the device plugin's own policy
// would most likely have placed it. Live memory and utilisation are not
// known, so they do not weigh the score.
func fallbackGPUs(inv []fit.GPU, pods []boundPod) []fit.GPU {
	gpus := make([]fit.GPU, len(inv))
	idx := make(map[string]int, len(inv))
	for i, g := range inv {
		gpus[i] = fit.GPU{UUID: g.UUID, Index: g.Index, Healthy: g.Healthy, Capacity: g.Capacity, SliceBytes: g.SliceBytes}
		idx[g.UUID] = i
	}
	var loose []boundPod
	for _, p := range pods {
		if i, ok := idx[p.gpu]; ok {
			gpus[i].Allocated += p.slices
		} else {
			loose = append(loose, p)
		}
	}
	for _, p := range loose {
		placed := false
		for i := range gpus {
			if gpus[i].Capacity-gpus[i].Allocated >= p.slices {
				gpus[i].Allocated += p.slices
				placed = true
				break
			}
		}
		if !placed && len(gpus) > 0 {
			gpus[0].Allocated += p.slices // over-full; keeps the total honest
		}
	}
	return gpus
}
