package nodeagent

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"reflect"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/visionslice/visionslice/deviceplugin"
	"github.com/visionslice/visionslice/deviceplugin/handoff"
	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/enforce"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
	"github.com/visionslice/visionslice/runtime/lifecycle"
	"github.com/visionslice/visionslice/runtime/server"
)

// ConfigVersion is the only config file version this agent reads.
const ConfigVersion = "v1"

// Config is the whole agent configuration. A file holds it as YAML with
// `version: v1`; unknown keys and versions are rejected with the line.
//
// Fields marked "live" change on SIGHUP or when the file changes; a change to
// any other field is logged as "restart required" and ignored until then.
type Config struct {
	Version string `yaml:"version"`
	// NodeName is the Kubernetes node this agent serves (default: the host name).
	NodeName string `yaml:"nodeName"`
	// ShutdownTimeout bounds a graceful stop after SIGTERM.
	ShutdownTimeout time.Duration `yaml:"shutdownTimeout"`

	GPU     GPUConfig     `yaml:"gpu"`
	Log     LogConfig     `yaml:"log"`
	Metrics MetricsConfig `yaml:"metrics"`

	// components: each component adds its section below.

	// Enforcement is GPU memory accounting per container and the overrun
	// policy (policy and accounting.sliceBytes/refreshInterval are live).
	Enforcement enforce.Section `yaml:"enforcement"`

	// DevicePlugin is the kubelet device plugin of visionslice.io/gpu-slice
	// (restart required).
	DevicePlugin deviceplugin.Config `yaml:"devicePlugin"`

	// Handoff makes the device plugin honour the GPU the scheduler extender
	// chose, from its signed record on the pod (restart required).
	Handoff handoff.Config `yaml:"handoff"`

	// Runtime is the co-hosted inference runtime: model repository, worker
	// processes, Open Inference Protocol on HTTP and gRPC (restart required).
	Runtime server.Config `yaml:"runtime"`

	// Lifecycle replaces model workers that overrun their GPU memory quota
	// and parks models that keep overrunning (needs the runtime).
	Lifecycle lifecycle.Config `yaml:"lifecycle"`
}

// GPUConfig configures the GPU seam.
type GPUConfig struct {
	// Backend is "nvml" (the real library) or a simulated node such as
	// "sim:h100x2" or "sim:h100x2+a100x1".
	Backend string `yaml:"backend"`
	// PollInterval is how often GPUs are sampled (live).
	PollInterval time.Duration `yaml:"pollInterval"`
	// XIDRecovery is how long a GPU stays unhealthy after its last critical
	// XID; 0 keeps it unhealthy until restart.
	XIDRecovery time.Duration `yaml:"xidRecovery"`
	// SimDebug serves the simulator's scripting endpoint at /debug/sim on the
	// metrics port (sim backends only).
	SimDebug bool `yaml:"simDebug"`
}

// LogConfig configures logging.
type LogConfig struct {
	// Level is debug, info, warn or error (live).
	Level string `yaml:"level"`
}

// MetricsConfig configures the metrics and health port.
type MetricsConfig struct {
	// Listen is the address of /metrics, /healthz and /readyz.
	Listen string `yaml:"listen"`
}

// DefaultConfig returns the configuration used for keys a file omits.
func DefaultConfig() Config {
	return Config{
		Version:         ConfigVersion,
		ShutdownTimeout: 10 * time.Second,
		GPU: GPUConfig{
			Backend:      "nvml",
			PollInterval: 200 * time.Millisecond,
			XIDRecovery:  time.Minute,
		},
		Log:         LogConfig{Level: "info"},
		Metrics:     MetricsConfig{Listen: ":9402"},
		Enforcement: enforce.DefaultSection(),

		DevicePlugin: deviceplugin.DefaultConfig(),
		Runtime:      server.DefaultConfig(),
		// The lifecycle manager runs whenever the runtime does.
		Lifecycle: lifecycle.Config{Enabled: true},
	}
}

// IsSim reports whether the GPU backend is the simulator.
func (c GPUConfig) IsSim() bool { return strings.HasPrefix(c.Backend, "sim:") }

// Validate checks the whole configuration and names every wrong field.
func (c Config) Validate() error {
	var errs []error
	if c.Version != ConfigVersion {
		errs = append(errs, fmt.Errorf("version %q is not supported (want %q)", c.Version, ConfigVersion))
	}
	if c.ShutdownTimeout <= 0 {
		errs = append(errs, fmt.Errorf("shutdownTimeout must be positive"))
	}
	switch {
	case c.GPU.Backend == "nvml":
	case c.GPU.IsSim():
		if _, err := sim.ParseSpec(c.GPU.Backend); err != nil {
			errs = append(errs, fmt.Errorf("gpu.backend: %w", err))
		}
	default:
		errs = append(errs, fmt.Errorf("gpu.backend %q: want nvml or sim:<spec> such as sim:h100x2", c.GPU.Backend))
	}
	if c.GPU.PollInterval < 10*time.Millisecond {
		errs = append(errs, fmt.Errorf("gpu.pollInterval %s is below 10ms", c.GPU.PollInterval))
	}
	if c.GPU.XIDRecovery < 0 {
		errs = append(errs, fmt.Errorf("gpu.xidRecovery must not be negative"))
	}
	if c.GPU.SimDebug && !c.GPU.IsSim() {
		errs = append(errs, fmt.Errorf("gpu.simDebug needs a sim backend"))
	}
	if _, err := ParseLevel(c.Log.Level); err != nil {
		errs = append(errs, fmt.Errorf("log.level: %w", err))
	}
	if _, _, err := net.SplitHostPort(c.Metrics.Listen); err != nil {
		errs = append(errs, fmt.Errorf("metrics.listen %q: %w", c.Metrics.Listen, err))
	}
	// components: validate each section here.
	if err := c.Enforcement.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("enforcement: %w", err))
	}
	if c.DevicePlugin.Enabled {
		if err := c.DevicePlugin.WithDefaults().Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := c.Handoff.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Runtime.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Lifecycle.Enabled {
		l := c.Lifecycle
		l.SetDefaults()
		if err := l.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ParseLevel parses a log level name.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("unknown level %q (want debug, info, warn or error)", s)
	}
	return l, nil
}

// LoadConfig reads a config file over the defaults.
func LoadConfig(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig parses YAML over the defaults. The version is checked before
// anything else, so a file of another version fails on that line, and
// unknown keys fail with their line.
func ParseConfig(data []byte) (Config, error) {
	var head yaml.Node
	if err := yaml.Unmarshal(data, &head); err != nil {
		return Config{}, err
	}
	if len(head.Content) == 0 || head.Content[0].Kind != yaml.MappingNode {
		return Config{}, errors.New("config must be a YAML mapping with version: " + ConfigVersion)
	}
	root := head.Content[0]
	found := false
	for i := 0; i+1 < len(root.Content); i += 2 {
		if root.Content[i].Value == "version" {
			found = true
			if v := root.Content[i+1]; v.Value != ConfigVersion {
				return Config{}, fmt.Errorf("line %d: version %q is not supported (want %q)", v.Line, v.Value, ConfigVersion)
			}
		}
	}
	if !found {
		return Config{}, fmt.Errorf("line %d: version is missing (want version: %s)", root.Line, ConfigVersion)
	}
	cfg := DefaultConfig()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// DeriveSliceBytes makes devicePlugin.sliceMiB the one source of the slice
// size: accounting, the runtime's worker limits and the model lifecycle take
// it from there, so a quota
// always equals the slices the kubelet handed out. A different value written
// for either of them is ignored, with a warning.
func (c *Config) DeriveSliceBytes(logger *slog.Logger) {
	b := uint64(c.DevicePlugin.WithDefaults().SliceMiB) << 20
	def := uint64(slice.DefaultSliceMiB) << 20
	for _, f := range []struct {
		key string
		v   *uint64
	}{
		{"enforcement.accounting.sliceBytes", &c.Enforcement.Accounting.SliceBytes},
		{"lifecycle.sliceBytes", &c.Lifecycle.SliceBytes},
		{"runtime.sliceBytes", &c.Runtime.SliceBytes},
	} {
		if *f.v != 0 && *f.v != def && *f.v != b && logger != nil {
			logger.Warn("slice size follows devicePlugin.sliceMiB; ignoring "+f.key, "configured_bytes", *f.v, "slice_bytes", b)
		}
		*f.v = b
	}
}

// restartRequired lists the top-level fields (by YAML key) that differ
// between old and updated once the live fields are set aside.
func restartRequired(old, updated Config) []string {
	// The live fields: Reload applies them at once.
	updated.GPU.PollInterval = old.GPU.PollInterval
	updated.Log.Level = old.Log.Level
	// components: copy each section's live fields here.
	updated.Enforcement.Policy = old.Enforcement.Policy
	updated.Enforcement.Accounting.SliceBytes = old.Enforcement.Accounting.SliceBytes
	updated.Enforcement.Accounting.RefreshInterval = old.Enforcement.Accounting.RefreshInterval
	var out []string
	ov, nv := reflect.ValueOf(old), reflect.ValueOf(updated)
	for i := 0; i < ov.NumField(); i++ {
		if !reflect.DeepEqual(ov.Field(i).Interface(), nv.Field(i).Interface()) {
			name, _, _ := strings.Cut(ov.Type().Field(i).Tag.Get("yaml"), ",")
			out = append(out, name)
		}
	}
	return out
}
