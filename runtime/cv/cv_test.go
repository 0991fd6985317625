package cv_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"math"
	"slices"
	"testing"

	"github.com/visionslice/visionslice/runtime/cv"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/tensor"
)

func solid(w, h int, c color.RGBA) *image.RGBA {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for i := 0; i < w*h; i++ {
		img.Pix[4*i], img.Pix[4*i+1], img.Pix[4*i+2], img.Pix[4*i+3] = c.R, c.G, c.B, 255
	}
	return img
}

// gradient is a smooth image, so that resampling methods agree closely.
func gradient(w, h int) *image.RGBA {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.SetRGBA(x, y, color.RGBA{uint8(255 * x / w), uint8(255 * y / h), uint8(128 + 64*math.Sin(float64(x+y)/40)), 255})
		}
	}
	return img
}

func encPNG(tb testing.TB, img image.Image) []byte {
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		tb.Fatal(err)
	}
	return b.Bytes()
}

func encJPEG(tb testing.TB, img image.Image, q int) []byte {
	var b bytes.Buffer
	if err := jpeg.Encode(&b, img, &jpeg.Options{Quality: q}); err != nil {
		tb.Fatal(err)
	}
	return b.Bytes()
}

func newPP(tb testing.TB, p cv.Params) *cv.Preprocessor {
	tb.Helper()
	pp, err := cv.NewPreprocessor(p, 2)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		pp.Close()
		if n := pp.LiveMats(); n != 0 {
			tb.Errorf("%d Mats left open after Close", n)
		}
	})
	return pp
}

func f32s(b []byte) []float32 {
	out := make([]float32, len(b)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}

func TestReadHeader(t *testing.T) {
	t.Parallel()
	img := gradient(48, 32)
	pngb, jpgb := encPNG(t, img), encJPEG(t, img, 90)
	for _, tc := range []struct {
		name   string
		data   []byte
		format string
	}{{"png", pngb, "png"}, {"jpeg", jpgb, "jpeg"}, {"jpeg with trailing bytes", append(slices.Clone(jpgb), 0, 0, 0), "jpeg"}} {
		h, err := cv.ReadHeader(tc.data, 0)
		if err != nil || h != (cv.Header{Format: tc.format, Width: 48, Height: 32}) {
			t.Errorf("%s: header %+v, %v", tc.name, h, err)
		}
	}
	bad := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"text", []byte("hello, world")},
		{"gif", []byte("GIF89a\x01\x00\x01\x00")},
		{"jpeg magic only", []byte{0xFF, 0xD8, 0xFF}},
		{"truncated jpeg", jpgb[:len(jpgb)/2]},
		{"truncated png", pngb[:len(pngb)-20]},
		{"png bad ihdr crc", func() []byte { b := slices.Clone(pngb); b[29] ^= 0xff; return b }()},
		{"huge png", hugePNG(100000, 100000)},
		{"huge jpeg", hugeJPEG(t, 60000, 60000)},
	}
	for _, tc := range bad {
		_, err := cv.ReadHeader(tc.data, 50_000_000)
		if !errors.Is(err, cv.ErrBadImage) {
			t.Errorf("%s: err = %v, want ErrBadImage", tc.name, err)
			continue
		}
		t.Logf("%s: %v", tc.name, err)
	}
}

// hugePNG is a well-formed PNG that declares w x h pixels and holds none.
func hugePNG(w, h uint32) []byte {
	chunk := func(b []byte, typ string, data []byte) []byte {
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		start := len(b)
		b = append(b, typ...)
		b = append(b, data...)
		return binary.BigEndian.AppendUint32(b, crc32.ChecksumIEEE(b[start:]))
	}
	ihdr := binary.BigEndian.AppendUint32(nil, w)
	ihdr = binary.BigEndian.AppendUint32(ihdr, h)
	ihdr = append(ihdr, 8, 2, 0, 0, 0) // 8-bit RGB
	b := []byte("\x89PNG\r\n\x1a\n")
	b = chunk(b, "IHDR", ihdr)
	b = chunk(b, "IDAT", []byte{0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01})
	return chunk(b, "IEND", nil)
}

// hugeJPEG patches the SOF of a small JPEG to declare w x h.
func hugeJPEG(tb testing.TB, w, h uint16) []byte {
	b := encJPEG(tb, solid(16, 16, color.RGBA{1, 2, 3, 255}), 90)
	i := bytes.Index(b, []byte{0xFF, 0xC0})
	if i < 0 {
		tb.Fatal("no SOF0 in the encoded JPEG")
	}
	binary.BigEndian.PutUint16(b[i+5:], h)
	binary.BigEndian.PutUint16(b[i+7:], w)
	return b
}

func TestLetterboxNormaliseNCHW(t *testing.T) {
	t.Parallel()
	// A 40x20 solid image letterboxed into 32x32: content 32x16 at rows 8..23.
	img := encPNG(t, solid(40, 20, color.RGBA{200, 100, 50, 255}))
	p := cv.Params{Width: 32, Height: 32, Letterbox: true, PadValue: 114, RGB: true, Scale: 1.0 / 255,
		Mean: [3]float32{0.5, 0.4, 0.3}, Std: [3]float32{0.2, 0.25, 0.5}, Datatype: tensor.FP32}
	pp := newPP(t, p)
	out, err := pp.Batch("x", [][]byte{img})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(out.Shape, []int64{1, 3, 32, 32}) || out.Datatype != tensor.FP32 || out.Validate() != nil {
		t.Fatalf("tensor %v %v", out.Shape, out.Validate())
	}
	v := f32s(out.Data)
	rgb := [3]float32{200, 100, 50}
	for c := 0; c < 3; c++ {
		content := (rgb[c]/255 - p.Mean[c]) / p.Std[c]
		pad := (114.0/255 - p.Mean[c]) / p.Std[c]
		for y := 0; y < 32; y++ {
			want := pad
			if y >= 8 && y < 24 {
				want = content
			}
			for x := 0; x < 32; x++ {
				if got := v[c*1024+y*32+x]; math.Abs(float64(got-want)) > 1e-5 {
					t.Fatalf("channel %d at (%d,%d) = %v, want %v", c, x, y, got, want)
				}
			}
		}
	}
}

func TestResizeNHWCBGRUint8(t *testing.T) {
	t.Parallel()
	img := encPNG(t, solid(7, 5, color.RGBA{10, 20, 30, 255}))
	pp := newPP(t, cv.Params{Width: 16, Height: 8, Datatype: tensor.Uint8, NHWC: true})
	out, err := pp.Batch("x", [][]byte{img, img})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(out.Shape, []int64{2, 8, 16, 3}) || len(out.Data) != 2*8*16*3 {
		t.Fatalf("shape %v, %d bytes", out.Shape, len(out.Data))
	}
	for i := 0; i < len(out.Data); i += 3 {
		if out.Data[i] != 30 || out.Data[i+1] != 20 || out.Data[i+2] != 10 {
			t.Fatalf("pixel %d = %v, want B,G,R = 30,20,10", i/3, out.Data[i:i+3])
		}
	}
}

func TestFP16(t *testing.T) {
	t.Parallel()
	img := encPNG(t, solid(4, 4, color.RGBA{255, 0, 51, 255}))
	pp := newPP(t, cv.Params{Width: 4, Height: 4, RGB: true, Scale: 1.0 / 255, Std: [3]float32{1, 1, 1}, Datatype: tensor.FP16})
	out, err := pp.Batch("x", [][]byte{img})
	if err != nil {
		t.Fatal(err)
	}
	// 1.0 = 0x3c00, 0 = 0, 0.2 = 0x3266 in half precision.
	for c, want := range []uint16{0x3c00, 0, 0x3266} {
		if got := binary.LittleEndian.Uint16(out.Data[c*32:]); got != want {
			t.Errorf("channel %d = %#x, want %#x", c, got, want)
		}
	}
}

func TestMatchesBaseline(t *testing.T) {
	t.Parallel()
	src := gradient(300, 200)
	p := cv.Params{Width: 64, Height: 64, Letterbox: true, RGB: true, Scale: 1, Std: [3]float32{1, 1, 1}, Datatype: tensor.FP32, FullDecode: true}
	pp := newPP(t, p)
	base, err := cv.NewBaseline(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, enc := range []struct {
		name string
		data []byte
	}{{"png", encPNG(t, src)}, {"jpeg", encJPEG(t, src, 95)}} {
		a, err := pp.Batch("x", [][]byte{enc.data})
		if err != nil {
			t.Fatal(err)
		}
		b, err := base.Batch("x", [][]byte{enc.data})
		if err != nil {
			t.Fatal(err)
		}
		var maxDiff float64
		for i, v := range f32s(a.Data) {
			maxDiff = math.Max(maxDiff, math.Abs(float64(v-f32s(b.Data)[i])))
		}
		t.Logf("%s: largest difference OpenCV vs pure Go: %.1f levels", enc.name, maxDiff)
		if maxDiff > 6 {
			t.Errorf("%s: OpenCV and the baseline differ by %.1f levels", enc.name, maxDiff)
		}
	}
}

func TestRejectsBadImagesWithoutLeaks(t *testing.T) {
	t.Parallel()
	pp := newPP(t, cv.Params{Width: 32, Height: 32, Datatype: tensor.FP32, Scale: 1, Std: [3]float32{1, 1, 1}, MaxPixels: 50_000_000})
	good := encJPEG(t, gradient(64, 48), 90)
	corrupt := slices.Clone(good)
	// Garble the data after the headers but keep SOI, SOF and EOI.
	for i := len(corrupt) / 2; i < len(corrupt)-2; i++ {
		corrupt[i] = 0xFF
	}
	cases := [][]byte{nil, []byte("junk"), good[:len(good)/2], hugePNG(20000, 20000), hugeJPEG(t, 65000, 65000), corrupt}
	for round := 0; round < 20; round++ {
		for i, img := range cases {
			dst := make([]byte, pp.Params().RowBytes())
			err := pp.Into(dst, img)
			if i < len(cases)-1 && !errors.Is(err, cv.ErrBadImage) {
				t.Fatalf("case %d: err = %v, want ErrBadImage", i, err)
			}
		}
		if _, err := pp.Batch("x", [][]byte{good, good, good}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pp.Batch("x", [][]byte{good, []byte("junk")}); err == nil || !errors.Is(err, cv.ErrBadImage) {
		t.Fatalf("batch with a bad image: %v", err)
	}
	if n := pp.LiveMats(); n > 2 {
		t.Fatalf("%d Mats live, the pool holds at most 2", n)
	}
}

func TestParamsFromRepository(t *testing.T) {
	t.Parallel()
	scale := float32(1)
	p := cv.ParamsFrom(&repository.Preprocessing{Resize: repository.Letterbox, Width: 640, Height: 480, PadValue: 3,
		Color: repository.BGR, Scale: &scale, Mean: []float32{1, 2, 3}, Std: []float32{4, 5, 6}, Layout: repository.NHWC,
		Datatype: tensor.FP16, MaxImagePixels: 99})
	want := cv.Params{Width: 640, Height: 480, Letterbox: true, PadValue: 3, Scale: 1, Mean: [3]float32{1, 2, 3},
		Std: [3]float32{4, 5, 6}, NHWC: true, Datatype: tensor.FP16, MaxPixels: 99}
	if p != want {
		t.Fatalf("got %+v\nwant %+v", p, want)
	}
	if err := (&cv.Params{Width: 0, Height: 3, Datatype: tensor.FP32}).Validate(); err == nil {
		t.Fatal("zero width accepted")
	}
}

func FuzzPreprocess(f *testing.F) {
	f.Add(encPNG(f, gradient(20, 10)))
	f.Add(encJPEG(f, gradient(20, 10), 80))
	f.Add(hugePNG(1<<20, 1<<20))
	f.Add([]byte("\xff\xd8\xff\xe0junk\xff\xd9"))
	pp, err := cv.NewPreprocessor(cv.Params{Width: 16, Height: 16, Letterbox: true, Scale: 1, Std: [3]float32{1, 1, 1}, Datatype: tensor.FP32, MaxPixels: 1 << 22}, 1)
	if err != nil {
		f.Fatal(err)
	}
	defer pp.Close()
	dst := make([]byte, pp.Params().RowBytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := pp.Into(dst, data); err != nil && !errors.Is(err, cv.ErrBadImage) {
			t.Fatalf("error not marked as a bad image: %v", err)
		}
	})
}
