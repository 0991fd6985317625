package repository

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/visionslice/visionslice/runtime/tensor"
)

func TestParseExamplePPOCR(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile("testdata/ppocr-det/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseConfig(data)
	if err != nil {
		t.Fatal(err)
	}
	in, ok := c.Input("image")
	if !ok || in.Datatype != tensor.Bytes || in.Preprocessing == nil {
		t.Fatalf("input image = %+v", in)
	}
	p := in.Preprocessing
	if p.ModelInput != "x" || p.Resize != Letterbox || p.Width != 640 || p.Color != BGR || p.Layout != NCHW || p.Datatype != tensor.FP32 {
		t.Errorf("preprocessing = %+v", p)
	}
	if got := p.EffectiveScale(); got < 0.0039 || got > 0.004 {
		t.Errorf("scale = %v", got)
	}
	if c.DynamicBatching.MaxQueueDelay != 2*time.Millisecond || c.DynamicBatching.DefaultTimeout != 30*time.Second {
		t.Errorf("dynamic batching = %+v", c.DynamicBatching)
	}
	if got := c.FullDims(&c.Outputs[0]); len(got) != 4 || got[0] != -1 {
		t.Errorf("full dims = %v", got)
	}
}

const minimal = `version: v1
max_batch_size: 4
inputs:
  - {name: x, datatype: FP32, dims: [3]}
outputs:
  - {name: y, datatype: FP32, dims: [3]}
`

func TestParseConfigErrors(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, yaml, want string
	}{
		{"empty", "", "empty file"},
		{"unknown key with line", minimal + "bogus: 1\n", "line 7: field bogus not found"},
		{"unknown nested key", strings.Replace(minimal, "dims: [3]}", "dims: [3], colour: RGB}", 1), "line 4: field colour not found"},
		{"wrong version", strings.Replace(minimal, "v1", "v2", 1), `version "v2" is not supported`},
		{"no version", strings.Replace(minimal, "version: v1\n", "", 1), `version "" is not supported`},
		{"bad datatype", strings.Replace(minimal, "FP32", "FLOAT", 1), `datatype "FLOAT"`},
		{"zero dim", strings.Replace(minimal, "[3]", "[0]", 1), "dim 0 must be positive"},
		{"duplicate name", strings.Replace(minimal, "name: y", "name: x", 1), "already used"},
		{"no outputs", strings.SplitAfter(minimal, "dims: [3]}\n")[0], "outputs: at least one"},
		{"preprocessing on FP32", strings.Replace(minimal, "dims: [3]}", "dims: [3], preprocessing: {resize: resize, width: 2, height: 2}}", 1), "BYTES inputs only"},
		{"bad resize", strings.Replace(minimal, "datatype: FP32, dims: [3]}", "datatype: BYTES, dims: [], preprocessing: {resize: crop, width: 2, height: 2}}", 1), "resize \"crop\""},
		{"bad mean", strings.Replace(minimal, "datatype: FP32, dims: [3]}", "datatype: BYTES, dims: [], preprocessing: {resize: resize, width: 2, height: 2, mean: [1]}}", 1), "mean needs 3"},
		{"preferred above max", minimal + "dynamic_batching: {preferred_batch_sizes: [8]}\n", "outside 1..max_batch_size"},
		{"batching without batch", strings.Replace(minimal, "max_batch_size: 4", "max_batch_size: 0", 1) + "dynamic_batching: {}\n", "needs max_batch_size"},
		{"bad duration", minimal + "dynamic_batching: {max_queue_delay: soon}\n", "line 7"},
		{"two docs", minimal + "---\nversion: v1\n", "more than one"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := ParseConfig([]byte(tc.yaml))
			if err == nil || !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	write(t, filepath.Join(root, "good", ConfigFile), minimal)
	write(t, filepath.Join(root, "good", "1", ModelFile), "onnx")
	write(t, filepath.Join(root, "good", "3", ModelFile), "onnx")
	write(t, filepath.Join(root, "good", "2", "other.bin"), "x") // no model file: not a version
	write(t, filepath.Join(root, "good", "notanumber", ModelFile), "x")
	write(t, filepath.Join(root, "all", ConfigFile), minimal+"version_policy: all\n")
	write(t, filepath.Join(root, "all", "1", ModelFile), "onnx")
	write(t, filepath.Join(root, "all", "2", ModelFile), "onnx")
	write(t, filepath.Join(root, "broken", ConfigFile), minimal+"nope: 1\n")
	write(t, filepath.Join(root, "broken", "1", ModelFile), "onnx")
	write(t, filepath.Join(root, "empty", ConfigFile), minimal)

	r, err := Load(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Models) != 4 {
		t.Fatalf("models = %d", len(r.Models))
	}
	good, err := r.Model("good")
	if err != nil || good.Err != nil {
		t.Fatal(err, good.Err)
	}
	if len(good.Versions) != 2 || good.Versions[1].Number != 3 {
		t.Errorf("versions = %+v", good.Versions)
	}
	if s := good.Served(); len(s) != 1 || s[0].Number != 3 {
		t.Errorf("served (latest) = %+v", s)
	}
	all, _ := r.Model("all")
	if s := all.Served(); len(s) != 2 {
		t.Errorf("served (all) = %+v", s)
	}
	broken, _ := r.Model("broken")
	if broken.Err == nil || !strings.Contains(broken.Err.Error(), "line 7") || broken.Served() != nil {
		t.Errorf("broken err = %v", broken.Err)
	}
	empty, _ := r.Model("empty")
	if empty.Err == nil || !strings.Contains(empty.Err.Error(), "no version") {
		t.Errorf("empty err = %v", empty.Err)
	}
	if _, err := r.Model("missing"); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing: %v", err)
	}
	if _, err := Load(filepath.Join(root, "nope")); err == nil {
		t.Error("Load of a missing root succeeded")
	}
}
