// Package tensor holds the tensor type shared by the inference front end, the
// batcher and the model workers. Data is kept in the layout of the Open
// Inference Protocol's binary tensor extension: fixed-size elements packed
// little-endian in row-major order, and BYTES elements each prefixed by a
// 4-byte little-endian length.
package tensor

import (
	"encoding/binary"
	"fmt"
)

// DataType is an Open Inference Protocol datatype name.
type DataType string

const (
	Bool   DataType = "BOOL"
	Uint8  DataType = "UINT8"
	Uint16 DataType = "UINT16"
	Uint32 DataType = "UINT32"
	Uint64 DataType = "UINT64"
	Int8   DataType = "INT8"
	Int16  DataType = "INT16"
	Int32  DataType = "INT32"
	Int64  DataType = "INT64"
	FP16   DataType = "FP16"
	FP32   DataType = "FP32"
	FP64   DataType = "FP64"
	Bytes  DataType = "BYTES"
)

// Size returns the size of one element in bytes, 0 for BYTES (variable) and
// -1 for an unknown datatype.
func (d DataType) Size() int {
	switch d {
	case Bool, Uint8, Int8:
		return 1
	case Uint16, Int16, FP16:
		return 2
	case Uint32, Int32, FP32:
		return 4
	case Uint64, Int64, FP64:
		return 8
	case Bytes:
		return 0
	}
	return -1
}

// Valid reports whether d is a datatype of the protocol.
func (d DataType) Valid() bool { return d.Size() >= 0 }

// Tensor is one named input or output.
type Tensor struct {
	Name     string
	Datatype DataType
	Shape    []int64
	Data     []byte
}

// Elements returns the number of elements the shape describes, or an error
// for a negative dimension or an overflowing product.
func Elements(shape []int64) (int64, error) {
	n := int64(1)
	for _, d := range shape {
		if d < 0 {
			return 0, fmt.Errorf("shape %v has a negative dimension", shape)
		}
		if d != 0 && n > (1<<62)/d {
			return 0, fmt.Errorf("shape %v is too large", shape)
		}
		n *= d
	}
	return n, nil
}

// Validate checks that the datatype is known and that Data holds exactly the
// elements the shape describes.
func (t *Tensor) Validate() error {
	if !t.Datatype.Valid() {
		return fmt.Errorf("tensor %q: unknown datatype %q", t.Name, t.Datatype)
	}
	n, err := Elements(t.Shape)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", t.Name, err)
	}
	if t.Datatype == Bytes {
		got, err := countBytesElements(t.Data)
		if err != nil {
			return fmt.Errorf("tensor %q: %w", t.Name, err)
		}
		if int64(got) != n {
			return fmt.Errorf("tensor %q: shape %v wants %d BYTES elements, data holds %d", t.Name, t.Shape, n, got)
		}
		return nil
	}
	if want := n * int64(t.Datatype.Size()); int64(len(t.Data)) != want {
		return fmt.Errorf("tensor %q: shape %v of %s wants %d bytes, data holds %d", t.Name, t.Shape, t.Datatype, want, len(t.Data))
	}
	return nil
}

// BytesElements splits BYTES data into its elements (sharing memory with data).
func BytesElements(data []byte) ([][]byte, error) {
	var out [][]byte
	for len(data) > 0 {
		if len(data) < 4 {
			return nil, fmt.Errorf("BYTES data truncated in a length prefix")
		}
		l := binary.LittleEndian.Uint32(data)
		data = data[4:]
		if uint64(l) > uint64(len(data)) {
			return nil, fmt.Errorf("BYTES element of %d bytes overruns the data (%d left)", l, len(data))
		}
		out = append(out, data[:l])
		data = data[l:]
	}
	return out, nil
}

func countBytesElements(data []byte) (int, error) {
	els, err := BytesElements(data)
	return len(els), err
}

// AppendBytesElement appends one length-prefixed BYTES element to dst.
func AppendBytesElement(dst, el []byte) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(el)))
	return append(dst, el...)
}
