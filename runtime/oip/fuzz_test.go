package oip

import (
	"strconv"
	"testing"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// FuzzParseJSONRequest: any body either parses into tensors that validate or
// fails with an error; never a panic.
func FuzzParseJSONRequest(f *testing.F) {
	for _, s := range []string{
		`{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4]]}]}`,
		`{"inputs":[{"name":"s","shape":[2],"datatype":"BYTES","data":["a","bc"]}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}`,
		`{"inputs":[{"name":"b","shape":[3],"datatype":"BOOL","data":[true,false,true]}]}`,
		`{"inputs":[{"name":"h","shape":[1],"datatype":"FP16","data":[65504]}]}`,
		`{"inputs":[{"name":"i","shape":[1],"datatype":"INT8","data":[-128]}],"parameters":{"binary_data_output":true}}`,
		`{"inputs":[{"name":"x","shape":[0],"datatype":"UINT64","data":[]}]}`,
		`[`, `{}`, `{"inputs":[{"data":{}}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := parseInferRequest(body, -1)
		if err != nil {
			return
		}
		for i := range req.Inputs {
			if err := req.Inputs[i].Validate(); err != nil {
				t.Fatalf("parsed input does not validate: %v", err)
			}
			if _, err := appendJSONData(nil, &req.Inputs[i]); err != nil && req.Inputs[i].Datatype != tensor.Bytes {
				t.Fatalf("parsed input does not re-encode: %v", err)
			}
		}
	})
}

// FuzzParseBinaryRequest: the binary tensor data extension with any header
// length and binary section.
func FuzzParseBinaryRequest(f *testing.F) {
	h := `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}`
	f.Add([]byte(h+"\x00\x00\x80?\x00\x00\x00@"), len(h))
	hb := `{"inputs":[{"name":"s","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":7}}]}`
	f.Add([]byte(hb+"\x03\x00\x00\x00abc"), len(hb))
	f.Add([]byte(h), len(h)+5)
	f.Add([]byte("{}"), -3)
	f.Fuzz(func(t *testing.T, body []byte, headerLen int) {
		if headerLen < 0 {
			headerLen = -headerLen
		}
		req, err := parseInferRequest(body, headerLen)
		if err != nil {
			return
		}
		total := 0
		for i := range req.Inputs {
			total += len(req.Inputs[i].Data)
		}
		if headerLen > len(body) {
			t.Fatalf("accepted header length %d over body %s", headerLen, strconv.Itoa(len(body)))
		}
	})
}

func TestHalfRoundTrip(t *testing.T) {
	t.Parallel()
	for _, f := range []float32{0, 1, -2, 0.5, 65504, 6.1035156e-05, 5.9604645e-08, 1.5, -0.333251953125} {
		if got := halfToFloat32(float32ToHalf(f)); got != f {
			t.Errorf("%v -> %#04x -> %v", f, float32ToHalf(f), got)
		}
	}
	if float32ToHalf(1e6) != 0x7c00 || float32ToHalf(1e-10) != 0 {
		t.Error("overflow/underflow")
	}
}
