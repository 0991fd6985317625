package devicemanager_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/visionslice/visionslice/deviceplugin"
	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
	"github.com/visionslice/visionslice/test/k8s/kubelet"
)

// node is a GPU node's agent half: simulated GPUs behind the real NVML
// adapter and poller, and the visionslice device plugin in its kubelet
// device-plugins folder.
type node struct {
	gpus   *sim.GPUs
	plugin *deviceplugin.Plugin
}

const sliceMiB = 20480 // an 80 GiB H100 holds exactly 4 slices

func startNode(t *testing.T, spec string) *node {
	t.Helper()
	logger := testLogger(t)
	gpus, err := sim.New(spec, t.Name())
	if err != nil {
		t.Fatal(err)
	}
	reader := gpu.NewReader(gpus.Interface(), logger)
	if err := reader.Init(); err != nil {
		t.Fatalf("nvml init: %v", err)
	}
	poller := gpu.NewPoller(reader, 20*time.Millisecond, logger)
	plugin, err := deviceplugin.New(deviceplugin.Config{
		SocketDir:          kubelet.DevicePluginDir,
		PodResourcesSocket: kubelet.PodResourcesSocket,
		SliceMiB:           sliceMiB,
		ReconcileInterval:  100 * time.Millisecond,
	}, poller, prometheus.NewRegistry(), logger)
	if err != nil {
		t.Fatalf("new device plugin: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Add(2)
	go func() { defer wg.Done(); errs <- poller.Run(ctx) }()
	go func() { defer wg.Done(); errs <- plugin.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil && !errors.Is(err, context.Canceled) {
				t.Errorf("node component: %v", err)
			}
		}
		reader.Shutdown()
		if _, err := os.Stat(plugin.SocketPath()); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("plugin socket %s left behind (stat: %v)", plugin.SocketPath(), err)
		}
	})
	return &node{gpus: gpus, plugin: plugin}
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("test", t.Name())
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// slicePod is a pod with one container requesting n slices.
func slicePod(name string, n int64) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "vision", UID: types.UID("uid-" + name)},
		Spec: v1.PodSpec{Containers: []v1.Container{{
			Name: "infer",
			Resources: v1.ResourceRequirements{
				Limits:   v1.ResourceList{slice.ResourceName: *resource.NewQuantity(n, resource.DecimalSI)},
				Requests: v1.ResourceList{slice.ResourceName: *resource.NewQuantity(n, resource.DecimalSI)},
			},
		}}},
	}
}
