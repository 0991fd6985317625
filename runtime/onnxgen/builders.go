package onnxgen

import (
	"encoding/binary"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// Unary returns a model y = op(x) with x and y of one datatype and shape
// (e.g. "Identity", "Relu", "Neg").
func Unary(op string, dt tensor.DataType, shape []int64) ([]byte, error) {
	m := Model{Graph: Graph{
		Name:    op,
		Nodes:   []Node{{Op: op, Inputs: []string{"x"}, Outputs: []string{"y"}}},
		Inputs:  []Value{{Name: "x", Datatype: dt, Shape: shape}},
		Outputs: []Value{{Name: "y", Datatype: dt, Shape: shape}},
	}}
	return m.Marshal()
}

// Binary returns a model c = op(a, b) ("Add", "Mul", "Sub", ...) with
// inputs and output of one datatype and shape.
func Binary(op string, dt tensor.DataType, shape []int64) ([]byte, error) {
	m := Model{Graph: Graph{
		Name:    op,
		Nodes:   []Node{{Op: op, Inputs: []string{"a", "b"}, Outputs: []string{"c"}}},
		Inputs:  []Value{{Name: "a", Datatype: dt, Shape: shape}, {Name: "b", Datatype: dt, Shape: shape}},
		Outputs: []Value{{Name: "c", Datatype: dt, Shape: shape}},
	}}
	return m.Marshal()
}

// ReduceSum returns a model y = ReduceSum(x, axes) (opset 13, axes as an
// initializer) with keepdims 0, plus a second output z = Identity(x), so a
// test can request one output of several.
func ReduceSum(dt tensor.DataType, shape []int64, axes ...int64) ([]byte, error) {
	raw := make([]byte, 0, 8*len(axes))
	for _, a := range axes {
		raw = binary.LittleEndian.AppendUint64(raw, uint64(a))
	}
	out := make([]int64, 0, len(shape))
	for i, d := range shape {
		reduced := false
		for _, a := range axes {
			if int64(i) == a {
				reduced = true
			}
		}
		if !reduced {
			out = append(out, d)
		}
	}
	m := Model{Graph: Graph{
		Name: "reduce_sum",
		Nodes: []Node{
			{Op: "ReduceSum", Inputs: []string{"x", "axes"}, Outputs: []string{"y"}, Attrs: []Attr{IntAttr("keepdims", 0)}},
			{Op: "Identity", Inputs: []string{"x"}, Outputs: []string{"z"}},
		},
		Inputs:       []Value{{Name: "x", Datatype: dt, Shape: shape}},
		Outputs:      []Value{{Name: "y", Datatype: dt, Shape: out}, {Name: "z", Datatype: dt, Shape: shape}},
		Initializers: []Initializer{{Name: "axes", Datatype: tensor.Int64, Dims: []int64{int64(len(axes))}, Raw: raw}},
	}}
	return m.Marshal()
}
