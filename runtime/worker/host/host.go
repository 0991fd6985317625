// Package host is the model inside a worker process: an ONNX Runtime
// session (runtime/ort) plus OpenCV preprocessing (runtime/cv) of the BYTES
// inputs that carry encoded images. It implements worker.Handler.
package host

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/ort"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/worker"
)

// Config of one hosted model.
type Config struct {
	// Model holds the ONNX bytes; when nil, ModelPath is read.
	Model     []byte
	ModelPath string
	// Spec is the model's repository config; only its preprocessing (and
	// dims, for warm-up) are used. May be nil: no image inputs.
	Spec *repository.Config
	ORT  ort.Options
	// Warmup runs one inference on zeros after loading.
	Warmup bool
}

// Model is a loaded model, ready to serve.
type Model struct {
	sess   *ort.Session
	images map[string]*image // by BYTES input name
	meta   worker.Metadata
}

type image struct {
	pp     preprocessor
	target ort.IO
}

// preprocessor turns encoded images into one tensor (runtime/cv's
// Preprocessor; see images_cv.go).
type preprocessor interface {
	// Shape of the tensor for n images.
	Shape(n int) []int64
	Batch(name string, images [][]byte) (tensor.Tensor, error)
	Close()
}

var _ worker.Handler = (*Model)(nil)

// Load reads and loads the model, checks the preprocessing against the
// model's inputs and optionally warms it up.
func Load(cfg Config) (*Model, error) {
	start := time.Now()
	data := cfg.Model
	if data == nil {
		var err error
		if data, err = os.ReadFile(cfg.ModelPath); err != nil {
			return nil, fmt.Errorf("read model: %w", err)
		}
	}
	sess, err := ort.NewSession(data, cfg.ORT)
	if err != nil {
		return nil, err
	}
	m := &Model{sess: sess, images: map[string]*image{}}
	if err := m.setup(cfg); err != nil {
		m.Close()
		return nil, err
	}
	m.meta.LoadSeconds = time.Since(start).Seconds()
	return m, nil
}

func (m *Model) setup(cfg Config) error {
	m.meta = worker.Metadata{PID: os.Getpid(), Runtime: "onnxruntime " + ort.Version(), Device: cfg.ORT.Device}
	if m.meta.Device == "" {
		m.meta.Device = "cpu"
	}
	for _, io := range m.sess.Inputs() {
		m.meta.Inputs = append(m.meta.Inputs, worker.TensorInfo(io))
	}
	for _, io := range m.sess.Outputs() {
		m.meta.Outputs = append(m.meta.Outputs, worker.TensorInfo(io))
	}
	if cfg.Spec != nil {
		for _, in := range cfg.Spec.Inputs {
			if in.Preprocessing == nil {
				continue
			}
			if err := m.addImage(in.Name, in.Preprocessing); err != nil {
				return err
			}
		}
	}
	if cfg.Warmup {
		if err := m.warmup(cfg.Spec); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}
	return nil
}

func (m *Model) addImage(name string, spec *repository.Preprocessing) error {
	target, ok := m.input(spec.ModelInput)
	if !ok {
		return fmt.Errorf("preprocessing of %q targets model input %q, which the model does not have", name, spec.ModelInput)
	}
	pp, dt, err := newImagePreprocessor(spec)
	if err != nil {
		return fmt.Errorf("preprocessing of %q: %w", name, err)
	}
	if err := checkTarget(name, pp.Shape(1), dt, target); err != nil {
		pp.Close()
		return err
	}
	m.images[name] = &image{pp: pp, target: target}
	m.meta.Images = append(m.meta.Images, worker.ImageInput{Name: name, ModelInput: target.Name})
	return nil
}

// checkTarget checks that images preprocessed into shape want (for one
// image) of datatype dt fit the model input target.
func checkTarget(name string, want []int64, dt tensor.DataType, target ort.IO) error {
	if target.Datatype != dt {
		return fmt.Errorf("preprocessing of %q makes %s, model input %q takes %s", name, dt, target.Name, target.Datatype)
	}
	if len(target.Shape) == 3 {
		want = want[1:]
	} else if len(target.Shape) != 4 {
		return fmt.Errorf("preprocessing of %q makes an image tensor, model input %q has shape %v", name, target.Name, target.Shape)
	}
	for i, d := range target.Shape {
		if d >= 0 && d != want[i] && !(i == 0 && len(want) == 4) {
			return fmt.Errorf("preprocessing of %q makes shape %v per image, model input %q has shape %v", name, want, target.Name, target.Shape)
		}
	}
	return nil
}

func (m *Model) input(name string) (ort.IO, bool) {
	for _, io := range m.sess.Inputs() {
		if io.Name == name {
			return io, true
		}
	}
	return ort.IO{}, false
}

// warmup runs the model once on zeros, with dynamic dimensions taken from
// the preprocessing, from the spec's dims, or 1.
func (m *Model) warmup(spec *repository.Config) error {
	var inputs []tensor.Tensor
	for _, io := range m.sess.Inputs() {
		shape := slices.Clone(io.Shape)
		var hint []int64
		for _, im := range m.images {
			if im.target.Name == io.Name {
				hint = im.pp.Shape(1)
			}
		}
		if hint == nil && spec != nil {
			if s, ok := spec.Input(io.Name); ok {
				hint = spec.FullDims(s)
			}
		}
		if len(hint) == len(shape)+1 {
			hint = hint[1:]
		}
		for i, d := range shape {
			if d < 0 {
				shape[i] = 1
				if len(hint) == len(shape) && hint[i] > 0 {
					shape[i] = hint[i]
				}
			}
		}
		n, err := tensor.Elements(shape)
		if err != nil {
			return fmt.Errorf("input %q: %w", io.Name, err)
		}
		inputs = append(inputs, tensor.Tensor{Name: io.Name, Datatype: io.Datatype, Shape: shape, Data: make([]byte, n*int64(io.Datatype.Size()))})
	}
	_, err := m.sess.Run(inputs, nil)
	return err
}

// Metadata describes the model.
func (m *Model) Metadata() worker.Metadata { return m.meta }

// Close releases the session and the preprocessors.
func (m *Model) Close() error {
	for _, im := range m.images {
		im.pp.Close()
	}
	return m.sess.Close()
}

// Infer preprocesses image inputs and runs the model.
func (m *Model) Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	if len(m.images) > 0 {
		start := time.Now()
		inputs = slices.Clone(inputs)
		for i := range inputs {
			im, ok := m.images[inputs[i].Name]
			if !ok {
				continue
			}
			t, err := im.decode(&inputs[i])
			if err != nil {
				return nil, err
			}
			inputs[i] = t
		}
		if t := worker.TimingsFrom(ctx); t != nil {
			t.Preprocess = time.Since(start)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return m.sess.Run(inputs, outputs)
}

func (im *image) decode(in *tensor.Tensor) (tensor.Tensor, error) {
	if in.Datatype != tensor.Bytes {
		return tensor.Tensor{}, fmt.Errorf("%w: input %q carries encoded images and must be BYTES, not %s", inferr.ErrInvalidInput, in.Name, in.Datatype)
	}
	if err := in.Validate(); err != nil {
		return tensor.Tensor{}, fmt.Errorf("%w: %w", inferr.ErrInvalidInput, err)
	}
	els, err := tensor.BytesElements(in.Data)
	if err != nil {
		return tensor.Tensor{}, fmt.Errorf("%w: input %q: %w", inferr.ErrInvalidInput, in.Name, err)
	}
	if len(in.Shape) == 0 || in.Shape[0] != int64(len(els)) {
		return tensor.Tensor{}, fmt.Errorf("%w: input %q: shape %v must have one image per row of the batch dimension", inferr.ErrInvalidInput, in.Name, in.Shape)
	}
	if len(im.target.Shape) == 3 && len(els) != 1 {
		return tensor.Tensor{}, fmt.Errorf("%w: input %q: the model takes one image, got %d", inferr.ErrInvalidInput, in.Name, len(els))
	}
	t, err := im.pp.Batch(im.target.Name, els)
	if err != nil {
		return tensor.Tensor{}, fmt.Errorf("%w: input %q: %w", inferr.ErrInvalidInput, in.Name, err)
	}
	if len(im.target.Shape) == 3 {
		t.Shape = t.Shape[1:]
	}
	return t, nil
}

// Code classifies Infer's errors for the wire.
func Code(err error) worker.Code {
	if errors.Is(err, inferr.ErrInvalidInput) || badImage(err) {
		return worker.CodeInvalidArgument
	}
	return worker.CodeInternal
}
