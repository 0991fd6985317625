package worker

import (
	"context"
	"time"
)

// Timings are what a worker reports of one request besides its result: the
// time it spent preprocessing (decoding and resizing images). A caller that
// wants them puts a *Timings in the request's context with WithTimings; the
// worker's host fills it on its side and the client copies it back.
type Timings struct {
	Preprocess time.Duration
}

type timingsKey struct{}

// WithTimings returns a context that carries t to be filled.
func WithTimings(ctx context.Context, t *Timings) context.Context {
	return context.WithValue(ctx, timingsKey{}, t)
}

// TimingsFrom returns the *Timings in ctx, nil when there is none.
func TimingsFrom(ctx context.Context) *Timings {
	t, _ := ctx.Value(timingsKey{}).(*Timings)
	return t
}
