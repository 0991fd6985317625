// Package onnxgen writes small ONNX models (ModelProto, protobuf wire format)
// in memory, so that tests can load real models of chosen operators, dtypes
// and shapes into ONNX Runtime without model files on disk.
//
// It encodes the handful of ModelProto fields a single-graph model needs,
// with field numbers taken from the published onnx.proto; nothing else of
// the ONNX format is covered.
package onnxgen

import (
	"errors"
	"fmt"
	"math"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// Dynamic marks a dimension whose size is chosen at run time.
const Dynamic int64 = -1

// Model is one ONNX model: a single graph in the default operator domain.
type Model struct {
	// Opset of the default domain (default 13).
	Opset int64
	// IRVersion of the file (default 8).
	IRVersion int64
	Graph     Graph
}

// Graph is the model's computation.
type Graph struct {
	Name         string
	Nodes        []Node
	Inputs       []Value
	Outputs      []Value
	Initializers []Initializer
}

// Node is one operator application.
type Node struct {
	Op      string
	Inputs  []string
	Outputs []string
	Attrs   []Attr
}

// Attr is an integer, integers or float attribute of a node.
type Attr struct {
	Name  string
	Int   *int64
	Ints  []int64
	Float *float32
}

// IntAttr returns an integer attribute.
func IntAttr(name string, v int64) Attr { return Attr{Name: name, Int: &v} }

// IntsAttr returns an integer-list attribute.
func IntsAttr(name string, v ...int64) Attr { return Attr{Name: name, Ints: v} }

// FloatAttr returns a float attribute.
func FloatAttr(name string, v float32) Attr { return Attr{Name: name, Float: &v} }

// Value declares a graph input or output: a tensor of a datatype and shape.
// A Dynamic dimension gets the symbolic name "d<index>" ("batch" for index 0).
type Value struct {
	Name     string
	Datatype tensor.DataType
	Shape    []int64
}

// Initializer is a constant tensor in raw little-endian layout.
type Initializer struct {
	Name     string
	Datatype tensor.DataType
	Dims     []int64
	Raw      []byte
}

// ONNX TensorProto.DataType values.
var elemTypes = map[tensor.DataType]int64{
	tensor.FP32: 1, tensor.Uint8: 2, tensor.Int8: 3, tensor.Uint16: 4, tensor.Int16: 5,
	tensor.Int32: 6, tensor.Int64: 7, tensor.Bytes: 8, tensor.Bool: 9, tensor.FP16: 10,
	tensor.FP64: 11, tensor.Uint32: 12, tensor.Uint64: 13,
}

// Marshal encodes the model as ONNX ModelProto bytes.
func (m *Model) Marshal() ([]byte, error) {
	opset, ir := m.Opset, m.IRVersion
	if opset == 0 {
		opset = 13
	}
	if ir == 0 {
		ir = 8
	}
	g, err := m.Graph.marshal()
	if err != nil {
		return nil, err
	}
	var b []byte
	b = appendInt(b, 1, ir)               // ir_version
	b = appendString(b, 2, "visionslice") // producer_name
	var os []byte
	os = appendString(os, 1, "") // domain: default
	os = appendInt(os, 2, opset) // version
	b = appendBytes(b, 8, os)    // opset_import
	b = appendBytes(b, 7, g)     // graph
	return b, nil
}

func (g *Graph) marshal() ([]byte, error) {
	if len(g.Nodes) == 0 || len(g.Inputs) == 0 || len(g.Outputs) == 0 {
		return nil, errors.New("onnxgen: a graph needs nodes, inputs and outputs")
	}
	name := g.Name
	if name == "" {
		name = "graph"
	}
	var b []byte
	for i, n := range g.Nodes {
		nb, err := n.marshal(i)
		if err != nil {
			return nil, err
		}
		b = appendBytes(b, 1, nb) // node
	}
	b = appendString(b, 2, name)
	for _, in := range g.Initializers {
		ib, err := in.marshal()
		if err != nil {
			return nil, err
		}
		b = appendBytes(b, 5, ib) // initializer
	}
	for _, v := range g.Inputs {
		vb, err := v.marshal()
		if err != nil {
			return nil, err
		}
		b = appendBytes(b, 11, vb) // input
	}
	for _, v := range g.Outputs {
		vb, err := v.marshal()
		if err != nil {
			return nil, err
		}
		b = appendBytes(b, 12, vb) // output
	}
	return b, nil
}

func (n *Node) marshal(i int) ([]byte, error) {
	if n.Op == "" {
		return nil, fmt.Errorf("onnxgen: node %d has no operator", i)
	}
	var b []byte
	for _, s := range n.Inputs {
		b = appendString(b, 1, s)
	}
	for _, s := range n.Outputs {
		b = appendString(b, 2, s)
	}
	b = appendString(b, 3, fmt.Sprintf("%s_%d", n.Op, i))
	b = appendString(b, 4, n.Op)
	for _, a := range n.Attrs {
		var ab []byte
		ab = appendString(ab, 1, a.Name)
		switch {
		case a.Float != nil:
			ab = protowire.AppendTag(ab, 2, protowire.Fixed32Type)
			ab = protowire.AppendFixed32(ab, math.Float32bits(*a.Float))
			ab = appendInt(ab, 20, 1) // type FLOAT
		case a.Int != nil:
			ab = appendInt(ab, 3, *a.Int)
			ab = appendInt(ab, 20, 2) // type INT
		default:
			var packed []byte
			for _, v := range a.Ints {
				packed = protowire.AppendVarint(packed, uint64(v))
			}
			ab = appendBytes(ab, 8, packed)
			ab = appendInt(ab, 20, 7) // type INTS
		}
		b = appendBytes(b, 5, ab)
	}
	return b, nil
}

func (v *Value) marshal() ([]byte, error) {
	et, ok := elemTypes[v.Datatype]
	if !ok {
		return nil, fmt.Errorf("onnxgen: value %q: unknown datatype %q", v.Name, v.Datatype)
	}
	var shape []byte
	for i, d := range v.Shape {
		var db []byte
		if d == Dynamic {
			p := fmt.Sprintf("d%d", i)
			if i == 0 {
				p = "batch"
			}
			db = appendString(db, 2, p) // dim_param
		} else {
			db = appendInt(db, 1, d) // dim_value
		}
		shape = appendBytes(shape, 1, db)
	}
	var tt []byte
	tt = appendInt(tt, 1, et)
	tt = protowire.AppendTag(tt, 2, protowire.BytesType) // shape, even when empty (scalar)
	tt = protowire.AppendBytes(tt, shape)
	var typ []byte
	typ = appendBytes(typ, 1, tt) // tensor_type
	var b []byte
	b = appendString(b, 1, v.Name)
	b = appendBytes(b, 2, typ)
	return b, nil
}

func (t *Initializer) marshal() ([]byte, error) {
	et, ok := elemTypes[t.Datatype]
	if !ok || t.Datatype == tensor.Bytes {
		return nil, fmt.Errorf("onnxgen: initializer %q: unsupported datatype %q", t.Name, t.Datatype)
	}
	n, err := tensor.Elements(t.Dims)
	if err != nil {
		return nil, fmt.Errorf("onnxgen: initializer %q: %w", t.Name, err)
	}
	if n*int64(t.Datatype.Size()) != int64(len(t.Raw)) {
		return nil, fmt.Errorf("onnxgen: initializer %q: dims %v want %d bytes, got %d", t.Name, t.Dims, n*int64(t.Datatype.Size()), len(t.Raw))
	}
	var b []byte
	for _, d := range t.Dims {
		b = appendInt(b, 1, d)
	}
	b = appendInt(b, 2, et)
	b = appendString(b, 8, t.Name)
	b = appendBytes(b, 9, t.Raw)
	return b, nil
}

func appendInt(b []byte, num protowire.Number, v int64) []byte {
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, uint64(v))
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func appendBytes(b []byte, num protowire.Number, v []byte) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}
