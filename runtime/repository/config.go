// Package repository reads a model repository laid out like Triton's:
//
//	<repo>/<model>/config.yaml
//	<repo>/<model>/<version>/model.onnx
//
// A model's config.yaml is versioned (`version: v1`) and strict: unknown keys
// are rejected with the line that holds them. The package is pure Go; the
// worker (runtime/ort, runtime/cv) consumes the types declared here.
package repository

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// ConfigVersion is the only config.yaml version this package reads.
const ConfigVersion = "v1"

// ErrInvalidConfig wraps every error about a config.yaml's content.
var ErrInvalidConfig = errors.New("invalid model config")

// Config is one model's config.yaml.
type Config struct {
	// Version of the file format; must be "v1".
	Version string `yaml:"version"`
	// Platform names the backend; only "onnxruntime" (the default) exists.
	Platform string `yaml:"platform,omitempty"`
	// MaxBatchSize > 0 means the model takes a leading batch dimension that
	// Dims below leave out (as in Triton); 0 means no batching and Dims are
	// the full shapes.
	MaxBatchSize int `yaml:"max_batch_size"`
	// Inputs and Outputs as clients see them.
	Inputs  []TensorSpec `yaml:"inputs"`
	Outputs []TensorSpec `yaml:"outputs"`
	// Slices is the model worker's GPU memory quota in slices of the node
	// (deviceplugin/slice.DefaultSliceMiB each). 0 runs it on the CPU.
	Slices int `yaml:"slices,omitempty"`
	// Instances is the number of worker processes per model version (default 1).
	Instances int `yaml:"instances,omitempty"`
	// IntraOpThreads for ONNX Runtime; 0 keeps the runtime's default.
	IntraOpThreads int `yaml:"intra_op_threads,omitempty"`
	// VersionPolicy chooses the versions served: "latest" (default: the
	// highest number) or "all".
	VersionPolicy string `yaml:"version_policy,omitempty"`
	// DynamicBatching, when present, groups requests into batches of up to
	// MaxBatchSize.
	DynamicBatching *DynamicBatching `yaml:"dynamic_batching,omitempty"`
}

// TensorSpec declares one input or output.
type TensorSpec struct {
	Name     string          `yaml:"name"`
	Datatype tensor.DataType `yaml:"datatype"`
	// Dims per batch item (without the batch dimension when MaxBatchSize > 0);
	// -1 marks a dynamic dimension. May be empty for a scalar per item.
	Dims []int64 `yaml:"dims"`
	// Preprocessing, allowed on a BYTES input only, makes the worker decode
	// each element as an encoded image (JPEG, PNG) and turn it into the model
	// input named Preprocessing.ModelInput.
	Preprocessing *Preprocessing `yaml:"preprocessing,omitempty"`
}

// ResizeMode says how an image is brought to Width x Height.
type ResizeMode string

const (
	// Resize stretches the image to Width x Height.
	Resize ResizeMode = "resize"
	// Letterbox scales keeping the aspect ratio and pads the rest with PadValue.
	Letterbox ResizeMode = "letterbox"
)

// ColorOrder is the channel order the model expects.
type ColorOrder string

const (
	RGB ColorOrder = "RGB"
	BGR ColorOrder = "BGR"
)

// Layout is the memory layout of the preprocessed tensor.
type Layout string

const (
	NCHW Layout = "NCHW"
	NHWC Layout = "NHWC"
)

// Preprocessing turns an encoded image into a model input tensor:
// decode -> colour order -> resize/letterbox -> value*Scale -> (v-Mean)/Std
// per channel -> layout -> dtype.
type Preprocessing struct {
	// ModelInput is the ONNX input that receives the tensor (default: the
	// BYTES input's own name).
	ModelInput string     `yaml:"model_input,omitempty"`
	Resize     ResizeMode `yaml:"resize"`
	Width      int        `yaml:"width"`
	Height     int        `yaml:"height"`
	// PadValue fills the letterbox border (0..255, before normalisation).
	PadValue int        `yaml:"pad_value,omitempty"`
	Color    ColorOrder `yaml:"color"`
	// Scale multiplies pixel values first (default 1/255; set 1 to keep 0..255).
	Scale *float32 `yaml:"scale,omitempty"`
	// Mean and Std per channel, in the model's colour order (default 0 and 1).
	Mean []float32 `yaml:"mean,omitempty"`
	Std  []float32 `yaml:"std,omitempty"`
	// Layout of the tensor (default NCHW).
	Layout Layout `yaml:"layout,omitempty"`
	// Datatype of the tensor: FP32 (default), FP16 or UINT8 (UINT8 skips
	// Scale/Mean/Std).
	Datatype tensor.DataType `yaml:"datatype,omitempty"`
	// MaxImagePixels rejects images whose declared width*height exceeds it
	// before a full decode (default 50 megapixels).
	MaxImagePixels int64 `yaml:"max_image_pixels,omitempty"`
}

// DefaultMaxImagePixels bounds a declared image size before decoding.
const DefaultMaxImagePixels = 50_000_000

// EffectiveScale returns Scale or its default 1/255.
func (p *Preprocessing) EffectiveScale() float32 {
	if p.Scale == nil {
		return 1.0 / 255
	}
	return *p.Scale
}

// DynamicBatching configures the batcher of one model version.
type DynamicBatching struct {
	// MaxQueueDelay is how long the first request of a batch may wait for
	// more (default 0: take what is queued now).
	MaxQueueDelay time.Duration `yaml:"max_queue_delay,omitempty"`
	// PreferredBatchSizes are sizes the batcher dispatches at as soon as it
	// reaches one, without waiting out MaxQueueDelay.
	PreferredBatchSizes []int `yaml:"preferred_batch_sizes,omitempty"`
	// MaxQueueSize bounds the queue in requests (default 1024); a full queue
	// rejects with "unavailable" (HTTP 503 / gRPC Unavailable).
	MaxQueueSize int `yaml:"max_queue_size,omitempty"`
	// DefaultTimeout is the deadline of a request that carries none (0: none).
	DefaultTimeout time.Duration `yaml:"default_timeout,omitempty"`
}

// DefaultMaxQueueSize applies when DynamicBatching.MaxQueueSize is 0.
const DefaultMaxQueueSize = 1024

// ParseConfig decodes and validates config.yaml content strictly and fills
// defaults.
func ParseConfig(data []byte) (*Config, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var c Config
	if err := dec.Decode(&c); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%w: empty file", ErrInvalidConfig)
		}
		return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: more than one YAML document", ErrInvalidConfig)
	}
	c.SetDefaults()
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	return &c, nil
}

// SetDefaults fills zero fields with their defaults.
func (c *Config) SetDefaults() {
	if c.Platform == "" {
		c.Platform = "onnxruntime"
	}
	if c.Instances == 0 {
		c.Instances = 1
	}
	if c.VersionPolicy == "" {
		c.VersionPolicy = "latest"
	}
	for i := range c.Inputs {
		p := c.Inputs[i].Preprocessing
		if p == nil {
			continue
		}
		if p.ModelInput == "" {
			p.ModelInput = c.Inputs[i].Name
		}
		if p.Layout == "" {
			p.Layout = NCHW
		}
		if p.Datatype == "" {
			p.Datatype = tensor.FP32
		}
		if p.Color == "" {
			p.Color = RGB
		}
		if p.MaxImagePixels == 0 {
			p.MaxImagePixels = DefaultMaxImagePixels
		}
	}
	if b := c.DynamicBatching; b != nil && b.MaxQueueSize == 0 {
		b.MaxQueueSize = DefaultMaxQueueSize
	}
}

// Validate checks a config after SetDefaults.
func (c *Config) Validate() error {
	if c.Version != ConfigVersion {
		return fmt.Errorf("version %q is not supported (want %q)", c.Version, ConfigVersion)
	}
	if c.Platform != "onnxruntime" {
		return fmt.Errorf("platform %q is not supported (want onnxruntime)", c.Platform)
	}
	if c.MaxBatchSize < 0 {
		return fmt.Errorf("max_batch_size %d is negative", c.MaxBatchSize)
	}
	if c.Slices < 0 {
		return fmt.Errorf("slices %d is negative", c.Slices)
	}
	if c.Instances < 1 {
		return fmt.Errorf("instances %d must be at least 1", c.Instances)
	}
	if c.IntraOpThreads < 0 {
		return fmt.Errorf("intra_op_threads %d is negative", c.IntraOpThreads)
	}
	if c.VersionPolicy != "latest" && c.VersionPolicy != "all" {
		return fmt.Errorf("version_policy %q must be latest or all", c.VersionPolicy)
	}
	if len(c.Inputs) == 0 {
		return errors.New("inputs: at least one is required")
	}
	if len(c.Outputs) == 0 {
		return errors.New("outputs: at least one is required")
	}
	names := map[string]string{}
	for i := range c.Inputs {
		if err := c.checkSpec("inputs", i, &c.Inputs[i], names); err != nil {
			return err
		}
	}
	for i := range c.Outputs {
		if err := c.checkSpec("outputs", i, &c.Outputs[i], names); err != nil {
			return err
		}
	}
	if b := c.DynamicBatching; b != nil {
		if c.MaxBatchSize == 0 {
			return errors.New("dynamic_batching needs max_batch_size > 0")
		}
		if b.MaxQueueDelay < 0 || b.DefaultTimeout < 0 {
			return errors.New("dynamic_batching: durations must not be negative")
		}
		if b.MaxQueueSize < 1 {
			return fmt.Errorf("dynamic_batching.max_queue_size %d must be at least 1", b.MaxQueueSize)
		}
		for _, s := range b.PreferredBatchSizes {
			if s < 1 || s > c.MaxBatchSize {
				return fmt.Errorf("dynamic_batching.preferred_batch_sizes: %d is outside 1..max_batch_size (%d)", s, c.MaxBatchSize)
			}
		}
	}
	return nil
}

func (c *Config) checkSpec(section string, i int, s *TensorSpec, names map[string]string) error {
	where := fmt.Sprintf("%s[%d]", section, i)
	if s.Name == "" {
		return fmt.Errorf("%s: name is required", where)
	}
	if prev, dup := names[s.Name]; dup {
		return fmt.Errorf("%s: name %q is already used by %s", where, s.Name, prev)
	}
	names[s.Name] = where
	where = fmt.Sprintf("%s (%s)", where, s.Name)
	if !s.Datatype.Valid() {
		return fmt.Errorf("%s: datatype %q is not an Open Inference Protocol datatype", where, s.Datatype)
	}
	if len(s.Dims) == 0 && c.MaxBatchSize == 0 {
		return fmt.Errorf("%s: dims are required when max_batch_size is 0", where)
	}
	for _, d := range s.Dims {
		if d < -1 || d == 0 {
			return fmt.Errorf("%s: dim %d must be positive or -1 (dynamic)", where, d)
		}
	}
	p := s.Preprocessing
	if p == nil {
		return nil
	}
	if section != "inputs" || s.Datatype != tensor.Bytes {
		return fmt.Errorf("%s: preprocessing applies to BYTES inputs only", where)
	}
	switch p.Resize {
	case Resize, Letterbox:
	default:
		return fmt.Errorf("%s: preprocessing.resize %q must be resize or letterbox", where, p.Resize)
	}
	if p.Width < 1 || p.Height < 1 || p.Width > 16384 || p.Height > 16384 {
		return fmt.Errorf("%s: preprocessing width and height must be 1..16384, got %dx%d", where, p.Width, p.Height)
	}
	if p.PadValue < 0 || p.PadValue > 255 {
		return fmt.Errorf("%s: preprocessing.pad_value %d must be 0..255", where, p.PadValue)
	}
	if p.Color != RGB && p.Color != BGR {
		return fmt.Errorf("%s: preprocessing.color %q must be RGB or BGR", where, p.Color)
	}
	if p.Layout != NCHW && p.Layout != NHWC {
		return fmt.Errorf("%s: preprocessing.layout %q must be NCHW or NHWC", where, p.Layout)
	}
	switch p.Datatype {
	case tensor.FP32, tensor.FP16, tensor.Uint8:
	default:
		return fmt.Errorf("%s: preprocessing.datatype %q must be FP32, FP16 or UINT8", where, p.Datatype)
	}
	if p.Scale != nil && (*p.Scale <= 0 || math.IsInf(float64(*p.Scale), 0) || math.IsNaN(float64(*p.Scale))) {
		return fmt.Errorf("%s: preprocessing.scale must be a positive number", where)
	}
	if len(p.Mean) != 0 && len(p.Mean) != 3 {
		return fmt.Errorf("%s: preprocessing.mean needs 3 values, got %d", where, len(p.Mean))
	}
	if len(p.Std) != 0 && len(p.Std) != 3 {
		return fmt.Errorf("%s: preprocessing.std needs 3 values, got %d", where, len(p.Std))
	}
	for _, v := range p.Std {
		if !(v > 0) {
			return fmt.Errorf("%s: preprocessing.std values must be positive", where)
		}
	}
	if p.MaxImagePixels < 0 {
		return fmt.Errorf("%s: preprocessing.max_image_pixels must not be negative", where)
	}
	return nil
}

// Input returns the input spec named name.
func (c *Config) Input(name string) (*TensorSpec, bool) {
	for i := range c.Inputs {
		if c.Inputs[i].Name == name {
			return &c.Inputs[i], true
		}
	}
	return nil, false
}

// Output returns the output spec named name.
func (c *Config) Output(name string) (*TensorSpec, bool) {
	for i := range c.Outputs {
		if c.Outputs[i].Name == name {
			return &c.Outputs[i], true
		}
	}
	return nil, false
}

// FullDims returns the shape clients see for s: with a leading -1 (batch)
// when the model batches.
func (c *Config) FullDims(s *TensorSpec) []int64 {
	if c.MaxBatchSize > 0 {
		return append([]int64{-1}, s.Dims...)
	}
	return append([]int64(nil), s.Dims...)
}
