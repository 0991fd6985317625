package nodeagent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRuntimeSection(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	worker := filepath.Join(dir, "visionslice-worker")
	if err := os.WriteFile(worker, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c, err := ParseConfig([]byte(`version: v1
runtime:
  enabled: true
  repository: ` + dir + `
  httpListen: 127.0.0.1:8000
  grpcListen: unix:///run/visionslice/oip.sock
  maxBodyBytes: 1048576
  workers:
    workerBinary: ` + worker + `
    ortLibrary: /usr/lib/libonnxruntime.so.1
    startTimeout: 30s
  tracing:
    otlpEndpoint: collector:4317
    sampleRatio: 0.5
`))
	if err != nil {
		t.Fatal(err)
	}
	r := c.Runtime
	if !r.Enabled || r.Repository != dir || r.GRPCListen != "unix:///run/visionslice/oip.sock" || r.MaxBodyBytes != 1<<20 ||
		r.Workers.WorkerBinary != worker || r.Tracing.SampleRatio != 0.5 || r.ShutdownGrace == 0 {
		t.Errorf("runtime = %+v", r)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	c.Runtime.Workers.WorkerBinary = filepath.Join(dir, "missing")
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "runtime.workers") {
		t.Errorf("Validate with a missing worker binary = %v", err)
	}
	if _, err := ParseConfig([]byte("version: v1\nruntime:\n  enabled: true\n  httpPort: 8000\n")); err == nil || !strings.Contains(err.Error(), "line 4") {
		t.Errorf("unknown key error = %v, want line 4", err)
	}
	// Off by default, and then not validated.
	d := DefaultConfig()
	if d.Runtime.Enabled || d.Runtime.HTTPListen != ":8000" || d.Runtime.GRPCListen != ":8001" {
		t.Errorf("default runtime = %+v", d.Runtime)
	}
}
