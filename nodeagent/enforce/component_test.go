package enforce_test

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/enforce"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
	"github.com/visionslice/visionslice/nodeagent/podresources"
	"github.com/visionslice/visionslice/nodeagent/podresources/podresourcestest"
)

func TestSectionValidate(t *testing.T) {
	t.Parallel()
	if err := enforce.DefaultSection().Validate(); err != nil {
		t.Fatal(err)
	}
	s := enforce.DefaultSection()
	s.CgroupRoot = "relative"
	s.Policy.DefaultAction = "zap"
	s.Accounting.SliceBytes = 1
	err := s.Validate()
	for _, want := range []string{"cgroupRoot", "policy: defaultAction", "accounting: sliceBytes"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want %q", err, want)
		}
	}
	s.Enabled = false
	if err := s.Validate(); err != nil {
		t.Errorf("disabled section validated: %v", err)
	}
}

// The component starts before the kubelet (no socket yet), accounts the
// simulated GPU's processes, picks up pod-resources once it is there, and
// stops cleanly.
func TestComponentRunsBeforeAndAfterKubelet(t *testing.T) {
	t.Parallel()
	logger := slog.New(slog.NewJSONHandler(io.Discard, nil))
	gpus, err := sim.New("h100x1", t.Name())
	if err != nil {
		t.Fatal(err)
	}
	reader := gpu.NewReader(gpus.Interface(), logger)
	if err := reader.Init(); err != nil {
		t.Fatal(err)
	}
	defer reader.Shutdown()
	poller := gpu.NewPoller(reader, 20*time.Millisecond, logger)

	dir, err := os.MkdirTemp("", "enf-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sec := enforce.DefaultSection()
	sec.Accounting.PodResourcesSocket = filepath.Join(dir, "kubelet.sock")
	sec.Accounting.PodLogsDir = filepath.Join(dir, "pods")
	sec.Accounting.ContainerLogsDir = filepath.Join(dir, "containers")
	sec.Accounting.RefreshInterval = 100 * time.Millisecond
	reg := prometheus.NewRegistry()
	c, err := enforce.NewComponent(sec, "node-a", poller, reg, logger)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 2)
	go func() { done <- poller.Run(ctx) }()
	go func() { done <- c.Run(ctx) }()

	// A host process on the GPU: unaccounted.
	if err := gpus.SetProcess(0, uint32(os.Getpid()), 1<<30, gpu.ProcessCompute); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		r := c.Tracker.Latest()
		return r != nil && r.Unaccounted[gpus.UUID(0)] == 1<<30
	})
	// The kubelet comes up.
	srv := podresourcestest.NewAt(t, sec.Accounting.PodResourcesSocket)
	srv.SetContainers([]podresources.ContainerDevices{{Namespace: "a", Pod: "b", Container: "c", ResourceName: slice.ResourceName, DeviceIDs: []string{gpus.UUID(0) + "::0"}}})
	waitFor(t, func() bool { return srv.ListCalls() > 0 })

	if err := c.Reload(sec); err != nil {
		t.Fatal(err)
	}
	bad := sec
	bad.Policy.AllowedActions = nil
	if err := c.Reload(bad); err == nil {
		t.Fatal("Reload accepted an invalid policy")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	for _, n := range []string{slice.MetricGPUUnaccountedMemBytes, "visionslice_enforcement_frozen_containers"} {
		if !names[n] {
			t.Errorf("metric %s not exported; have %v", n, names)
		}
	}
	cancel()
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
