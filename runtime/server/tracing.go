package server

import (
	"context"
	"log/slog"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// tracing holds the tracer provider: a no-op one unless an OTLP endpoint is
// configured. It is never installed globally.
type tracing struct {
	provider trace.TracerProvider
	tracer   trace.Tracer
	sdk      *sdktrace.TracerProvider
	on       bool
}

// enabled reports whether spans go anywhere; without, the gRPC stats
// handler is left out (it costs per request even with a no-op provider).
func (t *tracing) enabled() bool { return t.on || t.sdk != nil }

func newTracing(c TracingConfig) (*tracing, error) {
	if c.OTLPEndpoint == "" {
		p := noop.NewTracerProvider()
		return &tracing{provider: p, tracer: p.Tracer("visionslice/runtime")}, nil
	}
	opts := []otlptracegrpc.Option{otlptracegrpc.WithEndpoint(c.OTLPEndpoint)}
	if c.Insecure {
		opts = append(opts, otlptracegrpc.WithInsecure())
	}
	// The exporter connects lazily; a collector that is down costs dropped
	// spans, not a failed start.
	exp, err := otlptracegrpc.New(context.Background(), opts...)
	if err != nil {
		return nil, err
	}
	sdk := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(c.SampleRatio))),
		sdktrace.WithResource(resource.NewSchemaless(semconv.ServiceName("visionslice-runtime"))),
	)
	return &tracing{provider: sdk, tracer: sdk.Tracer("visionslice/runtime"), sdk: sdk}, nil
}

func (t *tracing) shutdown(logger *slog.Logger) {
	if t.sdk == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := t.sdk.Shutdown(ctx); err != nil {
		logger.Warn("tracing shutdown", "err", err)
	}
}
