// Command visionslice-worker hosts one model version: it loads the model
// into ONNX Runtime, warms it up, and answers the agent over a unix socket
// (runtime/worker's protocol). The agent's supervisor launches one per model
// instance, in its own cgroup; it logs JSON to stderr.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/visionslice/visionslice/runtime/ort"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/worker"
	"github.com/visionslice/visionslice/runtime/worker/host"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "visionslice-worker:", err)
		os.Exit(1)
	}
}

type flags struct {
	socket, model, config, spec, ortLib, device, name, logLevel string
	threads                                                     int
	gpuMemLimit                                                 uint64
	warmup                                                      bool
}

func parseFlags(args []string) (*flags, error) {
	f := &flags{}
	fs := flag.NewFlagSet("visionslice-worker", flag.ContinueOnError)
	fs.StringVar(&f.socket, "socket", "", "unix socket to listen on (required)")
	fs.StringVar(&f.model, "model", "", "path of the ONNX model file (required)")
	fs.StringVar(&f.config, "config", "", "path of the model's config.yaml (preprocessing of image inputs, dims)")
	fs.StringVar(&f.spec, "spec", "", "the model's config as JSON (what the agent passes; instead of --config)")
	fs.StringVar(&f.ortLib, "ort-lib", os.Getenv("VISIONSLICE_ORT_LIB"), "path of libonnxruntime.so (default $VISIONSLICE_ORT_LIB)")
	fs.StringVar(&f.device, "device", "cpu", "cpu or cuda:<index>")
	fs.Uint64Var(&f.gpuMemLimit, "gpu-mem-limit-bytes", 0, "CUDA arena limit (gpu_mem_limit) in bytes; 0: none")
	fs.IntVar(&f.threads, "threads", 0, "ONNX Runtime intra-op threads; 0: one per core")
	fs.BoolVar(&f.warmup, "warmup", true, "run one inference on zeros before serving")
	fs.StringVar(&f.name, "name", "", "model name and version, for logs")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if f.socket == "" || f.model == "" {
		return nil, errors.New("--socket and --model are required")
	}
	if f.config != "" && f.spec != "" {
		return nil, errors.New("--config and --spec are exclusive")
	}
	if f.threads < 0 {
		return nil, fmt.Errorf("--threads %d is negative", f.threads)
	}
	if _, _, err := ort.CUDADevice(f.device); err != nil {
		return nil, err
	}
	return f, nil
}

func run(args []string) error {
	f, err := parseFlags(args)
	if err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(f.logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level})).
		With("component", "worker", "model", f.name, "pid", os.Getpid())
	logger.Info("worker starting", "socket", f.socket, "model_path", f.model, "config", f.config,
		"ort_lib", f.ortLib, "device", f.device, "threads", f.threads, "gpu_mem_limit_bytes", f.gpuMemLimit, "warmup", f.warmup)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	spec, err := f.modelConfig()
	if err != nil {
		return err
	}
	if err := ort.Init(f.ortLib); err != nil {
		return err
	}
	m, err := host.Load(host.Config{
		ModelPath: f.model,
		Spec:      spec,
		ORT:       ort.Options{IntraOpThreads: f.threads, Device: f.device, GPUMemLimitBytes: f.gpuMemLimit},
		Warmup:    f.warmup,
	})
	if err != nil {
		return fmt.Errorf("load model %s: %w", f.model, err)
	}
	defer m.Close()
	md := m.Metadata()
	logger.Info("model loaded", "load_duration_seconds", md.LoadSeconds, "runtime", md.Runtime,
		"inputs", md.Inputs, "outputs", md.Outputs, "images", md.Images)

	// A socket left by a dead predecessor is in the way; remove it.
	if err := os.Remove(f.socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	ln, err := net.Listen("unix", f.socket)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer os.Remove(f.socket)
	if err := os.Chmod(f.socket, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("restrict socket: %w", err)
	}
	logger.Info("worker ready")
	err = worker.Serve(ctx, ln, m, worker.ServerConfig{Code: host.Code}, logger)
	logger.Info("worker stopping", "err", err)
	return err
}

// modelConfig reads --config (YAML file) or --spec (JSON).
func (f *flags) modelConfig() (*repository.Config, error) {
	switch {
	case f.config != "":
		b, err := os.ReadFile(f.config)
		if err != nil {
			return nil, fmt.Errorf("read model config: %w", err)
		}
		spec, err := repository.ParseConfig(b)
		if err != nil {
			return nil, fmt.Errorf("model config %s: %w", f.config, err)
		}
		return spec, nil
	case f.spec != "":
		var spec repository.Config
		if err := json.Unmarshal([]byte(f.spec), &spec); err != nil {
			return nil, fmt.Errorf("--spec: %w", err)
		}
		spec.SetDefaults()
		if err := spec.Validate(); err != nil {
			return nil, fmt.Errorf("--spec: %w", err)
		}
		return &spec, nil
	}
	return nil, nil
}
