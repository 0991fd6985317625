package onnxgen

import (
	"encoding/binary"
	"math"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// FP32 returns an FP32 tensor of the given values, for tests of generated
// models.
func FP32(name string, shape []int64, v ...float32) tensor.Tensor {
	b := make([]byte, 0, 4*len(v))
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(x))
	}
	return tensor.Tensor{Name: name, Datatype: tensor.FP32, Shape: shape, Data: b}
}

// Float32s returns an FP32 tensor's values.
func Float32s(t tensor.Tensor) []float32 {
	out := make([]float32, len(t.Data)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.Data[4*i:]))
	}
	return out
}
