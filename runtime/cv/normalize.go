package cv

import (
	"math"
	"runtime"
	"sync"
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
	if padded {
		fillPad(out, pad, W*H, p.NHWC)
	}
	// Rows are independent: large images are split across goroutines.
	parts := 1
	if g.w*g.h >= 1<<16 {
		parts = min(runtime.GOMAXPROCS(0), 4)
	}
	if parts == 1 {
		writeRows(out, lut, p, src, 0, g.h)
		return
	}
	var wg sync.WaitGroup
	step := (g.h + parts - 1) / parts
	for y0 := 0; y0 < g.h; y0 += step {
		wg.Add(1)
		go func() {
			defer wg.Done()
			writeRows(out, lut, p, src, y0, min(y0+step, g.h))
		}()
	}
	wg.Wait()
}

func fillPad[T any](out []T, pad [3]T, plane int, nhwc bool) {
	if nhwc {
		for i := 0; i < plane; i++ {
			out[3*i], out[3*i+1], out[3*i+2] = pad[0], pad[1], pad[2]
		}
		return
	}
	for c := 0; c < 3; c++ {
		o := out[c*plane : (c+1)*plane]
		for i := range o {
			o[i] = pad[c]
		}
	}
}

// writeRows converts rows y0..y1 of the source. The tables are reordered
// by source byte, so the inner loop reads a pixel's bytes at fixed offsets.
func writeRows[T any](out []T, lut *[3][256]T, p Params, src source, y0, y1 int) {
	W, H := p.Width, p.Height
	g := src.g
	// For source byte k: the output channel it feeds.
	var ch [3]int
	for j, k := range src.chans {
		ch[k] = j
	}
	l0, l1, l2 := &lut[ch[0]], &lut[ch[1]], &lut[ch[2]]
	bpp := src.bpp
	if p.NHWC {
		for y := y0; y < y1; y++ {
			row := src.pix[y*src.stride : y*src.stride+g.w*bpp]
			o := out[3*((g.y0+y)*W+g.x0) : 3*((g.y0+y)*W+g.x0+g.w)]
			for x := 0; x < g.w; x++ {
				px := row[x*bpp : x*bpp+3 : x*bpp+3]
				q := o[3*x : 3*x+3 : 3*x+3]
				q[ch[0]], q[ch[1]], q[ch[2]] = l0[px[0]], l1[px[1]], l2[px[2]]
			}
		}
		return
	}
	plane := W * H
	for y := y0; y < y1; y++ {
		row := src.pix[y*src.stride : y*src.stride+g.w*bpp]
		o := (g.y0+y)*W + g.x0
		q0 := out[ch[0]*plane+o : ch[0]*plane+o+g.w]
		q1 := out[ch[1]*plane+o : ch[1]*plane+o+g.w]
		q2 := out[ch[2]*plane+o : ch[2]*plane+o+g.w]
		if bpp == 3 {
			for x := range q0 {
				px := row[3*x : 3*x+3 : 3*x+3]
				q0[x], q1[x], q2[x] = l0[px[0]], l1[px[1]], l2[px[2]]
			}
			continue
		}
		for x := range q0 {
			px := row[x*bpp : x*bpp+3 : x*bpp+3]
			q0[x], q1[x], q2[x] = l0[px[0]], l1[px[1]], l2[px[2]]
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
