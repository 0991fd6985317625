package nodeagent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/visionslice/visionslice/deviceplugin/kubelettest"
	"github.com/visionslice/visionslice/deviceplugin/slice"
)

func TestDevicePluginSection(t *testing.T) {
	t.Parallel()
	c, err := ParseConfig([]byte(`version: v1
devicePlugin:
  sliceMiB: 2048
  reservedMiB: 512
  policy: spread
enforcement:
  accounting:
    sliceBytes: 2147483648
`))
	if err != nil {
		t.Fatal(err)
	}
	if !c.DevicePlugin.Enabled || c.DevicePlugin.SliceMiB != 2048 || c.DevicePlugin.ReservedMiB != 512 || c.DevicePlugin.Policy != "spread" {
		t.Errorf("devicePlugin = %+v", c.DevicePlugin)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	c.DevicePlugin.Policy = "random"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "devicePlugin.policy") {
		t.Errorf("Validate with a bad policy = %v", err)
	}
	if _, err := ParseConfig([]byte("version: v1\ndevicePlugin:\n  sliceMib: 2048\n")); err == nil || !strings.Contains(err.Error(), "line 3") {
		t.Errorf("unknown key error = %v, want line 3", err)
	}
}

// The agent runs the device plugin over its poller: it registers with the
// kubelet and exports slice capacity on its registry.
func TestAgentRunsDevicePlugin(t *testing.T) {
	t.Parallel()
	dir, err := os.MkdirTemp("", "agent-dp-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	k := kubelettest.Start(t, dir)

	cfg := testConfig(t, "sim:h100x1+a100x1")
	cfg.GPU.PollInterval = 20 * time.Millisecond
	cfg.Enforcement.Enabled = false
	cfg.DevicePlugin.SocketDir = dir
	cfg.DevicePlugin.PodResourcesSocket = filepath.Join(dir, "pod-resources.sock")
	a := newAgent(t, cfg)
	// Registered before runAgent, so it runs once the agent has stopped.
	t.Cleanup(func() {
		if _, err := os.Stat(filepath.Join(dir, cfg.DevicePlugin.PluginSocket)); !os.IsNotExist(err) {
			t.Errorf("plugin socket left after the agent stopped: %v", err)
		}
	})
	runAgent(t, a)

	if r := k.WaitRegistration(t, 10*time.Second); r.ResourceName != slice.ResourceName {
		t.Errorf("registered %q", r.ResourceName)
	}
	mfs, err := a.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	capacity := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() == slice.MetricGPUSlicesCapacity {
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == slice.LabelGPUIndex {
						capacity[l.GetValue()] = m.GetGauge().GetValue()
					}
				}
			}
		}
	}
	// Different GPU sizes give different slice counts.
	if len(capacity) != 2 || capacity["0"] <= capacity["1"] || capacity["1"] == 0 {
		t.Errorf("%s = %v, want more slices on the H100 (gpu 0) than on the A100 (gpu 1)", slice.MetricGPUSlicesCapacity, capacity)
	}
}
