// Package scheduling_test runs the visionslice scheduler extender (the real
// cmd/visionslice-scheduler binary, with the shipped manifests/scheduler
// configs) behind a real kube-scheduler and kube-apiserver. Agents are
// simulated by HTTP endpoints that serve the agent's GPU metrics, so each
// node's per-GPU free slices, health and scrape failures are scripted.
package scheduling_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/test/k8s/controlplane"
	"github.com/visionslice/visionslice/test/k8s/stack"
)

const sliceBytes = 1 << 30

// gpuState is what a simulated agent reports for one GPU.
type gpuState struct {
	uuid                string
	capacity, allocated int
	healthy             bool
}

// agent serves the agent's per-GPU metrics for one node; down makes it
// answer 503 (a failing scrape).
type agent struct {
	srv *httptest.Server

	mu   sync.Mutex
	gpus []gpuState
	down bool
}

func startAgent(t *testing.T, gpus ...gpuState) *agent {
	t.Helper()
	a := &agent{gpus: gpus}
	a.srv = httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *agent) set(f func(a *agent)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	f(a)
}

func (a *agent) serve(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.down {
		http.Error(w, "agent restarting", http.StatusServiceUnavailable)
		return
	}
	reg := prometheus.NewRegistry()
	labels := []string{slice.LabelGPUUUID, slice.LabelGPUIndex}
	gauge := func(name string) *prometheus.GaugeVec {
		g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: name}, labels)
		reg.MustRegister(g)
		return g
	}
	capacity, allocated := gauge(slice.MetricGPUSlicesCapacity), gauge(slice.MetricGPUSlicesAllocated)
	healthy, sliceSize := gauge(slice.MetricGPUHealthy), gauge(slice.MetricGPUSliceBytes)
	total, used := gauge(slice.MetricGPUMemoryTotalBytes), gauge(slice.MetricGPUMemoryUsedBytes)
	util, unaccounted := gauge(slice.MetricGPUUtilizationRatio), gauge(slice.MetricGPUUnaccountedMemBytes)
	for i, g := range a.gpus {
		l := prometheus.Labels{slice.LabelGPUUUID: g.uuid, slice.LabelGPUIndex: strconv.Itoa(i)}
		capacity.With(l).Set(float64(g.capacity))
		allocated.With(l).Set(float64(g.allocated))
		sliceSize.With(l).Set(sliceBytes)
		total.With(l).Set(float64(g.capacity) * sliceBytes)
		used.With(l).Set(float64(g.allocated) * sliceBytes)
		util.With(l).Set(0.2)
		unaccounted.With(l).Set(0)
		h := 0.0
		if g.healthy {
			h = 1
		}
		healthy.With(l).Set(h)
	}
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(w, r)
}

func slicePod(name string, n int64) *corev1.Pod {
	p := controlplane.SlicePod(name, slice.ResourceName, n)
	p.Spec.SchedulerName = stack.SchedulerProfile
	return p
}

// TestScheduler_ExtenderPlacesSlicesOnOneGPU: kube-scheduler with the shipped
// extender config places a 4-slice pod on the one node where one GPU has 4
// free slices, not on a node whose 6 free slices are split 3 + 3 nor on a node
// whose agent cannot be scraped (fail closed); the extender binds it and
// records the GPU with a signature the node side verifies. A second 4-slice
// pod counts the first as assumed (the metrics do not show it yet) and waits
// until the unreachable agent comes back.
func TestScheduler_ExtenderPlacesSlicesOnOneGPU(t *testing.T) {
	cp := controlplane.Start(t, controlplane.Options{BinDir: controlplane.RequireBinaries(t), NoScheduler: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	fragmented := startAgent(t,
		gpuState{uuid: "GPU-a0", capacity: 8, allocated: 5, healthy: true},
		gpuState{uuid: "GPU-a1", capacity: 8, allocated: 5, healthy: true})
	roomy := startAgent(t,
		gpuState{uuid: "GPU-b0", capacity: 8, allocated: 4, healthy: true},
		gpuState{uuid: "GPU-b1", capacity: 8, allocated: 8, healthy: true},
		gpuState{uuid: "GPU-b2", capacity: 8, allocated: 0, healthy: false})
	unreachable := startAgent(t,
		gpuState{uuid: "GPU-c0", capacity: 8, allocated: 0, healthy: true})
	unreachable.set(func(a *agent) { a.down = true })

	nodes := map[string]*agent{"gpu-a": fragmented, "gpu-b": roomy, "gpu-c": unreachable}
	targets := map[string]string{}
	for name, a := range nodes {
		// The Node shows its slice capacity as the kubelet publishes it: the
		// scheduler's own count sees room for 4 slices on every node.
		n := int64(0)
		for _, g := range a.gpus {
			n += int64(g.capacity - g.allocated)
		}
		cp.CreateNode(t, controlplane.NodeSpec{Name: name, Extended: map[corev1.ResourceName]int64{slice.ResourceName: n}})
		targets[name] = a.srv.URL + "/metrics"
	}
	cp.CreateNode(t, controlplane.NodeSpec{Name: "cpu-only"})
	const ns = "vision"
	cp.CreateNamespace(t, ns)

	key := []byte("visionslice-test-assignment-key-0123456789")
	extURL, ext := stack.StartExtender(t, cp, stack.Extender{Key: key, Targets: targets})
	cp.StartScheduler(t, stack.SchedulerConfig(t, extURL))

	pods := cp.Client.CoreV1().Pods(ns)
	first, err := pods.Create(ctx, slicePod("first", 4), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	bound, err := cp.WaitScheduled(ctx, ns, first.Name, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if bound.Spec.NodeName != "gpu-b" {
		t.Fatalf("4-slice pod bound to %s, want gpu-b (gpu-a has 3 + 3 free, gpu-c is not scraped)", bound.Spec.NodeName)
	}
	checkRecord(t, bound, key, "gpu-b", "GPU-b0")

	second, err := pods.Create(ctx, slicePod("second", 4), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	msg, err := cp.WaitUnschedulable(ctx, ns, second.Name, time.Minute)
	if err != nil {
		t.Fatalf("second 4-slice pod while GPU-b0 is taken by the first (assumed): %v", err)
	}
	t.Logf("second pod unschedulable as expected: %s", msg)

	// The agent of gpu-c comes back; a node event requeues the pod.
	unreachable.set(func(a *agent) { a.down = false })
	time.Sleep(time.Second) // two scrape intervals
	node, err := cp.Client.CoreV1().Nodes().Get(ctx, "gpu-c", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Labels = map[string]string{"visionslice.test/agent": "back"}
	if _, err := cp.Client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	bound, err = cp.WaitScheduled(ctx, ns, second.Name, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if bound.Spec.NodeName != "gpu-c" {
		t.Fatalf("second pod bound to %s, want gpu-c (the only GPU with 4 free once scraped)", bound.Spec.NodeName)
	}
	checkRecord(t, bound, key, "gpu-c", "GPU-c0")

	if err := ext.Stop(); err != nil {
		t.Errorf("extender did not stop cleanly on SIGTERM: %v", err)
	}
}

// checkRecord verifies the extender's signed GPU record on a bound pod, and
// that it does not verify under another key or for another GPU.
func checkRecord(t *testing.T, pod *corev1.Pod, key []byte, node, gpu string) {
	t.Helper()
	a, ok, err := slice.AssignmentFromAnnotations(string(pod.UID), pod.Annotations, key)
	if err != nil || !ok {
		t.Fatalf("pod %s: no valid GPU record (ok=%v err=%v) in annotations %v", pod.Name, ok, err, pod.Annotations)
	}
	if a.Node != node || a.GPU != gpu {
		t.Errorf("pod %s: record names node %s GPU %s, want %s %s", pod.Name, a.Node, a.GPU, node, gpu)
	}
	if _, _, err := slice.AssignmentFromAnnotations(string(pod.UID), pod.Annotations, []byte("another-cluster-key-0000")); err == nil {
		t.Errorf("pod %s: record verifies under another key", pod.Name)
	}
	forged := map[string]string{}
	for k, v := range pod.Annotations {
		forged[k] = v
	}
	forged[slice.AnnotationAssignedGPU] = strings.Replace(gpu, "0", "1", 1)
	if _, _, err := slice.AssignmentFromAnnotations(string(pod.UID), forged, key); err == nil {
		t.Errorf("pod %s: a record edited to another GPU still verifies", pod.Name)
	}
}
