package lifecycle

import (
	"strings"
	"testing"
	"time"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

func TestConfig(t *testing.T) {
	var c Config
	c.SetDefaults()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.SliceBytes != slice.DefaultSliceMiB<<20 || c.MaxOverruns != 3 || c.OverrunWindow != 10*time.Minute ||
		c.ReloadDebounce != 500*time.Millisecond || c.HotReload == nil || !*c.HotReload {
		t.Fatalf("defaults: %+v", c)
	}
	for _, tc := range []struct {
		name string
		cfg  Config
		says string
	}{
		{"negative window", Config{OverrunWindow: -time.Second}, "negative"},
		{"negative debounce", Config{ReloadDebounce: -time.Second}, "negative"},
		{"backoff max below initial", Config{BackoffInitial: time.Minute, BackoffMax: time.Second}, "backoffMax"},
		{"negative overruns", Config{MaxOverruns: -1}, "maxOverruns"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.cfg
			c.SetDefaults()
			if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("Validate() = %v, want it to say %q", err, tc.says)
			}
		})
	}
}
