// Package worker is the protocol between the agent and a model worker
// process over a unix socket: the server loop the worker runs (Serve) and
// the client the agent's supervisor uses (Client). It is pure Go; the model
// behind the server (ONNX Runtime, OpenCV) lives in runtime/worker/host, so
// the agent does not link either library.
//
// The wire format is built for a small added latency: each message is one
// frame (uint32 length, one kind byte, payload), all integers little-endian;
// tensors travel as name, datatype, shape and raw bytes in the binary
// tensor extension's layout, written with writev and read into one buffer
// per tensor. One connection carries one request at a time; the client keeps
// a pool of connections for concurrency.
//
//	infer request:  u64 timeout_ns, u16 n, n*tensor, u16 m, m*string (outputs)
//	infer response: u8 code; code 0: u64 preprocess_ns, u16 n, n*tensor; else: string32 message
//	tensor:         string name, string datatype, u8 rank, rank*i64, u64 len, data
//	string:         u16 len, bytes; string32: u32 len, bytes
//	metadata and health: JSON payloads.
package worker

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"time"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// Frame kinds.
const (
	kindInferRequest  byte = 1
	kindInferResponse byte = 2
	kindMetaRequest   byte = 3
	kindMetaResponse  byte = 4
	kindHealthRequest byte = 5
	kindHealthResp    byte = 6
)

// Code is the outcome class of a request, carried on the wire.
type Code uint8

const (
	CodeOK Code = iota
	// CodeInvalidArgument: the inputs are wrong (a bad image, a wrong shape).
	CodeInvalidArgument
	// CodeInternal: the model failed.
	CodeInternal
	// CodeDeadlineExceeded: the request's timeout passed in the worker.
	CodeDeadlineExceeded
)

func (c Code) String() string {
	switch c {
	case CodeOK:
		return "ok"
	case CodeInvalidArgument:
		return "invalid_argument"
	case CodeInternal:
		return "internal"
	case CodeDeadlineExceeded:
		return "deadline_exceeded"
	}
	return fmt.Sprintf("code_%d", uint8(c))
}

// DefaultMaxFrameBytes bounds a frame (1 GiB).
const DefaultMaxFrameBytes = 1 << 30

var errFrame = errors.New("malformed frame")

// frameWriter assembles one frame: small fields in head, tensor data as
// separate slices, all sent with one writev.
type frameWriter struct {
	bufs net.Buffers
	head []byte
	n    int // payload bytes so far
}

func (w *frameWriter) reset(kind byte) {
	w.bufs = w.bufs[:0]
	w.head = append(w.head[:0], 0, 0, 0, 0, kind)
	w.n = 1
}

func (w *frameWriter) u8(v uint8) { w.head = append(w.head, v); w.n++ }
func (w *frameWriter) u16(v uint16) {
	w.head = binary.LittleEndian.AppendUint16(w.head, v)
	w.n += 2
}
func (w *frameWriter) u64(v uint64) {
	w.head = binary.LittleEndian.AppendUint64(w.head, v)
	w.n += 8
}

func (w *frameWriter) str(s string) error {
	if len(s) > math.MaxUint16 {
		return fmt.Errorf("string of %d bytes is too long", len(s))
	}
	w.u16(uint16(len(s)))
	w.head = append(w.head, s...)
	w.n += len(s)
	return nil
}

func (w *frameWriter) str32(s string) {
	w.head = binary.LittleEndian.AppendUint32(w.head, uint32(len(s)))
	w.head = append(w.head, s...)
	w.n += 4 + len(s)
}

// data appends a large slice without copying it.
func (w *frameWriter) data(b []byte) {
	w.u64(uint64(len(b)))
	if len(b) == 0 {
		return
	}
	w.bufs = append(w.bufs, w.head, b)
	w.head = w.head[len(w.head):] // new small fields go after b
	w.n += len(b)
}

func (w *frameWriter) tensors(ts []tensor.Tensor) error {
	if len(ts) > math.MaxUint16 {
		return fmt.Errorf("%d tensors are too many", len(ts))
	}
	w.u16(uint16(len(ts)))
	for i := range ts {
		t := &ts[i]
		if err := w.str(t.Name); err != nil {
			return err
		}
		if err := w.str(string(t.Datatype)); err != nil {
			return err
		}
		if len(t.Shape) > 255 {
			return fmt.Errorf("tensor %q: rank %d is too high", t.Name, len(t.Shape))
		}
		w.u8(uint8(len(t.Shape)))
		for _, d := range t.Shape {
			w.u64(uint64(d))
		}
		w.data(t.Data)
	}
	return nil
}

// send writes the frame. head's storage is shared between the slices in
// bufs, which is safe because each slice was cut before the next append.
func (w *frameWriter) send(c net.Conn) error {
	if w.n > math.MaxUint32 {
		return fmt.Errorf("frame of %d bytes is too large", w.n)
	}
	first := w.bufs
	if len(first) == 0 {
		binary.LittleEndian.PutUint32(w.head[0:4], uint32(w.n))
		_, err := c.Write(w.head)
		return err
	}
	binary.LittleEndian.PutUint32(first[0][0:4], uint32(w.n))
	if len(w.head) > 0 {
		w.bufs = append(w.bufs, w.head)
	}
	_, err := w.bufs.WriteTo(c)
	w.head = nil // its storage is referenced by bufs; start afresh next time
	return err
}

// frameReader parses one frame's payload from a buffered connection,
// checking every length against what is left of the frame.
type frameReader struct {
	r    *bufio.Reader
	left int
	max  int
	err  error
	tmp  [8]byte
	// reuse makes tensors() carve tensor data out of one buffer kept across
	// frames (up to maxReuse bytes), for a reader whose tensors are dropped
	// before it reads the next frame (the server's). scratch[:used] is taken.
	reuse   bool
	scratch []byte
	used    int
}

// maxReuse bounds the buffer a server connection keeps between requests.
const maxReuse = 64 << 20

func (r *frameReader) next() (kind byte, err error) {
	var h [5]byte
	if _, err := io.ReadFull(r.r, h[:]); err != nil {
		return 0, err
	}
	n := int(binary.LittleEndian.Uint32(h[:4]))
	if n < 1 || n > r.max {
		return 0, fmt.Errorf("%w: frame of %d bytes (limit %d)", errFrame, n, r.max)
	}
	r.left, r.err, r.used = n-1, nil, 0
	return h[4], nil
}

func (r *frameReader) fail(err error) {
	if r.err == nil {
		r.err = err
	}
}

func (r *frameReader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n > r.left {
		r.fail(fmt.Errorf("%w: field of %d bytes overruns the frame (%d left)", errFrame, n, r.left))
		return nil
	}
	var b []byte
	if n <= len(r.tmp) {
		b = r.tmp[:n]
	} else {
		b = make([]byte, n)
	}
	if _, err := io.ReadFull(r.r, b); err != nil {
		r.fail(err)
		return nil
	}
	r.left -= n
	return b
}

func (r *frameReader) u8() uint8 {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *frameReader) u16() uint16 {
	if b := r.take(2); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}

func (r *frameReader) u32() uint32 {
	if b := r.take(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (r *frameReader) u64() uint64 {
	if b := r.take(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

func (r *frameReader) str() string     { return string(r.take(int(r.u16()))) }
func (r *frameReader) str32() string   { return string(r.take(int(r.u32()))) }
func (r *frameReader) bytes32() []byte { return append([]byte(nil), r.take(int(r.u32()))...) }

func (r *frameReader) tensors() []tensor.Tensor {
	n := int(r.u16())
	if r.err != nil {
		return nil
	}
	ts := make([]tensor.Tensor, 0, min(n, 64))
	for i := 0; i < n && r.err == nil; i++ {
		var t tensor.Tensor
		t.Name = r.str()
		t.Datatype = tensor.DataType(r.str())
		rank := int(r.u8())
		t.Shape = make([]int64, rank)
		for j := range t.Shape {
			t.Shape[j] = int64(r.u64())
		}
		size := r.u64()
		if size > uint64(r.left) {
			r.fail(fmt.Errorf("%w: tensor %q of %d bytes overruns the frame", errFrame, t.Name, size))
			return nil
		}
		if size > 0 {
			t.Data = r.alloc(int(size))
			if _, err := io.ReadFull(r.r, t.Data); err != nil {
				r.fail(err)
				return nil
			}
			r.left -= int(size)
		}
		ts = append(ts, t)
	}
	return ts
}

// alloc returns n bytes for tensor data: from the kept buffer when reuse
// is on and the frame fits, else fresh.
func (r *frameReader) alloc(n int) []byte {
	if !r.reuse {
		return make([]byte, n)
	}
	if r.used+n > len(r.scratch) {
		need := n + r.left // at most what the rest of the frame holds
		if r.used > 0 || need > maxReuse {
			return make([]byte, n)
		}
		r.scratch = make([]byte, need)
	}
	b := r.scratch[r.used : r.used+n : r.used+n]
	r.used += n
	return b
}

// done checks that the whole frame was consumed.
func (r *frameReader) done() error {
	if r.err == nil && r.left != 0 {
		r.err = fmt.Errorf("%w: %d bytes left over", errFrame, r.left)
	}
	return r.err
}

// timeoutNS encodes a deadline as a relative timeout (0: none).
func timeoutNS(deadline time.Time, ok bool) uint64 {
	if !ok {
		return 0
	}
	d := time.Until(deadline)
	if d <= 0 {
		return 1
	}
	return uint64(d)
}
