package scrape

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
)

var update = flag.Bool("update", false, "rewrite golden files in testdata")

var scrapeTime = time.Date(2026, 11, 26, 15, 0, 0, 0, time.UTC)

func TestParseGolden(t *testing.T) {
	t.Parallel()
	text, err := os.ReadFile(filepath.Join("testdata", "agent.prom"))
	if err != nil {
		t.Fatal(err)
	}
	gpus, samples, err := Parse(bytes.NewReader(text), expfmt.NewFormat(expfmt.TypeTextPlain), scrapeTime)
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	if samples != 19 {
		t.Errorf("samples = %d, want 19", samples)
	}
	got, err := json.MarshalIndent(gpus, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "agent.golden.json")
	if *update {
		if err := os.WriteFile(golden, append(got, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(bytes.TrimSpace(got), bytes.TrimSpace(want)) {
		t.Fatalf("parsed GPUs differ from %s:\n%s", golden, got)
	}
	// The sample with its own timestamp makes GPU 0 older than the scrape.
	if !gpus[0].Timestamp.Equal(time.UnixMilli(1764168000000)) || !gpus[1].Timestamp.Equal(scrapeTime) {
		t.Errorf("timestamps %v, %v: want the sample's own for gpu 0 and the scrape's for gpu 1", gpus[0].Timestamp, gpus[1].Timestamp)
	}
}

// TestParseProtobuf checks the delimited protobuf format the scraper asks for
// first gives the same GPUs as the text format.
func TestParseProtobuf(t *testing.T) {
	t.Parallel()
	text, err := os.ReadFile(filepath.Join("testdata", "agent.prom"))
	if err != nil {
		t.Fatal(err)
	}
	fams := map[string]*dto.MetricFamily{}
	dec := expfmt.NewDecoder(bytes.NewReader(text), expfmt.NewFormat(expfmt.TypeTextPlain))
	for {
		var mf dto.MetricFamily
		if err := dec.Decode(&mf); err != nil {
			break
		}
		fams[mf.GetName()] = &mf
	}
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeProtoDelim))
	for _, mf := range fams {
		if err := enc.Encode(mf); err != nil {
			t.Fatal(err)
		}
	}
	fromProto, _, err := Parse(&buf, expfmt.NewFormat(expfmt.TypeProtoDelim), scrapeTime)
	if err != nil {
		t.Fatalf("parse protobuf: %v", err)
	}
	fromText, _, err := Parse(bytes.NewReader(text), expfmt.NewFormat(expfmt.TypeTextPlain), scrapeTime)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := json.Marshal(fromProto)
	b, _ := json.Marshal(fromText)
	if !bytes.Equal(a, b) {
		t.Fatalf("protobuf and text disagree:\n%s\n%s", a, b)
	}
}

func TestParseErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, text, want string
		is               error
	}{
		{name: "garbage", text: "this is { not an exposition\n", want: "decode exposition"},
		{name: "no agent metrics", text: "go_goroutines 3\n", is: ErrNoGPUMetrics},
		{name: "missing uuid label", text: "visionslice_gpu_slices_capacity{gpu=\"0\"} 8\n", want: "without the gpu_uuid label"},
		{name: "bad gpu index", text: "visionslice_gpu_slices_capacity{gpu=\"x\",gpu_uuid=\"G\"} 8\n", want: "not a gpu index"},
		{name: "NaN value", text: "visionslice_gpu_slices_capacity{gpu=\"0\",gpu_uuid=\"G\"} NaN\n", want: "no finite gauge value"},
		{name: "only allocated", text: "visionslice_gpu_slices_allocated{gpu=\"0\",gpu_uuid=\"G\"} 1\n", is: ErrNoGPUMetrics},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, _, err := Parse(strings.NewReader(tc.text), expfmt.NewFormat(expfmt.TypeTextPlain), scrapeTime)
			if err == nil {
				t.Fatal("no error")
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Fatalf("err %v is not %v", err, tc.is)
			}
			if tc.want != "" && !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %q does not say %q", err, tc.want)
			}
		})
	}
}

func TestParseMissingHealthIsUnhealthy(t *testing.T) {
	t.Parallel()
	gpus, _, err := Parse(strings.NewReader("visionslice_gpu_slices_capacity{gpu=\"0\",gpu_uuid=\"G\"} 8\n"),
		expfmt.NewFormat(expfmt.TypeTextPlain), scrapeTime)
	if err != nil {
		t.Fatal(err)
	}
	if len(gpus) != 1 || gpus[0].Healthy || gpus[0].Capacity != 8 {
		t.Fatalf("got %+v, want one unhealthy gpu with 8 slices", gpus)
	}
}

func FuzzParse(f *testing.F) {
	if b, err := os.ReadFile(filepath.Join("testdata", "agent.prom")); err == nil {
		f.Add(b)
	}
	f.Add([]byte("visionslice_gpu_slices_capacity{gpu=\"0\",gpu_uuid=\"G\"} 8\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		gpus, _, err := Parse(bytes.NewReader(b), expfmt.NewFormat(expfmt.TypeTextPlain), scrapeTime)
		if err == nil && len(gpus) == 0 {
			t.Fatal("no error and no gpus")
		}
		for _, g := range gpus {
			if g.UUID == "" {
				t.Fatal("gpu without uuid")
			}
		}
	})
}

// TestParseRealAgentExposition parses an exposition captured from the real
// agent (simulated H100s, device plugin on), so a rename on either side shows.
func TestParseRealAgentExposition(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(filepath.Join("testdata", "agent-sim-h100x2.prom"))
	if err != nil {
		t.Fatal(err)
	}
	gpus, samples, err := Parse(bytes.NewReader(b), expfmt.NewFormat(expfmt.TypeTextPlain), scrapeTime)
	if err != nil {
		t.Fatal(err)
	}
	if samples < 50 {
		t.Errorf("only %d samples read", samples)
	}
	if len(gpus) != 2 {
		t.Fatalf("%d gpus, want 2", len(gpus))
	}
	for i, g := range gpus {
		if g.Index != i || !strings.HasPrefix(g.UUID, "GPU-") || !g.Healthy || g.Capacity != 80 || g.SliceBytes != 1<<30 ||
			g.MemoryTotalBytes != 80<<30 || g.MemoryUsedBytes == 0 || !g.Timestamp.Equal(scrapeTime) {
			t.Errorf("gpu %d: %+v", i, g)
		}
	}
}
