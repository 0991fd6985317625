package oip

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/visionslice/visionslice/runtime/oip/inferencepb"
)

// startGRPC serves the test backend on a unix socket and returns a client
// made with the generated code.
func startGRPC(t *testing.T, opts Options) pb.GRPCInferenceServiceClient {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "oip.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(newTestBackend(), opts, discard())
	g := grpc.NewServer(s.GRPCServerOptions()...)
	s.Register(g)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return pb.NewGRPCInferenceServiceClient(conn)
}

func TestGRPCMetadataAndHealth(t *testing.T) {
	t.Parallel()
	c := startGRPC(t, Options{Name: "visionslice", Version: "test"})
	ctx := context.Background()
	live, err := c.ServerLive(ctx, &pb.ServerLiveRequest{})
	if err != nil || !live.GetLive() {
		t.Fatalf("live: %v %v", live, err)
	}
	ready, err := c.ServerReady(ctx, &pb.ServerReadyRequest{})
	if err != nil || ready.GetReady() {
		t.Fatalf("ready: %v %v (cold model is never ready)", ready, err)
	}
	md, err := c.ServerMetadata(ctx, &pb.ServerMetadataRequest{})
	if err != nil || md.GetName() != "visionslice" || md.GetVersion() != "test" || md.GetExtensions()[0] != "binary_tensor_data" {
		t.Fatalf("server metadata: %v %v", md, err)
	}
	mr, err := c.ModelReady(ctx, &pb.ModelReadyRequest{Name: "double"})
	if err != nil || !mr.GetReady() {
		t.Fatalf("model ready: %v %v", mr, err)
	}
	mr, err = c.ModelReady(ctx, &pb.ModelReadyRequest{Name: "cold", Version: "1"})
	if err != nil || mr.GetReady() {
		t.Fatalf("cold ready: %v %v", mr, err)
	}
	mm, err := c.ModelMetadata(ctx, &pb.ModelMetadataRequest{Name: "double", Version: "1"})
	if err != nil || mm.GetPlatform() != "onnxruntime" || mm.GetInputs()[0].GetName() != "x" || mm.GetInputs()[0].GetShape()[0] != -1 || len(mm.GetOutputs()) != 2 {
		t.Fatalf("model metadata: %v %v", mm, err)
	}
	if _, err := c.ModelMetadata(ctx, &pb.ModelMetadataRequest{Name: "nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown model: %v", err)
	}
	if _, err := c.ModelReady(ctx, &pb.ModelReadyRequest{Name: "double", Version: "9"}); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown version: %v", err)
	}
}

func TestGRPCModelInfer(t *testing.T) {
	t.Parallel()
	c := startGRPC(t, Options{})
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-request-id", "grpc-req-1")
	var hdr metadata.MD
	// Raw contents.
	resp, err := c.ModelInfer(ctx, &pb.ModelInferRequest{ModelName: "double", Id: "7",
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{2, 2}}},
		Outputs:          []*pb.ModelInferRequest_InferRequestedOutputTensor{{Name: "y"}},
		RawInputContents: [][]byte{f32bytes(1, 2, 3, 4)}}, grpc.Header(&hdr))
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetId() != "7" || resp.GetModelVersion() != "1" || len(resp.GetOutputs()) != 1 || string(resp.GetRawOutputContents()[0]) != string(f32bytes(2, 4, 6, 8)) {
		t.Fatalf("response %v", resp)
	}
	if got := hdr.Get("x-request-id"); len(got) != 1 || got[0] != "grpc-req-1" {
		t.Errorf("x-request-id = %v", got)
	}
	// Typed contents, all outputs.
	resp, err = c.ModelInfer(context.Background(), &pb.ModelInferRequest{ModelName: "double", ModelVersion: "1",
		Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 2}, Contents: &pb.InferTensorContents{Fp32Contents: []float32{5, 6}}}}},
		grpc.Header(&hdr))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetOutputs()) != 2 || string(resp.GetRawOutputContents()[0]) != string(f32bytes(10, 12)) || resp.GetOutputs()[1].GetDatatype() != "FP64" {
		t.Fatalf("response %v", resp)
	}
	if got := hdr.Get("x-request-id"); len(got) != 1 || len(got[0]) != 32 {
		t.Errorf("generated x-request-id = %v", got)
	}
	// An encoded image as BYTES contents.
	resp, err = c.ModelInfer(context.Background(), &pb.ModelInferRequest{ModelName: "lengths",
		Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "image", Datatype: "BYTES", Shape: []int64{2}, Contents: &pb.InferTensorContents{BytesContents: [][]byte{[]byte("\xff\xd8\xff"), {}}}}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetRawOutputContents()[0]; len(got) != 16 || got[0] != 3 || got[8] != 0 {
		t.Fatalf("lengths = %v", got)
	}
}

func TestGRPCBadInput(t *testing.T) {
	t.Parallel()
	c := startGRPC(t, Options{MaxBodyBytes: 4096})
	x := func(dt string, shape []int64) []*pb.ModelInferRequest_InferInputTensor {
		return []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: dt, Shape: shape}}
	}
	cases := []struct {
		name string
		req  *pb.ModelInferRequest
		code codes.Code
		want string
	}{
		{"no inputs", &pb.ModelInferRequest{ModelName: "double"}, codes.InvalidArgument, "no inputs"},
		{"unknown model", &pb.ModelInferRequest{ModelName: "nope", Inputs: x("FP32", []int64{1, 2}), RawInputContents: [][]byte{f32bytes(1, 2)}}, codes.NotFound, `model "nope"`},
		{"unknown version", &pb.ModelInferRequest{ModelName: "double", ModelVersion: "4", Inputs: x("FP32", []int64{1, 2}), RawInputContents: [][]byte{f32bytes(1, 2)}}, codes.NotFound, `version "4"`},
		{"wrong dtype", &pb.ModelInferRequest{ModelName: "double", Inputs: x("FP64", []int64{1, 2}), RawInputContents: [][]byte{make([]byte, 16)}}, codes.InvalidArgument, "datatype FP64, model wants FP32"},
		{"wrong shape", &pb.ModelInferRequest{ModelName: "double", Inputs: x("FP32", []int64{1, 3}), RawInputContents: [][]byte{f32bytes(1, 2, 3)}}, codes.InvalidArgument, "shape [1 3]"},
		{"raw size", &pb.ModelInferRequest{ModelName: "double", Inputs: x("FP32", []int64{1, 2}), RawInputContents: [][]byte{f32bytes(1)}}, codes.InvalidArgument, "wants 8 bytes, data holds 4"},
		{"raw count", &pb.ModelInferRequest{ModelName: "double", Inputs: x("FP32", []int64{1, 2}), RawInputContents: [][]byte{f32bytes(1, 2), f32bytes(1)}}, codes.InvalidArgument, "2 entries for 1 inputs"},
		{"contents count", &pb.ModelInferRequest{ModelName: "double", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 2}, Contents: &pb.InferTensorContents{Fp32Contents: []float32{1}}}}}, codes.InvalidArgument, "1 elements, shape describes 2"},
		{"no contents", &pb.ModelInferRequest{ModelName: "double", Inputs: x("FP32", []int64{1, 2})}, codes.InvalidArgument, "no contents"},
		{"missing input", &pb.ModelInferRequest{ModelName: "pair", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "b", Datatype: "INT64", Shape: []int64{1}, Contents: &pb.InferTensorContents{Int64Contents: []int64{1}}}}}, codes.InvalidArgument, `missing input "a"`},
		{"extra input", &pb.ModelInferRequest{ModelName: "double", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 2}}, {Name: "k", Datatype: "FP32", Shape: []int64{1}}}, RawInputContents: [][]byte{f32bytes(1, 2), f32bytes(1)}}, codes.InvalidArgument, `unexpected input "k"`},
		{"not ready", &pb.ModelInferRequest{ModelName: "cold", Inputs: x("FP32", []int64{1}), RawInputContents: [][]byte{f32bytes(1)}}, codes.Unavailable, "not ready"},
		{"timeout", &pb.ModelInferRequest{ModelName: "sleepy", Parameters: map[string]*pb.InferParameter{"timeout": {ParameterChoice: &pb.InferParameter_Int64Param{Int64Param: 20000}}},
			Inputs: x("FP32", []int64{1}), RawInputContents: [][]byte{f32bytes(1)}}, codes.DeadlineExceeded, "deadline exceeded"},
		{"over limit", &pb.ModelInferRequest{ModelName: "double", Inputs: x("FP32", []int64{1, 2}), RawInputContents: [][]byte{make([]byte, 5000)}}, codes.ResourceExhausted, "larger than max"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := c.ModelInfer(context.Background(), tc.req)
			if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.want) {
				t.Fatalf("err = %v, want %s containing %q", err, tc.code, tc.want)
			}
		})
	}
}
