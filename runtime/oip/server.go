package oip

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"time"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// Observer receives one call per finished infer request; the server
// composition turns it into metrics.
type Observer interface {
	Request(model, version, result string, d time.Duration)
}

// Options of a Server.
type Options struct {
	// Name and Version answer server metadata.
	Name, Version string
	// MaxBodyBytes caps an HTTP body and a gRPC message (default 64 MiB).
	MaxBodyBytes int64
	Tracer       trace.Tracer
	// Propagator extracts trace context (default W3C trace context).
	Propagator propagation.TextMapPropagator
	Observer   Observer
}

// DefaultMaxBodyBytes applies when Options.MaxBodyBytes is 0.
const DefaultMaxBodyBytes = 64 << 20

// Extensions the server announces in its metadata.
var Extensions = []string{"binary_tensor_data"}

// Server answers the protocol over HTTP (Handler) and gRPC (Register).
type Server struct {
	backend Backend
	opts    Options
	logger  *slog.Logger
}

// NewServer returns a Server in front of backend.
func NewServer(backend Backend, opts Options, logger *slog.Logger) *Server {
	if opts.Name == "" {
		opts.Name = "visionslice"
	}
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if opts.Tracer == nil {
		opts.Tracer = noop.NewTracerProvider().Tracer("")
	}
	if opts.Propagator == nil {
		opts.Propagator = propagation.TraceContext{}
	}
	if opts.Observer == nil {
		opts.Observer = nopObserver{}
	}
	return &Server{backend: backend, opts: opts, logger: logger}
}

type nopObserver struct{}

func (nopObserver) Request(string, string, string, time.Duration) {}

// infer runs one request through validation and the model.
func (s *Server) infer(ctx context.Context, name, version string, inputs []tensor.Tensor, outputs []string) (Model, []tensor.Tensor, error) {
	start := time.Now()
	m, err := s.backend.Model(name, version)
	if err != nil {
		s.opts.Observer.Request(name, version, result(err), time.Since(start))
		return nil, nil, err
	}
	md := m.Metadata()
	out, err := s.inferModel(ctx, m, md, inputs, outputs)
	res := result(err)
	s.opts.Observer.Request(md.Name, md.Version, res, time.Since(start))
	if err != nil && res == "error" {
		s.logger.Warn("inference failed", "model", md.Name, "version", md.Version, "request_id", RequestID(ctx), "err", err)
	}
	return m, out, err
}

func (s *Server) inferModel(ctx context.Context, m Model, md *ModelMetadata, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	if !m.Ready() {
		msg := "model " + md.Name + " version " + md.Version + " is not ready"
		if md.StateReason != "" {
			msg += " (" + md.State + ": " + md.StateReason + ")"
		}
		return nil, &inferr.RetryAfter{Msg: msg, After: time.Second}
	}
	inputs, outputs, err := validate(md, inputs, outputs)
	if err != nil {
		return nil, err
	}
	out, err := m.Infer(ctx, inputs, outputs)
	if err != nil {
		return nil, err
	}
	if len(out) != len(outputs) {
		return nil, errors.New("model returned a different number of outputs than requested")
	}
	return out, nil
}

type requestIDKey struct{}

// WithRequestID returns ctx carrying a request ID.
func WithRequestID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, requestIDKey{}, id)
}

// RequestID returns the request ID ctx carries ("" when none), for logs
// further down (batcher, worker calls).
func RequestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}

// newRequestID returns 16 random bytes in hex.
func newRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// validRequestID accepts a client's ID when it is short and printable, so
// logs and headers stay sane.
func validRequestID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c < 0x21 || c > 0x7e {
			return false
		}
	}
	return true
}
