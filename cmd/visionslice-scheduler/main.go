// Command visionslice-scheduler is the visionslice kube-scheduler extender:
// flags and a config file become one scheduler.Config, then scheduler.New
// and Run, served over HTTP until SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.yaml.in/yaml/v3"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/scheduler"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "visionslice-scheduler:", err)
		os.Exit(1)
	}
}

type flags struct {
	fs         *flag.FlagSet
	config     string
	kubeconfig string
	listen     string
	keyFile    string
	logLevel   string
	standalone bool
	checkOnly  bool
}

func parseFlags(args []string) (*flags, error) {
	f := &flags{fs: flag.NewFlagSet("visionslice-scheduler", flag.ContinueOnError)}
	f.fs.StringVar(&f.config, "config", "", "path of the YAML config file (version: v1)")
	f.fs.StringVar(&f.kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig path (default $KUBECONFIG, then in-cluster)")
	f.fs.StringVar(&f.listen, "listen", "", "HTTP address of the extender (overrides listen)")
	f.fs.StringVar(&f.keyFile, "assignment-key-file", "", "file holding the HMAC key shared with the node agents (overrides assignmentKeyFile)")
	f.fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	f.fs.BoolVar(&f.standalone, "standalone", false, "run without an API server: filter and prioritize only, static targets only")
	f.fs.BoolVar(&f.checkOnly, "check-config", false, "validate the configuration, print it and exit")
	return f, f.fs.Parse(args)
}

func (f *flags) load() (scheduler.Config, error) {
	cfg := scheduler.DefaultConfig()
	if f.config != "" {
		var err error
		if cfg, err = scheduler.LoadConfig(f.config); err != nil {
			return cfg, err
		}
	}
	set := map[string]bool{}
	f.fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	if set["listen"] {
		cfg.Listen = f.listen
	}
	if set["assignment-key-file"] {
		cfg.AssignmentKeyFile = f.keyFile
	}
	cfg.Complete()
	return cfg, cfg.Validate()
}

func run(args []string) error {
	f, err := parseFlags(args)
	if err != nil {
		return err
	}
	cfg, err := f.load()
	if err != nil {
		return err
	}
	// The resolved config, defaults and flags applied, in the file's own
	// format (Weights and Prometheus are pointers: %+v would print addresses).
	resolved, err := yaml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("render config: %w", err)
	}
	if f.checkOnly {
		fmt.Print(string(resolved))
		return nil
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(f.logLevel)); err != nil {
		return fmt.Errorf("log level %q: want debug, info, warn or error", f.logLevel)
	}
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	klog.SetSlogLogger(logger.With("component", "klog"))
	logger.Info("starting visionslice-scheduler", "config", string(resolved))

	deps := scheduler.Deps{}
	if !f.standalone {
		rc, err := restConfig(f.kubeconfig)
		if err != nil {
			return err
		}
		if deps.Client, err = kubernetes.NewForConfig(rc); err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		if cfg.AssignmentKeyFile == "" {
			return errors.New("assignmentKeyFile (or --assignment-key-file) is required to bind")
		}
		if deps.Key, err = slice.ReadKey(cfg.AssignmentKeyFile); err != nil {
			return err
		}
	}
	ext, err := scheduler.New(cfg, deps, logger)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	srv := &http.Server{Addr: cfg.Listen, Handler: ext, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return ext.Run(gctx) })
	g.Go(func() error {
		logger.Info("serving extender", "listen", cfg.Listen)
		if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve extender: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		// Stop accepting, let in-flight verbs (a bind mid-way) finish.
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
	err = g.Wait()
	logger.Info("visionslice-scheduler stopped", "err", err)
	return err
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("load kubeconfig %s: %w", kubeconfig, err)
		}
		return rc, nil
	}
	rc, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("in-cluster config (use --kubeconfig or --standalone outside a cluster): %w", err)
	}
	return rc, nil
}
