// Package server composes the inference runtime of the agent: it reads the
// model repository, starts a supervised worker pool and a dynamic batcher
// per served model version, and serves them over the Open Inference
// Protocol (HTTP and gRPC), with metrics and tracing.
package server

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/visionslice/visionslice/runtime/supervisor"
)

// Config is the `runtime:` section of the agent configuration.
type Config struct {
	// Enabled turns the inference runtime on.
	Enabled bool `yaml:"enabled"`
	// Repository is the model repository directory.
	Repository string `yaml:"repository"`
	// HTTPListen and GRPCListen are the protocol's addresses (":8000",
	// ":8001"); GRPCListen may be "unix:///path".
	HTTPListen string `yaml:"httpListen"`
	GRPCListen string `yaml:"grpcListen"`
	// MaxBodyBytes caps an HTTP body and a gRPC message (default 64 MiB).
	MaxBodyBytes int64 `yaml:"maxBodyBytes"`
	// ShutdownGrace bounds draining requests at stop (default 10s).
	ShutdownGrace time.Duration `yaml:"shutdownGrace"`
	// Workers configures the model worker processes (worker binary, ONNX
	// Runtime library, health checks, restarts).
	Workers supervisor.Config `yaml:"workers"`
	// Tracing configures OpenTelemetry export.
	Tracing TracingConfig `yaml:"tracing"`
	// Device is where model workers run: "cpu" (default) or "cuda:<n>",
	// the CUDA execution provider on GPU n, its arena capped at the model's
	// quota (slices x SliceBytes) through gpu_mem_limit.
	Device string `yaml:"device"`
	// SliceBytes is the size of one slice; the agent sets it from
	// devicePlugin.sliceMiB.
	SliceBytes uint64 `yaml:"sliceBytes"`
}

// WorkerGPULimit returns the GPU memory limit of one worker of a model that
// holds slices, 0 when workers run on the CPU or the model holds none.
func (c *Config) WorkerGPULimit(slices int) uint64 {
	if !strings.HasPrefix(c.Device, "cuda:") || slices <= 0 {
		return 0
	}
	return uint64(slices) * c.SliceBytes
}

// TracingConfig: spans are always created when an endpoint is set and
// exported over OTLP/gRPC; with no endpoint tracing is off (W3C trace
// context is still read from requests so request IDs line up in logs).
type TracingConfig struct {
	// OTLPEndpoint is host:port of an OTLP/gRPC collector ("" = off).
	OTLPEndpoint string `yaml:"otlpEndpoint"`
	// Insecure sends without TLS.
	Insecure bool `yaml:"insecure"`
	// SampleRatio of traces started here (parent-based; default 1).
	SampleRatio float64 `yaml:"sampleRatio"`
}

// DefaultConfig returns the defaults of the section.
func DefaultConfig() Config {
	return Config{
		HTTPListen:    ":8000",
		GRPCListen:    ":8001",
		MaxBodyBytes:  64 << 20,
		ShutdownGrace: 10 * time.Second,
		Tracing:       TracingConfig{SampleRatio: 1},
	}
}

// Validate checks an enabled section (a disabled one is not checked).
func (c *Config) Validate() error {
	if !c.Enabled {
		return nil
	}
	var errs []error
	if c.Repository == "" {
		errs = append(errs, errors.New("runtime.repository is empty"))
	}
	if c.HTTPListen == "" && c.GRPCListen == "" {
		errs = append(errs, errors.New("runtime: set httpListen or grpcListen"))
	}
	if c.MaxBodyBytes < 1024 {
		errs = append(errs, fmt.Errorf("runtime.maxBodyBytes %d is below 1024", c.MaxBodyBytes))
	}
	if c.ShutdownGrace < 0 {
		errs = append(errs, errors.New("runtime.shutdownGrace must not be negative"))
	}
	if c.Tracing.SampleRatio < 0 || c.Tracing.SampleRatio > 1 {
		errs = append(errs, fmt.Errorf("runtime.tracing.sampleRatio %v must be within 0..1", c.Tracing.SampleRatio))
	}
	if c.Device != "" && c.Device != "cpu" {
		n, err := strconv.Atoi(strings.TrimPrefix(c.Device, "cuda:"))
		if !strings.HasPrefix(c.Device, "cuda:") || err != nil || n < 0 {
			errs = append(errs, fmt.Errorf("runtime.device %q: want cpu or cuda:<gpu index>", c.Device))
		} else if c.SliceBytes == 0 {
			errs = append(errs, errors.New("runtime.sliceBytes must be set for a cuda device"))
		}
	}
	w := c.Workers
	w.SetDefaults()
	if err := w.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("runtime.workers: %w", err))
	}
	return errors.Join(errs...)
}
