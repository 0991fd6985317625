// Command visionslice-agent is the visionslice node agent: flags and a config
// file become one nodeagent.Config, then nodeagent.New and Run.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"
	"go.yaml.in/yaml/v3"
	"k8s.io/klog/v2"

	"github.com/visionslice/visionslice/nodeagent"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "visionslice-agent:", err)
		os.Exit(1)
	}
}

type flags struct {
	fs        *flag.FlagSet
	config    string
	backend   string
	nodeName  string
	listen    string
	logLevel  string
	poll      time.Duration
	version   bool
	checkOnly bool
	runtime   bool
	modelRepo string
	ortLib    string
}

func parseFlags(args []string) (*flags, error) {
	f := &flags{fs: flag.NewFlagSet("visionslice-agent", flag.ContinueOnError)}
	f.fs.StringVar(&f.config, "config", "", "path of the YAML config file (version: v1)")
	f.fs.StringVar(&f.backend, "gpu-backend", "", "GPU backend: nvml, or a simulated node such as sim:h100x2 (overrides gpu.backend)")
	f.fs.StringVar(&f.nodeName, "node-name", os.Getenv("NODE_NAME"), "Kubernetes node name (default $NODE_NAME, then the host name)")
	f.fs.StringVar(&f.listen, "metrics-listen", "", "address of /metrics, /healthz and /readyz (overrides metrics.listen)")
	f.fs.StringVar(&f.logLevel, "log-level", "", "debug, info, warn or error (overrides log.level)")
	f.fs.DurationVar(&f.poll, "poll-interval", 0, "GPU poll interval (overrides gpu.pollInterval)")
	f.fs.BoolVar(&f.checkOnly, "check-config", false, "validate the configuration, print it and exit")
	f.fs.BoolVar(&f.runtime, "runtime", false, "serve the inference runtime (overrides runtime.enabled)")
	f.fs.StringVar(&f.modelRepo, "model-repository", defaultRepository(), "model repository used when runtime.repository is empty (default $VISIONSLICE_CACHE/repository)")
	f.fs.StringVar(&f.ortLib, "ort-lib", os.Getenv("VISIONSLICE_ORT_LIB"), "libonnxruntime.so used when runtime.workers.ortLibrary is empty (default $VISIONSLICE_ORT_LIB)")
	f.fs.BoolVar(&f.version, "version", false, "print the version and exit")
	return f, f.fs.Parse(args)
}

// load reads the config file (if any) and applies the flags that were set.
func (f *flags) load() (nodeagent.Config, error) {
	cfg := nodeagent.DefaultConfig()
	if f.config != "" {
		var err error
		if cfg, err = nodeagent.LoadConfig(f.config); err != nil {
			return cfg, err
		}
	}
	set := map[string]bool{}
	f.fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	if set["gpu-backend"] {
		cfg.GPU.Backend = f.backend
	}
	if set["metrics-listen"] {
		cfg.Metrics.Listen = f.listen
	}
	if set["log-level"] {
		cfg.Log.Level = f.logLevel
	}
	if set["poll-interval"] {
		cfg.GPU.PollInterval = f.poll
	}
	if set["runtime"] {
		cfg.Runtime.Enabled = f.runtime
	}
	if cfg.Runtime.Repository == "" {
		cfg.Runtime.Repository = f.modelRepo
	}
	if cfg.Runtime.Workers.ORTLibrary == "" {
		cfg.Runtime.Workers.ORTLibrary = f.ortLib
	}
	if cfg.Runtime.Workers.WorkerBinary == "" {
		// visionslice-worker is built next to the agent.
		if exe, err := os.Executable(); err == nil {
			cfg.Runtime.Workers.WorkerBinary = filepath.Join(filepath.Dir(exe), "visionslice-worker")
		}
	}
	if cfg.NodeName == "" {
		cfg.NodeName = f.nodeName
	}
	if cfg.NodeName == "" {
		cfg.NodeName, _ = os.Hostname()
	}
	return cfg, cfg.Validate()
}

func run(args []string) error {
	f, err := parseFlags(args)
	if err != nil {
		return err
	}
	if f.version {
		fmt.Println(nodeagent.Version)
		return nil
	}
	cfg, err := f.load()
	if err != nil {
		return err
	}
	if f.checkOnly {
		fmt.Printf("%+v\n", cfg)
		return nil
	}

	level := new(slog.LevelVar)
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	klog.SetSlogLogger(logger.With("component", "klog"))
	// The resolved config, defaults, flags and derived slice sizes applied,
	// in the file's own format: what an operator would write to get this
	// agent again.
	cfg.DeriveSliceBytes(logger)
	resolved, err := yaml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("render config: %w", err)
	}
	logger.Info("starting visionslice-agent", "version", nodeagent.Version, "config", string(resolved))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	agent, err := nodeagent.New(cfg, logger, level)
	if err != nil {
		return err
	}
	go watchReload(ctx, f, agent, logger)
	return agent.Run(ctx)
}

// watchReload re-reads the configuration on SIGHUP and when the config file
// changes (a ConfigMap update replaces the file through a symlink swap, so
// the directory is watched).
func watchReload(ctx context.Context, f *flags, agent *nodeagent.Agent, logger *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	var events chan fsnotify.Event
	var watchErrs chan error
	if f.config != "" {
		w, err := fsnotify.NewWatcher()
		if err != nil {
			logger.Warn("config file watch unavailable", "err", err)
		} else {
			defer w.Close()
			if err := w.Add(filepath.Dir(f.config)); err != nil {
				logger.Warn("config file watch unavailable", "err", err)
			} else {
				events, watchErrs = w.Events, w.Errors
			}
		}
	}
	var debounce <-chan time.Time
	reload := func(reason string) {
		cfg, err := f.load()
		if err != nil {
			logger.Error("config reload rejected, keeping the running config", "reason", reason, "err", err)
			return
		}
		if _, err := agent.Reload(cfg); err != nil {
			logger.Error("config reload rejected, keeping the running config", "reason", reason, "err", err)
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			reload("sighup")
		case err := <-watchErrs:
			logger.Warn("config file watch error", "err", err)
		case <-events:
			debounce = time.After(100 * time.Millisecond)
		case <-debounce:
			debounce = nil
			reload("file_changed")
		}
	}
}

// defaultRepository is $VISIONSLICE_CACHE/repository, where `make deps` lays
// out the default model repository.
func defaultRepository() string {
	if c := os.Getenv("VISIONSLICE_CACHE"); c != "" {
		return filepath.Join(c, "repository")
	}
	return ""
}
