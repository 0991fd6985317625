package lifecycle_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/server"
	"github.com/visionslice/visionslice/runtime/supervisor"
	"github.com/visionslice/visionslice/runtime/workertest"
)

// slowPool holds Start back, as a large model's load would.
type slowPool struct {
	server.Pool
	delay time.Duration
}

func (p slowPool) Start(ctx context.Context) error {
	select {
	case <-time.After(p.delay):
	case <-ctx.Done():
		return ctx.Err()
	}
	return p.Pool.Start(ctx)
}

// TestLoadProgress: while a version loads, its metadata says "loading"
// with the elapsed time and readiness is false; once loaded the state is
// gone and it is ready.
func TestLoadProgress(t *testing.T) {
	if workerBin == "" {
		t.Skip("VISIONSLICE_ORT_LIB is not set (run `make deps` and use `make test`)")
	}
	repo := t.TempDir()
	writeFile(t, filepath.Join(repo, "add", "config.yaml"), fmt.Appendf(nil, addConfig, 2, 0))
	writeFile(t, filepath.Join(repo, "add", "1", "model.onnx"), addModel(t))
	cfg := server.DefaultConfig()
	cfg.Enabled, cfg.Repository, cfg.HTTPListen, cfg.GRPCListen = true, repo, "127.0.0.1:0", ""
	cfg.Workers = workertest.Config(t, workerBin)
	newPool := func(m *repository.Model, v repository.Version, logger *slog.Logger) (server.Pool, error) {
		p, err := supervisor.New(cfg.Workers, supervisor.Model{Name: m.Name + "/" + strconv.FormatInt(v.Number, 10), ModelPath: v.Path, Spec: m.Config}, nil, supervisor.Hooks{}, logger)
		return slowPool{Pool: p, delay: 1500 * time.Millisecond}, err
	}
	srv, err := server.New(cfg, server.Deps{NewPool: newPool, Registerer: prometheus.NewRegistry()}, workertest.Logger())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	<-srv.Listening()
	base := "http://" + srv.HTTPAddr()
	type md struct {
		State       string `json:"state"`
		StateReason string `json:"state_reason"`
	}
	get := func() (md, int) {
		var m md
		resp, err := http.Get(base + "/v2/models/add")
		if err != nil {
			t.Fatal(err)
		}
		json.NewDecoder(resp.Body).Decode(&m)
		resp.Body.Close()
		ready, err := http.Get(base + "/v2/models/add/ready")
		if err != nil {
			t.Fatal(err)
		}
		ready.Body.Close()
		return m, ready.StatusCode
	}
	time.Sleep(700 * time.Millisecond)
	m, code := get()
	if m.State != server.StateLoading || !strings.Contains(m.StateReason, "loading for 0.") || !strings.Contains(m.StateReason, "2 worker(s)") || code != 503 {
		t.Fatalf("while loading: %+v ready %d", m, code)
	}
	time.Sleep(600 * time.Millisecond)
	if m, _ := get(); !strings.Contains(m.StateReason, "loading for 1.") {
		t.Fatalf("progress did not advance: %+v", m)
	}
	<-srv.Loaded()
	if m, code := get(); m.State != "" || code != 200 {
		t.Fatalf("after loading: %+v ready %d", m, code)
	}
}
