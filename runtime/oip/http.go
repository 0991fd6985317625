package oip

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// HeaderRequestID is echoed on every response (generated when absent).
const HeaderRequestID = "X-Request-ID"

// HeaderInferenceHeaderLength marks a binary tensor data extension body.
const HeaderInferenceHeaderLength = "Inference-Header-Content-Length"

// Handler returns the HTTP API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v2", s.serverMetadata)
	mux.HandleFunc("GET /v2/health/live", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	mux.HandleFunc("GET /v2/health/ready", func(w http.ResponseWriter, _ *http.Request) {
		if s.backend.Ready() {
			w.WriteHeader(http.StatusOK)
			return
		}
		writeError(w, fmt.Errorf("%w: not every model is ready", inferr.ErrUnavailable))
	})
	mux.HandleFunc("GET /v2/models/{model}", s.modelMetadata)
	mux.HandleFunc("GET /v2/models/{model}/versions/{version}", s.modelMetadata)
	mux.HandleFunc("GET /v2/models/{model}/ready", s.modelReady)
	mux.HandleFunc("GET /v2/models/{model}/versions/{version}/ready", s.modelReady)
	mux.HandleFunc("POST /v2/models/{model}/infer", s.inferHTTP)
	mux.HandleFunc("POST /v2/models/{model}/versions/{version}/infer", s.inferHTTP)
	return s.middleware(mux)
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// middleware echoes X-Request-ID, starts a server span from the W3C trace
// context and caps the body.
func (s *Server) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get(HeaderRequestID)
		if !validRequestID(id) {
			id = newRequestID()
		}
		w.Header().Set(HeaderRequestID, id)
		ctx := s.opts.Propagator.Extract(r.Context(), propagation.HeaderCarrier(r.Header))
		ctx, span := s.opts.Tracer.Start(ctx, "HTTP "+r.Method, trace.WithSpanKind(trace.SpanKindServer),
			trace.WithAttributes(attribute.String("http.request.method", r.Method), attribute.String("url.path", r.URL.Path), attribute.String("request.id", id)))
		defer span.End()
		r = r.WithContext(WithRequestID(ctx, id))
		r.Body = http.MaxBytesReader(w, r.Body, s.opts.MaxBodyBytes)
		sw := &statusWriter{ResponseWriter: w}
		next.ServeHTTP(sw, r)
		if r.Pattern != "" {
			span.SetName(r.Pattern)
		}
		span.SetAttributes(attribute.Int("http.response.status_code", sw.status))
		if sw.status >= 500 {
			span.SetStatus(codes.Error, http.StatusText(sw.status))
		}
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// httpStatus maps an error class to a status code.
func httpStatus(err error) int {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return http.StatusRequestEntityTooLarge
	}
	return classOf(err).http
}

func writeError(w http.ResponseWriter, err error) {
	code := httpStatus(err)
	var ra *inferr.RetryAfter
	if errors.As(err, &ra) {
		w.Header().Set("Retry-After", strconv.Itoa(max(1, int((ra.After+time.Second-1)/time.Second))))
	} else if code == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	msg := err.Error()
	if code == http.StatusInternalServerError {
		msg = "internal error: " + msg
	}
	writeJSON(w, code, map[string]string{"error": msg})
}

func (s *Server) serverMetadata(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"name": s.opts.Name, "version": s.opts.Version, "extensions": Extensions})
}

func (s *Server) modelMetadata(w http.ResponseWriter, r *http.Request) {
	m, err := s.backend.Model(r.PathValue("model"), r.PathValue("version"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, m.Metadata())
}

func (s *Server) modelReady(w http.ResponseWriter, r *http.Request) {
	m, err := s.backend.Model(r.PathValue("model"), r.PathValue("version"))
	if err != nil {
		writeError(w, err)
		return
	}
	if !m.Ready() {
		writeError(w, fmt.Errorf("%w: model %s is not ready", inferr.ErrUnavailable, m.Metadata().Name))
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Server) inferHTTP(w http.ResponseWriter, r *http.Request) {
	buf, err := readBody(r, s.opts.MaxBodyBytes)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, fmt.Errorf("%w: body over the limit of %d bytes", inferr.ErrTooLarge, s.opts.MaxBodyBytes))
			return
		}
		writeError(w, fmt.Errorf("%w: reading body: %w", inferr.ErrInvalidInput, err))
		return
	}
	name, version := r.PathValue("model"), r.PathValue("version")
	req, err := s.decodeHTTP(r, buf, name, version)
	if err != nil {
		s.opts.Observer.Request(name, version, result(err), 0)
		writeError(w, err)
		return
	}
	if req.version != "" {
		version = req.version
	}
	ctx := r.Context()
	if req.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, req.Timeout)
		defer cancel()
	}
	m, out, err := s.infer(ctx, name, version, req.Inputs, req.Outputs)
	if err != nil {
		trace.SpanFromContext(r.Context()).RecordError(err)
		writeError(w, err)
		return
	}
	md := m.Metadata()
	resp := jsonResponse{ModelName: md.Name, ModelVersion: md.Version, ID: req.ID, Outputs: make([]jsonOutput, len(out))}
	var bin [][]byte
	binLen := 0
	for i := range out {
		o := &out[i]
		resp.Outputs[i] = jsonOutput{Name: o.Name, Datatype: o.Datatype, Shape: o.Shape}
		if req.BinaryOutputs[o.Name] || req.BinaryOutputs["*"] {
			resp.Outputs[i].Parameters = map[string]any{"binary_data_size": len(o.Data)}
			bin = append(bin, o.Data)
			binLen += len(o.Data)
			continue
		}
		data, err := appendJSONData(nil, o)
		if err != nil {
			writeError(w, fmt.Errorf("%w: %w", inferr.ErrInvalidInput, err))
			return
		}
		resp.Outputs[i].Data = data
	}
	header, err := json.Marshal(resp)
	if err != nil {
		writeError(w, err)
		return
	}
	if len(bin) == 0 {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(header)))
		_, _ = w.Write(header)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set(HeaderInferenceHeaderLength, strconv.Itoa(len(header)))
	w.Header().Set("Content-Length", strconv.Itoa(len(header)+binLen))
	_, _ = w.Write(header)
	for _, b := range bin {
		_, _ = w.Write(b)
	}
}

// decodeHTTP reads a JSON body, a binary extension body, or a raw body: an
// encoded image or other bytes posted as-is (Content-Type not JSON, no
// Inference-Header-Content-Length) to a model with one BYTES input.
func (s *Server) decodeHTTP(r *http.Request, buf []byte, name, version string) (*decodedRequest, error) {
	body := buf[headroom:]
	if hl := r.Header.Get(HeaderInferenceHeaderLength); hl != "" {
		n, err := strconv.Atoi(hl)
		if err != nil || n < 0 {
			return nil, invalid("%s %q is not a non-negative integer", HeaderInferenceHeaderLength, hl)
		}
		return parseInferRequest(body, n)
	}
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if ct == "" || ct == "application/json" || strings.HasSuffix(ct, "+json") || (ct == "application/x-www-form-urlencoded" && looksJSON(body)) {
		return parseInferRequest(body, -1)
	}
	return s.rawRequest(r, buf, name, version)
}

// looksJSON lets `curl -d '{...}'` (form content type by default) through.
func looksJSON(b []byte) bool {
	for _, c := range b {
		switch c {
		case ' ', '\t', '\r', '\n':
			continue
		}
		return c == '{'
	}
	return false
}

// rawRequest makes the body (buf after its headroom) one BYTES element in
// place.
func (s *Server) rawRequest(r *http.Request, buf []byte, name, version string) (*decodedRequest, error) {
	body := buf[headroom:]
	m, err := s.backend.Model(name, version)
	if err != nil {
		return nil, err
	}
	md := m.Metadata()
	if len(md.Inputs) != 1 || md.Inputs[0].Datatype != tensor.Bytes {
		return nil, invalid("a raw %s body needs a model with exactly one BYTES input; model %s takes %s (send JSON or use %s)", r.Header.Get("Content-Type"), md.Name, names(md.Inputs), HeaderInferenceHeaderLength)
	}
	if len(body) == 0 {
		return nil, invalid("empty body")
	}
	if int64(len(body)) > math.MaxUint32 {
		return nil, invalid("body of %d bytes is too large for one BYTES element", len(body))
	}
	binary.LittleEndian.PutUint32(buf, uint32(len(body)))
	in := md.Inputs[0]
	shape := make([]int64, len(in.Shape))
	for i := range shape {
		shape[i] = 1
	}
	req := &decodedRequest{
		Inputs:        []tensor.Tensor{{Name: in.Name, Datatype: tensor.Bytes, Shape: shape, Data: buf}},
		BinaryOutputs: map[string]bool{},
		version:       md.Version,
	}
	if b, _ := strconv.ParseBool(r.URL.Query().Get("binary_data_output")); b {
		req.BinaryOutputs["*"] = true
	}
	return req, nil
}

// headroom is kept in front of every body read so that a raw body becomes
// a BYTES element (4-byte length prefix) without a copy.
const headroom = 4

// readBody reads the whole body into one buffer sized from Content-Length
// (when given and within limit), with headroom in front: the result is
// headroom bytes, then the body.
func readBody(r *http.Request, limit int64) ([]byte, error) {
	size := int64(512)
	if r.ContentLength > 0 && r.ContentLength <= limit {
		size = r.ContentLength + 1 // +1: ReadFrom sees EOF without growing
	}
	buf := bytes.NewBuffer(make([]byte, headroom, headroom+size))
	if _, err := buf.ReadFrom(r.Body); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
