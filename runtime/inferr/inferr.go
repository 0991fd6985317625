// Package inferr holds the error classes the inference front end turns into
// protocol status codes (HTTP status, gRPC code). Producers wrap them with
// %w and a message that names what was wrong; the front end uses errors.Is.
package inferr

import (
	"errors"
	"time"
)

var (
	// ErrInvalidInput: the request is wrong (HTTP 400, gRPC InvalidArgument).
	ErrInvalidInput = errors.New("invalid input")
	// ErrNotFound: unknown model or version (HTTP 404, gRPC NotFound).
	ErrNotFound = errors.New("not found")
	// ErrUnavailable: not ready or overloaded; retry later (HTTP 503 with
	// Retry-After, gRPC Unavailable).
	ErrUnavailable = errors.New("unavailable")
	// ErrTooLarge: the request body is over the limit (HTTP 413, gRPC
	// ResourceExhausted).
	ErrTooLarge = errors.New("request too large")
)

// RetryAfter is an ErrUnavailable with a hint of when to retry.
type RetryAfter struct {
	Msg   string
	After time.Duration
}

func (e *RetryAfter) Error() string { return e.Msg }

// Unwrap makes errors.Is(err, ErrUnavailable) hold.
func (e *RetryAfter) Unwrap() error { return ErrUnavailable }
