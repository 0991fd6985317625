// Package e2e_test runs the whole placement path with real components: etcd,
// kube-apiserver and kube-scheduler; the visionslice-scheduler extender
// binary scraping the agent; the visionslice-agent binary on simulated GPUs,
// its device plugin registered with the kubelet's own device manager (driven
// by the test, which publishes the node's slices the way the kubelet does);
// and the handoff from the extender's signed GPU record to the device
// plugin's allocation. It runs in a private mount namespace (root) so the
// kubelet's real socket paths are used.
package e2e_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/scheduler/scrape"
	"github.com/visionslice/visionslice/test/k8s/controlplane"
	"github.com/visionslice/visionslice/test/k8s/gobuild"
	"github.com/visionslice/visionslice/test/k8s/kubelet"
	"github.com/visionslice/visionslice/test/k8s/stack"
)

var iso kubelet.Isolation

func TestMain(m *testing.M) { kubelet.RunIsolated(m, &iso) }

const (
	nodeName = "gpu-node-1"
	ns       = "vision"
	sliceMiB = 20480 // an 80 GiB H100 holds exactly 4 slices
)

// TestEndToEnd_PodsGetTheGPUTheSchedulerChose: with the extender on the
// spread strategy, two 1-slice pods are placed on different GPUs of one node
// and a 2-slice pod on either; for each, the device manager allocates its
// slices on exactly the GPU in the extender's signed record (the plugin's own
// binpack would have stacked the first two), the container's environment
// names that GPU and its memory limit, and the agent's metrics report the
// allocated slices per GPU.
func TestEndToEnd_PodsGetTheGPUTheSchedulerChose(t *testing.T) {
	iso.Require(t)
	cp := controlplane.Start(t, controlplane.Options{BinDir: controlplane.RequireBinaries(t), NoScheduler: true})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cp.CreateNode(t, controlplane.NodeSpec{Name: nodeName})
	cp.CreateNamespace(t, ns)
	key := []byte("visionslice-e2e-assignment-key-0123456789")

	// The node: the kubelet's device manager, then the agent with its device
	// plugin and the handoff reading records from the API server.
	k := kubelet.Start(t)
	metricsAddr := stack.FreeAddr(t)
	agentCfg := fmt.Sprintf(`version: v1
nodeName: %s
shutdownTimeout: 5s
gpu:
  backend: sim:h100x2
  pollInterval: 100ms
metrics:
  listen: %q
devicePlugin:
  enabled: true
  sliceMiB: %d
  reconcileInterval: 200ms
handoff:
  enabled: true
  kubeAPI: %s
  assignmentKeyFile: %s
`, nodeName, metricsAddr, sliceMiB, cp.Kubeconfig, stack.WriteFile(t, "key", key))
	agent := cp.StartProcess(t, "visionslice-agent", gobuild.Command(t, "visionslice-agent"),
		"--config="+stack.WriteFile(t, "agent.yaml", []byte(agentCfg)))
	metricsURL := "http://" + metricsAddr + "/metrics"
	agent.WaitHTTP(t, "http://"+metricsAddr+"/readyz", "", time.Minute)
	k.WaitCapacity(t, 8, 8)
	_, allocatable := k.Capacity()
	if err := cp.SetNodeExtended(ctx, nodeName, slice.ResourceName, allocatable); err != nil {
		t.Fatalf("publish node capacity: %v", err)
	}

	// The control plane side: extender (spread) and kube-scheduler with the shipped profile.
	extURL, ext := stack.StartExtender(t, cp, stack.Extender{Key: key, Targets: map[string]string{nodeName: metricsURL}, Strategy: "spread"})
	cp.StartScheduler(t, stack.SchedulerConfig(t, extURL))

	held := map[string]int{} // slices per GPU, as placed
	var gpus []string
	for _, step := range []struct {
		name   string
		slices int64
	}{{"first", 1}, {"second", 1}, {"third", 2}} {
		pod := controlplane.SlicePod(step.name, slice.ResourceName, step.slices)
		pod.Spec.SchedulerName = stack.SchedulerProfile
		if _, err := cp.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		bound, err := cp.WaitScheduled(ctx, ns, step.name, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		rec, ok, err := slice.AssignmentFromAnnotations(string(bound.UID), bound.Annotations, key)
		if err != nil || !ok || rec.Node != nodeName {
			t.Fatalf("pod %s: no valid GPU record for %s (ok=%v err=%v): %v", step.name, nodeName, ok, err, bound.Annotations)
		}

		// The kubelet admits the pod: the device manager asks the plugin,
		// which follows the record.
		if err := k.Admit(bound); err != nil {
			t.Fatalf("kubelet admission of %s: %v", step.name, err)
		}
		got := gpuOf(t, k.Slices(bound))
		if got != rec.GPU {
			t.Errorf("pod %s: device manager allocated on %s, the scheduler chose %s", step.name, got, rec.GPU)
		}
		env := k.RunOptions(t, bound)
		if env[slice.EnvVisibleDevices] != rec.GPU || env[slice.EnvMemoryLimitBytes] != fmt.Sprint(uint64(step.slices)*sliceMiB<<20) {
			t.Errorf("pod %s: container env %s=%q %s=%q, want %s and %d slices' bytes", step.name,
				slice.EnvVisibleDevices, env[slice.EnvVisibleDevices], slice.EnvMemoryLimitBytes, env[slice.EnvMemoryLimitBytes], rec.GPU, step.slices)
		}
		held[rec.GPU] += int(step.slices)
		gpus = append(gpus, rec.GPU)
		t.Logf("pod %s (%d slices): scheduler chose %s, device manager allocated %v", step.name, step.slices, rec.GPU, k.Slices(bound))
	}
	if gpus[0] == gpus[1] {
		t.Errorf("spread placed both 1-slice pods on %s", gpus[0])
	}

	// The agent's metrics, as the extender scrapes them, show the slices held.
	deadline := time.Now().Add(20 * time.Second)
	for {
		per, err := allocatedPerGPU(ctx, metricsURL)
		if err == nil && equal(per, held) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent reports allocated slices %v (err %v), want %v", per, err, held)
		}
		time.Sleep(100 * time.Millisecond)
	}

	if err := ext.Stop(); err != nil {
		t.Errorf("extender: %v", err)
	}
	if err := agent.Stop(); err != nil {
		t.Errorf("agent: %v", err)
	}
}

func gpuOf(t *testing.T, ids []string) string {
	t.Helper()
	gpu := ""
	for _, s := range ids {
		id, err := slice.ParseID(s)
		if err != nil {
			t.Fatal(err)
		}
		if gpu != "" && id.GPU != gpu {
			t.Fatalf("slices %v span GPUs", ids)
		}
		gpu = id.GPU
	}
	if gpu == "" {
		t.Fatal("no slices allocated")
	}
	return gpu
}

// allocatedPerGPU scrapes the agent and parses it with the extender's parser.
func allocatedPerGPU(ctx context.Context, url string) (map[string]int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	gpus, _, err := scrape.Parse(bytes.NewReader(body), expfmt.NewFormat(expfmt.TypeTextPlain), time.Now())
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	for _, g := range gpus {
		if g.Allocated > 0 {
			out[g.UUID] = g.Allocated
		}
	}
	return out, nil
}

func equal(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
