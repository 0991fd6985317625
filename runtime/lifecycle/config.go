// Package lifecycle manages model versions after they are loaded: it
// watches each model worker's GPU memory against the model's quota (its
// slices) and, on an overrun, replaces the worker with a fresh process (a
// new CUDA context) while requests wait in the queue, backing off when
// overruns repeat and parking the model in a clear "failed_over_quota"
// state when they keep repeating, until the quota is raised.
package lifecycle

import (
	"errors"
	"time"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

// Config is the `lifecycle:` section of the agent configuration.
type Config struct {
	// Enabled turns the lifecycle manager on (needs the runtime).
	Enabled bool `yaml:"enabled"`
	// SliceBytes is the memory of one slice; a model's quota is its
	// config's slices times this (default: the device plugin's slice).
	SliceBytes uint64 `yaml:"sliceBytes"`
	// OverrunWindow and MaxOverruns: more than MaxOverruns overruns of one
	// model version within OverrunWindow put it in the failed_over_quota
	// state (defaults 10m and 3).
	OverrunWindow time.Duration `yaml:"overrunWindow"`
	MaxOverruns   int           `yaml:"maxOverruns"`
	// BackoffInitial and BackoffMax: the first overrun in the window is
	// replaced at once, the next after BackoffInitial, doubling up to
	// BackoffMax (defaults 1s and 30s).
	BackoffInitial time.Duration `yaml:"backoffInitial"`
	BackoffMax     time.Duration `yaml:"backoffMax"`
	// ConfigInterval is how often model configs are re-read for quota
	// changes (default 2s).
	ConfigInterval time.Duration `yaml:"configInterval"`
	// HotReload watches the model repository: a new version is verified
	// (checksum, load, warm-up) before it takes traffic, a removed one is
	// drained (default on).
	HotReload *bool `yaml:"hotReload"`
	// ReloadDebounce is how long a model's files must be quiet before it
	// is reloaded (default 500ms).
	ReloadDebounce time.Duration `yaml:"reloadDebounce"`
}

// SetDefaults fills zero fields.
func (c *Config) SetDefaults() {
	if c.SliceBytes == 0 {
		c.SliceBytes = slice.DefaultSliceMiB << 20
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.OverrunWindow, 10*time.Minute)
	def(&c.BackoffInitial, time.Second)
	def(&c.BackoffMax, 30*time.Second)
	def(&c.ConfigInterval, 2*time.Second)
	def(&c.ReloadDebounce, 500*time.Millisecond)
	if c.HotReload == nil {
		on := true
		c.HotReload = &on
	}
	if c.MaxOverruns == 0 {
		c.MaxOverruns = 3
	}
}

// Validate reports a config that cannot work (after SetDefaults).
func (c *Config) Validate() error {
	var errs []error
	if c.OverrunWindow < 0 || c.BackoffInitial < 0 || c.ConfigInterval < 0 || c.ReloadDebounce < 0 {
		errs = append(errs, errors.New("lifecycle: durations must not be negative"))
	}
	if c.BackoffMax < c.BackoffInitial {
		errs = append(errs, errors.New("lifecycle.backoffMax must be at least backoffInitial"))
	}
	if c.MaxOverruns < 1 {
		errs = append(errs, errors.New("lifecycle.maxOverruns must be at least 1"))
	}
	return errors.Join(errs...)
}
