package handoff

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

var key = []byte("shared-assignment-key")

const node = "node-a"

type podOpt func(*v1.Pod)

func pod(name string, sizes []int64, opts ...podOpt) *v1.Pod {
	p := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name),
			CreationTimestamp: metav1.NewTime(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))},
		Spec:   v1.PodSpec{NodeName: node},
		Status: v1.PodStatus{Phase: v1.PodPending},
	}
	for i, n := range sizes {
		p.Spec.Containers = append(p.Spec.Containers, v1.Container{Name: "c" + string(rune('0'+i)), Resources: v1.ResourceRequirements{
			Limits: v1.ResourceList{slice.ResourceName: *resource.NewQuantity(n, resource.DecimalSI)}}})
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

// signed writes the record the extender would write.
func signed(gpu, onNode string) podOpt {
	return func(p *v1.Pod) {
		a := slice.Assignment{PodUID: string(p.UID), Node: onNode, GPU: gpu}
		p.Annotations = map[string]string{slice.AnnotationAssignedGPU: gpu, slice.AnnotationAssignedNode: onNode,
			slice.AnnotationAssignmentSignature: a.Sign(key)}
	}
}

// forged writes a record the pod's owner made up (they do not hold the key).
func forged(gpu string) podOpt {
	return func(p *v1.Pod) {
		a := slice.Assignment{PodUID: string(p.UID), Node: node, GPU: gpu}
		p.Annotations = map[string]string{slice.AnnotationAssignedGPU: gpu, slice.AnnotationAssignedNode: node,
			slice.AnnotationAssignmentSignature: a.Sign([]byte("a guess at the key"))}
	}
}

func boundAtMinute(m int) podOpt {
	return func(p *v1.Pod) {
		p.Status.Conditions = []v1.PodCondition{{Type: v1.PodScheduled, Status: v1.ConditionTrue,
			LastTransitionTime: metav1.NewTime(time.Date(2026, 1, 1, 0, m, 0, 0, time.UTC))}}
	}
}

func phase(ph v1.PodPhase) podOpt { return func(p *v1.Pod) { p.Status.Phase = ph } }

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func start(t *testing.T, run bool, objs ...runtime.Object) (*Hinter, *syncBuf) {
	t.Helper()
	logs := &syncBuf{}
	h, err := New(fake.NewClientset(objs...), node, key, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if run {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- h.Run(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
		deadline := time.Now().Add(10 * time.Second)
		for !h.inf.HasSynced() {
			if time.Now().After(deadline) {
				t.Fatal("informer did not sync")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return h, logs
}

func TestPreferredGPU(t *testing.T) {
	t.Parallel()
	copied := pod("copied", []int64{2})
	v := pod("victim", nil) // a valid record for another pod...
	signed("GPU-x", node)(v)
	copied.Annotations = v.Annotations // ...copied onto this one

	type call struct {
		size    int
		wantGPU string // "" = no hint
	}
	tests := []struct {
		name  string
		pods  []runtime.Object
		calls []call
		logs  string
	}{
		{name: "valid record honoured once", pods: []runtime.Object{pod("a", []int64{2}, signed("GPU-1", node))},
			calls: []call{{2, "GPU-1"}, {2, ""}}},
		{name: "size must match", pods: []runtime.Object{pod("a", []int64{2}, signed("GPU-1", node)), pod("b", []int64{4}, signed("GPU-2", node))},
			calls: []call{{4, "GPU-2"}, {3, ""}, {2, "GPU-1"}}},
		{name: "oldest bind first", pods: []runtime.Object{
			pod("late", []int64{2}, signed("GPU-late", node), boundAtMinute(9)),
			pod("early", []int64{2}, signed("GPU-early", node), boundAtMinute(1))},
			calls: []call{{2, "GPU-early"}, {2, "GPU-late"}, {2, ""}}},
		{name: "every container of a pod on its gpu", pods: []runtime.Object{pod("multi", []int64{2, 3}, signed("GPU-m", node))},
			calls: []call{{3, "GPU-m"}, {2, "GPU-m"}, {2, ""}}},
		{name: "forged record refused", pods: []runtime.Object{pod("f", []int64{2}, forged("GPU-9"))},
			calls: []call{{2, ""}}, logs: "gpu record refused"},
		{name: "record copied from another pod refused", pods: []runtime.Object{copied},
			calls: []call{{2, ""}}, logs: "assignment signature does not match"},
		{name: "record for another node refused", pods: []runtime.Object{pod("w", []int64{2}, signed("GPU-1", "node-b"))},
			calls: []call{{2, ""}}, logs: `record names node \"node-b\"`},
		{name: "no record, no hint", pods: []runtime.Object{pod("plain", []int64{2})}, calls: []call{{2, ""}}},
		{name: "running pods are done", pods: []runtime.Object{pod("r", []int64{2}, signed("GPU-1", node), phase(v1.PodRunning))},
			calls: []call{{2, ""}}},
		{name: "pods of other nodes ignored", pods: []runtime.Object{pod("o", []int64{2}, signed("GPU-1", node), func(p *v1.Pod) { p.Spec.NodeName = "node-b" })},
			calls: []call{{2, ""}}},
	}
	for _, tc := range tests {
		for _, run := range []bool{true, false} { // watched cache, and the live list before it syncs
			name := tc.name + map[bool]string{true: "/watched", false: "/live list"}[run]
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				h, logs := start(t, run, tc.pods...)
				for i, c := range tc.calls {
					ctx, cancel := context.WithTimeout(context.Background(), time.Second)
					gpu, ok := h.PreferredGPU(ctx, c.size)
					cancel()
					if gpu != c.wantGPU || ok != (c.wantGPU != "") {
						t.Fatalf("call %d (size %d): %q %v, want %q", i, c.size, gpu, ok, c.wantGPU)
					}
				}
				if tc.logs != "" && !strings.Contains(logs.String(), tc.logs) {
					t.Fatalf("logs do not say %q:\n%s", tc.logs, logs)
				}
			})
		}
	}
}

func TestNewValidates(t *testing.T) {
	t.Parallel()
	l := slog.New(slog.NewTextHandler(&syncBuf{}, nil))
	if _, err := New(nil, node, key, l); err == nil {
		t.Error("nil client accepted")
	}
	if _, err := New(fake.NewClientset(), "", key, l); err == nil {
		t.Error("empty node accepted")
	}
	if _, err := New(fake.NewClientset(), node, nil, l); err == nil {
		t.Error("empty key accepted")
	}
}

func TestConfig(t *testing.T) {
	t.Parallel()
	if err := (Config{}).Validate(); err != nil {
		t.Errorf("disabled section: %v", err)
	}
	if err := (Config{Enabled: true}).Validate(); err == nil || !strings.Contains(err.Error(), "kubeAPI") || !strings.Contains(err.Error(), "assignmentKeyFile") {
		t.Errorf("empty enabled section: %v", err)
	}
	dir := t.TempDir()
	short, long := dir+"/short", dir+"/long"
	if err := os.WriteFile(short, []byte("tiny\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(long, []byte("  0123456789abcdef0123\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := slice.ReadKey(short); err == nil {
		t.Error("short key accepted")
	}
	if k, err := slice.ReadKey(long); err != nil || string(k) != "0123456789abcdef0123" {
		t.Errorf("key %q %v", k, err)
	}
	kc := dir + "/kubeconfig"
	if err := os.WriteFile(kc, []byte("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\nusers: [{name: u, user: {token: t}}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h, err := NewFromConfig(Config{Enabled: true, KubeAPI: kc, AssignmentKeyFile: long}, node, slog.New(slog.NewTextHandler(&syncBuf{}, nil)))
	if err != nil || h == nil {
		t.Fatalf("NewFromConfig: %v", err)
	}
}
