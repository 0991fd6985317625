// Package cv turns encoded images (JPEG, PNG) into model input tensors with
// OpenCV through gocv.io/x/gocv. It is the only package of the project that
// touches gocv; only the model worker process links it.
//
// Every image is checked from its header before a full decode
// (ReadHeader), decoded, resized or letterboxed to the model's size,
// put in the model's colour order, normalised ((v*scale-mean)/std per
// channel) and written in NCHW or NHWC layout as FP32, FP16 or UINT8.
// Baseline does the same in pure Go, for comparison.
package cv

import (
	"fmt"
	"math"

	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// Params describe one preprocessing.
type Params struct {
	Width, Height int
	// Letterbox keeps the aspect ratio and pads (centred) with PadValue;
	// otherwise the image is stretched to Width x Height.
	Letterbox bool
	PadValue  uint8
	// RGB puts channels in R, G, B order; otherwise B, G, R.
	RGB bool
	// Scale multiplies the 0..255 values first; Mean and Std then apply per
	// channel in the output's colour order.
	Scale     float32
	Mean, Std [3]float32
	// NHWC writes pixels interleaved; otherwise planar NCHW.
	NHWC bool
	// Datatype of the result: FP32, FP16 or UINT8 (UINT8 ignores Scale,
	// Mean and Std).
	Datatype tensor.DataType
	// MaxPixels bounds the declared width*height of an image (0: no bound).
	MaxPixels int64
	// FullDecode turns off the JPEG decoder's DCT-domain downscaling
	// (decoding at 1/2, 1/4 or 1/8 size when the image is at least that
	// much larger than what the model gets).
	FullDecode bool
}

// ParamsFrom converts a model repository's preprocessing spec (defaults
// filled) into Params.
func ParamsFrom(p *repository.Preprocessing) Params {
	q := Params{
		Width:     p.Width,
		Height:    p.Height,
		Letterbox: p.Resize == repository.Letterbox,
		PadValue:  uint8(p.PadValue),
		RGB:       p.Color != repository.BGR,
		Scale:     p.EffectiveScale(),
		Mean:      [3]float32{0, 0, 0},
		Std:       [3]float32{1, 1, 1},
		NHWC:      p.Layout == repository.NHWC,
		Datatype:  p.Datatype,
		MaxPixels: p.MaxImagePixels,
	}
	if q.Datatype == "" {
		q.Datatype = tensor.FP32
	}
	copy(q.Mean[:], p.Mean)
	copy(q.Std[:], p.Std)
	return q
}

// Validate reports parameters that cannot work.
func (p Params) Validate() error {
	if p.Width < 1 || p.Height < 1 || p.Width > 16384 || p.Height > 16384 {
		return fmt.Errorf("preprocessing size %dx%d: want 1..16384 each", p.Width, p.Height)
	}
	switch p.Datatype {
	case tensor.FP32, tensor.FP16, tensor.Uint8:
	default:
		return fmt.Errorf("preprocessing datatype %q: want FP32, FP16 or UINT8", p.Datatype)
	}
	if p.Datatype != tensor.Uint8 {
		if !(p.Scale > 0) || math.IsInf(float64(p.Scale), 0) {
			return fmt.Errorf("preprocessing scale %v: want a positive number", p.Scale)
		}
		for _, s := range p.Std {
			if !(s > 0) {
				return fmt.Errorf("preprocessing std %v: want positive values", p.Std)
			}
		}
	}
	return nil
}

// RowBytes is the size of one preprocessed image in the result.
func (p Params) RowBytes() int {
	return 3 * p.Width * p.Height * p.Datatype.Size()
}

// Shape is the result's shape for n images.
func (p Params) Shape(n int) []int64 {
	if p.NHWC {
		return []int64{int64(n), int64(p.Height), int64(p.Width), 3}
	}
	return []int64{int64(n), 3, int64(p.Height), int64(p.Width)}
}

// geometry is where the resized image lands in the Width x Height canvas.
type geometry struct {
	w, h   int // resized size
	x0, y0 int // offset in the canvas
}

func (p Params) geometry(srcW, srcH int) geometry {
	if !p.Letterbox {
		return geometry{w: p.Width, h: p.Height}
	}
	s := math.Min(float64(p.Width)/float64(srcW), float64(p.Height)/float64(srcH))
	w := max(1, min(p.Width, int(math.Round(float64(srcW)*s))))
	h := max(1, min(p.Height, int(math.Round(float64(srcH)*s))))
	return geometry{w: w, h: h, x0: (p.Width - w) / 2, y0: (p.Height - h) / 2}
}

// reduction returns the JPEG decode downscale factor (1, 2, 4 or 8): the
// largest that still leaves at least as many pixels as the resize keeps.
func (p Params) reduction(hd Header) int {
	if p.FullDecode || hd.Format != "jpeg" {
		return 1
	}
	g := p.geometry(hd.Width, hd.Height)
	f := 1
	for _, c := range []int{2, 4, 8} {
		if hd.Width/c >= g.w && hd.Height/c >= g.h {
			f = c
		}
	}
	return f
}
