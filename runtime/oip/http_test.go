package oip

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/visionslice/visionslice/runtime/tensor"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newHTTP(t *testing.T, opts Options) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(NewServer(newTestBackend(), opts, discard()).Handler())
	t.Cleanup(srv.Close)
	return srv
}

func do(t *testing.T, method, url string, body []byte, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

func TestHTTPHealthAndMetadata(t *testing.T) {
	t.Parallel()
	srv := newHTTP(t, Options{Name: "visionslice", Version: "test"})
	cases := []struct {
		path string
		code int
		want string
	}{
		{"/v2", 200, `"extensions":["binary_tensor_data"]`},
		{"/v2/health/live", 200, ""},
		{"/v2/health/ready", 503, "not every model is ready"},
		{"/v2/models/double", 200, `"inputs":[{"name":"x","datatype":"FP32","shape":[-1,2]}]`},
		{"/v2/models/double/versions/1", 200, `"versions":["1"]`},
		{"/v2/models/double/versions/2", 404, `version \"2\"`},
		{"/v2/models/nope", 404, `model \"nope\"`},
		{"/v2/models/double/ready", 200, ""},
		{"/v2/models/lengths/versions/3/ready", 200, ""},
		{"/v2/models/cold/ready", 503, "not ready"},
	}
	for _, tc := range cases {
		resp, body := do(t, "GET", srv.URL+tc.path, nil, nil)
		if resp.StatusCode != tc.code || !strings.Contains(string(body), tc.want) {
			t.Errorf("GET %s: %d %s, want %d containing %s", tc.path, resp.StatusCode, body, tc.code, tc.want)
		}
		if resp.Header.Get(HeaderRequestID) == "" {
			t.Errorf("GET %s: no %s", tc.path, HeaderRequestID)
		}
	}
	resp, _ := do(t, "POST", srv.URL+"/v2/health/live", nil, nil)
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST live: %d", resp.StatusCode)
	}
}

func TestHTTPInferJSON(t *testing.T) {
	t.Parallel()
	srv := newHTTP(t, Options{})
	body := `{"id":"req-1","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}],
		"outputs":[{"name":"sum"},{"name":"y"}]}`
	resp, b := do(t, "POST", srv.URL+"/v2/models/double/infer", []byte(body), map[string]string{"Content-Type": "application/json", HeaderRequestID: "abc-123"})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	if got := resp.Header.Get(HeaderRequestID); got != "abc-123" {
		t.Errorf("request id echoed as %q", got)
	}
	var r jsonResponse
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	if r.ID != "req-1" || r.ModelName != "double" || r.ModelVersion != "1" || len(r.Outputs) != 2 {
		t.Fatalf("response %s", b)
	}
	if r.Outputs[0].Name != "sum" || string(r.Outputs[0].Data) != "[3,7.5]" {
		t.Errorf("sum = %s", r.Outputs[0].Data)
	}
	if r.Outputs[1].Name != "y" || string(r.Outputs[1].Data) != "[2,4,6,9]" || r.Outputs[1].Shape[0] != 2 {
		t.Errorf("y = %s %v", r.Outputs[1].Data, r.Outputs[1].Shape)
	}
	// curl -d sends a form content type; the JSON still parses.
	resp, b = do(t, "POST", srv.URL+"/v2/models/double/infer", []byte(body), map[string]string{"Content-Type": "application/x-www-form-urlencoded"})
	if resp.StatusCode != 200 {
		t.Errorf("form content type: %d %s", resp.StatusCode, b)
	}
}

func f32bytes(vals ...float32) []byte {
	var b []byte
	for _, v := range vals {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(v))
	}
	return b
}

func TestHTTPInferBinaryExtension(t *testing.T) {
	t.Parallel()
	srv := newHTTP(t, Options{})
	bin := f32bytes(1, 2, 3, 4)
	header := `{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","parameters":{"binary_data_size":16}}],
		"outputs":[{"name":"y","parameters":{"binary_data":true}},{"name":"sum"}]}`
	body := append([]byte(header), bin...)
	resp, b := do(t, "POST", srv.URL+"/v2/models/double/versions/1/infer", body, map[string]string{
		"Content-Type": "application/octet-stream", HeaderInferenceHeaderLength: strconv.Itoa(len(header))})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	hl, err := strconv.Atoi(resp.Header.Get(HeaderInferenceHeaderLength))
	if err != nil || hl > len(b) {
		t.Fatalf("response header length %q", resp.Header.Get(HeaderInferenceHeaderLength))
	}
	var r jsonResponse
	if err := json.Unmarshal(b[:hl], &r); err != nil {
		t.Fatal(err)
	}
	if r.Outputs[0].Parameters["binary_data_size"] != float64(16) || r.Outputs[0].Data != nil {
		t.Errorf("y: %+v", r.Outputs[0])
	}
	if !bytes.Equal(b[hl:], f32bytes(2, 4, 6, 8)) {
		t.Errorf("binary y = %v", b[hl:])
	}
	if string(r.Outputs[1].Data) != "[3,7]" {
		t.Errorf("sum = %s", r.Outputs[1].Data)
	}

	// binary_data_output for all outputs; a BYTES input in the binary section.
	el := tensor.AppendBytesElement(nil, []byte("\xff\xd8jpeg"))
	header = `{"parameters":{"binary_data_output":true},"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":` + strconv.Itoa(len(el)) + `}}]}`
	resp, b = do(t, "POST", srv.URL+"/v2/models/lengths/infer", append([]byte(header), el...), map[string]string{HeaderInferenceHeaderLength: strconv.Itoa(len(header))})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	hl, _ = strconv.Atoi(resp.Header.Get(HeaderInferenceHeaderLength))
	if got := binary.LittleEndian.Uint64(b[hl:]); got != 6 {
		t.Errorf("len = %d", got)
	}
}

func TestHTTPRawImageBody(t *testing.T) {
	t.Parallel()
	srv := newHTTP(t, Options{})
	img := bytes.Repeat([]byte{0xff, 0xd8, 0x00}, 1000)
	resp, b := do(t, "POST", srv.URL+"/v2/models/lengths/infer", img, map[string]string{"Content-Type": "image/jpeg"})
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"data":[3000]`) {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	resp, b = do(t, "POST", srv.URL+"/v2/models/double/infer", img, map[string]string{"Content-Type": "image/jpeg"})
	if resp.StatusCode != 400 || !strings.Contains(string(b), "exactly one BYTES input") {
		t.Fatalf("raw body to an FP32 model: %d %s", resp.StatusCode, b)
	}
}

// pickCounter counts the lookups that name no version: each is a pick of
// the default version, which a canary's split counts.
type pickCounter struct {
	Backend
	picks atomic.Int64
}

func (b *pickCounter) Model(name, version string) (Model, error) {
	if version == "" {
		b.picks.Add(1)
	}
	return b.Backend.Model(name, version)
}

// TestHTTPRawBodyPicksOnce: a raw body is decoded for the model version
// its request is then run on, with one pick of the default version.
func TestHTTPRawBodyPicksOnce(t *testing.T) {
	t.Parallel()
	b := &pickCounter{Backend: newTestBackend()}
	srv := httptest.NewServer(NewServer(b, Options{}, discard()).Handler())
	t.Cleanup(srv.Close)
	resp, body := do(t, "POST", srv.URL+"/v2/models/lengths/infer", []byte("abc"), map[string]string{"Content-Type": "image/jpeg"})
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"model_version":"3"`) {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	if n := b.picks.Load(); n != 1 {
		t.Errorf("default version picked %d times for one request, want 1", n)
	}
}

func TestHTTPBadInput(t *testing.T) {
	t.Parallel()
	srv := newHTTP(t, Options{MaxBodyBytes: 4096})
	ok := `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}`
	cases := []struct {
		name, path, body string
		hdr              map[string]string
		code             int
		want             string
	}{
		{"malformed json", "double", `{"inputs":[`, nil, 400, "malformed JSON"},
		{"trailing data", "double", ok + "x", nil, 400, "trailing data"},
		{"wrong field type", "double", `{"inputs":[{"name":"x","shape":"1x2"}]}`, nil, 400, `field "inputs.shape"`},
		{"no inputs", "double", `{"inputs":[]}`, nil, 400, "no inputs"},
		{"wrong shape", "double", `{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}`, nil, 400, "shape [1 3], model wants [-1 2]"},
		{"wrong rank", "double", `{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}]}`, nil, 400, "shape [2]"},
		{"batch too big", "double", `{"inputs":[{"name":"x","shape":[9,2],"datatype":"FP32","data":[1,2,1,2,1,2,1,2,1,2,1,2,1,2,1,2,1,2]}]}`, nil, 400, "batch size 9, model takes 1..8"},
		{"wrong dtype", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"INT32","data":[1,2]}]}`, nil, 400, "datatype INT32, model wants FP32"},
		{"unknown dtype", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FLOAT","data":[1,2]}]}`, nil, 400, `unknown datatype "FLOAT"`},
		{"data count", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2,3]}]}`, nil, 400, "more than the 2 elements"},
		{"data too few", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1]}]}`, nil, 400, "data has 1 elements, shape describes 2"},
		{"data not number", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,"a"]}]}`, nil, 400, "want a number"},
		{"int overflow", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"INT8","data":[1,300]}]}`, nil, 400, "300 is not a INT8"},
		{"negative dim", "double", `{"inputs":[{"name":"x","shape":[-1,2],"datatype":"FP32","data":[1,2]}]}`, nil, 400, "negative dimension"},
		{"missing input", "pair", `{"inputs":[{"name":"a","shape":[1],"datatype":"INT64","data":[1]}]}`, nil, 400, `missing input "b"`},
		{"unknown input", "double", `{"inputs":[{"name":"z","shape":[1],"datatype":"FP32","data":[1]}]}`, nil, 400, `unexpected input "z"`},
		{"extra input", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]},{"name":"w","shape":[1],"datatype":"FP32","data":[1]}]}`, nil, 400, `unexpected input "w"`},
		{"duplicate input", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]},{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}`, nil, 400, `given twice`},
		{"unknown output", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}],"outputs":[{"name":"q"}]}`, nil, 400, `unknown output "q"`},
		{"no data", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32"}]}`, nil, 400, "has no data"},
		{"unknown model", "nope", ok, nil, 404, `model "nope"`},
		{"unknown version", "double/versions/7", ok, nil, 404, `version "7"`},
		{"not ready", "cold", ok, nil, 503, "not ready"},
		{"body over limit", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}],"pad":"` + strings.Repeat("a", 5000) + `"}`, nil, 413, "over the limit of 4096"},
		{"binary size overrun", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}`, map[string]string{HeaderInferenceHeaderLength: "all"}, 400, "overruns the binary section"},
		{"header length too big", "double", ok, map[string]string{HeaderInferenceHeaderLength: "9999"}, 400, "exceeds the body"},
		{"header length bad", "double", ok, map[string]string{HeaderInferenceHeaderLength: "x"}, 400, "not a non-negative integer"},
		{"timeout", "sleepy", `{"parameters":{"timeout":20000},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}`, nil, 504, "deadline exceeded"},
		{"bad timeout", "sleepy", `{"parameters":{"timeout":-5},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}`, nil, 400, "timeout -5"},
		{"binary size without header", "double", `{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}`, nil, 400, "no Inference-Header-Content-Length"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			hdr := map[string]string{"Content-Type": "application/json"}
			for k, v := range tc.hdr {
				hdr[k] = v
			}
			if hdr[HeaderInferenceHeaderLength] == "all" {
				hdr[HeaderInferenceHeaderLength] = strconv.Itoa(len(tc.body))
			}
			resp, b := do(t, "POST", srv.URL+"/v2/models/"+tc.path+"/infer", []byte(tc.body), hdr)
			var e struct{ Error string }
			if err := json.Unmarshal(b, &e); err != nil || e.Error == "" {
				t.Fatalf("error body %s is not {\"error\": ...}", b)
			}
			if resp.StatusCode != tc.code || !strings.Contains(e.Error, tc.want) {
				t.Fatalf("%d %s, want %d containing %q", resp.StatusCode, b, tc.code, tc.want)
			}
			if tc.code == 503 && resp.Header.Get("Retry-After") == "" {
				t.Error("503 without Retry-After")
			}
		})
	}
}

func TestHTTPTraceContextPropagated(t *testing.T) {
	t.Parallel()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	srv := newHTTP(t, Options{Tracer: tp.Tracer("test")})
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	resp, b := do(t, "POST", srv.URL+"/v2/models/double/infer", []byte(`{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}`),
		map[string]string{"traceparent": "00-" + traceID + "-00f067aa0ba902b7-01"})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	spans := rec.Ended()
	if len(spans) != 1 {
		t.Fatalf("%d spans", len(spans))
	}
	s := spans[0]
	if s.SpanContext().TraceID().String() != traceID || s.Parent().SpanID().String() != "00f067aa0ba902b7" || s.Name() != "POST /v2/models/{model}/infer" {
		t.Errorf("span %q trace %s parent %s", s.Name(), s.SpanContext().TraceID(), s.Parent().SpanID())
	}
}
