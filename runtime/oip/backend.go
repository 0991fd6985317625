// Package oip serves the Open Inference Protocol (KServe v2) over HTTP
// (JSON and the binary tensor data extension) and gRPC
// (inference.GRPCInferenceService) in front of a Backend.
package oip

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"

	"google.golang.org/grpc/codes"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// Backend is what the front end serves: the server composition implements
// it over the repository, batchers and worker pools; tests use small real
// models or a computing stand-in.
type Backend interface {
	// Ready reports whether every model that should serve does.
	Ready() bool
	// Model returns a served model version; version "" picks the default.
	// Errors wrap inferr.ErrNotFound for an unknown model or version.
	Model(name, version string) (Model, error)
}

// Model is one served model version.
type Model interface {
	Metadata() *ModelMetadata
	Ready() bool
	// Infer runs validated inputs (batch dimension first when the model
	// batches) and returns the requested outputs in order.
	Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error)
}

// TensorMetadata describes one input or output; -1 marks a variable dimension.
type TensorMetadata struct {
	Name     string          `json:"name"`
	Datatype tensor.DataType `json:"datatype"`
	Shape    []int64         `json:"shape"`
}

// ModelMetadata describes a model version.
type ModelMetadata struct {
	Name string `json:"name"`
	// Version is the version this Model serves.
	Version string `json:"-"`
	// Versions are all versions served of the model.
	Versions []string `json:"versions,omitempty"`
	Platform string   `json:"platform"`
	// MaxBatchSize > 0: the first dimension of every input and output is the
	// batch (1..MaxBatchSize).
	MaxBatchSize int              `json:"-"`
	Inputs       []TensorMetadata `json:"inputs"`
	Outputs      []TensorMetadata `json:"outputs"`
	// State and StateReason come from the model lifecycle (e.g.
	// "failed_over_quota" and why); empty while plainly serving.
	State       string `json:"state,omitempty"`
	StateReason string `json:"state_reason,omitempty"`
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", inferr.ErrInvalidInput, fmt.Sprintf(format, args...))
}

// validate checks inputs and requested outputs against md, orders the inputs
// as the model declares them and fills the default outputs.
func validate(md *ModelMetadata, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, []string, error) {
	ordered := make([]tensor.Tensor, len(md.Inputs))
	seen := make([]bool, len(md.Inputs))
	for i := range inputs {
		in := &inputs[i]
		idx := slices.IndexFunc(md.Inputs, func(t TensorMetadata) bool { return t.Name == in.Name })
		if idx < 0 {
			return nil, nil, invalid("unexpected input %q (model %s takes %s)", in.Name, md.Name, names(md.Inputs))
		}
		if seen[idx] {
			return nil, nil, invalid("input %q given twice", in.Name)
		}
		seen[idx] = true
		want := md.Inputs[idx]
		if in.Datatype != want.Datatype {
			return nil, nil, invalid("input %q has datatype %s, model wants %s", in.Name, in.Datatype, want.Datatype)
		}
		if err := checkShape(md, &want, in.Shape); err != nil {
			return nil, nil, err
		}
		if err := in.Validate(); err != nil {
			return nil, nil, invalid("%s", err.Error())
		}
		ordered[idx] = *in
	}
	for i, ok := range seen {
		if !ok {
			return nil, nil, invalid("missing input %q", md.Inputs[i].Name)
		}
	}
	if len(outputs) == 0 {
		outputs = make([]string, len(md.Outputs))
		for i, o := range md.Outputs {
			outputs[i] = o.Name
		}
		return ordered, outputs, nil
	}
	for i, o := range outputs {
		if !slices.ContainsFunc(md.Outputs, func(t TensorMetadata) bool { return t.Name == o }) {
			return nil, nil, invalid("unknown output %q (model %s has %s)", o, md.Name, names(md.Outputs))
		}
		if slices.Contains(outputs[:i], o) {
			return nil, nil, invalid("output %q requested twice", o)
		}
	}
	return ordered, outputs, nil
}

func checkShape(md *ModelMetadata, want *TensorMetadata, got []int64) error {
	if len(got) != len(want.Shape) {
		return invalid("input %q has shape %v, model wants %v", want.Name, got, want.Shape)
	}
	for i, d := range got {
		if d < 0 {
			return invalid("input %q has negative dimension in shape %v", want.Name, got)
		}
		if i == 0 && md.MaxBatchSize > 0 {
			if d < 1 || d > int64(md.MaxBatchSize) {
				return invalid("input %q has batch size %d, model takes 1..%d", want.Name, d, md.MaxBatchSize)
			}
			continue
		}
		if w := want.Shape[i]; w >= 0 && w != d {
			return invalid("input %q has shape %v, model wants %v", want.Name, got, want.Shape)
		}
	}
	return nil
}

func names(ts []TensorMetadata) string {
	s := make([]string, len(ts))
	for i, t := range ts {
		s[i] = fmt.Sprintf("%q", t.Name)
	}
	return fmt.Sprint(s)
}

// errClass is how the front ends report one class of error: the result
// label in metrics, the HTTP status and the gRPC code.
type errClass struct {
	err    error
	result string
	http   int
	grpc   codes.Code
}

// errClasses in the order they are tested; an error in none is internal.
var errClasses = []errClass{
	{inferr.ErrTooLarge, "invalid_input", http.StatusRequestEntityTooLarge, codes.ResourceExhausted},
	{inferr.ErrInvalidInput, "invalid_input", http.StatusBadRequest, codes.InvalidArgument},
	{inferr.ErrNotFound, "not_found", http.StatusNotFound, codes.NotFound},
	{inferr.ErrUnavailable, "unavailable", http.StatusServiceUnavailable, codes.Unavailable},
	{context.DeadlineExceeded, "timeout", http.StatusGatewayTimeout, codes.DeadlineExceeded},
	{context.Canceled, "canceled", 499 /* client closed the request */, codes.Canceled},
}

var errInternal = errClass{result: "error", http: http.StatusInternalServerError, grpc: codes.Internal}

// classOf finds err's class.
func classOf(err error) errClass {
	for _, c := range errClasses {
		if errors.Is(err, c.err) {
			return c
		}
	}
	return errInternal
}

// result is the label of a finished request in metrics.
func result(err error) string {
	if err == nil {
		return "success"
	}
	return classOf(err).result
}
