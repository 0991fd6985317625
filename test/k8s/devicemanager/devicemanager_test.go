package devicemanager_test

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/podresources"
	"github.com/visionslice/visionslice/test/k8s/kubelet"
)

// TestDeviceManager_AllocatesSlicesOnOneGPU: the plugin registers with the
// kubelet's device manager, which then publishes the node's slices; every
// container's slices come from one GPU with that GPU and the memory limit in
// its environment; a request that only fits across two GPUs is refused with
// the reason; freed slices are reused.
func TestDeviceManager_AllocatesSlicesOnOneGPU(t *testing.T) {
	iso.Require(t)
	k := kubelet.Start(t)
	n := startNode(t, "h100x2")
	k.WaitCapacity(t, 8, 8)

	a := slicePod("a", 3)
	if err := k.Admit(a); err != nil {
		t.Fatalf("admit pod a (3 slices): %v", err)
	}
	gpuA := k.GPU(t, a)
	env := k.RunOptions(t, a)
	wantEnv := map[string]string{
		slice.EnvVisibleDevices:   gpuA,
		slice.EnvGPUUUID:          gpuA,
		slice.EnvMemoryLimitBytes: strconv.FormatUint(3*sliceMiB<<20, 10),
		slice.EnvSliceIDs:         strings.Join(k.Slices(a), ","),
	}
	for name, want := range wantEnv {
		if env[name] != want {
			t.Errorf("pod a: env %s = %q, want %q", name, env[name], want)
		}
	}

	// Binpack: the GPU with 1 free slice cannot hold 3, so b takes the other.
	b := slicePod("b", 3)
	if err := k.Admit(b); err != nil {
		t.Fatalf("admit pod b (3 slices): %v", err)
	}
	gpuB := k.GPU(t, b)
	if gpuB == gpuA {
		t.Fatalf("pod b put on %s with pod a: only 1 slice was free there", gpuB)
	}
	if got := k.RunOptions(t, b)[slice.EnvVisibleDevices]; got != gpuB {
		t.Errorf("pod b: %s = %q, want %q", slice.EnvVisibleDevices, got, gpuB)
	}

	// 2 slices are free on the node, 1 + 1: the kubelet's count fits, one GPU does not.
	c := slicePod("c", 2)
	err := k.Admit(c)
	if err == nil {
		t.Fatalf("pod c (2 slices) admitted with slices %v while free slices are split 1 + 1", k.Slices(c))
	}
	for _, want := range []string{"span 2 GPUs", "no GPU on this node has 2 free slices"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal of pod c = %q, want it to say %q", err, want)
		}
	}

	// The plugin's ledger learns the owners from the kubelet's pod-resources API.
	waitFor(t, "ledger names the owners of 6 slices", func() bool {
		owned := 0
		for _, al := range n.plugin.Allocations() {
			if al.Owner.Pod == "a" && al.GPU == gpuA || al.Owner.Pod == "b" && al.GPU == gpuB {
				owned++
			}
		}
		return owned == 6
	})

	// a ends: its GPU has 4 free slices again and c fits there.
	k.Remove(a)
	if err := k.Admit(c); err != nil {
		t.Fatalf("admit pod c after a ended: %v", err)
	}
	if got := k.GPU(t, c); got != gpuA {
		t.Errorf("pod c on %s, want %s (the GPU a freed)", got, gpuA)
	}
}

// TestDeviceManager_GPUHealth: a GPU lost is taken out of the kubelet's
// allocatable slices (capacity stays), allocation avoids it, and its slices
// come back when it recovers.
func TestDeviceManager_GPUHealth(t *testing.T) {
	iso.Require(t)
	k := kubelet.Start(t)
	n := startNode(t, "h100x2")
	k.WaitCapacity(t, 8, 8)

	if err := n.gpus.SetUnhealthy(0, "gpu_lost"); err != nil {
		t.Fatal(err)
	}
	k.WaitCapacity(t, 8, 4)
	p := slicePod("p", 4)
	if err := k.Admit(p); err != nil {
		t.Fatalf("admit 4 slices with one healthy GPU: %v", err)
	}
	if got, want := k.GPU(t, p), n.gpus.UUID(1); got != want {
		t.Errorf("pod on %s, want the healthy GPU %s", got, want)
	}
	q := slicePod("q", 1)
	if err := k.Admit(q); err == nil {
		t.Fatalf("pod q admitted with slices %v: the only free slices are on the lost GPU", k.Slices(q))
	}

	if err := n.gpus.SetHealthy(0); err != nil {
		t.Fatal(err)
	}
	k.WaitCapacity(t, 8, 8)
	if err := k.Admit(q); err != nil {
		t.Fatalf("admit after the GPU recovered: %v", err)
	}
	if got, want := k.GPU(t, q), n.gpus.UUID(0); got != want {
		t.Errorf("pod q on %s, want the recovered GPU %s", got, want)
	}
}

// TestDeviceManager_KubeletRestart: the kubelet restarts (its sockets and the
// plugin's socket are removed, the checkpoint kept); the plugin serves and
// registers again, the restarted device manager restores the running pod's
// slices from its checkpoint, and new pods are placed around them.
func TestDeviceManager_KubeletRestart(t *testing.T) {
	iso.Require(t)
	k := kubelet.Start(t)
	n := startNode(t, "h100x2")
	k.WaitCapacity(t, 8, 8)
	a := slicePod("a", 3)
	if err := k.Admit(a); err != nil {
		t.Fatal(err)
	}
	gpuA := k.GPU(t, a)
	if _, err := os.Stat(kubelet.CheckpointFile); err != nil {
		t.Fatalf("device manager wrote no checkpoint: %v", err)
	}

	k.Stop()
	restarted := time.Now()
	k = kubelet.Start(t, a)
	k.WaitCapacity(t, 8, 8)
	t.Logf("plugin registered again %s after the kubelet restarted", time.Since(restarted).Round(time.Millisecond))
	if got := k.GPU(t, a); got != gpuA {
		t.Fatalf("after restart pod a holds slices on %s, want %s", got, gpuA)
	}

	b := slicePod("b", 4)
	if err := k.Admit(b); err != nil {
		t.Fatalf("admit 4 slices after restart: %v", err)
	}
	if got := k.GPU(t, b); got == gpuA {
		t.Errorf("pod b on %s, which holds pod a's 3 slices", got)
	}
	if err := k.Admit(slicePod("c", 2)); err == nil {
		t.Error("pod c (2 slices) admitted with 1 slice free on the node")
	}

	// The pod-resources API served from the restored state lists a's slices,
	// as the plugin's ledger rebuild reads it.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := podresources.Dial(ctx, kubelet.PodResourcesSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	list, err := c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	held := 0
	for _, cd := range list {
		if cd.Pod == "a" && cd.ResourceName == slice.ResourceName {
			held += len(cd.DeviceIDs)
		}
	}
	if held != 3 {
		t.Errorf("pod-resources lists %d slices for pod a, want 3: %+v", held, list)
	}
	_ = n
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
