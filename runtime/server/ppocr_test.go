//go:build !nocv

// The image end-to-end test needs OpenCV; -tags nocv leaves it out.

package server

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/visionslice/visionslice/runtime/cv"
	pb "github.com/visionslice/visionslice/runtime/oip/inferencepb"
	"github.com/visionslice/visionslice/runtime/onnxgen"
	"github.com/visionslice/visionslice/runtime/ort"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/tensor"
	"github.com/visionslice/visionslice/runtime/workertest"
)

// ppocrRepo lays out the example ppocr-det config with the cached model.
func ppocrRepo(t testing.TB) (root, model string) {
	t.Helper()
	model = os.Getenv("VISIONSLICE_PPOCR_MODEL")
	if model == "" {
		t.Skip("VISIONSLICE_PPOCR_MODEL is not set (run `make deps` and use `make test`)")
	}
	cfg, err := os.ReadFile("../repository/testdata/ppocr-det/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	root = t.TempDir()
	writeFile(t, filepath.Join(root, "ppocr-det", "config.yaml"), cfg)
	if err := os.MkdirAll(filepath.Join(root, "ppocr-det", "1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(model, filepath.Join(root, "ppocr-det", "1", "model.onnx")); err != nil {
		t.Fatal(err)
	}
	return root, model
}

// directPPOCR runs the same preprocessing and the model in this process.
func directPPOCR(t testing.TB, modelPath string, img []byte) tensor.Tensor {
	t.Helper()
	data, err := os.ReadFile("../repository/testdata/ppocr-det/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	spec, err := repository.ParseConfig(data)
	if err != nil {
		t.Fatal(err)
	}
	pp, err := cv.NewPreprocessor(cv.ParamsFrom(spec.Inputs[0].Preprocessing), 1)
	if err != nil {
		t.Fatal(err)
	}
	defer pp.Close()
	x, err := pp.Batch("x", [][]byte{img})
	if err != nil {
		t.Fatal(err)
	}
	if err := ort.Init(os.Getenv("VISIONSLICE_ORT_LIB")); err != nil {
		t.Fatal(err)
	}
	model, err := os.ReadFile(modelPath)
	if err != nil {
		t.Fatal(err)
	}
	sess, err := ort.NewSession(model, ort.Options{IntraOpThreads: spec.IntraOpThreads})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	out, err := sess.Run([]tensor.Tensor{x}, []string{"sigmoid_0.tmp_0"})
	if err != nil {
		t.Fatal(err)
	}
	return out[0]
}

// TestPPOCRDetEndToEnd posts a real JPEG to the PP-OCRv4 det model served by
// real worker processes, over HTTP (raw body, as `curl --data-binary`
// sends it, and the binary tensor extension) and gRPC, and compares the
// output with a direct in-process ONNX Runtime run on the same tensor.
func TestPPOCRDetEndToEnd(t *testing.T) {
	root, modelPath := ppocrRepo(t)
	img := workertest.TextImage(t)
	r := startServer(t, root, Deps{})
	if !r.srv.Ready() {
		t.Fatal("server not ready after loading")
	}
	want := directPPOCR(t, modelPath, img)
	if !slices.Equal(want.Shape, []int64{1, 1, 640, 640}) {
		t.Fatalf("direct output shape %v", want.Shape)
	}
	// The logo's text is detected: some pixels are text with high probability.
	text := 0
	for _, p := range onnxgen.Float32s(want) {
		if p > 0.5 {
			text++
		}
	}
	if text < 100 {
		t.Fatalf("only %d text pixels in the direct run", text)
	}
	t.Logf("%d of %d pixels are text", text, 640*640)

	// HTTP, raw JPEG body.
	resp, b := post(t, r.http+"/v2/models/ppocr-det/infer?binary_data_output=true", "image/jpeg", img)
	if resp.StatusCode != 200 {
		t.Fatalf("http raw: %d %s", resp.StatusCode, b)
	}
	hl, _ := strconv.Atoi(resp.Header.Get("Inference-Header-Content-Length"))
	var hdr struct {
		Outputs []struct {
			Name  string
			Shape []int64
		}
	}
	if err := json.Unmarshal(b[:hl], &hdr); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(hdr.Outputs[0].Shape, want.Shape) || !bytes.Equal(b[hl:], want.Data) {
		t.Fatalf("http raw output differs from the direct run (shape %v)", hdr.Outputs[0].Shape)
	}

	// HTTP, binary tensor extension with a BYTES input.
	el := tensor.AppendBytesElement(nil, img)
	header := `{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":` + strconv.Itoa(len(el)) + `}}],
		"outputs":[{"name":"sigmoid_0.tmp_0","parameters":{"binary_data":true}}]}`
	resp, b = post(t, r.http+"/v2/models/ppocr-det/versions/1/infer", "application/octet-stream", append([]byte(header), el...),
		"Inference-Header-Content-Length", strconv.Itoa(len(header)))
	if resp.StatusCode != 200 {
		t.Fatalf("http binary: %d %s", resp.StatusCode, b)
	}
	hl, _ = strconv.Atoi(resp.Header.Get("Inference-Header-Content-Length"))
	if !bytes.Equal(b[hl:], want.Data) {
		t.Fatal("http binary extension output differs from the direct run")
	}

	// gRPC, BYTES contents.
	g, err := r.grpc.ModelInfer(context.Background(), &pb.ModelInferRequest{ModelName: "ppocr-det",
		Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "image", Datatype: "BYTES", Shape: []int64{1}, Contents: &pb.InferTensorContents{BytesContents: [][]byte{img}}}}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(g.GetOutputs()[0].GetShape(), want.Shape) || !bytes.Equal(g.GetRawOutputContents()[0], want.Data) {
		t.Fatal("grpc output differs from the direct run")
	}

	// The workers reported their preprocessing time of the three requests.
	prep := r.srv.metrics.prep.WithLabelValues("ppocr-det", "1").(prometheus.Histogram)
	var m dto.Metric
	if err := prep.Write(&m); err != nil {
		t.Fatal(err)
	}
	if n, sum := m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum(); n != 3 || sum <= 0 {
		t.Errorf("preprocess histogram: %d samples, %v s in all; want 3 samples of real time", n, sum)
	} else {
		t.Logf("worker preprocessing: %.1f ms per image", 1000*sum/float64(n))
	}

	// A corrupt image is the client's fault: 400, and no worker restarts.
	resp, b = post(t, r.http+"/v2/models/ppocr-det/infer", "image/jpeg", img[:len(img)/3])
	if resp.StatusCode != 400 || !strings.Contains(string(b), "image") {
		t.Fatalf("corrupt jpeg: %d %s", resp.StatusCode, b)
	}
	if rs := r.srv.lookup("ppocr-det", "").poolOrNil().Restarts(); len(rs) != 0 {
		t.Fatalf("restarts after a corrupt image: %v", rs)
	}
}
