package deviceplugin_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/visionslice/visionslice/deviceplugin"
	"github.com/visionslice/visionslice/deviceplugin/kubelettest"
	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
	"github.com/visionslice/visionslice/nodeagent/podresources"
	"github.com/visionslice/visionslice/nodeagent/podresources/podresourcestest"
)

// ids returns the slice IDs of gpu with the given indexes.
func ids(gpuUUID string, idx ...int) []string {
	out := make([]string, len(idx))
	for i, n := range idx {
		out[i] = slice.ID{GPU: gpuUUID, Index: n}.String()
	}
	return out
}

func span(lo, hi int) []int {
	var out []int
	for i := lo; i <= hi; i++ {
		out = append(out, i)
	}
	return out
}

func concat(lists ...[]string) []string {
	var out []string
	for _, l := range lists {
		out = append(out, l...)
	}
	return out
}

func TestRegisterAndListAndWatch(t *testing.T) {
	t.Parallel()
	src := newFakeSource(
		dev(0, "GPU-h100", 81920, 0),
		dev(1, "GPU-a100", 40960, 1),
		dev(2, "GPU-l4", 24576, -1),
	)
	h := startPlugin(t, deviceplugin.Config{ReservedMiB: 1024}, src)

	// Ask for options and devices the way the kubelet does after Register.
	opts, err := h.client.GetDevicePluginOptions(context.Background(), &pluginapi.Empty{})
	if err != nil {
		t.Fatalf("GetDevicePluginOptions: %v", err)
	}
	if !opts.GetPreferredAllocationAvailable || opts.PreStartRequired {
		t.Errorf("options = %+v, want preferred allocation and no pre-start", opts)
	}

	devs := recvUntil(t, watch(t, h.client), func([]*pluginapi.Device) bool { return true })
	want := map[string]int{"GPU-h100": 79, "GPU-a100": 39, "GPU-l4": 23}
	got := map[string]int{}
	numa := map[string]string{}
	for _, d := range devs {
		id, err := slice.ParseID(d.ID)
		if err != nil {
			t.Fatalf("device ID: %v", err)
		}
		got[id.GPU]++
		if d.Health != pluginapi.Healthy {
			t.Errorf("%s health %s, want Healthy", d.ID, d.Health)
		}
		topo := "none"
		if d.Topology != nil {
			topo = fmt.Sprint(d.Topology.Nodes[0].ID)
		}
		numa[id.GPU] = topo
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("slices per GPU = %v, want %v (different sizes, 1 GiB reserved)", got, want)
	}
	if wantNUMA := map[string]string{"GPU-h100": "0", "GPU-a100": "1", "GPU-l4": "none"}; !reflect.DeepEqual(numa, wantNUMA) {
		t.Errorf("NUMA topology = %v, want %v", numa, wantNUMA)
	}
}

func TestRegistrationRequest(t *testing.T) {
	t.Parallel()
	dir := shortDir(t)
	k := kubelettest.Start(t, dir)
	p, err := deviceplugin.New(deviceplugin.Config{SocketDir: dir, PodResourcesSocket: filepath.Join(dir, "none.sock")},
		newFakeSource(dev(0, "GPU-a", 4096, 0)), nil, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	r := k.WaitRegistration(t, waitLimit)
	want := &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     deviceplugin.DefaultPluginSocket,
		ResourceName: slice.ResourceName,
		Options:      &pluginapi.DevicePluginOptions{GetPreferredAllocationAvailable: true},
	}
	if r.Version != want.Version || r.Endpoint != want.Endpoint || r.ResourceName != want.ResourceName ||
		!r.Options.GetPreferredAllocationAvailable {
		t.Errorf("register request = %+v, want %+v", r, want)
	}
	if fi, err := os.Stat(p.SocketPath()); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("plugin socket %s: %v", p.SocketPath(), err)
	}

	// Shutdown ends a live ListAndWatch stream and removes the socket.
	stream := watch(t, dialPlugin(t, p.SocketPath()))
	recvUntil(t, stream, func([]*pluginapi.Device) bool { return true })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if _, err := stream.Recv(); err == nil {
		t.Error("ListAndWatch stream still open after shutdown")
	}
	if _, err := os.Stat(p.SocketPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("plugin socket after shutdown: %v, want removed", err)
	}
}

type fixedHinter struct{ uuid string }

func (h fixedHinter) PreferredGPU(context.Context, int) (string, bool) { return h.uuid, h.uuid != "" }

func TestGetPreferredAllocation(t *testing.T) {
	t.Parallel()
	unhealthy := dev(3, "GPU-d", 8192, 1)
	unhealthy.Healthy, unhealthy.HealthReason = false, "xid_79"
	devs := []gpu.Device{dev(0, "GPU-a", 4096, 0), dev(1, "GPU-b", 8192, 0), dev(2, "GPU-c", 8192, 1), unhealthy}
	a, b, c, d := ids("GPU-a", span(0, 3)...), ids("GPU-b", span(0, 7)...), ids("GPU-c", span(0, 7)...), ids("GPU-d", span(0, 7)...)
	plugins := map[string]pluginapi.DevicePluginClient{
		"binpack": startPlugin(t, deviceplugin.Config{}, newFakeSource(devs...)).client,
		"spread":  startPlugin(t, deviceplugin.Config{Policy: deviceplugin.PolicySpread}, newFakeSource(devs...)).client,
		"hint-c":  startPlugin(t, deviceplugin.Config{}, newFakeSource(devs...), deviceplugin.WithHinter(fixedHinter{"GPU-c"})).client,
	}
	tests := []struct {
		name      string
		plugin    string
		available []string
		must      []string
		size      int32
		want      []string
		code      codes.Code
	}{
		{name: "binpack takes the fullest gpu that fits", plugin: "binpack", available: concat(a, b), size: 3, want: ids("GPU-a", 0, 1, 2)},
		{name: "binpack skips a gpu too small", plugin: "binpack", available: concat(a, b), size: 5, want: ids("GPU-b", 0, 1, 2, 3, 4)},
		{name: "binpack counts only offered slices", plugin: "binpack", available: concat(a, ids("GPU-b", 5, 7)), size: 2, want: ids("GPU-b", 5, 7)},
		{name: "ties go to the lowest index", plugin: "binpack", available: concat(c, b), size: 8, want: b},
		{name: "spread takes the emptiest gpu", plugin: "spread", available: concat(a, b), size: 3, want: ids("GPU-b", 0, 1, 2)},
		{name: "must-include fixes the gpu", plugin: "binpack", available: concat(a, b), must: ids("GPU-b", 5), size: 2, want: ids("GPU-b", 5, 0)},
		{name: "must-include on two gpus has no answer", plugin: "binpack", available: concat(a, b), must: concat(ids("GPU-a", 0), ids("GPU-b", 0)), size: 2, want: nil},
		{name: "no single gpu holds the request", plugin: "binpack", available: concat(a, b, c), size: 9, want: nil},
		{name: "unhealthy gpu is never preferred", plugin: "spread", available: concat(d, ids("GPU-b", 0, 1, 2, 3)), size: 4, want: ids("GPU-b", 0, 1, 2, 3)},
		{name: "unknown offered ids are ignored", plugin: "binpack", available: concat([]string{"bogus", "GPU-zzz::0", "GPU-a::99"}, a), size: 1, want: ids("GPU-a", 0)},
		{name: "repeated offered ids count once", plugin: "binpack", available: concat(ids("GPU-a", 0, 0, 0), ids("GPU-b", 1, 2)), must: ids("GPU-b", 2, 2), size: 2, want: ids("GPU-b", 2, 1)},
		{name: "hinted gpu wins", plugin: "hint-c", available: concat(a, b, c), size: 2, want: ids("GPU-c", 0, 1)},
		{name: "hinted gpu too full falls back to policy", plugin: "hint-c", available: concat(a, b, ids("GPU-c", 0, 1)), size: 4, want: a},
		{name: "zero size", plugin: "binpack", available: a, size: 0, code: codes.InvalidArgument},
		{name: "unknown must-include", plugin: "binpack", available: a, must: []string{"GPU-zzz::1"}, size: 1, code: codes.InvalidArgument},
		{name: "must-include beyond size", plugin: "binpack", available: a, must: ids("GPU-a", 0, 1), size: 1, code: codes.InvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			resp, err := plugins[tc.plugin].GetPreferredAllocation(context.Background(), &pluginapi.PreferredAllocationRequest{
				ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{
					AvailableDeviceIDs: tc.available, MustIncludeDeviceIDs: tc.must, AllocationSize: tc.size,
				}},
			})
			if tc.code != codes.OK {
				if status.Code(err) != tc.code {
					t.Fatalf("error = %v, want code %s", err, tc.code)
				}
				return
			}
			if err != nil {
				t.Fatalf("GetPreferredAllocation: %v", err)
			}
			if got := resp.ContainerResponses[0].DeviceIDs; !reflect.DeepEqual(got, tc.want) {
				t.Errorf("preferred = %v, want %v", got, tc.want)
			}
		})
	}

	t.Run("one answer per container", func(t *testing.T) {
		t.Parallel()
		resp, err := plugins["binpack"].GetPreferredAllocation(context.Background(), &pluginapi.PreferredAllocationRequest{
			ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{
				{AvailableDeviceIDs: concat(a, b), AllocationSize: 1},
				{AvailableDeviceIDs: concat(a, b), AllocationSize: 6},
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.ContainerResponses) != 2 || len(resp.ContainerResponses[0].DeviceIDs) != 1 || len(resp.ContainerResponses[1].DeviceIDs) != 6 {
			t.Errorf("responses = %v", resp.ContainerResponses)
		}
	})
}

func TestAllocate(t *testing.T) {
	t.Parallel()
	unhealthy := dev(2, "GPU-d", 8192, 1)
	unhealthy.Healthy, unhealthy.HealthReason = false, "gpu_lost"
	src := newFakeSource(dev(0, "GPU-a", 4096, 0), dev(1, "GPU-b", 8192, 0), unhealthy)
	h := startPlugin(t, deviceplugin.Config{
		SliceMiB:    2048,
		CDI:         deviceplugin.CDIConfig{Enabled: true},
		DeviceSpecs: []string{"/dev/nvidiactl", "/dev/nvidia{index}"},
	}, src)

	t.Run("success", func(t *testing.T) {
		resp, err := h.client.Allocate(context.Background(), &pluginapi.AllocateRequest{
			ContainerRequests: []*pluginapi.ContainerAllocateRequest{
				{DevicesIds: ids("GPU-b", 3, 1)},
				{DevicesIds: ids("GPU-a", 0)},
			},
		})
		if err != nil {
			t.Fatalf("Allocate: %v", err)
		}
		want := []*pluginapi.ContainerAllocateResponse{
			{
				Envs: map[string]string{
					slice.EnvVisibleDevices:   "GPU-b",
					slice.EnvGPUUUID:          "GPU-b",
					slice.EnvMemoryLimitBytes: strconv.Itoa(2 * 2048 << 20),
					slice.EnvSliceIDs:         "GPU-b::1,GPU-b::3",
				},
				CdiDevices: []*pluginapi.CDIDevice{{Name: "nvidia.com/gpu=GPU-b"}},
				Devices: []*pluginapi.DeviceSpec{
					{ContainerPath: "/dev/nvidiactl", HostPath: "/dev/nvidiactl", Permissions: "rw"},
					{ContainerPath: "/dev/nvidia1", HostPath: "/dev/nvidia1", Permissions: "rw"},
				},
			},
			{
				Envs: map[string]string{
					slice.EnvVisibleDevices:   "GPU-a",
					slice.EnvGPUUUID:          "GPU-a",
					slice.EnvMemoryLimitBytes: strconv.Itoa(2048 << 20),
					slice.EnvSliceIDs:         "GPU-a::0",
				},
				CdiDevices: []*pluginapi.CDIDevice{{Name: "nvidia.com/gpu=GPU-a"}},
				Devices: []*pluginapi.DeviceSpec{
					{ContainerPath: "/dev/nvidiactl", HostPath: "/dev/nvidiactl", Permissions: "rw"},
					{ContainerPath: "/dev/nvidia0", HostPath: "/dev/nvidia0", Permissions: "rw"},
				},
			},
		}
		for i, w := range want {
			g := resp.ContainerResponses[i]
			if !reflect.DeepEqual(g.Envs, w.Envs) || fmt.Sprint(g.CdiDevices) != fmt.Sprint(w.CdiDevices) || fmt.Sprint(g.Devices) != fmt.Sprint(w.Devices) {
				t.Errorf("container %d:\n got %v\nwant %v", i, g, w)
			}
		}
		if got := h.plugin.AllocatedSlices(); got["GPU-b"] != 2 || got["GPU-a"] != 1 {
			t.Errorf("ledger = %v, want 2 on GPU-b and 1 on GPU-a", got)
		}
	})

	tests := []struct {
		name string
		devs [][]string
		code codes.Code
		msg  string
	}{
		{name: "no containers", devs: nil, code: codes.InvalidArgument, msg: "no container requests"},
		{name: "no ids", devs: [][]string{{}}, code: codes.InvalidArgument, msg: "no device IDs"},
		{name: "malformed id", devs: [][]string{{"GPU-a-3"}}, code: codes.InvalidArgument, msg: `malformed slice id "GPU-a-3"`},
		{name: "unknown gpu", devs: [][]string{{"GPU-zzz::0"}}, code: codes.InvalidArgument, msg: "no GPU GPU-zzz on this node"},
		{name: "index beyond the gpu", devs: [][]string{ids("GPU-a", 2)}, code: codes.InvalidArgument, msg: "GPU GPU-a has 2 slices"},
		{name: "repeated id", devs: [][]string{ids("GPU-b", 1, 1)}, code: codes.InvalidArgument, msg: `"GPU-b::1" requested twice`},
		{name: "two gpus", devs: [][]string{concat(ids("GPU-a", 1), ids("GPU-b", 0))}, code: codes.InvalidArgument, msg: "2 slices span 2 GPUs"},
		{name: "unhealthy gpu", devs: [][]string{ids("GPU-d", 0)}, code: codes.FailedPrecondition, msg: "GPU GPU-d (index 2) is unhealthy (gpu_lost)"},
		{name: "second container bad", devs: [][]string{ids("GPU-b", 0), {"x"}}, code: codes.InvalidArgument, msg: "container request 1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := &pluginapi.AllocateRequest{}
			for _, d := range tc.devs {
				req.ContainerRequests = append(req.ContainerRequests, &pluginapi.ContainerAllocateRequest{DevicesIds: d})
			}
			_, err := h.client.Allocate(context.Background(), req)
			if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
				t.Errorf("Allocate error = %v, want %s containing %q", err, tc.code, tc.msg)
			}
		})
	}
	if got := h.plugin.AllocatedSlices(); got["GPU-b"] != 2 || got["GPU-a"] != 1 || got["GPU-d"] != 0 {
		t.Errorf("refused requests changed the ledger: %v", got)
	}
	if err := testutil.GatherAndCompare(h.reg, strings.NewReader(`
# HELP visionslice_deviceplugin_allocate_requests_total Allocate calls from the kubelet, by result (success, invalid_argument, failed_precondition).
# TYPE visionslice_deviceplugin_allocate_requests_total counter
visionslice_deviceplugin_allocate_requests_total{result="failed_precondition"} 1
visionslice_deviceplugin_allocate_requests_total{result="invalid_argument"} 8
visionslice_deviceplugin_allocate_requests_total{result="success"} 1
`), "visionslice_deviceplugin_allocate_requests_total"); err != nil {
		t.Error(err)
	}
}

// TestFragmentation: two GPUs with 3 free slices each cannot hold 4.
func TestFragmentation(t *testing.T) {
	t.Parallel()
	h := startPlugin(t, deviceplugin.Config{}, newFakeSource(dev(0, "GPU-a", 4096, 0), dev(1, "GPU-b", 4096, 0)))
	ctx := context.Background()
	for _, id := range concat(ids("GPU-a", 0), ids("GPU-b", 0)) {
		if _, err := h.client.Allocate(ctx, &pluginapi.AllocateRequest{
			ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: []string{id}}},
		}); err != nil {
			t.Fatalf("Allocate %s: %v", id, err)
		}
	}
	free := concat(ids("GPU-a", 1, 2, 3), ids("GPU-b", 1, 2, 3))
	resp, err := h.client.GetPreferredAllocation(ctx, &pluginapi.PreferredAllocationRequest{
		ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{AvailableDeviceIDs: free, AllocationSize: 4}},
	})
	if err != nil {
		t.Fatalf("GetPreferredAllocation: %v", err)
	}
	if got := resp.ContainerResponses[0].DeviceIDs; len(got) != 0 {
		t.Fatalf("preferred = %v, want none", got)
	}
	// The kubelet falls back to the first free devices it finds.
	_, err = h.client.Allocate(ctx, &pluginapi.AllocateRequest{
		ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: free[:4]}},
	})
	msg := status.Convert(err).Message()
	for _, want := range []string{"4 slices span 2 GPUs (3 on GPU-a, 1 on GPU-b)", "no GPU on this node has 4 free slices", "GPU-a: 3, GPU-b: 3"} {
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(msg, want) {
			t.Errorf("Allocate error = %v, want InvalidArgument containing %q", err, want)
		}
	}
	t.Logf("message: %s", msg)
}

func TestKubeletRestart(t *testing.T) {
	t.Parallel()
	for _, removeSocket := range []bool{true, false} {
		t.Run(fmt.Sprintf("plugin socket removed=%v", removeSocket), func(t *testing.T) {
			t.Parallel()
			h := startPlugin(t, deviceplugin.Config{}, newFakeSource(dev(0, "GPU-a", 4096, 0)))
			old := watch(t, h.client)
			recvUntil(t, old, func([]*pluginapi.Device) bool { return true })

			h.kubelet.Stop()
			if removeSocket { // the kubelet's startup cleanup of the folder
				if err := os.Remove(h.plugin.SocketPath()); err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			h.kubelet = kubelettest.Start(t, h.dir)
			r := h.kubelet.WaitRegistration(t, waitLimit)
			t.Logf("re-registered %s after the kubelet socket was re-created", time.Since(start))

			devs := recvUntil(t, watch(t, dialPlugin(t, filepath.Join(h.dir, r.Endpoint))), func([]*pluginapi.Device) bool { return true })
			if len(devs) != 4 {
				t.Errorf("after restart %d devices, want 4", len(devs))
			}
			if removeSocket {
				if _, err := old.Recv(); err == nil {
					t.Error("stream of the replaced server still open")
				}
			}
		})
	}
}

func TestHealthWithSimPoller(t *testing.T) {
	t.Parallel()
	for _, reason := range []string{"gpu_lost", "xid_79"} {
		t.Run(reason, func(t *testing.T) {
			t.Parallel()
			s, err := sim.New("h100x2", t.Name())
			if err != nil {
				t.Fatal(err)
			}
			poller := startPoller(t, s.Interface(), testLogger(t), gpu.WithXIDRecovery(300*time.Millisecond))
			h := startPlugin(t, deviceplugin.Config{SliceMiB: 8192}, poller)
			perGPU := slice.Count(s.MemoryTotalBytes(0), 0, 8192<<20)
			bad, good := s.UUID(1), s.UUID(0)
			stream := watch(t, h.client)
			state := func(wantBad string) func([]*pluginapi.Device) bool {
				return func(devs []*pluginapi.Device) bool {
					m := healthByGPU(t, devs)
					return m[good][pluginapi.Healthy] == perGPU && m[bad][wantBad] == perGPU
				}
			}
			recvUntil(t, stream, state(pluginapi.Healthy))

			if err := s.SetUnhealthy(1, reason); err != nil {
				t.Fatal(err)
			}
			recvUntil(t, stream, state(pluginapi.Unhealthy))
			_, err = h.client.Allocate(context.Background(), &pluginapi.AllocateRequest{
				ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids(bad, 0)}},
			})
			if status.Code(err) != codes.FailedPrecondition {
				t.Errorf("Allocate on the unhealthy GPU = %v, want FailedPrecondition", err)
			}

			if reason == "gpu_lost" {
				if err := s.SetHealthy(1); err != nil {
					t.Fatal(err)
				}
			} // an XID recovers on its own after the reader's recovery period
			recvUntil(t, stream, state(pluginapi.Healthy))
			if _, err := h.client.Allocate(context.Background(), &pluginapi.AllocateRequest{
				ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids(bad, 0)}},
			}); err != nil {
				t.Errorf("Allocate after recovery: %v", err)
			}
		})
	}
}

// TestLedgerFromPodResources: after an agent restart the ledger comes from
// the kubelet's pod-resources, and held slices are never preferred.
func TestLedgerFromPodResources(t *testing.T) {
	t.Parallel()
	pr := podresourcestest.New(t)
	pr.SetContainers([]podresources.ContainerDevices{
		{Namespace: "ns1", Pod: "ocr", Container: "main", ResourceName: slice.ResourceName, DeviceIDs: ids("GPU-a", 0, 1, 2)},
		{Namespace: "ns2", Pod: "det", Container: "side", ResourceName: slice.ResourceName, DeviceIDs: ids("GPU-b", 0)},
		{Namespace: "ns2", Pod: "det", Container: "side", ResourceName: "nvidia.com/gpu", DeviceIDs: []string{"GPU-a"}},
	})
	all := concat(ids("GPU-a", span(0, 3)...), ids("GPU-b", span(0, 3)...))
	pr.SetAllocatable(map[string][]string{slice.ResourceName: all})
	h := startPlugin(t, deviceplugin.Config{PodResourcesSocket: pr.Socket(), ReconcileInterval: 20 * time.Millisecond},
		newFakeSource(dev(0, "GPU-a", 4096, 0), dev(1, "GPU-b", 4096, 0)))

	if got := h.plugin.AllocatedSlices(); got["GPU-a"] != 3 || got["GPU-b"] != 1 {
		t.Fatalf("ledger after start = %v, want 3 on GPU-a and 1 on GPU-b", got)
	}
	if pr.AllocatableCalls() == 0 {
		t.Error("GetAllocatableResources not called at start")
	}
	owners := map[string]deviceplugin.Owner{}
	for _, a := range h.plugin.Allocations() {
		owners[a.SliceID] = a.Owner
	}
	if o := owners["GPU-a::1"]; o != (deviceplugin.Owner{Namespace: "ns1", Pod: "ocr", Container: "main"}) {
		t.Errorf("owner of GPU-a::1 = %+v", o)
	}

	preferred := func(size int32) []string {
		t.Helper()
		// A stale kubelet view offers every slice.
		resp, err := h.client.GetPreferredAllocation(context.Background(), &pluginapi.PreferredAllocationRequest{
			ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{AvailableDeviceIDs: all, AllocationSize: size}},
		})
		if err != nil {
			t.Fatal(err)
		}
		return resp.ContainerResponses[0].DeviceIDs
	}
	if got := preferred(1); !reflect.DeepEqual(got, ids("GPU-a", 3)) {
		t.Errorf("preferred(1) = %v, want GPU-a::3 (binpack on the free slice)", got)
	}
	if got := preferred(2); !reflect.DeepEqual(got, ids("GPU-b", 1, 2)) {
		t.Errorf("preferred(2) = %v, want GPU-b::1,2", got)
	}

	// The pod ends: the next reconcile releases its slices. A new Allocate
	// is pending until pod-resources names its owner.
	if _, err := h.client.Allocate(context.Background(), &pluginapi.AllocateRequest{
		ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids("GPU-b", 3)}},
	}); err != nil {
		t.Fatal(err)
	}
	pr.SetContainers([]podresources.ContainerDevices{
		{Namespace: "ns2", Pod: "det", Container: "side", ResourceName: slice.ResourceName, DeviceIDs: ids("GPU-b", 0)},
		{Namespace: "ns3", Pod: "new", Container: "c", ResourceName: slice.ResourceName, DeviceIDs: ids("GPU-b", 3)},
	})
	deadline := time.Now().Add(waitLimit)
	for {
		got := h.plugin.AllocatedSlices()
		var owner deviceplugin.Owner
		for _, a := range h.plugin.Allocations() {
			if a.SliceID == "GPU-b::3" {
				owner = a.Owner
			}
		}
		if got["GPU-a"] == 0 && got["GPU-b"] == 2 && owner.Pod == "new" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ledger = %v (GPU-b::3 owner %+v), want GPU-a released and GPU-b::3 held by ns3/new", got, owner)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestMetrics(t *testing.T) {
	t.Parallel()
	h := startPlugin(t, deviceplugin.Config{SliceMiB: 2048}, newFakeSource(dev(0, "GPU-a", 8192, 0), dev(1, "GPU-b", 4096, 0)))
	if _, err := h.client.Allocate(context.Background(), &pluginapi.AllocateRequest{
		ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids("GPU-a", 0, 1, 2)}},
	}); err != nil {
		t.Fatal(err)
	}
	problems, err := testutil.GatherAndLint(h.reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint %s: %s", p.Metric, p.Text)
	}
	want := `
# HELP visionslice_gpu_slices_allocated Slices of the GPU held by containers, from the device plugin's ledger.
# TYPE visionslice_gpu_slices_allocated gauge
visionslice_gpu_slices_allocated{gpu="0",gpu_uuid="GPU-a"} 3
visionslice_gpu_slices_allocated{gpu="1",gpu_uuid="GPU-b"} 0
# HELP visionslice_gpu_slices_capacity Slices of visionslice.io/gpu-slice advertised on the GPU.
# TYPE visionslice_gpu_slices_capacity gauge
visionslice_gpu_slices_capacity{gpu="0",gpu_uuid="GPU-a"} 4
visionslice_gpu_slices_capacity{gpu="1",gpu_uuid="GPU-b"} 2
# HELP visionslice_gpu_slice_size_bytes GPU memory of one slice in bytes.
# TYPE visionslice_gpu_slice_size_bytes gauge
visionslice_gpu_slice_size_bytes{gpu="0",gpu_uuid="GPU-a"} 2.147483648e+09
visionslice_gpu_slice_size_bytes{gpu="1",gpu_uuid="GPU-b"} 2.147483648e+09
# HELP visionslice_deviceplugin_registrations_total Registration attempts with the kubelet, by result (success, error).
# TYPE visionslice_deviceplugin_registrations_total counter
visionslice_deviceplugin_registrations_total{result="error"} 0
visionslice_deviceplugin_registrations_total{result="success"} 1
`
	if err := testutil.GatherAndCompare(h.reg, strings.NewReader(want),
		"visionslice_gpu_slices_allocated", "visionslice_gpu_slices_capacity", "visionslice_gpu_slice_size_bytes",
		"visionslice_deviceplugin_registrations_total"); err != nil {
		t.Error(err)
	}
}

func TestConfig(t *testing.T) {
	t.Parallel()
	def := deviceplugin.DefaultConfig()
	if !def.Enabled {
		t.Error("plugin disabled by default")
	}
	if err := def.Validate(); err != nil {
		t.Fatalf("defaults invalid: %v", err)
	}
	if def.SliceMiB != slice.DefaultSliceMiB || def.Policy != deviceplugin.PolicyBinpack || def.SocketDir != pluginapi.DevicePluginPath ||
		def.PodResourcesSocket != podresources.DefaultSocket {
		t.Errorf("defaults = %+v", def)
	}
	tests := []struct {
		name string
		edit func(*deviceplugin.Config)
		want string
	}{
		{"relative socket dir", func(c *deviceplugin.Config) { c.SocketDir = "plugins" }, "devicePlugin.socketDir"},
		{"socket name with slash", func(c *deviceplugin.Config) { c.PluginSocket = "a/b.sock" }, "devicePlugin.pluginSocket"},
		{"plugin socket is kubelet's", func(c *deviceplugin.Config) { c.PluginSocket = "kubelet.sock" }, "must differ from kubeletSocket"},
		{"negative slice", func(c *deviceplugin.Config) { c.SliceMiB = -1 }, "devicePlugin.sliceMiB"},
		{"negative reserve", func(c *deviceplugin.Config) { c.ReservedMiB = -1 }, "devicePlugin.reservedMiB"},
		{"bad policy", func(c *deviceplugin.Config) { c.Policy = "random" }, `devicePlugin.policy "random"`},
		{"bad interval", func(c *deviceplugin.Config) { c.ReconcileInterval = -time.Second }, "devicePlugin.reconcileInterval"},
		{"bad cdi kind", func(c *deviceplugin.Config) { c.CDI = deviceplugin.CDIConfig{Enabled: true, Kind: "gpu"} }, "devicePlugin.cdi.kind"},
		{"relative device spec", func(c *deviceplugin.Config) { c.DeviceSpecs = []string{"dev/nvidia0"} }, "devicePlugin.deviceSpecs[0]"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := def
			tc.edit(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Validate = %v, want an error naming %q", err, tc.want)
			}
			if _, err := deviceplugin.New(c, newFakeSource(), nil, testLogger(t)); err == nil {
				t.Error("New accepted an invalid config")
			}
		})
	}
}

// TestWaitsForKubeletFolderAndGPUs: an agent started before the kubelet made
// its folder, and before the first GPU poll, waits for both, then registers.
func TestWaitsForKubeletFolderAndGPUs(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(shortDir(t), "dp")
	src := newFakeSource()
	p, err := deviceplugin.New(deviceplugin.Config{SocketDir: dir, PodResourcesSocket: filepath.Join(dir, "none.sock")}, src, nil, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()

	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	k := kubelettest.Start(t, dir)
	src.Set(dev(0, "GPU-a", 2048, 0))
	if r := k.WaitRegistration(t, waitLimit); r.ResourceName != slice.ResourceName {
		t.Errorf("registered %q", r.ResourceName)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}

	// Cancelled while still waiting for the folder: Run returns nil at once.
	ctx2, cancel2 := context.WithCancel(context.Background())
	p2, err := deviceplugin.New(deviceplugin.Config{SocketDir: filepath.Join(dir, "missing")}, src, nil, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	go func() { done <- p2.Run(ctx2) }()
	cancel2()
	if err := <-done; err != nil {
		t.Fatalf("Run while waiting: %v", err)
	}
}

// TestKubeletStartsAfterPlugin: registration fails while there is no
// kubelet and succeeds as soon as kubelet.sock appears.
func TestKubeletStartsAfterPlugin(t *testing.T) {
	t.Parallel()
	dir := shortDir(t)
	reg := prometheus.NewPedanticRegistry()
	p, err := deviceplugin.New(deviceplugin.Config{SocketDir: dir, PodResourcesSocket: filepath.Join(dir, "none.sock")},
		newFakeSource(dev(0, "GPU-a", 2048, 0)), reg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	// Wait for the first failed attempt, then start the kubelet.
	deadline := time.Now().Add(waitLimit)
	for testutil.ToFloat64(registrations(t, reg, "error")) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no failed registration attempt without a kubelet")
		}
		time.Sleep(5 * time.Millisecond)
	}
	k := kubelettest.Start(t, dir)
	start := time.Now()
	k.WaitRegistration(t, waitLimit)
	t.Logf("registered %s after kubelet.sock appeared", time.Since(start))
}

func registrations(t *testing.T, reg *prometheus.Registry, result string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x"})
	for _, mf := range mfs {
		if mf.GetName() != "visionslice_deviceplugin_registrations_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == result {
				g.Set(m.GetCounter().GetValue())
			}
		}
	}
	return g
}
