package deviceplugin_test

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/visionslice/visionslice/deviceplugin"
	"github.com/visionslice/visionslice/deviceplugin/kubelettest"
	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/gpu"
)

const waitLimit = 10 * time.Second

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// shortDir is a fresh folder with a short path: unix socket paths are limited
// to 108 bytes, which t.TempDir() overruns for long test names.
func shortDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "dp-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// startPoller reads lib through the real reader and polls it every 10 ms
// until the end of the test.
func startPoller(t testing.TB, lib nvml.Interface, logger *slog.Logger, opts ...gpu.ReaderOption) *gpu.Poller {
	t.Helper()
	r := gpu.NewReader(lib, logger, opts...)
	if err := r.Init(); err != nil {
		t.Fatalf("gpu reader: %v", err)
	}
	t.Cleanup(r.Shutdown)
	poller := gpu.NewPoller(r, 10*time.Millisecond, logger)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = poller.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return poller
}

// fakeSource is a GPUSource whose snapshots the test sets.
type fakeSource struct {
	mu     sync.Mutex
	seq    uint64
	latest *gpu.Snapshot
	subs   map[chan *gpu.Snapshot]bool
}

var _ deviceplugin.GPUSource = (*fakeSource)(nil)

func newFakeSource(devs ...gpu.Device) *fakeSource {
	s := &fakeSource{subs: map[chan *gpu.Snapshot]bool{}}
	if len(devs) > 0 {
		s.Set(devs...)
	}
	return s
}

func (s *fakeSource) Set(devs ...gpu.Device) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	s.latest = &gpu.Snapshot{Seq: s.seq, Time: time.Now(), Devices: append([]gpu.Device(nil), devs...)}
	for ch := range s.subs {
		select {
		case <-ch:
		default:
		}
		ch <- s.latest
	}
}

func (s *fakeSource) Snapshot() *gpu.Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.latest
}

func (s *fakeSource) Subscribe() (<-chan *gpu.Snapshot, func()) {
	ch := make(chan *gpu.Snapshot, 1)
	s.mu.Lock()
	s.subs[ch] = true
	if s.latest != nil {
		ch <- s.latest
	}
	s.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			s.mu.Lock()
			delete(s.subs, ch)
			s.mu.Unlock()
		})
	}
}

// dev is a healthy GPU of mib MiB on NUMA node numa.
func dev(index int, uuid string, mib uint64, numa int) gpu.Device {
	return gpu.Device{Index: index, UUID: uuid, NUMANode: numa, MemoryTotalBytes: mib << 20, MemoryFreeBytes: mib << 20, Healthy: true}
}

// harness is a running plugin with its kubelet.
type harness struct {
	dir     string
	kubelet *kubelettest.Kubelet
	plugin  *deviceplugin.Plugin
	reg     *prometheus.Registry
	client  pluginapi.DevicePluginClient
	cancel  context.CancelFunc
	done    chan error
}

// startPlugin runs a plugin in a fresh socket folder with a test kubelet, waits
// for its registration and connects a DevicePlugin client to the registered
// endpoint. cfg.SocketDir is set by the harness.
func startPlugin(t testing.TB, cfg deviceplugin.Config, src deviceplugin.GPUSource, opts ...deviceplugin.Option) *harness {
	t.Helper()
	h := &harness{dir: shortDir(t), reg: prometheus.NewPedanticRegistry(), done: make(chan error, 1)}
	cfg.SocketDir = h.dir
	if cfg.PodResourcesSocket == "" {
		cfg.PodResourcesSocket = filepath.Join(h.dir, "no-pod-resources.sock")
	}
	h.kubelet = kubelettest.Start(t, h.dir)
	p, err := deviceplugin.New(cfg, src, h.reg, testLogger(t), opts...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	h.plugin = p
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.done <- p.Run(ctx) }()
	t.Cleanup(h.stop)

	r := h.kubelet.WaitRegistration(t, waitLimit)
	h.client = dialPlugin(t, filepath.Join(h.dir, r.Endpoint))
	return h
}

// stop ends Run and checks that it returned without error.
func (h *harness) stop() {
	h.cancel()
	if err := <-h.done; err != nil {
		panic("Run returned " + err.Error())
	}
	h.done <- nil // keep stop idempotent
}

func dialPlugin(t testing.TB, path string) pluginapi.DevicePluginClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("dial plugin: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return pluginapi.NewDevicePluginClient(conn)
}

// watch opens ListAndWatch; the stream ends with the test.
func watch(t testing.TB, c pluginapi.DevicePluginClient) pluginapi.DevicePlugin_ListAndWatchClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s, err := c.ListAndWatch(ctx, &pluginapi.Empty{})
	if err != nil {
		t.Fatalf("ListAndWatch: %v", err)
	}
	return s
}

// recvUntil reads ListAndWatch answers until ok accepts one.
func recvUntil(t testing.TB, s pluginapi.DevicePlugin_ListAndWatchClient, ok func([]*pluginapi.Device) bool) []*pluginapi.Device {
	t.Helper()
	type res struct {
		r   *pluginapi.ListAndWatchResponse
		err error
	}
	deadline := time.After(waitLimit)
	for {
		ch := make(chan res, 1)
		go func() {
			r, err := s.Recv()
			ch <- res{r, err}
		}()
		select {
		case <-deadline:
			t.Fatalf("no matching ListAndWatch answer within %s", waitLimit)
		case x := <-ch:
			if x.err != nil {
				t.Fatalf("ListAndWatch recv: %v", x.err)
			}
			if ok(x.r.Devices) {
				return x.r.Devices
			}
		}
	}
}

// healthByGPU counts slices by GPU and health.
func healthByGPU(t testing.TB, devs []*pluginapi.Device) map[string]map[string]int {
	t.Helper()
	out := map[string]map[string]int{}
	for _, d := range devs {
		id, err := slice.ParseID(d.ID)
		if err != nil {
			t.Fatalf("advertised device: %v", err)
		}
		if out[id.GPU] == nil {
			out[id.GPU] = map[string]int{}
		}
		out[id.GPU][d.Health]++
	}
	return out
}
