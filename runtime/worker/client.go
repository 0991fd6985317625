package worker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// ErrWorkerGone means the connection to the worker broke during a request:
// the worker died or closed it. The request may be retried on another worker.
var ErrWorkerGone = errors.New("model worker connection lost")

// RemoteError is an error the worker answered with.
type RemoteError struct {
	Code Code
	Msg  string
}

func (e *RemoteError) Error() string { return e.Msg }

// Unwrap maps the code onto the front end's error classes.
func (e *RemoteError) Unwrap() error {
	switch e.Code {
	case CodeInvalidArgument:
		return inferr.ErrInvalidInput
	case CodeDeadlineExceeded:
		return context.DeadlineExceeded
	}
	return nil
}

// Client talks to one worker over its unix socket. It is safe for
// concurrent use: each request takes an idle connection or dials a new one.
type Client struct {
	path    string
	maxIdle int
	maxResp int

	mu     sync.Mutex
	idle   []*clientConn
	closed bool
}

type clientConn struct {
	c net.Conn
	r frameReader
	w frameWriter
}

// NewClient returns a client for the worker listening at path; it keeps up
// to maxIdle idle connections (0: 16). It does not dial yet.
func NewClient(path string, maxIdle int) *Client {
	if maxIdle <= 0 {
		maxIdle = 16
	}
	return &Client{path: path, maxIdle: maxIdle, maxResp: DefaultMaxFrameBytes}
}

// Close closes the idle connections; requests in flight close theirs when
// they finish.
func (cl *Client) Close() error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	cl.closed = true
	for _, c := range cl.idle {
		c.c.Close()
	}
	cl.idle = nil
	return nil
}

func (cl *Client) get(ctx context.Context) (*clientConn, error) {
	cl.mu.Lock()
	if cl.closed {
		cl.mu.Unlock()
		return nil, fmt.Errorf("%w: client closed", ErrWorkerGone)
	}
	if n := len(cl.idle); n > 0 {
		c := cl.idle[n-1]
		cl.idle = cl.idle[:n-1]
		cl.mu.Unlock()
		return c, nil
	}
	cl.mu.Unlock()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", cl.path)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("%w: dial %s: %w", ErrWorkerGone, cl.path, err)
	}
	c := &clientConn{c: nc}
	c.r = frameReader{r: bufio.NewReaderSize(nc, 64<<10), max: cl.maxResp}
	return c, nil
}

func (cl *Client) put(c *clientConn) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.closed || len(cl.idle) >= cl.maxIdle {
		c.c.Close()
		return
	}
	cl.idle = append(cl.idle, c)
}

// roundTrip sends the frame in c.w and reads the reply frame's kind. On any
// transport error the connection is closed and the error says whether the
// context or the worker caused it.
func (cl *Client) roundTrip(ctx context.Context, c *clientConn) (byte, error) {
	if dl, ok := ctx.Deadline(); ok {
		c.c.SetDeadline(dl)
	} else {
		c.c.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { c.c.SetDeadline(time.Unix(1, 0)) })
	err := c.w.send(c.c)
	var kind byte
	if err == nil {
		kind, err = c.r.next()
	}
	if !stop() && ctx.Err() != nil {
		c.c.Close()
		return 0, ctx.Err()
	}
	if err != nil {
		c.c.Close()
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		// The connection's deadline is the context's: it can fire a moment
		// before the context notices.
		if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
			return 0, context.DeadlineExceeded
		}
		return 0, fmt.Errorf("%w: %w", ErrWorkerGone, err)
	}
	return kind, nil
}

// Infer runs one request on the worker. Errors: ErrWorkerGone when the
// connection broke, the context's error when it ended, *RemoteError when
// the worker answered with one.
func (cl *Client) Infer(ctx context.Context, inputs []tensor.Tensor, outputs []string) ([]tensor.Tensor, error) {
	c, err := cl.get(ctx)
	if err != nil {
		return nil, err
	}
	c.w.reset(kindInferRequest)
	c.w.u64(timeoutNS(ctx.Deadline()))
	if err := c.w.tensors(inputs); err != nil {
		cl.put(c)
		return nil, fmt.Errorf("%w: %w", inferr.ErrInvalidInput, err)
	}
	if len(outputs) > 0xffff {
		cl.put(c)
		return nil, fmt.Errorf("%w: %d outputs requested", inferr.ErrInvalidInput, len(outputs))
	}
	c.w.u16(uint16(len(outputs)))
	for _, o := range outputs {
		if err := c.w.str(o); err != nil {
			cl.put(c)
			return nil, fmt.Errorf("%w: output name: %w", inferr.ErrInvalidInput, err)
		}
	}
	kind, err := cl.roundTrip(ctx, c)
	if err != nil {
		return nil, err
	}
	if kind != kindInferResponse {
		c.c.Close()
		return nil, fmt.Errorf("%w: reply of kind %d to an inference", ErrWorkerGone, kind)
	}
	code := Code(c.r.u8())
	var res []tensor.Tensor
	var rerr error
	if code == CodeOK {
		pre := time.Duration(c.r.u64())
		res = c.r.tensors()
		if t := TimingsFrom(ctx); t != nil && c.r.err == nil {
			t.Preprocess = pre
		}
	} else {
		rerr = &RemoteError{Code: code, Msg: c.r.str32()}
	}
	if err := c.r.done(); err != nil {
		c.c.Close()
		return nil, fmt.Errorf("%w: %w", ErrWorkerGone, err)
	}
	cl.put(c)
	return res, rerr
}

func (cl *Client) call(ctx context.Context, req, want byte) ([]byte, error) {
	c, err := cl.get(ctx)
	if err != nil {
		return nil, err
	}
	c.w.reset(req)
	kind, err := cl.roundTrip(ctx, c)
	if err != nil {
		return nil, err
	}
	payload := c.r.bytes32()
	if err := c.r.done(); err != nil || kind != want {
		c.c.Close()
		return nil, fmt.Errorf("%w: bad reply of kind %d: %v", ErrWorkerGone, kind, err)
	}
	cl.put(c)
	return payload, nil
}

// Health asks the worker whether it serves.
func (cl *Client) Health(ctx context.Context) error {
	_, err := cl.call(ctx, kindHealthRequest, kindHealthResp)
	return err
}

// Metadata asks the worker for its model's metadata.
func (cl *Client) Metadata(ctx context.Context) (Metadata, error) {
	var md Metadata
	b, err := cl.call(ctx, kindMetaRequest, kindMetaResponse)
	if err != nil {
		return md, err
	}
	if err := json.Unmarshal(b, &md); err != nil {
		return md, fmt.Errorf("decode worker metadata: %w", err)
	}
	return md, nil
}
