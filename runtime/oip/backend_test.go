package oip

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// testBackend computes for real: "double" returns y = 2x (FP32, batch 8),
// "lengths" returns the length of each BYTES element (INT64, batch 8), and
// "cold" is never ready.
type testBackend struct{ models map[string]*testModel }

type testModel struct {
	md    ModelMetadata
	ready bool
	wait  bool
	fn    func(inputs []tensor.Tensor) []tensor.Tensor
}

func newTestBackend() *testBackend {
	double := &testModel{ready: true, md: ModelMetadata{Name: "double", Version: "1", Versions: []string{"1"}, Platform: "onnxruntime", MaxBatchSize: 8,
		Inputs:  []TensorMetadata{{Name: "x", Datatype: tensor.FP32, Shape: []int64{-1, 2}}},
		Outputs: []TensorMetadata{{Name: "y", Datatype: tensor.FP32, Shape: []int64{-1, 2}}, {Name: "sum", Datatype: tensor.FP64, Shape: []int64{-1}}}}}
	double.fn = func(in []tensor.Tensor) []tensor.Tensor {
		x := in[0]
		y := tensor.Tensor{Name: "y", Datatype: tensor.FP32, Shape: x.Shape, Data: make([]byte, len(x.Data))}
		sum := tensor.Tensor{Name: "sum", Datatype: tensor.FP64, Shape: x.Shape[:1]}
		var s float64
		for i := 0; i < len(x.Data); i += 4 {
			v := math.Float32frombits(binary.LittleEndian.Uint32(x.Data[i:]))
			binary.LittleEndian.PutUint32(y.Data[i:], math.Float32bits(2*v))
			s += float64(v)
			if (i/4)%2 == 1 {
				sum.Data = binary.LittleEndian.AppendUint64(sum.Data, math.Float64bits(s))
				s = 0
			}
		}
		return []tensor.Tensor{y, sum}
	}
	lengths := &testModel{ready: true, md: ModelMetadata{Name: "lengths", Version: "3", Versions: []string{"3"}, Platform: "onnxruntime", MaxBatchSize: 8,
		Inputs:  []TensorMetadata{{Name: "image", Datatype: tensor.Bytes, Shape: []int64{-1}}},
		Outputs: []TensorMetadata{{Name: "len", Datatype: tensor.Int64, Shape: []int64{-1}}}}}
	lengths.fn = func(in []tensor.Tensor) []tensor.Tensor {
		els, _ := tensor.BytesElements(in[0].Data)
		out := tensor.Tensor{Name: "len", Datatype: tensor.Int64, Shape: in[0].Shape}
		for _, e := range els {
			out.Data = binary.LittleEndian.AppendUint64(out.Data, uint64(len(e)))
		}
		return []tensor.Tensor{out}
	}
	cold := &testModel{md: ModelMetadata{Name: "cold", Version: "1", Versions: []string{"1"}, Platform: "onnxruntime",
		Inputs:  []TensorMetadata{{Name: "x", Datatype: tensor.FP32, Shape: []int64{1}}},
		Outputs: []TensorMetadata{{Name: "y", Datatype: tensor.FP32, Shape: []int64{1}}}}}
	pair := &testModel{ready: true, md: ModelMetadata{Name: "pair", Version: "1", Versions: []string{"1"}, Platform: "onnxruntime",
		Inputs:  []TensorMetadata{{Name: "a", Datatype: tensor.Int64, Shape: []int64{1}}, {Name: "b", Datatype: tensor.Int64, Shape: []int64{1}}},
		Outputs: []TensorMetadata{{Name: "a", Datatype: tensor.Int64, Shape: []int64{1}}}}}
	pair.fn = func(in []tensor.Tensor) []tensor.Tensor { return in[:1] }
	// "sleepy" answers only when the request's context ends.
	sleepy := &testModel{ready: true, wait: true, md: ModelMetadata{Name: "sleepy", Version: "1", Versions: []string{"1"}, Platform: "onnxruntime",
		Inputs:  []TensorMetadata{{Name: "x", Datatype: tensor.FP32, Shape: []int64{1}}},
		Outputs: []TensorMetadata{{Name: "x", Datatype: tensor.FP32, Shape: []int64{1}}}}}
	sleepy.fn = func(in []tensor.Tensor) []tensor.Tensor { return in }
	return &testBackend{models: map[string]*testModel{"double": double, "lengths": lengths, "cold": cold, "pair": pair, "sleepy": sleepy}}
}

func (b *testBackend) Ready() bool { return false } // "cold" never is

func (b *testBackend) Model(name, version string) (Model, error) {
	m, ok := b.models[name]
	if !ok {
		return nil, fmt.Errorf("model %q: %w", name, inferr.ErrNotFound)
	}
	if version != "" && version != m.md.Version {
		return nil, fmt.Errorf("model %q version %q: %w", name, version, inferr.ErrNotFound)
	}
	return m, nil
}

func (m *testModel) Metadata() *ModelMetadata { return &m.md }
func (m *testModel) Ready() bool              { return m.ready }

func (m *testModel) Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	if m.wait {
		<-ctx.Done()
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	all := m.fn(inputs)
	out := make([]tensor.Tensor, 0, len(outputs))
	for _, name := range outputs {
		for _, t := range all {
			if t.Name == name {
				out = append(out, t)
			}
		}
	}
	return out, nil
}
