package worker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// TensorInfo describes a model input or output; -1 marks a dynamic dimension.
type TensorInfo struct {
	Name     string          `json:"name"`
	Datatype tensor.DataType `json:"datatype"`
	Shape    []int64         `json:"shape"`
}

// ImageInput is a BYTES input whose encoded images the worker preprocesses
// into the model input ModelInput.
type ImageInput struct {
	Name       string `json:"name"`
	ModelInput string `json:"model_input"`
}

// Metadata is what a ready worker reports about itself and its model.
type Metadata struct {
	PID int `json:"pid"`
	// Runtime names the inference library and its version.
	Runtime string `json:"runtime"`
	Device  string `json:"device"`
	// Inputs and Outputs are the model's own (as ONNX Runtime reports them).
	Inputs  []TensorInfo `json:"inputs"`
	Outputs []TensorInfo `json:"outputs"`
	// Images lists the BYTES inputs the worker decodes as images.
	Images []ImageInput `json:"images,omitempty"`
	// LoadSeconds is how long loading and warming the model took.
	LoadSeconds float64 `json:"load_seconds"`
}

// Handler is the model behind a server. Infer may be called concurrently;
// the inputs' memory is valid until the answer is written (outputs may
// share it).
type Handler interface {
	Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error)
	Metadata() Metadata
}

// CodeOf classifies a handler error for the wire (host.Code for the real
// model: CodeInvalidArgument for errors the request caused).
type CodeOf func(err error) Code

// ServerConfig configures Serve.
type ServerConfig struct {
	// MaxFrameBytes bounds one request (default DefaultMaxFrameBytes).
	MaxFrameBytes int
	// Code classifies handler errors (default: CodeInternal for all but
	// context.DeadlineExceeded).
	Code CodeOf
}

// Serve answers requests on ln until ctx ends, then closes ln and waits for
// the connections' requests in flight to finish.
func Serve(ctx context.Context, ln net.Listener, h Handler, cfg ServerConfig, logger *slog.Logger) error {
	if cfg.MaxFrameBytes <= 0 {
		cfg.MaxFrameBytes = DefaultMaxFrameBytes
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			// Unblock idle readers; a request in flight still gets its answer
			// written (the write deadline is not touched).
			c.SetReadDeadline(time.Now())
		}
		mu.Unlock()
	})
	defer stop()
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
				c.Close()
			}()
			if err := serveConn(ctx, c, h, cfg); err != nil && ctx.Err() == nil {
				logger.Warn("worker connection failed", "err", err)
			}
		}()
	}
}

func serveConn(ctx context.Context, c net.Conn, h Handler, cfg ServerConfig) error {
	// Inputs are dropped once answered, so their memory serves the next
	// request on this connection (no fresh allocation, no page faults).
	r := &frameReader{r: bufio.NewReaderSize(c, 64<<10), max: cfg.MaxFrameBytes, reuse: true}
	var w frameWriter
	for {
		kind, err := r.next()
		if err != nil {
			if isClosed(err) {
				return nil
			}
			return err
		}
		switch kind {
		case kindInferRequest:
			if err := serveInfer(ctx, c, r, &w, h, cfg); err != nil {
				if isClosed(err) { // the client gave up (its deadline) and hung up
					return nil
				}
				return err
			}
		case kindMetaRequest, kindHealthRequest:
			if err := r.done(); err != nil {
				return err
			}
			var payload []byte
			resp := kindHealthResp
			if kind == kindMetaRequest {
				resp = kindMetaResponse
				if payload, err = json.Marshal(h.Metadata()); err != nil {
					return fmt.Errorf("encode metadata: %w", err)
				}
			}
			w.reset(resp)
			w.str32(string(payload))
			if err := w.send(c); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%w: unknown kind %d", errFrame, kind)
		}
	}
}

func serveInfer(ctx context.Context, c net.Conn, r *frameReader, w *frameWriter, h Handler, cfg ServerConfig) error {
	timeout := r.u64()
	inputs := r.tensors()
	n := int(r.u16())
	var outputs []string
	for i := 0; i < n && r.err == nil; i++ {
		outputs = append(outputs, r.str())
	}
	if err := r.done(); err != nil {
		return err
	}
	rctx := context.WithoutCancel(ctx) // shutdown lets requests in flight finish
	if timeout > 0 {
		var cancel context.CancelFunc
		rctx, cancel = context.WithTimeout(rctx, time.Duration(timeout))
		defer cancel()
	}
	var tm Timings
	res, err := h.Infer(WithTimings(rctx, &tm), inputs, outputs)
	w.reset(kindInferResponse)
	if err != nil {
		code := CodeInternal
		switch {
		case errors.Is(err, context.DeadlineExceeded):
			code = CodeDeadlineExceeded
		case cfg.Code != nil:
			code = cfg.Code(err)
		}
		if code == CodeOK {
			code = CodeInternal
		}
		w.u8(uint8(code))
		w.str32(err.Error())
		return w.send(c)
	}
	w.u8(uint8(CodeOK))
	w.u64(uint64(tm.Preprocess))
	if err := w.tensors(res); err != nil {
		w.reset(kindInferResponse)
		w.u8(uint8(CodeInternal))
		w.str32(err.Error())
	}
	return w.send(c)
}

func isClosed(err error) bool {
	var ne net.Error
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) || (errors.As(err, &ne) && ne.Timeout())
}
