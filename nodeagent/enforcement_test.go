package nodeagent

import (
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/enforce"
	"github.com/visionslice/visionslice/nodeagent/gpu"
)

func TestEnforcementSection(t *testing.T) {
	t.Parallel()
	c, err := ParseConfig([]byte(`version: v1
gpu:
  backend: sim:h100x1
enforcement:
  cgroupRoot: /sys/fs/cgroup
  accounting:
    sliceBytes: 2147483648
    refreshInterval: 5s
  policy:
    defaultAction: freeze
    allowedActions: [observe, freeze, kill]
    gracePeriod: 10s
    hysteresis:
      overFor: 500ms
      marginBytes: 1048576
      releaseRatio: 0.9
`))
	if err != nil {
		t.Fatal(err)
	}
	e := c.Enforcement
	if !e.Enabled || e.Accounting.SliceBytes != 2<<30 || e.Accounting.HostProc != "/proc" || e.Policy.DefaultAction != enforce.ActionFreeze ||
		e.Policy.GracePeriod != 10*time.Second || e.Policy.Hysteresis.OverFor != 500*time.Millisecond || e.Policy.Hysteresis.ReleaseRatio != 0.9 ||
		len(e.Policy.AllowedActions) != 3 || e.Policy.CheckInterval != 100*time.Millisecond {
		t.Fatalf("enforcement section = %+v", e)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseConfig([]byte("version: v1\nenforcement:\n  policy:\n    gracePeriodd: 1s\n")); err == nil || !strings.Contains(err.Error(), "line 4") {
		t.Fatalf("unknown key: %v, want its line", err)
	}
	c.Enforcement.Policy.DefaultAction = "kill"
	c.Enforcement.Policy.AllowedActions = []enforce.Action{"observe"}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "enforcement: policy: defaultAction") {
		t.Fatalf("Validate = %v", err)
	}

	old := DefaultConfig()
	live := old
	live.Enforcement.Policy.DefaultAction = enforce.ActionObserve
	live.Enforcement.Policy.GracePeriod = time.Minute
	live.Enforcement.Accounting.SliceBytes = 4 << 30
	if got := restartRequired(old, live); len(got) != 0 {
		t.Errorf("live enforcement changes need a restart: %v", got)
	}
	cold := old
	cold.Enforcement.CgroupRoot = "/elsewhere"
	if got := restartRequired(old, cold); !slices.Equal(got, []string{"enforcement"}) {
		t.Errorf("restartRequired = %v, want [enforcement]", got)
	}
}

// The agent builds accounting over its poller: a host process on a
// simulated GPU shows as unaccounted memory on /metrics' registry.
func TestAgentAccountsGPUMemory(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, "sim:h100x1")
	cfg.GPU.PollInterval = 20 * time.Millisecond
	dir := t.TempDir()
	cfg.Enforcement.Accounting.PodResourcesSocket = dir + "/kubelet.sock"
	cfg.Enforcement.Accounting.PodLogsDir = dir
	cfg.Enforcement.Accounting.ContainerLogsDir = dir
	a := newAgent(t, cfg)
	if a.Accounting() == nil {
		t.Fatal("Accounting() is nil with enforcement enabled")
	}
	runAgent(t, a)
	if err := a.Sim().SetProcess(0, uint32(os.Getpid()), 3<<30, gpu.ProcessCompute); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mfs, err := a.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == slice.MetricGPUUnaccountedMemBytes && len(mf.GetMetric()) == 1 && mf.GetMetric()[0].GetGauge().GetValue() == 3<<30 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("unaccounted GPU memory never reached /metrics")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
