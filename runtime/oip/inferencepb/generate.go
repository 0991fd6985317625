// Package inferencepb holds the generated Go code of the Open Inference
// Protocol gRPC API (inference.proto, written for visionslice from the
// published KServe v2 specification).
package inferencepb

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative inference.proto
