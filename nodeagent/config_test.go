package nodeagent

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		yaml    string
		wantErr string // substring; "" means valid
		check   func(t *testing.T, c Config)
	}{
		{
			name: "defaults fill omitted keys",
			yaml: "version: v1\ngpu:\n  backend: sim:h100x2\n",
			check: func(t *testing.T, c Config) {
				if c.GPU.PollInterval != 200*time.Millisecond || c.Metrics.Listen != ":9402" || c.ShutdownTimeout != 10*time.Second {
					t.Errorf("defaults not applied: %+v", c)
				}
			},
		},
		{
			name: "durations parse",
			yaml: "version: v1\ngpu:\n  pollInterval: 50ms\n  xidRecovery: 2m\n",
			check: func(t *testing.T, c Config) {
				if c.GPU.PollInterval != 50*time.Millisecond || c.GPU.XIDRecovery != 2*time.Minute {
					t.Errorf("durations: %+v", c.GPU)
				}
			},
		},
		{name: "unknown version names its line", yaml: "# header\nversion: v2\n", wantErr: "line 2: version \"v2\" is not supported"},
		{name: "missing version", yaml: "gpu:\n  backend: nvml\n", wantErr: "version is missing"},
		{name: "unknown key names its line", yaml: "version: v1\ngpu:\n  backend: nvml\n  pollIntervall: 1s\n", wantErr: "line 4: field pollIntervall not found"},
		{name: "not a mapping", yaml: "- a\n- b\n", wantErr: "must be a YAML mapping"},
		{name: "bad yaml", yaml: "version: v1\ngpu: [\n", wantErr: "yaml"},
		{name: "bad duration", yaml: "version: v1\ngpu:\n  pollInterval: fast\n", wantErr: "line 3"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseConfig([]byte(tc.yaml))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c)
		})
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		mutate  func(c *Config)
		wantErr string
	}{
		{name: "default is valid", mutate: func(*Config) {}},
		{name: "sim spec", mutate: func(c *Config) { c.GPU.Backend = "sim:h100x2+a100x1" }},
		{name: "bad backend", mutate: func(c *Config) { c.GPU.Backend = "cuda" }, wantErr: "gpu.backend \"cuda\""},
		{name: "bad sim spec", mutate: func(c *Config) { c.GPU.Backend = "sim:k80x2" }, wantErr: "unknown gpu model \"k80\""},
		{name: "poll too fast", mutate: func(c *Config) { c.GPU.PollInterval = time.Millisecond }, wantErr: "below 10ms"},
		{name: "bad level", mutate: func(c *Config) { c.Log.Level = "loud" }, wantErr: "unknown level \"loud\""},
		{name: "bad listen", mutate: func(c *Config) { c.Metrics.Listen = "9402" }, wantErr: "metrics.listen"},
		{name: "sim debug needs sim", mutate: func(c *Config) { c.GPU.SimDebug = true }, wantErr: "gpu.simDebug"},
		{name: "zero shutdown", mutate: func(c *Config) { c.ShutdownTimeout = 0 }, wantErr: "shutdownTimeout"},
		{
			name:    "every error is reported",
			mutate:  func(c *Config) { c.Log.Level = "x"; c.GPU.PollInterval = 0 },
			wantErr: "gpu.pollInterval 0s is below 10ms\nlog.level",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := DefaultConfig()
			tc.mutate(&c)
			err := c.Validate()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestLoadConfigNamesFile(t *testing.T) {
	t.Parallel()
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte("version: v1\nbogus: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := LoadConfig(p)
	if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("err = %v", err)
	}
}

func TestRestartRequired(t *testing.T) {
	t.Parallel()
	old := DefaultConfig()
	live := old
	live.GPU.PollInterval = time.Second
	live.Log.Level = "debug"
	if got := restartRequired(old, live); len(got) != 0 {
		t.Errorf("live changes reported as restart required: %v", got)
	}
	cold := live
	cold.Metrics.Listen = ":9999"
	cold.GPU.Backend = "sim:a100x1"
	if got := restartRequired(old, cold); !slices.Equal(got, []string{"gpu", "metrics"}) {
		t.Errorf("restartRequired = %v, want [gpu metrics]", got)
	}
}

func TestSliceSizeFollowsDevicePlugin(t *testing.T) {
	t.Parallel()
	c := DefaultConfig()
	c.DevicePlugin.SliceMiB = 2048
	c.Lifecycle.SliceBytes = 0
	c.DeriveSliceBytes(nil)
	if want := uint64(2048) << 20; c.Enforcement.Accounting.SliceBytes != want || c.Lifecycle.SliceBytes != want {
		t.Errorf("accounting %d, lifecycle %d; want both %d", c.Enforcement.Accounting.SliceBytes, c.Lifecycle.SliceBytes, want)
	}
	// A conflicting value written by hand is overridden, not obeyed.
	c.Enforcement.Accounting.SliceBytes = 3 << 30
	c.DeriveSliceBytes(nil)
	if c.Enforcement.Accounting.SliceBytes != 2048<<20 {
		t.Errorf("conflicting sliceBytes kept: %d", c.Enforcement.Accounting.SliceBytes)
	}
}
