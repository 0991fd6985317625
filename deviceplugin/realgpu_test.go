package deviceplugin_test

import (
	"context"
	"os"
	"strconv"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/visionslice/visionslice/deviceplugin"
	"github.com/visionslice/visionslice/deviceplugin/slice"
)

// TestRealGPU runs the plugin over the real NVML library: the slices it
// advertises must match each GPU's memory and NUMA node as NVML reports them,
// and Allocate must hand out the GPU's real UUID.
func TestRealGPU(t *testing.T) {
	if os.Getenv("VISIONSLICE_TEST_NVML") == "" {
		t.Skip("VISIONSLICE_TEST_NVML unset: this test needs an NVIDIA GPU and driver")
	}
	poller := startPoller(t, nvml.New(), testLogger(t))

	const reservedMiB = 512
	h := startPlugin(t, deviceplugin.Config{ReservedMiB: reservedMiB}, poller)
	devs := recvUntil(t, watch(t, h.client), func([]*pluginapi.Device) bool { return true })
	snap := poller.Snapshot()
	perGPU := map[string]int{}
	numa := map[string]int64{}
	for _, d := range devs {
		id, err := slice.ParseID(d.ID)
		if err != nil {
			t.Fatal(err)
		}
		perGPU[id.GPU]++
		numa[id.GPU] = -1
		if d.Topology != nil {
			numa[id.GPU] = d.Topology.Nodes[0].ID
		}
	}
	for _, g := range snap.Devices {
		want := slice.Count(g.MemoryTotalBytes, reservedMiB<<20, slice.DefaultSliceMiB<<20)
		t.Logf("gpu %d %s %s: %d MiB, NUMA node %d, healthy %v -> %d slices advertised (want %d), topology NUMA %d",
			g.Index, g.Name, g.UUID, g.MemoryTotalBytes>>20, g.NUMANode, g.Healthy, perGPU[g.UUID], want, numa[g.UUID])
		if perGPU[g.UUID] != want || want == 0 {
			t.Errorf("gpu %s: %d slices, want %d", g.UUID, perGPU[g.UUID], want)
		}
		if numa[g.UUID] != int64(g.NUMANode) {
			t.Errorf("gpu %s: topology NUMA %d, NVML says %d", g.UUID, numa[g.UUID], g.NUMANode)
		}
	}

	g := snap.Devices[0]
	resp, err := h.client.Allocate(context.Background(), &pluginapi.AllocateRequest{
		ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids(g.UUID, 0, 1, 2, 3)}},
	})
	if err != nil {
		t.Fatalf("Allocate: %v", err)
	}
	env := resp.ContainerResponses[0].Envs
	t.Logf("Allocate env: %v", env)
	if env[slice.EnvVisibleDevices] != g.UUID || env[slice.EnvMemoryLimitBytes] != strconv.Itoa(4<<30) {
		t.Errorf("env = %v", env)
	}
}
