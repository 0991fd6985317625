package lifecycle_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/visionslice/visionslice/runtime/lifecycle"
	"github.com/visionslice/visionslice/runtime/onnxgen"
	"github.com/visionslice/visionslice/runtime/server"
	"github.com/visionslice/visionslice/runtime/tensor"
)

func reloadConfig() lifecycle.Config {
	return lifecycle.Config{ReloadDebounce: 100 * time.Millisecond}
}

// addModel is the same model as version 1.
func addModel(t *testing.T) []byte {
	t.Helper()
	b, err := onnxgen.Binary("Add", tensor.FP32, []int64{onnxgen.Dynamic, 4})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// warmupFailModel loads (its dimensions are dynamic) but fails on the
// first inference: c = a + b + k with k of 3 elements cannot broadcast
// against the 4 the config declares.
func warmupFailModel(t *testing.T) []byte {
	t.Helper()
	shape := []int64{onnxgen.Dynamic, onnxgen.Dynamic}
	m := onnxgen.Model{Graph: onnxgen.Graph{
		Name: "bad",
		Nodes: []onnxgen.Node{
			{Op: "Add", Inputs: []string{"a", "b"}, Outputs: []string{"s"}},
			{Op: "Add", Inputs: []string{"s", "k"}, Outputs: []string{"c"}},
		},
		Inputs:       []onnxgen.Value{{Name: "a", Datatype: tensor.FP32, Shape: shape}, {Name: "b", Datatype: tensor.FP32, Shape: shape}},
		Outputs:      []onnxgen.Value{{Name: "c", Datatype: tensor.FP32, Shape: shape}},
		Initializers: []onnxgen.Initializer{{Name: "k", Datatype: tensor.FP32, Dims: []int64{3}, Raw: make([]byte, 12)}},
	}}
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sum(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// addVersion writes version n's files (checksum file too when checksum is
// not "").
func (h *harness) addVersion(n int, model []byte, checksum string) {
	h.t.Helper()
	dir := filepath.Join(h.repo, "add", fmt.Sprint(n))
	if checksum != "" {
		writeFile(h.t, filepath.Join(dir, server.ChecksumFile), []byte(checksum+"  model.onnx\n"))
	}
	writeFile(h.t, filepath.Join(dir, "model.onnx"), model)
}

type indexEntry = server.IndexEntry

func (h *harness) index() []indexEntry {
	h.t.Helper()
	resp, err := h.client.Post(h.http+"/v2/repository/index", "application/json", nil)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out []indexEntry
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != 200 {
		h.t.Fatalf("index: %d %v", resp.StatusCode, err)
	}
	return out
}

func (h *harness) entry(version string) (indexEntry, bool) {
	for _, e := range h.index() {
		if e.Name == "add" && e.Version == version {
			return e, true
		}
	}
	return indexEntry{}, false
}

// served returns the versions the model's metadata lists.
func (h *harness) served() []string {
	h.t.Helper()
	resp, err := h.client.Get(h.http + "/v2/models/add")
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	var md struct{ Versions []string }
	json.NewDecoder(resp.Body).Decode(&md)
	return md.Versions
}

// TestHotReloadGoodVersionUnderLoad: a new version directory appears
// under load; it is verified and loaded in fresh workers before it takes
// traffic, the old version is drained, and no request fails. Removing the
// new version brings the old one back, again without a failed request.
func TestHotReloadGoodVersionUnderLoad(t *testing.T) {
	h := start(t, 1, 0, reloadConfig())
	stop := h.load(20)
	time.Sleep(200 * time.Millisecond)
	model := addModel(t)
	t0 := time.Now()
	h.addVersion(2, model, sum(model))
	took := h.waitFor("version 2 to serve", func() bool { return slices.Equal(h.served(), []string{"2"}) })
	h.srv.WaitDrained()
	time.Sleep(200 * time.Millisecond)
	lats, fails := stop()
	if len(fails) > 0 {
		t.Fatalf("%d of %d requests failed during the reload, first: %s", len(fails), len(fails)+len(lats), fails[0])
	}
	if e, ok := h.entry("2"); !ok || e.State != "READY" {
		t.Fatalf("index entry of version 2: %+v %v", e, ok)
	}
	if _, ok := h.entry("1"); ok {
		t.Fatalf("version 1 still listed after it was replaced: %+v", h.index())
	}
	if got := h.metric(server.MetricVersionLoads, "model", "add", "result", server.LoadSuccess); got != 1 {
		t.Errorf("successful loads = %v", got)
	}
	t.Logf("new version on disk -> serving %.0f ms (debounce 100 ms); %d requests, 0 failed; p50 %.2f ms p99 %.2f ms max %.2f ms",
		ms(took), len(lats), ms(pct(lats, 0.5)), ms(pct(lats, 0.99)), ms(pct(lats, 1)))
	_ = t0

	// Removing version 2 drains it; version 1 serves again.
	stop = h.load(20)
	time.Sleep(100 * time.Millisecond)
	if err := os.RemoveAll(filepath.Join(h.repo, "add", "2")); err != nil {
		t.Fatal(err)
	}
	h.waitFor("version 1 to serve again", func() bool { return slices.Equal(h.served(), []string{"1"}) })
	h.srv.WaitDrained()
	lats, fails = stop()
	if len(fails) > 0 {
		t.Fatalf("%d of %d requests failed while version 2 was removed, first: %s", len(fails), len(fails)+len(lats), fails[0])
	}
}

// TestHotReloadBadVersionsKeepOld: a corrupt model file, a model that
// fails warm-up and a wrong checksum each never take traffic; version 1
// keeps serving under load, and the failure shows in the repository
// index, the metrics and the load API's answer.
func TestHotReloadBadVersionsKeepOld(t *testing.T) {
	h := start(t, 1, 0, reloadConfig())
	model := addModel(t)
	cases := []struct {
		name     string
		model    []byte
		checksum string
		result   string
		reason   string
	}{
		{"corrupt model file", []byte("this is not an onnx model"), "", server.LoadFailed, "failed to start"},
		{"fails warm-up", warmupFailModel(t), "", server.LoadFailed, "warm-up"},
		{"wrong checksum", model, strings.Repeat("ab", 32), server.LoadChecksum, "does not match its checksum"},
	}
	stop := h.load(20)
	for i, tc := range cases {
		version := fmt.Sprint(i + 2)
		h.addVersion(i+2, tc.model, tc.checksum)
		h.waitFor(tc.name+" to be reported", func() bool {
			e, ok := h.entry(version)
			return ok && e.State == "UNAVAILABLE"
		})
		e, _ := h.entry(version)
		if !strings.Contains(e.Reason, tc.reason) {
			t.Errorf("%s: index reason %q does not say %q", tc.name, e.Reason, tc.reason)
		}
		if got := h.served(); !slices.Equal(got, []string{"1"}) {
			t.Fatalf("%s: serving %v", tc.name, got)
		}
		if got := h.metric(server.MetricVersionLoadFailed, "model", "add", "version", version); got != 1 {
			t.Errorf("%s: load failed gauge = %v", tc.name, got)
		}
		if got := h.metric(server.MetricVersionLoads, "model", "add", "result", tc.result); got < 1 {
			t.Errorf("%s: loads{result=%s} = %v", tc.name, tc.result, got)
		}
	}
	// The explicit load API says why.
	resp, err := h.client.Post(h.http+"/v2/repository/models/add/load", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || !strings.Contains(string(b), "checksum") {
		t.Errorf("load API: %d %s", resp.StatusCode, b)
	}
	lats, fails := stop()
	if len(fails) > 0 {
		t.Fatalf("%d of %d requests failed while bad versions appeared, first: %s", len(fails), len(fails)+len(lats), fails[0])
	}
	t.Logf("%d requests served by version 1 while 3 bad versions were rejected", len(lats))
}

// TestRepositoryAPI: Triton's repository extension: index, unload (the
// model drains and stops serving), load (it serves again), and clear
// errors for bad requests.
func TestRepositoryAPI(t *testing.T) {
	h := start(t, 1, 0, lifecycle.Config{HotReload: new(bool)})
	post := func(path, body string) (int, string) {
		resp, err := h.client.Post(h.http+path, "application/json", bytes.NewReader([]byte(body)))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := post("/v2/repository/index", `{"ready": true}`); code != 200 || !strings.Contains(body, `{"name":"add","version":"1","state":"READY"}`) {
		t.Fatalf("index: %d %s", code, body)
	}
	if code, _ := post("/v2/repository/models/add/unload", ""); code != 200 {
		t.Fatalf("unload: %d", code)
	}
	h.srv.WaitDrained()
	if code, msg := h.infer(); code != 503 {
		t.Fatalf("infer after unload: %d %s", code, msg)
	}
	if code, body := post("/v2/repository/index", ""); code != 200 || !strings.Contains(body, `"reason":"unloaded"`) {
		t.Fatalf("index after unload: %d %s", code, body)
	}
	if code, body := post("/v2/repository/index", `{"ready": true}`); code != 200 || body != "[]\n" {
		t.Fatalf("ready index after unload: %d %s", code, body)
	}
	if code, body := post("/v2/repository/models/add/load", `{"parameters": {}}`); code != 200 {
		t.Fatalf("load: %d %s", code, body)
	}
	if code, msg := h.infer(); code != 200 {
		t.Fatalf("infer after load: %d %s", code, msg)
	}
	for _, tc := range []struct {
		path, body string
		code       int
		says       string
	}{
		{"/v2/repository/models/nope/load", "", 404, "not found"},
		{"/v2/repository/models/nope/unload", "", 404, "not found"},
		{"/v2/repository/models/..%2Fetc/load", "", 400, "not a directory name"},
		{"/v2/repository/index", "{", 400, "malformed JSON"},
		{"/v2/repository/models/add/load", `{"parameters": 3}`, 400, "malformed JSON"},
	} {
		if code, body := post(tc.path, tc.body); code != tc.code || !strings.Contains(body, tc.says) {
			t.Errorf("POST %s %q: %d %s, want %d %q", tc.path, tc.body, code, body, tc.code, tc.says)
		}
	}
}

// TestHotReloadNewModel: a model directory that appears is served once
// its files are complete; a model whose config is wrong is listed with the
// reason and fixed by rewriting the config.
func TestHotReloadNewModel(t *testing.T) {
	h := start(t, 1, 0, reloadConfig())
	root := filepath.Join(h.repo, "sub")
	writeFile(t, filepath.Join(root, "config.yaml"), []byte(strings.Replace(addConfig, "instances: %d\nslices: %d\n", "colour: red\n", 1)))
	writeFile(t, filepath.Join(root, "1", "model.onnx"), addModel(t))
	h.waitFor("the bad config to be reported", func() bool {
		for _, e := range h.index() {
			if e.Name == "sub" && e.State == "UNAVAILABLE" && strings.Contains(e.Reason, "colour") {
				return true
			}
		}
		return false
	})
	if code, msg := h.infer(); code != 200 {
		t.Fatalf("add while sub is broken: %d %s", code, msg)
	}
	writeFile(t, filepath.Join(root, "config.yaml"), fmt.Appendf(nil, addConfig, 1, 0))
	h.waitFor("sub to serve", func() bool {
		for _, e := range h.index() {
			if e.Name == "sub" && e.Version == "1" && e.State == "READY" {
				return true
			}
		}
		return false
	})
	sub := &harness{t: t, http: h.http, client: h.client, path: "/v2/models/sub/infer", ctype: h.ctype, body: h.body, want: h.want}
	if code, msg := sub.infer(); code != 200 {
		t.Fatalf("sub: %d %s", code, msg)
	}
	// Removing the directory removes the model.
	if err := os.RemoveAll(root); err != nil {
		t.Fatal(err)
	}
	h.waitFor("sub to go", func() bool { code, _ := sub.infer(); return code == 404 })
	h.srv.WaitDrained()
}
