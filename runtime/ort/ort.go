// Package ort runs ONNX models with ONNX Runtime through
// github.com/yalue/onnxruntime_go. It is the only package of the project
// that touches that library; only the model worker process links it.
//
// ONNX Runtime keeps one environment per process: Init loads the shared
// library once, and every Session of the process shares it.
package ort

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	ortgo "github.com/yalue/onnxruntime_go"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// ErrInvalidInput wraps errors about the inputs a caller passed to Run (a
// client's fault, as opposed to a failure of the runtime). It is the
// front end's inferr.ErrInvalidInput.
var ErrInvalidInput = inferr.ErrInvalidInput

var env struct {
	mu  sync.Mutex
	lib string
}

// Init loads the ONNX Runtime shared library at lib and creates the
// process's environment. Calling it again with the same path is a no-op;
// with another path it fails, since a process holds one runtime.
func Init(lib string) error {
	if lib == "" {
		return errors.New("onnx runtime library path is empty")
	}
	env.mu.Lock()
	defer env.mu.Unlock()
	if env.lib != "" {
		if env.lib != lib {
			return fmt.Errorf("onnx runtime already initialised from %s, not %s", env.lib, lib)
		}
		return nil
	}
	ortgo.SetSharedLibraryPath(lib)
	if err := ortgo.InitializeEnvironment(ortgo.WithLogLevelError()); err != nil {
		return fmt.Errorf("initialise onnx runtime from %s: %w", lib, err)
	}
	env.lib = lib
	return nil
}

// Version returns the loaded ONNX Runtime's version ("" before Init).
func Version() string {
	env.mu.Lock()
	defer env.mu.Unlock()
	if env.lib == "" {
		return ""
	}
	return ortgo.GetVersion()
}

// Options configure one session.
type Options struct {
	// IntraOpThreads is the size of the operator thread pool (0: the
	// runtime's default, one per core).
	IntraOpThreads int
	// InterOpThreads (0: the runtime's default).
	InterOpThreads int
	// Device is "cpu" (default) or "cuda:<n>".
	Device string
	// GPUMemLimitBytes caps the CUDA execution provider's arena
	// (gpu_mem_limit); 0 leaves it unlimited. Used with a cuda device only.
	GPUMemLimitBytes uint64
}

// CUDADevice parses "cuda:<n>" (or "cuda", device 0). ok is false for "cpu"
// and "".
func CUDADevice(device string) (n int, ok bool, err error) {
	switch {
	case device == "" || device == "cpu":
		return 0, false, nil
	case device == "cuda":
		return 0, true, nil
	case strings.HasPrefix(device, "cuda:"):
		n, err := strconv.Atoi(strings.TrimPrefix(device, "cuda:"))
		if err != nil || n < 0 {
			return 0, false, fmt.Errorf("device %q: want cpu or cuda:<index>", device)
		}
		return n, true, nil
	}
	return 0, false, fmt.Errorf("device %q: want cpu or cuda:<index>", device)
}

// IO describes one model input or output. A -1 dimension is dynamic.
type IO struct {
	Name     string          `json:"name"`
	Datatype tensor.DataType `json:"datatype"`
	Shape    []int64         `json:"shape"`
}

// Session is a loaded model. Run may be called concurrently.
type Session struct {
	s       *ortgo.DynamicAdvancedSession
	inputs  []IO
	outputs []IO
	outIdx  map[string]int
}

// NewSession loads an ONNX model from its bytes. Init must have been called.
func NewSession(model []byte, opts Options) (*Session, error) {
	if len(model) == 0 {
		return nil, errors.New("onnx model is empty")
	}
	so, err := ortgo.NewSessionOptions()
	if err != nil {
		return nil, fmt.Errorf("create session options: %w", err)
	}
	defer so.Destroy()
	if opts.IntraOpThreads > 0 {
		if err := so.SetIntraOpNumThreads(opts.IntraOpThreads); err != nil {
			return nil, fmt.Errorf("set intra-op threads: %w", err)
		}
	}
	if opts.InterOpThreads > 0 {
		if err := so.SetInterOpNumThreads(opts.InterOpThreads); err != nil {
			return nil, fmt.Errorf("set inter-op threads: %w", err)
		}
	}
	dev, cuda, err := CUDADevice(opts.Device)
	if err != nil {
		return nil, err
	}
	if cuda {
		if err := appendCUDA(so, dev, opts.GPUMemLimitBytes); err != nil {
			return nil, err
		}
	}
	ins, outs, err := ortgo.GetInputOutputInfoWithONNXData(model)
	if err != nil {
		return nil, fmt.Errorf("read model inputs and outputs: %w", err)
	}
	s := &Session{outIdx: map[string]int{}}
	var inNames, outNames []string
	for _, in := range ins {
		io, err := ioOf(in)
		if err != nil {
			return nil, fmt.Errorf("model input: %w", err)
		}
		s.inputs = append(s.inputs, io)
		inNames = append(inNames, in.Name)
	}
	for i, out := range outs {
		io, err := ioOf(out)
		if err != nil {
			return nil, fmt.Errorf("model output: %w", err)
		}
		s.outputs = append(s.outputs, io)
		s.outIdx[out.Name] = i
		outNames = append(outNames, out.Name)
	}
	sess, err := ortgo.NewDynamicAdvancedSessionWithONNXData(model, inNames, outNames, so)
	if err != nil {
		return nil, fmt.Errorf("create onnx runtime session: %w", err)
	}
	s.s = sess
	return s, nil
}

func appendCUDA(so *ortgo.SessionOptions, dev int, limit uint64) error {
	co, err := ortgo.NewCUDAProviderOptions()
	if err != nil {
		return fmt.Errorf("cuda execution provider: %w", err)
	}
	defer co.Destroy()
	o := map[string]string{"device_id": strconv.Itoa(dev), "arena_extend_strategy": "kSameAsRequested"}
	if limit > 0 {
		o["gpu_mem_limit"] = strconv.FormatUint(limit, 10)
	}
	if err := co.Update(o); err != nil {
		return fmt.Errorf("cuda execution provider options: %w", err)
	}
	if err := so.AppendExecutionProviderCUDA(co); err != nil {
		return fmt.Errorf("append cuda execution provider: %w", err)
	}
	return nil
}

// Inputs returns the model's inputs in order.
func (s *Session) Inputs() []IO { return s.inputs }

// Outputs returns the model's outputs in order.
func (s *Session) Outputs() []IO { return s.outputs }

// Close releases the session.
func (s *Session) Close() error {
	if s.s == nil {
		return nil
	}
	err := s.s.Destroy()
	s.s = nil
	return err
}

// Run runs the model on inputs (each model input exactly once, by name) and
// returns the requested outputs in the order asked (all outputs, in model
// order, when outputs is empty). Output tensors own fresh Go memory.
func (s *Session) Run(inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	vals := make([]ortgo.Value, len(s.inputs))
	defer func() {
		for _, v := range vals {
			if v != nil {
				v.Destroy()
			}
		}
	}()
	if len(inputs) != len(s.inputs) {
		if err := s.checkNames(inputs); err != nil {
			return nil, err
		}
	}
	for i := range inputs {
		in := &inputs[i]
		idx := s.inputIndex(in.Name)
		if idx < 0 {
			return nil, fmt.Errorf("%w: the model has no input %q (inputs: %s)", ErrInvalidInput, in.Name, names(s.inputs))
		}
		if vals[idx] != nil {
			return nil, fmt.Errorf("%w: input %q given twice", ErrInvalidInput, in.Name)
		}
		if err := checkTensor(&s.inputs[idx], in); err != nil {
			return nil, err
		}
		v, err := ortgo.NewCustomDataTensor(ortgo.NewShape(in.Shape...), in.Data, elemTypes[in.Datatype])
		if err != nil {
			return nil, fmt.Errorf("input %q: %w", in.Name, err)
		}
		vals[idx] = v
	}
	want := make([]int, 0, len(s.outputs))
	if len(outputs) == 0 {
		for i := range s.outputs {
			want = append(want, i)
		}
	}
	for _, name := range outputs {
		i, ok := s.outIdx[name]
		if !ok {
			return nil, fmt.Errorf("%w: the model has no output %q (outputs: %s)", ErrInvalidInput, name, names(s.outputs))
		}
		want = append(want, i)
	}
	outs := make([]ortgo.Value, len(s.outputs))
	if err := s.s.Run(vals, outs); err != nil {
		return nil, fmt.Errorf("run model: %w", err)
	}
	defer func() {
		for _, v := range outs {
			if v != nil {
				v.Destroy()
			}
		}
	}()
	res := make([]tensor.Tensor, 0, len(want))
	for _, i := range want {
		t, err := toTensor(s.outputs[i].Name, outs[i])
		if err != nil {
			return nil, err
		}
		res = append(res, t)
	}
	return res, nil
}

func (s *Session) inputIndex(name string) int {
	for i := range s.inputs {
		if s.inputs[i].Name == name {
			return i
		}
	}
	return -1
}

// checkNames explains a wrong number of inputs: which are missing or extra.
func (s *Session) checkNames(inputs []tensor.Tensor) error {
	given := map[string]bool{}
	for _, in := range inputs {
		if s.inputIndex(in.Name) < 0 {
			return fmt.Errorf("%w: the model has no input %q (inputs: %s)", ErrInvalidInput, in.Name, names(s.inputs))
		}
		given[in.Name] = true
	}
	for _, io := range s.inputs {
		if !given[io.Name] {
			return fmt.Errorf("%w: input %q is missing", ErrInvalidInput, io.Name)
		}
	}
	return fmt.Errorf("%w: %d inputs given, the model takes %d", ErrInvalidInput, len(inputs), len(s.inputs))
}

func checkTensor(want *IO, in *tensor.Tensor) error {
	if in.Datatype != want.Datatype {
		return fmt.Errorf("%w: input %q has datatype %s, the model wants %s", ErrInvalidInput, in.Name, in.Datatype, want.Datatype)
	}
	if len(in.Shape) != len(want.Shape) {
		return fmt.Errorf("%w: input %q has shape %v, the model wants %v", ErrInvalidInput, in.Name, in.Shape, want.Shape)
	}
	for i, d := range want.Shape {
		if d >= 0 && in.Shape[i] != d {
			return fmt.Errorf("%w: input %q has shape %v, the model wants %v", ErrInvalidInput, in.Name, in.Shape, want.Shape)
		}
	}
	if err := in.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidInput, err)
	}
	if len(in.Data) == 0 {
		return fmt.Errorf("%w: input %q has no elements", ErrInvalidInput, in.Name)
	}
	return nil
}

func names(ios []IO) string {
	n := make([]string, len(ios))
	for i, io := range ios {
		n[i] = io.Name
	}
	return strings.Join(n, ", ")
}

var elemTypes = map[tensor.DataType]ortgo.TensorElementDataType{
	tensor.FP32:   ortgo.TensorElementDataTypeFloat,
	tensor.Uint8:  ortgo.TensorElementDataTypeUint8,
	tensor.Int8:   ortgo.TensorElementDataTypeInt8,
	tensor.Uint16: ortgo.TensorElementDataTypeUint16,
	tensor.Int16:  ortgo.TensorElementDataTypeInt16,
	tensor.Int32:  ortgo.TensorElementDataTypeInt32,
	tensor.Int64:  ortgo.TensorElementDataTypeInt64,
	tensor.Bool:   ortgo.TensorElementDataTypeBool,
	tensor.FP16:   ortgo.TensorElementDataTypeFloat16,
	tensor.FP64:   ortgo.TensorElementDataTypeDouble,
	tensor.Uint32: ortgo.TensorElementDataTypeUint32,
	tensor.Uint64: ortgo.TensorElementDataTypeUint64,
}

func ioOf(info ortgo.InputOutputInfo) (IO, error) {
	if info.OrtValueType != ortgo.ONNXTypeTensor {
		return IO{}, fmt.Errorf("%q is a %s, only tensors are supported", info.Name, info.OrtValueType)
	}
	for dt, et := range elemTypes {
		if et == info.DataType {
			shape := make([]int64, len(info.Dimensions))
			for i, d := range info.Dimensions {
				if d < 0 {
					d = -1
				}
				shape[i] = d
			}
			return IO{Name: info.Name, Datatype: dt, Shape: shape}, nil
		}
	}
	return IO{}, fmt.Errorf("%q has element type %s, which the protocol cannot carry", info.Name, info.DataType)
}

// toTensor views an output value's Go-owned data as bytes.
func toTensor(name string, v ortgo.Value) (tensor.Tensor, error) {
	t := tensor.Tensor{Name: name, Shape: []int64(v.GetShape())}
	var data []byte
	switch x := v.(type) {
	case *ortgo.Tensor[float32]:
		t.Datatype, data = tensor.FP32, bytesOf(x.GetData())
	case *ortgo.Tensor[float64]:
		t.Datatype, data = tensor.FP64, bytesOf(x.GetData())
	case *ortgo.Tensor[uint8]:
		t.Datatype, data = tensor.Uint8, bytesOf(x.GetData())
	case *ortgo.Tensor[int8]:
		t.Datatype, data = tensor.Int8, bytesOf(x.GetData())
	case *ortgo.Tensor[uint16]:
		t.Datatype, data = tensor.Uint16, bytesOf(x.GetData())
	case *ortgo.Tensor[int16]:
		t.Datatype, data = tensor.Int16, bytesOf(x.GetData())
	case *ortgo.Tensor[uint32]:
		t.Datatype, data = tensor.Uint32, bytesOf(x.GetData())
	case *ortgo.Tensor[int32]:
		t.Datatype, data = tensor.Int32, bytesOf(x.GetData())
	case *ortgo.Tensor[uint64]:
		t.Datatype, data = tensor.Uint64, bytesOf(x.GetData())
	case *ortgo.Tensor[int64]:
		t.Datatype, data = tensor.Int64, bytesOf(x.GetData())
	case *ortgo.Tensor[bool]:
		t.Datatype, data = tensor.Bool, bytesOf(x.GetData())
	default:
		// onnxruntime_go copies other element types (FP16) with a wrong
		// length, so they are refused rather than returned short.
		return tensor.Tensor{}, fmt.Errorf("output %q: element type %d is not supported as an output", name, v.DataType())
	}
	// onnxruntime_go copied the output into this Go slice; it stays valid
	// after the value's Destroy.
	t.Data = data
	return t, nil
}

func bytesOf[T any](s []T) []byte {
	if len(s) == 0 {
		return nil
	}
	var z T
	return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), len(s)*int(unsafe.Sizeof(z)))
}
