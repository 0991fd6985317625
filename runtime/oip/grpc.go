package oip

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"runtime"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/visionslice/visionslice/runtime/oip/inferencepb"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// grpcService implements inference.GRPCInferenceService.
type grpcService struct {
	pb.UnimplementedGRPCInferenceServiceServer
	s *Server
}

var _ pb.GRPCInferenceServiceServer = (*grpcService)(nil)

// Register adds the service to g.
func (s *Server) Register(g *grpc.Server) {
	pb.RegisterGRPCInferenceServiceServer(g, &grpcService{s: s})
}

// GRPCServerOptions are the options a gRPC server for this service wants:
// message size limits from MaxBodyBytes and the request ID interceptor.
func (s *Server) GRPCServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(int(s.opts.MaxBodyBytes)),
		grpc.MaxSendMsgSize(math.MaxInt32),
		grpc.UnaryInterceptor(requestIDInterceptor),
		// Reuse handler goroutines instead of one new goroutine per call.
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
	}
}

// requestIDInterceptor echoes x-request-id (generated when absent) in the
// response header metadata.
func requestIDInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	id := ""
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get("x-request-id"); len(v) > 0 {
			id = v[0]
		}
	}
	if !validRequestID(id) {
		id = newRequestID()
	}
	_ = grpc.SetHeader(ctx, metadata.Pairs("x-request-id", id))
	return handler(WithRequestID(ctx, id), req)
}

// grpcError maps an error class to a status.
func grpcError(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(classOf(err).grpc, err.Error())
}

func (g *grpcService) ServerLive(context.Context, *pb.ServerLiveRequest) (*pb.ServerLiveResponse, error) {
	return &pb.ServerLiveResponse{Live: true}, nil
}

func (g *grpcService) ServerReady(context.Context, *pb.ServerReadyRequest) (*pb.ServerReadyResponse, error) {
	return &pb.ServerReadyResponse{Ready: g.s.backend.Ready()}, nil
}

func (g *grpcService) ModelReady(_ context.Context, r *pb.ModelReadyRequest) (*pb.ModelReadyResponse, error) {
	m, err := g.s.backend.Model(r.GetName(), r.GetVersion())
	if err != nil {
		return nil, grpcError(err)
	}
	return &pb.ModelReadyResponse{Ready: m.Ready()}, nil
}

func (g *grpcService) ServerMetadata(context.Context, *pb.ServerMetadataRequest) (*pb.ServerMetadataResponse, error) {
	return &pb.ServerMetadataResponse{Name: g.s.opts.Name, Version: g.s.opts.Version, Extensions: Extensions}, nil
}

func (g *grpcService) ModelMetadata(_ context.Context, r *pb.ModelMetadataRequest) (*pb.ModelMetadataResponse, error) {
	m, err := g.s.backend.Model(r.GetName(), r.GetVersion())
	if err != nil {
		return nil, grpcError(err)
	}
	md := m.Metadata()
	resp := &pb.ModelMetadataResponse{Name: md.Name, Versions: md.Versions, Platform: md.Platform}
	for _, t := range md.Inputs {
		resp.Inputs = append(resp.Inputs, &pb.ModelMetadataResponse_TensorMetadata{Name: t.Name, Datatype: string(t.Datatype), Shape: t.Shape})
	}
	for _, t := range md.Outputs {
		resp.Outputs = append(resp.Outputs, &pb.ModelMetadataResponse_TensorMetadata{Name: t.Name, Datatype: string(t.Datatype), Shape: t.Shape})
	}
	return resp, nil
}

func (g *grpcService) ModelInfer(ctx context.Context, r *pb.ModelInferRequest) (*pb.ModelInferResponse, error) {
	inputs, err := decodeGRPCInputs(r)
	if err != nil {
		g.s.opts.Observer.Request(r.GetModelName(), r.GetModelVersion(), result(err), 0)
		return nil, grpcError(err)
	}
	outputs := make([]string, len(r.GetOutputs()))
	for i, o := range r.GetOutputs() {
		outputs[i] = o.GetName()
	}
	if p, ok := r.GetParameters()["timeout"]; ok {
		d, err := timeoutParam(p.GetInt64Param())
		if err != nil {
			return nil, grpcError(err)
		}
		if d > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, d)
			defer cancel()
		}
	}
	m, out, err := g.s.infer(ctx, r.GetModelName(), r.GetModelVersion(), inputs, outputs)
	if err != nil {
		return nil, grpcError(err)
	}
	md := m.Metadata()
	resp := &pb.ModelInferResponse{ModelName: md.Name, ModelVersion: md.Version, Id: r.GetId(),
		Outputs: make([]*pb.ModelInferResponse_InferOutputTensor, len(out)), RawOutputContents: make([][]byte, len(out))}
	for i, o := range out {
		resp.Outputs[i] = &pb.ModelInferResponse_InferOutputTensor{Name: o.Name, Datatype: string(o.Datatype), Shape: o.Shape}
		resp.RawOutputContents[i] = o.Data
	}
	return resp, nil
}

// decodeGRPCInputs takes raw_input_contents (one per input, in order) or the
// typed contents of each input.
func decodeGRPCInputs(r *pb.ModelInferRequest) ([]tensor.Tensor, error) {
	ins := r.GetInputs()
	if len(ins) == 0 {
		return nil, invalid("request has no inputs")
	}
	raw := r.GetRawInputContents()
	if len(raw) > 0 && len(raw) != len(ins) {
		return nil, invalid("raw_input_contents has %d entries for %d inputs", len(raw), len(ins))
	}
	out := make([]tensor.Tensor, len(ins))
	for i, in := range ins {
		dt := tensor.DataType(in.GetDatatype())
		if in.GetName() == "" {
			return nil, invalid("inputs[%d] has no name", i)
		}
		if !dt.Valid() {
			return nil, invalid("input %q: unknown datatype %q", in.GetName(), in.GetDatatype())
		}
		t := tensor.Tensor{Name: in.GetName(), Datatype: dt, Shape: in.GetShape()}
		if t.Shape == nil {
			t.Shape = []int64{}
		}
		n, err := tensor.Elements(t.Shape)
		if err != nil {
			return nil, invalid("input %q: %s", t.Name, err.Error())
		}
		if len(raw) > 0 {
			if in.GetContents() != nil {
				return nil, invalid("input %q has contents while raw_input_contents is used", t.Name)
			}
			t.Data = raw[i]
		} else {
			if in.GetContents() == nil {
				return nil, invalid("input %q has no contents", t.Name)
			}
			if t.Data, err = fromContents(in.GetContents(), dt, n); err != nil {
				return nil, invalid("input %q: %s", t.Name, err.Error())
			}
		}
		out[i] = t
	}
	return out, nil
}

// fromContents converts typed contents into the binary layout.
func fromContents(c *pb.InferTensorContents, dt tensor.DataType, n int64) ([]byte, error) {
	le := binary.LittleEndian
	count := func(got int) error {
		if int64(got) != n {
			return fmt.Errorf("contents hold %d elements, shape describes %d", got, n)
		}
		return nil
	}
	var out []byte
	switch dt {
	case tensor.Bool:
		if err := count(len(c.GetBoolContents())); err != nil {
			return nil, err
		}
		for _, b := range c.GetBoolContents() {
			if b {
				out = append(out, 1)
			} else {
				out = append(out, 0)
			}
		}
	case tensor.Int8, tensor.Int16, tensor.Int32:
		if err := count(len(c.GetIntContents())); err != nil {
			return nil, err
		}
		bits := dt.Size() * 8
		for _, v := range c.GetIntContents() {
			if bits < 32 && (v < -(1<<(bits-1)) || v >= 1<<(bits-1)) {
				return nil, fmt.Errorf("%d does not fit %s", v, dt)
			}
			out = appendUint(out, uint64(v), dt.Size())
		}
	case tensor.Int64:
		if err := count(len(c.GetInt64Contents())); err != nil {
			return nil, err
		}
		for _, v := range c.GetInt64Contents() {
			out = le.AppendUint64(out, uint64(v))
		}
	case tensor.Uint8, tensor.Uint16, tensor.Uint32:
		if err := count(len(c.GetUintContents())); err != nil {
			return nil, err
		}
		bits := dt.Size() * 8
		for _, v := range c.GetUintContents() {
			if bits < 32 && v >= 1<<bits {
				return nil, fmt.Errorf("%d does not fit %s", v, dt)
			}
			out = appendUint(out, uint64(v), dt.Size())
		}
	case tensor.Uint64:
		if err := count(len(c.GetUint64Contents())); err != nil {
			return nil, err
		}
		for _, v := range c.GetUint64Contents() {
			out = le.AppendUint64(out, v)
		}
	case tensor.FP32:
		if err := count(len(c.GetFp32Contents())); err != nil {
			return nil, err
		}
		out = make([]byte, 0, 4*n)
		for _, v := range c.GetFp32Contents() {
			out = le.AppendUint32(out, math.Float32bits(v))
		}
	case tensor.FP64:
		if err := count(len(c.GetFp64Contents())); err != nil {
			return nil, err
		}
		for _, v := range c.GetFp64Contents() {
			out = le.AppendUint64(out, math.Float64bits(v))
		}
	case tensor.Bytes:
		if err := count(len(c.GetBytesContents())); err != nil {
			return nil, err
		}
		for _, v := range c.GetBytesContents() {
			out = tensor.AppendBytesElement(out, v)
		}
	default:
		return nil, fmt.Errorf("datatype %s has no typed contents field; use raw_input_contents", dt)
	}
	if out == nil {
		out = []byte{}
	}
	return out, nil
}
