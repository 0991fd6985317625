package oip

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/x448/float16"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// jsonRequest is the body of POST .../infer (the JSON part when the binary
// extension is used).
type jsonRequest struct {
	ID         string                     `json:"id,omitempty"`
	Parameters map[string]json.RawMessage `json:"parameters,omitempty"`
	Inputs     []jsonInput                `json:"inputs"`
	Outputs    []jsonOutputRequest        `json:"outputs,omitempty"`
}

type jsonInput struct {
	Name       string                     `json:"name"`
	Shape      []int64                    `json:"shape"`
	Datatype   tensor.DataType            `json:"datatype"`
	Parameters map[string]json.RawMessage `json:"parameters,omitempty"`
	Data       json.RawMessage            `json:"data,omitempty"`
}

type jsonOutputRequest struct {
	Name       string                     `json:"name"`
	Parameters map[string]json.RawMessage `json:"parameters,omitempty"`
}

type jsonResponse struct {
	ModelName    string       `json:"model_name"`
	ModelVersion string       `json:"model_version,omitempty"`
	ID           string       `json:"id,omitempty"`
	Outputs      []jsonOutput `json:"outputs"`
}

type jsonOutput struct {
	Name       string          `json:"name"`
	Datatype   tensor.DataType `json:"datatype"`
	Shape      []int64         `json:"shape"`
	Parameters map[string]any  `json:"parameters,omitempty"`
	Data       json.RawMessage `json:"data,omitempty"`
}

// decodedRequest is a parsed infer request.
type decodedRequest struct {
	ID      string
	Inputs  []tensor.Tensor
	Outputs []string
	// BinaryOutputs says, per name in Outputs, whether it goes into the
	// binary section of the response.
	BinaryOutputs map[string]bool
	// Timeout from the request's "timeout" parameter (microseconds, as
	// Triton's), 0 when absent.
	Timeout time.Duration
	// version is the model version a raw body was decoded for ("" for
	// other bodies): inference goes to that version, not to a second pick
	// of the default (which would advance a canary's split once more).
	version string
}

// parseInferRequest parses an infer body. headerLen < 0 means the whole body
// is JSON; otherwise the first headerLen bytes are JSON and the rest is the
// binary section of the binary tensor data extension.
func parseInferRequest(body []byte, headerLen int) (*decodedRequest, error) {
	header, binSection := body, []byte(nil)
	if headerLen >= 0 {
		if headerLen > len(body) {
			return nil, invalid("Inference-Header-Content-Length %d exceeds the body of %d bytes", headerLen, len(body))
		}
		header, binSection = body[:headerLen], body[headerLen:]
	}
	var jr jsonRequest
	dec := json.NewDecoder(bytes.NewReader(header))
	if err := dec.Decode(&jr); err != nil {
		return nil, invalid("malformed JSON request: %s", jsonErr(err))
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, invalid("malformed JSON request: trailing data after the object")
	}
	if len(jr.Inputs) == 0 {
		return nil, invalid("request has no inputs")
	}
	allBinary, err := boolParam(jr.Parameters, "binary_data_output")
	if err != nil {
		return nil, err
	}
	req := &decodedRequest{ID: jr.ID, Inputs: make([]tensor.Tensor, len(jr.Inputs)), BinaryOutputs: map[string]bool{}}
	us, _, err := intParam(jr.Parameters, "timeout")
	if err != nil {
		return nil, invalid("%s", err.Error())
	}
	if req.Timeout, err = timeoutParam(us); err != nil {
		return nil, err
	}
	off := 0
	for i, in := range jr.Inputs {
		if in.Name == "" {
			return nil, invalid("inputs[%d] has no name", i)
		}
		if !in.Datatype.Valid() {
			return nil, invalid("input %q: unknown datatype %q", in.Name, in.Datatype)
		}
		if in.Shape == nil {
			return nil, invalid("input %q has no shape", in.Name)
		}
		n, err := tensor.Elements(in.Shape)
		if err != nil {
			return nil, invalid("input %q: %s", in.Name, err.Error())
		}
		t := tensor.Tensor{Name: in.Name, Datatype: in.Datatype, Shape: in.Shape}
		size, hasSize, err := intParam(in.Parameters, "binary_data_size")
		if err != nil {
			return nil, invalid("input %q: %s", in.Name, err.Error())
		}
		if hasSize {
			if headerLen < 0 {
				return nil, invalid("input %q has binary_data_size but the request has no Inference-Header-Content-Length", in.Name)
			}
			if len(in.Data) > 0 {
				return nil, invalid("input %q has both data and binary_data_size", in.Name)
			}
			if size < 0 || size > int64(len(binSection)-off) {
				return nil, invalid("input %q: binary_data_size %d overruns the binary section (%d bytes left)", in.Name, size, len(binSection)-off)
			}
			t.Data = binSection[off : off+int(size) : off+int(size)]
			off += int(size)
		} else {
			if len(in.Data) == 0 {
				return nil, invalid("input %q has no data", in.Name)
			}
			t.Data, err = decodeJSONData(in.Data, in.Datatype, n)
			if err != nil {
				return nil, invalid("input %q: %s", in.Name, err.Error())
			}
		}
		req.Inputs[i] = t
	}
	if off != len(binSection) {
		return nil, invalid("binary section has %d bytes, inputs' binary_data_size add up to %d", len(binSection), off)
	}
	for i, o := range jr.Outputs {
		if o.Name == "" {
			return nil, invalid("outputs[%d] has no name", i)
		}
		b, err := boolParam(o.Parameters, "binary_data")
		if err != nil {
			return nil, invalid("output %q: %s", o.Name, err.Error())
		}
		_, set := o.Parameters["binary_data"]
		req.Outputs = append(req.Outputs, o.Name)
		req.BinaryOutputs[o.Name] = b || (!set && allBinary)
	}
	if len(jr.Outputs) == 0 && allBinary {
		req.BinaryOutputs["*"] = true
	}
	return req, nil
}

func jsonErr(err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("%s at byte %d", se.Error(), se.Offset)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("field %q: cannot use a JSON %s as %s", te.Field, te.Value, te.Type)
	}
	return err.Error()
}

func boolParam(p map[string]json.RawMessage, key string) (bool, error) {
	raw, ok := p[key]
	if !ok {
		return false, nil
	}
	var b bool
	if err := json.Unmarshal(raw, &b); err != nil {
		return false, invalid("parameter %s must be a boolean", key)
	}
	return b, nil
}

func intParam(p map[string]json.RawMessage, key string) (int64, bool, error) {
	raw, ok := p[key]
	if !ok {
		return 0, false, nil
	}
	var n int64
	if err := json.Unmarshal(raw, &n); err != nil {
		return 0, false, fmt.Errorf("parameter %s must be an integer", key)
	}
	return n, true, nil
}

// decodeJSONData flattens a (possibly nested) JSON array of want elements of
// datatype dt into the binary tensor layout.
func decodeJSONData(raw json.RawMessage, dt tensor.DataType, want int64) ([]byte, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	size := dt.Size()
	var out []byte
	if size > 0 && want <= 1<<28 {
		out = make([]byte, 0, want*int64(size))
	}
	depth := 0
	var count int64
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("malformed data: %s", jsonErr(err))
		}
		switch v := tok.(type) {
		case json.Delim:
			switch v {
			case '[':
				depth++
			case ']':
				depth--
			default:
				return nil, fmt.Errorf("data must be an array of values, found an object")
			}
			continue
		}
		if count++; count > want {
			return nil, fmt.Errorf("data has more than the %d elements the shape describes", want)
		}
		out, err = appendValue(out, dt, tok)
		if err != nil {
			return nil, fmt.Errorf("data element %d: %w", count-1, err)
		}
	}
	if depth != 0 {
		return nil, fmt.Errorf("malformed data: unbalanced brackets")
	}
	if count != want {
		return nil, fmt.Errorf("data has %d elements, shape describes %d", count, want)
	}
	return out, nil
}

func appendValue(out []byte, dt tensor.DataType, tok json.Token) ([]byte, error) {
	le := binary.LittleEndian
	if dt == tensor.Bool {
		b, ok := tok.(bool)
		if !ok {
			return nil, fmt.Errorf("want a boolean, got %v", tok)
		}
		if b {
			return append(out, 1), nil
		}
		return append(out, 0), nil
	}
	if dt == tensor.Bytes {
		s, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("want a string, got %v", tok)
		}
		return tensor.AppendBytesElement(out, []byte(s)), nil
	}
	num, ok := tok.(json.Number)
	if !ok {
		return nil, fmt.Errorf("want a number, got %v", tok)
	}
	switch dt {
	case tensor.FP32, tensor.FP64, tensor.FP16:
		f, err := strconv.ParseFloat(string(num), 64)
		if err != nil {
			return nil, fmt.Errorf("%s is not a number", num)
		}
		switch dt {
		case tensor.FP32:
			return le.AppendUint32(out, math.Float32bits(float32(f))), nil
		case tensor.FP64:
			return le.AppendUint64(out, math.Float64bits(f)), nil
		default:
			return le.AppendUint16(out, float32ToHalf(float32(f))), nil
		}
	case tensor.Uint8, tensor.Uint16, tensor.Uint32, tensor.Uint64:
		bits := dt.Size() * 8
		u, err := strconv.ParseUint(string(num), 10, bits)
		if err != nil {
			return nil, fmt.Errorf("%s is not a %s", num, dt)
		}
		return appendUint(out, u, dt.Size()), nil
	default: // signed
		bits := dt.Size() * 8
		i, err := strconv.ParseInt(string(num), 10, bits)
		if err != nil {
			return nil, fmt.Errorf("%s is not a %s", num, dt)
		}
		return appendUint(out, uint64(i), dt.Size()), nil
	}
}

func appendUint(out []byte, u uint64, size int) []byte {
	switch size {
	case 1:
		return append(out, byte(u))
	case 2:
		return binary.LittleEndian.AppendUint16(out, uint16(u))
	case 4:
		return binary.LittleEndian.AppendUint32(out, uint32(u))
	}
	return binary.LittleEndian.AppendUint64(out, u)
}

// appendJSONData writes t's elements as a flat JSON array.
func appendJSONData(dst []byte, t *tensor.Tensor) ([]byte, error) {
	le := binary.LittleEndian
	dst = append(dst, '[')
	size := t.Datatype.Size()
	if t.Datatype == tensor.Bytes {
		els, err := tensor.BytesElements(t.Data)
		if err != nil {
			return nil, fmt.Errorf("output %q: %w", t.Name, err)
		}
		for i, el := range els {
			if i > 0 {
				dst = append(dst, ',')
			}
			if !utf8.Valid(el) {
				return nil, fmt.Errorf("output %q holds binary BYTES; request it with binary_data", t.Name)
			}
			b, _ := json.Marshal(string(el))
			dst = append(dst, b...)
		}
		return append(dst, ']'), nil
	}
	if size <= 0 || len(t.Data)%size != 0 {
		return nil, fmt.Errorf("output %q: %d bytes of %s", t.Name, len(t.Data), t.Datatype)
	}
	for i := 0; i < len(t.Data); i += size {
		if i > 0 {
			dst = append(dst, ',')
		}
		d := t.Data[i:]
		switch t.Datatype {
		case tensor.Bool:
			dst = strconv.AppendBool(dst, d[0] != 0)
		case tensor.Uint8:
			dst = strconv.AppendUint(dst, uint64(d[0]), 10)
		case tensor.Uint16:
			dst = strconv.AppendUint(dst, uint64(le.Uint16(d)), 10)
		case tensor.Uint32:
			dst = strconv.AppendUint(dst, uint64(le.Uint32(d)), 10)
		case tensor.Uint64:
			dst = strconv.AppendUint(dst, le.Uint64(d), 10)
		case tensor.Int8:
			dst = strconv.AppendInt(dst, int64(int8(d[0])), 10)
		case tensor.Int16:
			dst = strconv.AppendInt(dst, int64(int16(le.Uint16(d))), 10)
		case tensor.Int32:
			dst = strconv.AppendInt(dst, int64(int32(le.Uint32(d))), 10)
		case tensor.Int64:
			dst = strconv.AppendInt(dst, int64(le.Uint64(d)), 10)
		case tensor.FP16:
			dst = appendFloat(dst, float64(halfToFloat32(le.Uint16(d))), 32)
		case tensor.FP32:
			dst = appendFloat(dst, float64(math.Float32frombits(le.Uint32(d))), 32)
		case tensor.FP64:
			dst = appendFloat(dst, math.Float64frombits(le.Uint64(d)), 64)
		}
	}
	return append(dst, ']'), nil
}

// appendFloat writes NaN and infinities as strings (JSON has no literal for
// them), as other Open Inference Protocol servers do.
func appendFloat(dst []byte, f float64, bits int) []byte {
	switch {
	case math.IsNaN(f):
		return append(dst, `"NaN"`...)
	case math.IsInf(f, 1):
		return append(dst, `"Infinity"`...)
	case math.IsInf(f, -1):
		return append(dst, `"-Infinity"`...)
	}
	return strconv.AppendFloat(dst, f, 'g', -1, bits)
}

// float32ToHalf converts to IEEE 754 binary16, rounding to nearest even.
func float32ToHalf(f float32) uint16 { return float16.Fromfloat32(f).Bits() }

func halfToFloat32(h uint16) float32 { return float16.Frombits(h).Float32() }

// timeoutParam converts the "timeout" request parameter (microseconds).
func timeoutParam(us int64) (time.Duration, error) {
	if us < 0 || us > int64(24*time.Hour/time.Microsecond) {
		return 0, invalid("parameter timeout %d µs must be within 0..86400000000", us)
	}
	return time.Duration(us) * time.Microsecond, nil
}
