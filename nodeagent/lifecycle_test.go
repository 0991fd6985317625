package nodeagent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/visionslice/visionslice/runtime/lifecycle"
)

func TestLifecycleSection(t *testing.T) {
	t.Parallel()
	c, err := ParseConfig([]byte(`version: v1
lifecycle:
  enabled: true
  sliceBytes: 2147483648
  overrunWindow: 5m
  maxOverruns: 2
  backoffInitial: 2s
  backoffMax: 1m
  configInterval: 5s
  hotReload: false
  reloadDebounce: 1s
`))
	if err != nil {
		t.Fatal(err)
	}
	l := c.Lifecycle
	if !l.Enabled || l.SliceBytes != 2<<30 || l.OverrunWindow != 5*time.Minute || l.MaxOverruns != 2 || l.HotReload == nil || *l.HotReload ||
		l.ReloadDebounce != time.Second {
		t.Errorf("lifecycle = %+v", l)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	c.Lifecycle.BackoffMax = time.Second
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "lifecycle.backoffMax") {
		t.Errorf("Validate with backoffMax below backoffInitial = %v", err)
	}
	if _, err := ParseConfig([]byte("version: v1\nlifecycle:\n  enabled: true\n  maxOverrun: 2\n")); err == nil || !strings.Contains(err.Error(), "line 4") {
		t.Errorf("unknown key error = %v, want line 4", err)
	}
}

// The agent wires the lifecycle manager to the runtime: its metrics show
// each model version's quota from the model's slices and the device
// plugin's slice size.
func TestAgentWiresLifecycle(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	worker := filepath.Join(dir, "visionslice-worker")
	if err := os.WriteFile(worker, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	repo := filepath.Join(dir, "repo")
	for path, data := range map[string]string{
		"m/config.yaml":  "version: v1\ninputs:\n  - {name: a, datatype: FP32, dims: [4]}\noutputs:\n  - {name: c, datatype: FP32, dims: [4]}\nslices: 3\n",
		"m/1/model.onnx": "not loaded by this test",
	} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(repo, path)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(repo, path), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cfg := testConfig(t, "sim:h100x1")
	cfg.Enforcement.Enabled = false
	cfg.DevicePlugin.Enabled = true
	cfg.DevicePlugin.SliceMiB = 2048
	cfg.Runtime.Enabled = true
	cfg.Runtime.Repository = repo
	cfg.Runtime.Workers.WorkerBinary = worker
	cfg.Runtime.Workers.ORTLibrary = "/nonexistent/libonnxruntime.so"
	cfg.Lifecycle.Enabled = true
	a := newAgent(t, cfg)
	mfs, err := a.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var quota float64
	for _, mf := range mfs {
		if mf.GetName() == lifecycle.MetricQuota {
			quota = mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	if quota != 3*2048<<20 {
		t.Errorf("%s = %v, want 3 slices of 2 GiB", lifecycle.MetricQuota, quota)
	}
}
