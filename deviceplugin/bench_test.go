package deviceplugin_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/visionslice/visionslice/deviceplugin"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
)

// measure runs op b.N times and reports the p50 and p99 of its durations.
func measure(b *testing.B, op func(i int) error) {
	samples := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		if err := op(i); err != nil {
			b.Fatal(err)
		}
		samples = append(samples, time.Since(start))
	}
	b.StopTimer()
	reportQuantiles(b, samples)
}

// reportQuantiles reports the p50 and p99 of samples in microseconds.
func reportQuantiles(b *testing.B, samples []time.Duration) {
	if len(samples) == 0 {
		return
	}
	slices.Sort(samples)
	q := func(f float64) float64 { return float64(samples[int(f*float64(len(samples)-1))].Microseconds()) }
	b.ReportMetric(q(0.50), "p50-us")
	b.ReportMetric(q(0.99), "p99-us")
}

// eightH100 is a node of 8 H100 80 GB GPUs: 80 slices each at 1 GiB.
func eightH100() []gpu.Device {
	var devs []gpu.Device
	for i := 0; i < 8; i++ {
		devs = append(devs, dev(i, fmt.Sprintf("GPU-%08d-h100", i), 81920, i/4))
	}
	return devs
}

// BenchmarkAllocate measures one Allocate of 4 slices as the kubelet makes
// it: over the plugin's unix socket with the generated client.
func BenchmarkAllocate(b *testing.B) {
	h := startPlugin(b, deviceplugin.Config{}, newFakeSource(eightH100()...))
	devs := eightH100()
	req := func(i int) *pluginapi.AllocateRequest {
		g := devs[i%len(devs)].UUID
		n := (i / len(devs) * 4) % 80
		return &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids(g, n, n+1, n+2, n+3)}}}
	}
	measure(b, func(i int) error {
		_, err := h.client.Allocate(context.Background(), req(i))
		return err
	})
}

// BenchmarkGetPreferredAllocation measures one preference for 4 slices among
// all 640 slices of an 8-GPU node.
func BenchmarkGetPreferredAllocation(b *testing.B) {
	devs := eightH100()
	h := startPlugin(b, deviceplugin.Config{}, newFakeSource(devs...))
	var all []string
	for _, d := range devs {
		all = append(all, ids(d.UUID, span(0, 79)...)...)
	}
	req := &pluginapi.PreferredAllocationRequest{ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{AvailableDeviceIDs: all, AllocationSize: 4}}}
	measure(b, func(int) error {
		_, err := h.client.GetPreferredAllocation(context.Background(), req)
		return err
	})
}

// BenchmarkHealthToListAndWatch measures the time from the GPU poller
// publishing a health change to the kubelet's ListAndWatch stream receiving
// the updated 640 devices of an 8-GPU node.
func BenchmarkHealthToListAndWatch(b *testing.B) {
	devs := eightH100()
	src := newFakeSource(devs...)
	h := startPlugin(b, deviceplugin.Config{}, src)
	stream := watch(b, h.client)
	if _, err := stream.Recv(); err != nil {
		b.Fatal(err)
	}
	measure(b, func(i int) error {
		devs[3].Healthy = i%2 == 1
		src.Set(devs...)
		r, err := stream.Recv()
		if err != nil {
			return err
		}
		if got := r.Devices[3*80].Health == pluginapi.Healthy; got != devs[3].Healthy {
			return fmt.Errorf("slice health %v, want %v", got, devs[3].Healthy)
		}
		return nil
	})
}

// BenchmarkSimGPULostToListAndWatch measures, end to end over the simulated
// GPUs, the real reader and a 10 ms poller, the time from a GPU being lost to
// the kubelet's stream showing its slices Unhealthy (and back on recovery).
// It includes up to one poll interval.
func BenchmarkSimGPULostToListAndWatch(b *testing.B) {
	s, err := sim.New("h100x2", b.Name())
	if err != nil {
		b.Fatal(err)
	}
	poller := startPoller(b, s.Interface(), testLogger(b))
	h := startPlugin(b, deviceplugin.Config{SliceMiB: 8192}, poller)
	stream := watch(b, h.client)
	lost := s.UUID(1)
	health := func(want string) func([]*pluginapi.Device) bool {
		return func(devs []*pluginapi.Device) bool { return healthByGPU(b, devs)[lost][want] > 0 }
	}
	recvUntil(b, stream, health(pluginapi.Healthy))
	measure(b, func(i int) error {
		want := pluginapi.Unhealthy
		if i%2 == 0 {
			if err := s.SetUnhealthy(1, "gpu_lost"); err != nil {
				return err
			}
		} else {
			want = pluginapi.Healthy
			if err := s.SetHealthy(1); err != nil {
				return err
			}
		}
		recvUntil(b, stream, health(want))
		return nil
	})
}
