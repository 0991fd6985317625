package cv_test

import (
	"image"
	"image/color"
	"image/draw"
	"slices"
	"testing"
	"time"

	"github.com/visionslice/visionslice/runtime/cv"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// frame1080p is a 1920x1080 JPEG of a smooth background with dark text-like
// blocks, about what a camera frame of a document costs to decode.
func frame1080p(tb testing.TB) []byte {
	img := gradient(1920, 1080)
	for y := 100; y < 1000; y += 60 {
		for x := 100; x < 1800; x += 24 {
			draw.Draw(img, image.Rect(x, y, x+16, y+30), image.NewUniform(color.Black), image.Point{}, draw.Src)
		}
	}
	return encJPEG(tb, img, 90)
}

// ppocrParams is the PP-OCRv4 det preprocessing at 640x640.
func ppocrParams() cv.Params {
	return cv.Params{Width: 640, Height: 640, Letterbox: true, RGB: true, Scale: 1.0 / 255,
		Mean: [3]float32{0.485, 0.456, 0.406}, Std: [3]float32{0.229, 0.224, 0.225}, Datatype: tensor.FP32}
}

func benchInto(b *testing.B, into func(dst, img []byte) error, p cv.Params) {
	img := frame1080p(b)
	dst := make([]byte, p.RowBytes())
	b.SetBytes(int64(len(img)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := into(dst, img); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPreprocess1080pTo640: OpenCV (with and without JPEG DCT-domain
// downscaling) against the pure-Go baseline, one image at a time.
func BenchmarkPreprocess1080pTo640(b *testing.B) {
	b.Run("gocv", func(b *testing.B) {
		pp, err := cv.NewPreprocessor(ppocrParams(), 1)
		if err != nil {
			b.Fatal(err)
		}
		defer pp.Close()
		benchInto(b, pp.Into, ppocrParams())
	})
	b.Run("gocv_full_decode", func(b *testing.B) {
		p := ppocrParams()
		p.FullDecode = true
		pp, err := cv.NewPreprocessor(p, 1)
		if err != nil {
			b.Fatal(err)
		}
		defer pp.Close()
		benchInto(b, pp.Into, p)
	})
	b.Run("pure_go", func(b *testing.B) {
		base, err := cv.NewBaseline(ppocrParams())
		if err != nil {
			b.Fatal(err)
		}
		benchInto(b, base.Into, ppocrParams())
	})
}

// BenchmarkPreprocessSpeedup alternates the OpenCV path and the pure-Go
// baseline on the same 1080p JPEG, so load on the machine hits both alike,
// and reports the ratio of their medians (the speed-up).
func BenchmarkPreprocessSpeedup(b *testing.B) {
	p := ppocrParams()
	pp, err := cv.NewPreprocessor(p, 1)
	if err != nil {
		b.Fatal(err)
	}
	defer pp.Close()
	base, err := cv.NewBaseline(p)
	if err != nil {
		b.Fatal(err)
	}
	img := frame1080p(b)
	dst := make([]byte, p.RowBytes())
	var fast, slow []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if err := pp.Into(dst, img); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := base.Into(dst, img); err != nil {
			b.Fatal(err)
		}
		fast, slow = append(fast, t1.Sub(t0)), append(slow, time.Since(t1))
	}
	b.StopTimer()
	slices.Sort(fast)
	slices.Sort(slow)
	f, s := fast[len(fast)/2], slow[len(slow)/2]
	b.ReportMetric(float64(f.Microseconds())/1e3, "gocv-p50-ms")
	b.ReportMetric(float64(s.Microseconds())/1e3, "pure-go-p50-ms")
	b.ReportMetric(float64(s)/float64(f), "speedup")
}
