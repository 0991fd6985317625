package cv

import (
	"math"
	"unsafe"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// writer turns resized 8-bit pixels into one row of the result. Per channel
// lookup tables hold the normalised value of each of the 256 levels, so the
// inner loop is a load and a store per value.
type writer struct {
	p     Params
	f32   [3][256]float32
	f16   [3][256]uint16
	pad32 [3]float32
	pad16 [3]uint16
}

func newWriter(p Params) *writer {
	w := &writer{p: p}
	for c := 0; c < 3; c++ {
		for v := 0; v < 256; v++ {
			f := (float32(v)*p.Scale - p.Mean[c]) / p.Std[c]
			w.f32[c][v] = f
			w.f16[c][v] = halfOf(f)
		}
		w.pad32[c] = w.f32[c][p.PadValue]
		w.pad16[c] = w.f16[c][p.PadValue]
	}
	return w
}

// source is a resized image: rows of pixels with bpp bytes each; chans maps
// output channel k to the byte offset of its value within a pixel.
type source struct {
	pix    []byte
	stride int
	bpp    int
	chans  [3]int
	g      geometry
}

// write fills dst (RowBytes long) from src, padding around it.
func (w *writer) write(dst []byte, src source) {
	switch w.p.Datatype {
	case tensor.FP32:
		out := unsafe.Slice((*float32)(unsafe.Pointer(&dst[0])), len(dst)/4)
		writeAs(out, &w.f32, w.pad32, w.p, src)
	case tensor.FP16:
		out := unsafe.Slice((*uint16)(unsafe.Pointer(&dst[0])), len(dst)/2)
		writeAs(out, &w.f16, w.pad16, w.p, src)
	default:
		var lut [3][256]uint8
		for c := range lut {
			for v := range lut[c] {
				lut[c][v] = uint8(v)
			}
		}
		writeAs(dst, &lut, [3]uint8{w.p.PadValue, w.p.PadValue, w.p.PadValue}, w.p, src)
	}
}

func writeAs[T any](out []T, lut *[3][256]T, pad [3]T, p Params, src source) {
	W, H := p.Width, p.Height
	g := src.g
	padded := g.w != W || g.h != H
	c0, c1, c2 := src.chans[0], src.chans[1], src.chans[2]
	l0, l1, l2 := &lut[0], &lut[1], &lut[2]
	if p.NHWC {
		if padded {
			for i := 0; i < W*H; i++ {
				out[3*i], out[3*i+1], out[3*i+2] = pad[0], pad[1], pad[2]
			}
		}
		for y := 0; y < g.h; y++ {
			row := src.pix[y*src.stride : y*src.stride+g.w*src.bpp]
			o := out[3*((g.y0+y)*W+g.x0) : 3*((g.y0+y)*W+g.x0+g.w)]
			for x, s := 0, 0; x < g.w; x, s = x+1, s+src.bpp {
				o[3*x] = l0[row[s+c0]]
				o[3*x+1] = l1[row[s+c1]]
				o[3*x+2] = l2[row[s+c2]]
			}
		}
		return
	}
	plane := W * H
	p0, p1, p2 := out[:plane], out[plane:2*plane], out[2*plane:3*plane]
	if padded {
		for i := 0; i < plane; i++ {
			p0[i], p1[i], p2[i] = pad[0], pad[1], pad[2]
		}
	}
	for y := 0; y < g.h; y++ {
		row := src.pix[y*src.stride : y*src.stride+g.w*src.bpp]
		o := (g.y0+y)*W + g.x0
		q0, q1, q2 := p0[o:o+g.w], p1[o:o+g.w], p2[o:o+g.w]
		for x, s := 0, 0; x < g.w; x, s = x+1, s+src.bpp {
			q0[x] = l0[row[s+c0]]
			q1[x] = l1[row[s+c1]]
			q2[x] = l2[row[s+c2]]
		}
	}
}

// halfOf converts a float32 to IEEE 754 half precision, rounding to
// nearest even, with overflow to infinity.
func halfOf(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int((b>>23)&0xff) - 127 + 15
	mant := b & 0x7fffff
	switch {
	case (b>>23)&0xff == 0xff: // Inf or NaN
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	case exp >= 31:
		return sign | 0x7c00
	case exp <= 0:
		if exp < -10 {
			return sign
		}
		mant |= 0x800000
		shift := uint(14 - exp)
		h := mant >> shift
		rem := mant & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	}
	h := uint32(exp)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++
	}
	return sign | uint16(h)
}
