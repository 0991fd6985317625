package supervisor

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		failures int
		want     time.Duration
	}{{0, 100 * time.Millisecond}, {1, 200 * time.Millisecond}, {3, 800 * time.Millisecond}, {9, 30 * time.Second}, {500, 30 * time.Second}} {
		if got := backoff(100*time.Millisecond, 30*time.Second, tc.failures); got != tc.want {
			t.Errorf("backoff after %d failures = %s, want %s", tc.failures, got, tc.want)
		}
	}
}

func TestConfigDefaultsAndValidate(t *testing.T) {
	t.Parallel()
	var c Config
	c.SetDefaults()
	if c.StartTimeout != 2*time.Minute || c.HealthFailures != 3 || c.BackoffMax != 30*time.Second || c.WorkerLogLevel != "info" {
		t.Fatalf("defaults %+v", c)
	}
	if err := c.Validate(); err == nil {
		t.Fatal("empty worker binary accepted")
	}
	c.WorkerBinary, c.ORTLibrary = "/nonexistent/visionslice-worker", "/lib.so"
	if err := c.Validate(); err == nil {
		t.Fatal("missing worker binary accepted")
	}
	c.BackoffMax = time.Millisecond
	if err := c.Validate(); err == nil {
		t.Fatal("backoffMax below backoffInitial accepted")
	}
}
