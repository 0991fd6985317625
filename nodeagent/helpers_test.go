package nodeagent

import (
	"context"
	"io"
	"log/slog"
	"testing"
)

// testConfig is the default config on a simulated node named after the test,
// serving metrics on a free loopback port.
func testConfig(t *testing.T, backend string) Config {
	cfg := DefaultConfig()
	cfg.NodeName = "node-" + t.Name()
	cfg.GPU.Backend = backend
	cfg.Metrics.Listen = "127.0.0.1:0"
	return cfg
}

// newAgent builds an agent that logs nowhere.
func newAgent(t *testing.T, cfg Config) *Agent {
	t.Helper()
	a, err := New(cfg, slog.New(slog.NewJSONHandler(io.Discard, nil)), nil)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// runAgent runs a until the end of the test, then checks that Run returned
// without error. Cleanups registered before it run after the agent stopped.
func runAgent(t *testing.T, a *Agent) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
}
