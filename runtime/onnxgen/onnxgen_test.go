package onnxgen_test

import (
	"testing"

	"github.com/visionslice/visionslice/runtime/onnxgen"
	"github.com/visionslice/visionslice/runtime/tensor"
)

func TestMarshalRejectsBadGraphs(t *testing.T) {
	t.Parallel()
	x := onnxgen.Value{Name: "x", Datatype: tensor.FP32, Shape: []int64{2}}
	id := onnxgen.Node{Op: "Identity", Inputs: []string{"x"}, Outputs: []string{"y"}}
	for name, g := range map[string]onnxgen.Graph{
		"no nodes":          {Inputs: []onnxgen.Value{x}, Outputs: []onnxgen.Value{x}},
		"node without op":   {Nodes: []onnxgen.Node{{}}, Inputs: []onnxgen.Value{x}, Outputs: []onnxgen.Value{x}},
		"unknown datatype":  {Nodes: []onnxgen.Node{id}, Inputs: []onnxgen.Value{{Name: "x", Datatype: "COMPLEX"}}, Outputs: []onnxgen.Value{x}},
		"short initializer": {Nodes: []onnxgen.Node{id}, Inputs: []onnxgen.Value{x}, Outputs: []onnxgen.Value{x}, Initializers: []onnxgen.Initializer{{Name: "w", Datatype: tensor.FP32, Dims: []int64{2}, Raw: []byte{1}}}},
		"BYTES initializer": {Nodes: []onnxgen.Node{id}, Inputs: []onnxgen.Value{x}, Outputs: []onnxgen.Value{x}, Initializers: []onnxgen.Initializer{{Name: "w", Datatype: tensor.Bytes}}},
	} {
		m := onnxgen.Model{Graph: g}
		if _, err := m.Marshal(); err == nil {
			t.Errorf("%s: marshalled", name)
		}
	}
	m := onnxgen.Model{Graph: onnxgen.Graph{Nodes: []onnxgen.Node{id}, Inputs: []onnxgen.Value{x}, Outputs: []onnxgen.Value{x}}}
	a, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := m.Marshal()
	if string(a) != string(b) || len(a) < 40 {
		t.Fatalf("encoding is not deterministic or too short (%d bytes)", len(a))
	}
}

func TestFP32RoundTrip(t *testing.T) {
	t.Parallel()
	in := []float32{1.5, -2, 0, 3.25}
	tt := onnxgen.FP32("x", []int64{2, 2}, in...)
	if err := tt.Validate(); err != nil {
		t.Fatal(err)
	}
	for i, v := range onnxgen.Float32s(tt) {
		if v != in[i] {
			t.Fatalf("value %d = %v, want %v", i, v, in[i])
		}
	}
}
