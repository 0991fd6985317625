package deviceplugin

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/gpu"
)

type staticSource struct{ s *gpu.Snapshot }

func (s staticSource) Snapshot() *gpu.Snapshot { return s.s }
func (s staticSource) Subscribe() (<-chan *gpu.Snapshot, func()) {
	ch := make(chan *gpu.Snapshot, 1)
	ch <- s.s
	return ch, func() {}
}

// fuzzPlugin has GPU-a (4 slices, healthy), GPU-b (4, healthy) and GPU-c
// (4, unhealthy), without serving anything.
func fuzzPlugin(tb testing.TB) *Plugin {
	snap := &gpu.Snapshot{Devices: []gpu.Device{
		{Index: 0, UUID: "GPU-a", NUMANode: 0, MemoryTotalBytes: 4 << 30, Healthy: true},
		{Index: 1, UUID: "GPU-b", NUMANode: 0, MemoryTotalBytes: 4 << 30, Healthy: true},
		{Index: 2, UUID: "GPU-c", NUMANode: 1, MemoryTotalBytes: 4 << 30, HealthReason: "xid_79"},
	}}
	p, err := New(Config{PodResourcesSocket: "/nonexistent/pod-resources.sock"}, staticSource{snap}, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		tb.Fatal(err)
	}
	p.update(snap)
	return p
}

// FuzzAllocate: Allocate never panics, refuses with InvalidArgument or
// FailedPrecondition, and what it accepts is distinct slices of one healthy
// GPU with the matching limit.
func FuzzAllocate(f *testing.F) {
	p := fuzzPlugin(f)
	for _, s := range []string{"GPU-a::0,GPU-a::3", "GPU-a::0,GPU-b::0", "GPU-c::1", "GPU-a::4", "GPU-a::-1", "::0", "GPU-a::0,GPU-a::0", "GPU-a::01", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		devs := strings.Split(s, ",")
		resp, got, err := p.allocate(&pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: devs}}})
		if err != nil {
			if c := status.Code(err); c != codes.InvalidArgument && c != codes.FailedPrecondition {
				t.Fatalf("code %s for %q: %v", c, s, err)
			}
			return
		}
		if len(got) != len(devs) {
			t.Fatalf("%q: %d slices for %d IDs", s, len(got), len(devs))
		}
		seen := map[slice.ID]bool{}
		for _, id := range got {
			if id.GPU != got[0].GPU || id.GPU == "GPU-c" || seen[id] || id.Index < 0 || id.Index > 3 {
				t.Fatalf("%q accepted as %v", s, got)
			}
			seen[id] = true
		}
		env := resp.ContainerResponses[0].Envs
		if env[slice.EnvVisibleDevices] != got[0].GPU || env[slice.EnvMemoryLimitBytes] != strconv.Itoa(len(got)<<30) {
			t.Fatalf("%q: env %v", s, env)
		}
	})
}

// FuzzPreferred: a preference is empty or exactly the size asked, distinct,
// on one healthy GPU, drawn from what was offered and holding must-include.
func FuzzPreferred(f *testing.F) {
	p := fuzzPlugin(f)
	f.Add("GPU-a::0,GPU-a::1,GPU-b::0,GPU-b::1,GPU-b::2", "", int32(2))
	f.Add("GPU-a::0,GPU-b::0,GPU-c::0", "GPU-b::0", int32(1))
	f.Add("GPU-a::0,GPU-a::0,GPU-a::1", "GPU-a::1", int32(2))
	f.Fuzz(func(t *testing.T, avail, must string, size int32) {
		req := &pluginapi.ContainerPreferredAllocationRequest{AllocationSize: size}
		if avail != "" {
			req.AvailableDeviceIDs = strings.Split(avail, ",")
		}
		if must != "" {
			req.MustIncludeDeviceIDs = strings.Split(must, ",")
		}
		out, err := p.preferred(context.Background(), req)
		if err != nil || len(out) == 0 {
			return
		}
		offered := map[string]bool{}
		for _, s := range append(req.AvailableDeviceIDs, req.MustIncludeDeviceIDs...) {
			offered[s] = true
		}
		seen := map[string]bool{}
		first, _ := slice.ParseID(out[0])
		for _, s := range out {
			id, err := slice.ParseID(s)
			if err != nil || id.GPU != first.GPU || id.GPU == "GPU-c" || seen[s] || !offered[s] {
				t.Fatalf("preferred(%q, %q, %d) = %v", avail, must, size, out)
			}
			seen[s] = true
		}
		if len(out) != int(size) {
			t.Fatalf("preferred(%q, %q, %d) = %v: wrong size", avail, must, size, out)
		}
		for _, s := range req.MustIncludeDeviceIDs {
			if !seen[s] {
				t.Fatalf("preferred(%q, %q, %d) = %v: lost must-include %s", avail, must, size, out, s)
			}
		}
	})
}
