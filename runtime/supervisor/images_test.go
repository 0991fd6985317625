//go:build !nocv

package supervisor_test

import (
	"bytes"
	"context"
	"errors"
	"image"
	"image/color"
	"image/draw"
	"image/jpeg"
	"image/png"
	"slices"
	"strings"
	"testing"

	"github.com/visionslice/visionslice/runtime/cv"
	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/onnxgen"
	"github.com/visionslice/visionslice/runtime/ort"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/supervisor"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/workertest"
)

// The tests of this file need a worker with OpenCV (not built with nocv).

func pngOf(tb testing.TB, w, h int, c color.RGBA) []byte {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for i := 0; i < w*h; i++ {
		copy(img.Pix[4*i:], []byte{c.R, c.G, c.B, 255})
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		tb.Fatal(err)
	}
	return b.Bytes()
}

func TestImagesPreprocessedInWorker(t *testing.T) {
	cfg := config(t)
	model := writeModel(t, must(onnxgen.Unary("Identity", tensor.FP32, []int64{onnxgen.Dynamic, 3, 16, 16})))
	spec := &repository.Config{Version: "v1", MaxBatchSize: 4,
		Inputs: []repository.TensorSpec{{Name: "image", Datatype: tensor.Bytes, Dims: []int64{1}, Preprocessing: &repository.Preprocessing{
			ModelInput: "x", Resize: repository.Letterbox, Width: 16, Height: 16, PadValue: 114, Color: repository.RGB,
			Mean: []float32{0.485, 0.456, 0.406}, Std: []float32{0.229, 0.224, 0.225}}}},
		Outputs: []repository.TensorSpec{{Name: "y", Datatype: tensor.FP32, Dims: []int64{3, 16, 16}}}}
	spec.SetDefaults()
	if err := spec.Validate(); err != nil {
		t.Fatal(err)
	}
	p := start(t, cfg, supervisor.Model{Name: "img/1", ModelPath: model, Spec: spec}, nil, supervisor.Hooks{})
	if md := p.Metadata(); len(md.Images) != 1 || md.Images[0].ModelInput != "x" {
		t.Fatalf("metadata images %+v", md.Images)
	}
	imgs := [][]byte{pngOf(t, 32, 16, color.RGBA{200, 10, 30, 255}), pngOf(t, 8, 24, color.RGBA{0, 90, 255, 255})}
	var data []byte
	for _, im := range imgs {
		data = tensor.AppendBytesElement(data, im)
	}
	out, err := p.Infer(context.Background(), []tensor.Tensor{{Name: "image", Datatype: tensor.Bytes, Shape: []int64{2, 1}, Data: data}}, []string{"y"})
	if err != nil {
		t.Fatal(err)
	}
	// The same preprocessing in this process gives the same tensor.
	pp, err := cv.NewPreprocessor(cv.ParamsFrom(spec.Inputs[0].Preprocessing), 1)
	if err != nil {
		t.Fatal(err)
	}
	defer pp.Close()
	want, err := pp.Batch("x", imgs)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(out[0].Shape, []int64{2, 3, 16, 16}) || !bytes.Equal(out[0].Data, want.Data) {
		t.Fatalf("worker preprocessing differs: shape %v", out[0].Shape)
	}
	for _, bad := range [][]byte{[]byte("not an image"), pngOf(t, 8, 8, color.RGBA{})[:40]} {
		_, err := p.Infer(context.Background(), []tensor.Tensor{{Name: "image", Datatype: tensor.Bytes, Shape: []int64{1}, Data: tensor.AppendBytesElement(nil, bad)}}, nil)
		if !errors.Is(err, inferr.ErrInvalidInput) || !strings.Contains(err.Error(), "image") {
			t.Fatalf("bad image: %v", err)
		}
		t.Log(err)
	}
	if r := p.Restarts(); len(r) != 0 {
		t.Fatalf("bad images restarted workers: %v", r)
	}
}

// TestPPOCRJPEGThroughWorker: a JPEG of text-like glyphs goes to the
// PP-OCRv4 det worker as BYTES; the answer equals preprocessing and running
// the model in this process.
func TestPPOCRJPEGThroughWorker(t *testing.T) {
	cfg := config(t)
	modelPath, model := workertest.PPOCRModel(t)
	spec := &repository.Config{Version: "v1", MaxBatchSize: 4, IntraOpThreads: 2,
		Inputs: []repository.TensorSpec{{Name: "image", Datatype: tensor.Bytes, Dims: []int64{1}, Preprocessing: &repository.Preprocessing{
			ModelInput: "x", Resize: repository.Letterbox, Width: 640, Height: 640, Color: repository.RGB,
			Mean: []float32{0.485, 0.456, 0.406}, Std: []float32{0.229, 0.224, 0.225}}}},
		Outputs: []repository.TensorSpec{{Name: "sigmoid_0.tmp_0", Datatype: tensor.FP32, Dims: []int64{1, -1, -1}}}}
	spec.SetDefaults()
	if err := spec.Validate(); err != nil {
		t.Fatal(err)
	}
	p := start(t, cfg, supervisor.Model{Name: "ppocr/1", ModelPath: modelPath, Spec: spec}, nil, supervisor.Hooks{})
	img := image.NewRGBA(image.Rect(0, 0, 960, 540))
	for i := range img.Pix {
		img.Pix[i] = 255
	}
	black := image.NewUniform(color.Black)
	for y := 60; y < 480; y += 90 {
		for x := 40; x < 880; x += 22 {
			if (x/22)%6 == 5 {
				continue // a space between words
			}
			draw.Draw(img, image.Rect(x, y, x+4, y+28), black, image.Point{}, draw.Src)
			draw.Draw(img, image.Rect(x, y+12, x+14, y+16), black, image.Point{}, draw.Src)
			draw.Draw(img, image.Rect(x+12, y, x+16, y+28), black, image.Point{}, draw.Src)
		}
	}
	var jb bytes.Buffer
	if err := jpeg.Encode(&jb, img, &jpeg.Options{Quality: 90}); err != nil {
		t.Fatal(err)
	}
	out, err := p.Infer(context.Background(), []tensor.Tensor{{Name: "image", Datatype: tensor.Bytes, Shape: []int64{1, 1},
		Data: tensor.AppendBytesElement(nil, jb.Bytes())}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ort.Init(cfg.ORTLibrary); err != nil {
		t.Fatal(err)
	}
	pp, err := cv.NewPreprocessor(cv.ParamsFrom(spec.Inputs[0].Preprocessing), 1)
	if err != nil {
		t.Fatal(err)
	}
	defer pp.Close()
	x, err := pp.Batch("x", [][]byte{jb.Bytes()})
	if err != nil {
		t.Fatal(err)
	}
	s, err := ort.NewSession(model, ort.Options{IntraOpThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	want, err := s.Run([]tensor.Tensor{x}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(out[0].Shape, []int64{1, 1, 640, 640}) || !bytes.Equal(out[0].Data, want[0].Data) {
		t.Fatalf("worker answer (shape %v) differs from the in-process run", out[0].Shape)
	}
	var text int
	for _, v := range onnxgen.Float32s(out[0]) {
		if v > 0.3 {
			text++
		}
	}
	t.Logf("%d of %d pixels are text", text, 640*640)
	if text < 5000 {
		t.Fatal("the detector found no text")
	}
}
