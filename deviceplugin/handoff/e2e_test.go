package handoff

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	extenderv1 "k8s.io/kube-scheduler/extender/v1"

	"github.com/visionslice/visionslice/scheduler"
	"github.com/visionslice/visionslice/scheduler/scrape"
)

type oneNode map[string]scrape.Node

func (o oneNode) Get(n string) (scrape.Node, bool) { v, ok := o[n]; return v, ok }

// TestExtenderBindThenHandoff binds with the real extender and reads the
// record back with the node side, over one (fake) API server: the GPU the
// extender chose is the GPU the device plugin is told.
func TestExtenderBindThenHandoff(t *testing.T) {
	t.Parallel()
	p := pod("infer", []int64{3})
	p.Spec.NodeName = ""
	client := fake.NewClientset(p)
	client.PrependReactor("create", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetSubresource() != "binding" {
			return false, nil, nil
		}
		b := a.(k8stesting.CreateAction).GetObject().(*v1.Binding)
		cur, err := client.Tracker().Get(v1.SchemeGroupVersion.WithResource("pods"), b.Namespace, b.Name)
		if err != nil {
			return true, nil, err
		}
		bound := cur.(*v1.Pod).DeepCopy()
		bound.Spec.NodeName = b.Target.Name
		return true, nil, client.Tracker().Update(v1.SchemeGroupVersion.WithResource("pods"), bound, b.Namespace)
	})
	now := time.Now()
	src := oneNode{node: scrape.Node{Target: scrape.Target{Node: node}, GPUs: []scrape.GPU{
		{UUID: "GPU-0", Index: 0, Healthy: true, Capacity: 8, Allocated: 6, SliceBytes: 1 << 30, Timestamp: now},
		{UUID: "GPU-1", Index: 1, Healthy: true, Capacity: 8, Allocated: 2, SliceBytes: 1 << 30, Timestamp: now},
	}}}
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	ext, err := scheduler.New(scheduler.DefaultConfig(), scheduler.Deps{Client: client, Key: key, Source: src}, logger)
	if err != nil {
		t.Fatal(err)
	}
	gpu, err := ext.Bind(context.Background(), extenderv1.ExtenderBindingArgs{PodName: "infer", PodNamespace: "default", PodUID: p.UID, Node: node})
	if err != nil || gpu != "GPU-1" { // GPU-0 has 2 free: only GPU-1 holds 3
		t.Fatalf("bind: %q %v", gpu, err)
	}
	got, err := client.CoreV1().Pods("default").Get(context.Background(), "infer", metav1.GetOptions{})
	if err != nil || got.Spec.NodeName != node {
		t.Fatalf("pod not bound: %v %v", got.Spec.NodeName, err)
	}
	h, err := New(client, node, key, logger)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if hint, ok := h.PreferredGPU(ctx, 3); !ok || hint != gpu {
		t.Fatalf("node side hint %q %v, want %s", hint, ok, gpu)
	}
	// A node holding a different key refuses the same record.
	other, _ := New(client, node, []byte("another-cluster-key"), logger)
	if hint, ok := other.PreferredGPU(ctx, 3); ok {
		t.Fatalf("record verified under another key: %q", hint)
	}
}
