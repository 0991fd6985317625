package oip

import (
	"bytes"
	"context"
	"net/http/httptest"
	"testing"

	pb "github.com/visionslice/visionslice/runtime/oip/inferencepb"
)

// BenchmarkHandlerJSON: the HTTP handler's own cost per request (no
// network): middleware, parsing, validation, a computing test model,
// response encoding.
func BenchmarkHandlerJSON(b *testing.B) {
	h := NewServer(newTestBackend(), Options{}, discard()).Handler()
	body := []byte(`{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}],"outputs":[{"name":"y"}]}`)
	b.ReportAllocs()
	for b.Loop() {
		req := httptest.NewRequest("POST", "/v2/models/double/infer", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != 200 {
			b.Fatal(w.Code, w.Body.String())
		}
	}
}

// BenchmarkGRPCService: the gRPC service's own cost per request without the
// transport.
func BenchmarkGRPCService(b *testing.B) {
	g := &grpcService{s: NewServer(newTestBackend(), Options{}, discard())}
	req := &pb.ModelInferRequest{ModelName: "double", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 2}}},
		RawInputContents: [][]byte{f32bytes(1, 2)}}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := g.ModelInfer(context.Background(), req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParseJSON: the JSON request parser alone.
func BenchmarkParseJSON(b *testing.B) {
	body := []byte(`{"id":"1","inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}],"outputs":[{"name":"y"}]}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := parseInferRequest(body, -1); err != nil {
			b.Fatal(err)
		}
	}
}
