package cv

import (
	"bytes"
	"fmt"
	"image"
	"image/draw"
	"image/jpeg"
	"image/png"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// Baseline is the pure-Go preprocessing (image/jpeg, image/png, image/draw
// and a bilinear resize on the pixel slice) that the OpenCV path is measured
// against. Its output matches the Preprocessor's up to resampling
// differences. It is not used for serving.
type Baseline struct {
	p Params
	w *writer
}

// NewBaseline checks p and returns a Baseline.
func NewBaseline(p Params) (*Baseline, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return &Baseline{p: p, w: newWriter(p)}, nil
}

// Batch preprocesses images into one tensor, like Preprocessor.Batch.
func (b *Baseline) Batch(name string, images [][]byte) (tensor.Tensor, error) {
	return batch(name, &b.p, images, b.Into)
}

// Into preprocesses one encoded image into dst (RowBytes long).
func (b *Baseline) Into(dst []byte, data []byte) error {
	if len(dst) != b.p.RowBytes() {
		return fmt.Errorf("destination holds %d bytes, one image needs %d", len(dst), b.p.RowBytes())
	}
	hd, err := ReadHeader(data, b.p.MaxPixels)
	if err != nil {
		return err
	}
	var img image.Image
	if hd.Format == "jpeg" {
		img, err = jpeg.Decode(bytes.NewReader(data))
	} else {
		img, err = png.Decode(bytes.NewReader(data))
	}
	if err != nil {
		return fmt.Errorf("%w: decode %s: %w", ErrBadImage, hd.Format, err)
	}
	r := img.Bounds()
	rgba := image.NewRGBA(image.Rect(0, 0, r.Dx(), r.Dy()))
	draw.Draw(rgba, rgba.Bounds(), img, r.Min, draw.Src)
	g := b.p.geometry(r.Dx(), r.Dy())
	pix, stride := bilinear(rgba, g.w, g.h)
	chans := [3]int{2, 1, 0} // B, G, R from RGBA
	if b.p.RGB {
		chans = [3]int{0, 1, 2}
	}
	b.w.write(dst, source{pix: pix, stride: stride, bpp: 4, chans: chans, g: g})
	return nil
}

// bilinear resizes src to w x h with pixel-centre alignment (as OpenCV's
// INTER_LINEAR does), returning RGBA pixels and their stride.
func bilinear(src *image.RGBA, w, h int) ([]byte, int) {
	sw, sh := src.Bounds().Dx(), src.Bounds().Dy()
	if sw == w && sh == h {
		return src.Pix, src.Stride
	}
	type tap struct {
		i0, i1 int
		f      uint32 // weight of i1 in 1/256
	}
	taps := func(n, sn int) []tap {
		t := make([]tap, n)
		scale := float64(sn) / float64(n)
		for i := range t {
			s := (float64(i)+0.5)*scale - 0.5
			if s < 0 {
				s = 0
			}
			i0 := int(s)
			if i0 > sn-1 {
				i0 = sn - 1
			}
			i1 := min(i0+1, sn-1)
			t[i] = tap{i0, i1, uint32((s - float64(i0)) * 256)}
		}
		return t
	}
	xs, ys := taps(w, sw), taps(h, sh)
	out := make([]byte, 4*w*h)
	for y, ty := range ys {
		r0 := src.Pix[ty.i0*src.Stride:]
		r1 := src.Pix[ty.i1*src.Stride:]
		o := out[4*w*y:]
		for x, tx := range xs {
			a, bb := 4*tx.i0, 4*tx.i1
			for c := 0; c < 3; c++ {
				top := uint32(r0[a+c])*(256-tx.f) + uint32(r0[bb+c])*tx.f
				bot := uint32(r1[a+c])*(256-tx.f) + uint32(r1[bb+c])*tx.f
				o[4*x+c] = uint8((top*(256-ty.f) + bot*ty.f + 1<<15) >> 16)
			}
		}
	}
	return out, 4 * w
}
