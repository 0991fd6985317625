package tensor_test

import (
	"bytes"
	"strings"
	"testing"

	"github.com/visionslice/visionslice/runtime/tensor"
)

func TestValidate(t *testing.T) {
	t.Parallel()
	two := tensor.AppendBytesElement(tensor.AppendBytesElement(nil, []byte("jpeg")), nil)
	tests := []struct {
		name    string
		t       tensor.Tensor
		wantErr string
	}{
		{name: "fp32 2x2", t: tensor.Tensor{Name: "x", Datatype: tensor.FP32, Shape: []int64{2, 2}, Data: make([]byte, 16)}},
		{name: "empty dim", t: tensor.Tensor{Name: "x", Datatype: tensor.Int64, Shape: []int64{0, 3}}},
		{name: "scalar", t: tensor.Tensor{Name: "x", Datatype: tensor.Uint8, Data: []byte{1}}},
		{name: "bytes", t: tensor.Tensor{Name: "img", Datatype: tensor.Bytes, Shape: []int64{2}, Data: two}},
		{name: "short data", t: tensor.Tensor{Name: "x", Datatype: tensor.FP32, Shape: []int64{2, 2}, Data: make([]byte, 15)}, wantErr: "wants 16 bytes, data holds 15"},
		{name: "unknown dtype", t: tensor.Tensor{Name: "x", Datatype: "FP8", Shape: []int64{1}}, wantErr: `unknown datatype "FP8"`},
		{name: "negative dim", t: tensor.Tensor{Name: "x", Datatype: tensor.FP32, Shape: []int64{-1, 4}}, wantErr: "negative dimension"},
		{name: "overflow", t: tensor.Tensor{Name: "x", Datatype: tensor.FP32, Shape: []int64{1 << 40, 1 << 40}}, wantErr: "too large"},
		{name: "bytes count", t: tensor.Tensor{Name: "img", Datatype: tensor.Bytes, Shape: []int64{3}, Data: two}, wantErr: "wants 3 BYTES elements, data holds 2"},
		{name: "bytes truncated", t: tensor.Tensor{Name: "img", Datatype: tensor.Bytes, Shape: []int64{1}, Data: []byte{9, 0, 0, 0, 'a'}}, wantErr: "overruns"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tc.t.Validate()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func TestDataTypeSizes(t *testing.T) {
	t.Parallel()
	for dt, want := range map[tensor.DataType]int{tensor.Bool: 1, tensor.FP16: 2, tensor.FP32: 4, tensor.Int64: 8, tensor.Bytes: 0, "NOPE": -1} {
		if got := dt.Size(); got != want {
			t.Errorf("%s.Size() = %d, want %d", dt, got, want)
		}
	}
}

// FuzzBytesElements: BYTES data comes from clients; splitting it never
// panics and what it returns re-encodes to the same bytes.
func FuzzBytesElements(f *testing.F) {
	f.Add(tensor.AppendBytesElement(nil, []byte("abc")))
	f.Add([]byte{255, 255, 255, 255, 1})
	f.Add([]byte{1, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		els, err := tensor.BytesElements(data)
		if err != nil {
			return
		}
		var back []byte
		for _, el := range els {
			back = tensor.AppendBytesElement(back, el)
		}
		if !bytes.Equal(back, data) {
			t.Fatalf("elements of %x re-encode to %x", data, back)
		}
	})
}
