package ort_test

import (
	"errors"
	"image"
	"image/color"
	"image/draw"
	"os"
	"slices"
	"testing"

	"github.com/visionslice/visionslice/runtime/onnxgen"
	"github.com/visionslice/visionslice/runtime/ort"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/workertest"
)

// initORT loads the runtime named by VISIONSLICE_ORT_LIB or skips.
func initORT(tb testing.TB) {
	tb.Helper()
	lib := os.Getenv("VISIONSLICE_ORT_LIB")
	if lib == "" {
		tb.Skip("VISIONSLICE_ORT_LIB is not set (run `make deps` and use `make test`)")
	}
	if _, err := os.Stat(lib); err != nil {
		tb.Skipf("ONNX Runtime library %s is missing: %v", lib, err)
	}
	if err := ort.Init(lib); err != nil {
		tb.Fatal(err)
	}
}

func newSession(tb testing.TB, model []byte, err error) *ort.Session {
	tb.Helper()
	if err != nil {
		tb.Fatal(err)
	}
	s, err := ort.NewSession(model, ort.Options{IntraOpThreads: 1})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

func TestInitTwice(t *testing.T) {
	initORT(t)
	if err := ort.Init(os.Getenv("VISIONSLICE_ORT_LIB")); err != nil {
		t.Fatalf("second Init with the same path: %v", err)
	}
	if err := ort.Init("/nonexistent/libonnxruntime.so"); err == nil {
		t.Fatal("Init with another path succeeded")
	}
	if ort.Version() == "" {
		t.Fatal("empty version")
	}
}

func TestMetadataAndDynamicBatch(t *testing.T) {
	initORT(t)
	m, err := onnxgen.Binary("Add", tensor.FP32, []int64{onnxgen.Dynamic, 3})
	s := newSession(t, m, err)
	wantIn := []ort.IO{{Name: "a", Datatype: tensor.FP32, Shape: []int64{-1, 3}}, {Name: "b", Datatype: tensor.FP32, Shape: []int64{-1, 3}}}
	if got := s.Inputs(); len(got) != 2 || got[0].Name != "a" || !slices.Equal(got[0].Shape, wantIn[0].Shape) || got[1].Datatype != tensor.FP32 {
		t.Fatalf("inputs = %+v, want %+v", got, wantIn)
	}
	if got := s.Outputs(); len(got) != 1 || got[0].Name != "c" || !slices.Equal(got[0].Shape, []int64{-1, 3}) {
		t.Fatalf("outputs = %+v", got)
	}
	for _, batch := range []int64{1, 4, 17} {
		a := make([]float32, batch*3)
		b := make([]float32, batch*3)
		for i := range a {
			a[i], b[i] = float32(i), float32(2*i)+0.5
		}
		out, err := s.Run([]tensor.Tensor{onnxgen.FP32("b", []int64{batch, 3}, b...), onnxgen.FP32("a", []int64{batch, 3}, a...)}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(out) != 1 || out[0].Name != "c" || !slices.Equal(out[0].Shape, []int64{batch, 3}) {
			t.Fatalf("batch %d: output %+v", batch, out)
		}
		for i, v := range onnxgen.Float32s(out[0]) {
			if v != a[i]+b[i] {
				t.Fatalf("batch %d: c[%d] = %v, want %v", batch, i, v, a[i]+b[i])
			}
		}
	}
}

func TestDatatypes(t *testing.T) {
	initORT(t)
	for _, dt := range []tensor.DataType{tensor.FP32, tensor.FP64, tensor.Int32, tensor.Int64, tensor.Uint8, tensor.Int8, tensor.Int16, tensor.Uint16, tensor.Bool} {
		t.Run(string(dt), func(t *testing.T) {
			m, err := onnxgen.Unary("Identity", dt, []int64{onnxgen.Dynamic, 2, 2})
			s := newSession(t, m, err)
			data := make([]byte, 3*4*dt.Size())
			for i := range data {
				data[i] = byte(i * 7)
				if dt == tensor.Bool {
					data[i] &= 1
				}
			}
			out, err := s.Run([]tensor.Tensor{{Name: "x", Datatype: dt, Shape: []int64{3, 2, 2}, Data: data}}, []string{"y"})
			if err != nil {
				t.Fatal(err)
			}
			if out[0].Datatype != dt || !slices.Equal(out[0].Shape, []int64{3, 2, 2}) || !slices.Equal(out[0].Data, data) {
				t.Fatalf("identity of %s: got %+v", dt, out[0])
			}
		})
	}
	t.Run("FP16 input", func(t *testing.T) {
		m := onnxgen.Model{Graph: onnxgen.Graph{
			Nodes:   []onnxgen.Node{{Op: "Cast", Inputs: []string{"x"}, Outputs: []string{"y"}, Attrs: []onnxgen.Attr{onnxgen.IntAttr("to", 1)}}},
			Inputs:  []onnxgen.Value{{Name: "x", Datatype: tensor.FP16, Shape: []int64{2}}},
			Outputs: []onnxgen.Value{{Name: "y", Datatype: tensor.FP32, Shape: []int64{2}}},
		}}
		b, err := m.Marshal()
		s := newSession(t, b, err)
		// 1.0 and -2.0 in IEEE half precision.
		out, err := s.Run([]tensor.Tensor{{Name: "x", Datatype: tensor.FP16, Shape: []int64{2}, Data: []byte{0x00, 0x3c, 0x00, 0xc0}}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := onnxgen.Float32s(out[0]); !slices.Equal(got, []float32{1, -2}) {
			t.Fatalf("cast = %v", got)
		}
	})
}

func TestReduceSumAndOutputSelection(t *testing.T) {
	initORT(t)
	m, err := onnxgen.ReduceSum(tensor.FP32, []int64{onnxgen.Dynamic, 2, 3}, 2)
	s := newSession(t, m, err)
	in := onnxgen.FP32("x", []int64{2, 2, 3}, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
	out, err := s.Run([]tensor.Tensor{in}, []string{"y"})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 1 || out[0].Name != "y" || !slices.Equal(out[0].Shape, []int64{2, 2}) || !slices.Equal(onnxgen.Float32s(out[0]), []float32{6, 15, 24, 33}) {
		t.Fatalf("y = %+v %v", out, onnxgen.Float32s(out[0]))
	}
	out, err = s.Run([]tensor.Tensor{in}, []string{"z", "y"})
	if err != nil {
		t.Fatal(err)
	}
	if out[0].Name != "z" || out[1].Name != "y" || !slices.Equal(out[0].Data, in.Data) {
		t.Fatalf("order of outputs: %s, %s", out[0].Name, out[1].Name)
	}
}

func TestBadInputs(t *testing.T) {
	initORT(t)
	m, err := onnxgen.Binary("Mul", tensor.FP32, []int64{onnxgen.Dynamic, 2})
	s := newSession(t, m, err)
	a := onnxgen.FP32("a", []int64{1, 2}, 1, 2)
	b := onnxgen.FP32("b", []int64{1, 2}, 3, 4)
	cases := []struct {
		name    string
		inputs  []tensor.Tensor
		outputs []string
	}{
		{"missing input", []tensor.Tensor{a}, nil},
		{"extra input", []tensor.Tensor{a, b, onnxgen.FP32("c", []int64{1, 2}, 0, 0)}, nil},
		{"unknown input", []tensor.Tensor{a, onnxgen.FP32("q", []int64{1, 2}, 0, 0)}, nil},
		{"duplicate input", []tensor.Tensor{a, a}, nil},
		{"wrong dtype", []tensor.Tensor{a, {Name: "b", Datatype: tensor.Int32, Shape: []int64{1, 2}, Data: make([]byte, 8)}}, nil},
		{"wrong rank", []tensor.Tensor{a, onnxgen.FP32("b", []int64{2}, 0, 0)}, nil},
		{"wrong fixed dim", []tensor.Tensor{a, onnxgen.FP32("b", []int64{1, 3}, 0, 0, 0)}, nil},
		{"data short of shape", []tensor.Tensor{a, {Name: "b", Datatype: tensor.FP32, Shape: []int64{2, 2}, Data: make([]byte, 8)}}, nil},
		{"empty tensor", []tensor.Tensor{a, {Name: "b", Datatype: tensor.FP32, Shape: []int64{0, 2}}}, nil},
		{"unknown output", []tensor.Tensor{a, b}, []string{"nope"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.Run(tc.inputs, tc.outputs)
			if !errors.Is(err, ort.ErrInvalidInput) {
				t.Fatalf("err = %v, want ErrInvalidInput", err)
			}
			t.Log(err)
		})
	}
	if _, err := ort.NewSession([]byte("not a model"), ort.Options{}); err == nil {
		t.Fatal("garbage model loaded")
	}
}

// textImage draws rows of dark glyph-like blocks on white: what a text
// detector sees as words. It returns the image and the boxes of the words.
func textImage(w, h int) (*image.RGBA, []image.Rectangle) {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	draw.Draw(img, img.Bounds(), image.NewUniform(color.White), image.Point{}, draw.Src)
	var words []image.Rectangle
	for row := 0; row < 4; row++ {
		y := 60 + row*120
		x := 40
		for word := 0; word < 3; word++ {
			start := x
			for ch := 0; ch < 5; ch++ {
				// Glyphs of two strokes, like letters.
				draw.Draw(img, image.Rect(x, y, x+4, y+28), image.NewUniform(color.Black), image.Point{}, draw.Src)
				draw.Draw(img, image.Rect(x, y+12, x+14, y+16), image.NewUniform(color.Black), image.Point{}, draw.Src)
				draw.Draw(img, image.Rect(x+12, y, x+16, y+28), image.NewUniform(color.Black), image.Point{}, draw.Src)
				x += 22
			}
			words = append(words, image.Rect(start, y, x-6, y+28))
			x += 40
		}
	}
	return img, words
}

// nchw normalises an RGBA image as PP-OCR expects (ImageNet mean/std, RGB).
func nchw(img *image.RGBA) tensor.Tensor {
	w, h := img.Bounds().Dx(), img.Bounds().Dy()
	mean := [3]float32{0.485, 0.456, 0.406}
	std := [3]float32{0.229, 0.224, 0.225}
	v := make([]float32, 3*w*h)
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			p := img.Pix[y*img.Stride+4*x:]
			for c := 0; c < 3; c++ {
				v[c*w*h+y*w+x] = (float32(p[c])/255 - mean[c]) / std[c]
			}
		}
	}
	return onnxgen.FP32("x", []int64{1, 3, int64(h), int64(w)}, v...)
}

func TestPPOCRDetOnTextImage(t *testing.T) {
	initORT(t)
	_, model := workertest.PPOCRModel(t)
	s, err := ort.NewSession(model, ort.Options{IntraOpThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if in := s.Inputs(); len(in) != 1 || in[0].Name != "x" || !slices.Equal(in[0].Shape, []int64{-1, 3, -1, -1}) {
		t.Fatalf("inputs = %+v", in)
	}
	img, words := textImage(640, 640)
	out, err := s.Run([]tensor.Tensor{nchw(img)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 1 || !slices.Equal(out[0].Shape, []int64{1, 1, 640, 640}) {
		t.Fatalf("output %+v", out)
	}
	prob := onnxgen.Float32s(out[0])
	inWord := func(x, y int) bool {
		for _, r := range words {
			if image.Pt(x, y).In(r) {
				return true
			}
		}
		return false
	}
	var inSum, outSum float64
	var inN, outN int
	for y := 0; y < 640; y++ {
		for x := 0; x < 640; x++ {
			if inWord(x, y) {
				inSum += float64(prob[y*640+x])
				inN++
			} else {
				outSum += float64(prob[y*640+x])
				outN++
			}
		}
	}
	inMean, outMean := inSum/float64(inN), outSum/float64(outN)
	t.Logf("mean text probability: in words %.3f, elsewhere %.3f", inMean, outMean)
	if inMean < 0.3 || outMean > 0.05 {
		t.Fatalf("the detector does not find the words: in %.3f, out %.3f", inMean, outMean)
	}
}
