// Package e2e_test runs the whole placement path with real components: etcd,
// kube-apiserver and kube-scheduler; the visionslice-scheduler extender
// binary scraping the agent; the visionslice-agent binary on simulated GPUs,
// its device plugin registered with the kubelet's own device manager (driven
// by the test, which publishes the node's slices the way the kubelet does);
// the handoff from the extender's signed GPU record to the device plugin's
// allocation; and the agent's enforcement of a scripted overrun (real cgroup
// v2 freeze, an Event on the pod). It runs in a private mount namespace
// (root) so the kubelet's real socket paths are used.
package e2e_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/cgroup"
	"github.com/visionslice/visionslice/nodeagent/cgroup/cgrouptest"
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
// allocated slices per GPU. Then the first pod's container overruns its slice
// and the agent freezes it and records an Event on the pod.
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
	logs := t.TempDir() // the kubelet's /var/log/pods and /var/log/containers
	for _, d := range []string{"pods", "containers"} {
		if err := os.MkdirAll(filepath.Join(logs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	agentCfg := fmt.Sprintf(`version: v1
nodeName: %s
shutdownTimeout: 5s
gpu:
  backend: sim:h100x2
  pollInterval: 100ms
  simDebug: true
metrics:
  listen: %q
devicePlugin:
  enabled: true
  sliceMiB: %d
  reconcileInterval: 200ms
handoff:
  enabled: true
  kubeAPI: %[4]s
  assignmentKeyFile: %[5]s
enforcement:
  enabled: true
  kubeAPI: %[4]s
  accounting:
    sliceBytes: %[6]d
    podLogsDir: %[7]s/pods
    containerLogsDir: %[7]s/containers
    refreshInterval: 200ms
  policy:
    defaultAction: freeze
    allowedActions: [observe, freeze]
    gracePeriod: 10m
    checkInterval: 100ms
`, nodeName, metricsAddr, sliceMiB, cp.Kubeconfig, stack.WriteFile(t, "key", key), uint64(sliceMiB)<<20, logs)
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
	placed := map[string]*corev1.Pod{}
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
		got := k.GPU(t, bound)
		if got != rec.GPU {
			t.Errorf("pod %s: device manager allocated on %s, the scheduler chose %s", step.name, got, rec.GPU)
		}
		env := k.RunOptions(t, bound)
		if env[slice.EnvVisibleDevices] != rec.GPU || env[slice.EnvMemoryLimitBytes] != fmt.Sprint(uint64(step.slices)*sliceMiB<<20) {
			t.Errorf("pod %s: container env %s=%q %s=%q, want %s and %d slices' bytes", step.name,
				slice.EnvVisibleDevices, env[slice.EnvVisibleDevices], slice.EnvMemoryLimitBytes, env[slice.EnvMemoryLimitBytes], rec.GPU, step.slices)
		}
		placed[step.name] = bound
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
		if err == nil && maps.Equal(per, held) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent reports allocated slices %v (err %v), want %v", per, err, held)
		}
		time.Sleep(100 * time.Millisecond)
	}

	t.Run("overrun", func(t *testing.T) {
		overrun(ctx, t, cp, placed["first"], logs, "http://"+metricsAddr)
	})

	if err := ext.Stop(); err != nil {
		t.Errorf("extender: %v", err)
	}
	if err := agent.Stop(); err != nil {
		t.Errorf("agent: %v", err)
	}
}

// overrun makes a process the container "infer" of pod (1 slice), has the
// simulated GPU report it using 1.5 slices' memory, and expects the agent to
// apply the configured action (freeze) to its cgroup and record a Warning
// Event on the pod.
func overrun(ctx context.Context, t *testing.T, cp *controlplane.ControlPlane, pod *corev1.Pod, logs, agentURL string) {
	pid, group := startContainer(t, pod, logs)
	gpuUUID := pod.Annotations[slice.AnnotationAssignedGPU]
	index := -1
	gpus, err := scrapeAgent(ctx, agentURL+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range gpus {
		if g.UUID == gpuUUID {
			index = g.Index
		}
	}
	if index < 0 {
		t.Fatalf("agent does not report GPU %s", gpuUUID)
	}
	body := fmt.Sprintf(`{"usedMiB": %d, "kind": "compute"}`, sliceMiB*3/2)
	req, err := http.NewRequestWithContext(ctx, http.MethodPut,
		fmt.Sprintf("%s/debug/sim/gpus/%d/processes/%d", agentURL, index, pid), strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		t.Fatalf("script the simulated GPU: %s", resp.Status)
	}

	deadline := time.Now().Add(30 * time.Second)
	for {
		events, err := cp.Client.CoreV1().Events(pod.Namespace).List(ctx, metav1.ListOptions{
			FieldSelector: "involvedObject.name=" + pod.Name + ",reason=GPUMemoryOverQuotaFrozen"})
		if err != nil {
			t.Fatal(err)
		}
		st, serr := group.Stats()
		if len(events.Items) > 0 && serr == nil && st.Frozen {
			ev := events.Items[0]
			t.Logf("agent froze the container and recorded %s %s: %s", ev.Type, ev.Reason, ev.Message)
			if ev.Type != corev1.EventTypeWarning || ev.Source.Component != "visionslice-agent" || ev.InvolvedObject.UID != pod.UID {
				t.Errorf("event %+v: want a Warning from visionslice-agent about pod UID %s", ev, pod.UID)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no freeze and Event for the overrun of pod %s (events %d, frozen %v, stats err %v)", pod.Name, len(events.Items), st.Frozen, serr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startContainer runs a sleep as the container "infer" of pod: in a cgroup v2
// group named as the kubelet's systemd driver names a containerd container
// (below a test group; skips where cgroup v2 is not writable), with the
// kubelet's log folder and link that name the container.
func startContainer(t *testing.T, pod *corev1.Pod, logs string) (int, cgroup.Group) {
	t.Helper()
	m := cgrouptest.Manager(t)
	probe, err := m.Create("probe", cgroup.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	parent := filepath.Dir(probe.Path())
	if err := probe.Delete(); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(pod.UID))
	ctrID := hex.EncodeToString(sum[:])
	rel := filepath.Join(strings.TrimPrefix(strings.TrimPrefix(parent, m.Root()), "/"), "kubepods.slice", "kubepods-burstable.slice",
		"kubepods-burstable-pod"+strings.ReplaceAll(string(pod.UID), "-", "_")+".slice", "cri-containerd-"+ctrID+".scope")
	if err := os.MkdirAll(filepath.Join(m.Root(), rel), 0o755); err != nil {
		t.Fatal(err)
	}
	g, err := m.Open(rel)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = g.Delete()
		_ = cmd.Wait()
	})
	if err := g.AddProc(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	ctr := pod.Spec.Containers[0].Name
	if err := os.MkdirAll(filepath.Join(logs, "pods", pod.Namespace+"_"+pod.Name+"_"+string(pod.UID), ctr), 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(logs, "containers", pod.Name+"_"+pod.Namespace+"_"+ctr+"-"+ctrID+".log")
	if err := os.Symlink("../pods/x", link); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid, g
}

// allocatedPerGPU returns the agent's allocated slices per GPU.
func allocatedPerGPU(ctx context.Context, url string) (map[string]int, error) {
	gpus, err := scrapeAgent(ctx, url)
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

// scrapeAgent scrapes the agent and parses it with the extender's parser.
func scrapeAgent(ctx context.Context, url string) ([]scrape.GPU, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	gpus, _, err := scrape.Parse(resp.Body, expfmt.NewFormat(expfmt.TypeTextPlain), time.Now())
	return gpus, err
}
