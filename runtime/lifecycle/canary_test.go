package lifecycle_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"testing"

	"github.com/visionslice/visionslice/runtime/server"
)

// inferVersion sends one request (naming a version in the header when
// version is not "") and returns the version that answered.
func (h *harness) inferVersion(version string) (string, error) {
	req, _ := http.NewRequest("POST", h.http+"/v2/models/add/infer", bytes.NewReader(inferBody))
	req.Header.Set("Content-Type", "application/json")
	if version != "" {
		req.Header.Set(server.VersionHeader, version)
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("%d %s", resp.StatusCode, b)
	}
	var out struct {
		ModelVersion string `json:"model_version"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return "", err
	}
	return out.ModelVersion, nil
}

func (h *harness) canary(body string) {
	h.t.Helper()
	resp, err := h.client.Post(h.http+"/v2/repository/models/add/canary", "application/json", bytes.NewReader([]byte(body)))
	if err != nil {
		h.t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		h.t.Fatalf("canary %s: %d %s", body, resp.StatusCode, b)
	}
}

// split sends n requests from 10 clients and returns the share (0..100)
// each version answered.
func (h *harness) split(n int, header string) map[string]float64 {
	h.t.Helper()
	counts := map[string]int{}
	results := make(chan string, n)
	errs := make(chan error, n)
	for c := range 10 {
		go func() {
			for i := c; i < n; i += 10 {
				v, err := h.inferVersion(header)
				if err != nil {
					errs <- err
					continue
				}
				results <- v
			}
		}()
	}
	for range n {
		select {
		case v := <-results:
			counts[v]++
		case err := <-errs:
			h.t.Fatalf("request failed: %v", err)
		}
	}
	out := map[string]float64{}
	for v, c := range counts {
		out[v] = 100 * float64(c) / float64(n)
	}
	return out
}

// TestCanary: with a canary of 30% set before version 2 appears, version
// 1 keeps serving and version 2 takes 30% of the requests that name no
// version (measured over 1,000 within ±3 points); the version header routes
// exactly; metrics count per version; promote ends version 1, and a later
// canary rolled back leaves its version out.
func TestCanary(t *testing.T) {
	h := start(t, 1, 0, reloadConfig())
	h.canary(`{"percent": 30}`)
	model := addModel(t)
	h.addVersion(2, model, "")
	h.waitFor("both versions to serve", func() bool { return slices.Equal(h.served(), []string{"1", "2"}) })

	got := h.split(1000, "")
	if math.Abs(got["2"]-30) > 3 || math.Abs(got["1"]-70) > 3 {
		t.Fatalf("canary split over 1000 requests: %v, want 30%% on version 2", got)
	}
	for _, v := range []string{"1", "2"} {
		if got := h.split(200, v); got[v] != 100 {
			t.Fatalf("header %s: %v", v, got)
		}
	}
	for _, v := range []string{"1", "2"} {
		if n := h.metric(server.MetricRequests, "model", "add", "version", v, "result", "success"); n < 200 {
			t.Errorf("requests metric of version %s = %v", v, n)
		}
	}
	if _, err := h.inferVersion("x"); err == nil {
		t.Error("a non-numeric version header was accepted")
	}
	if _, err := h.inferVersion("9"); err == nil {
		t.Error("a version not served was routed")
	}
	t.Logf("canary split over 1000 requests: %.1f%% / %.1f%% (target 30%%)", got["2"], got["1"])

	// Promote: version 2 takes everything, version 1 drains.
	h.canary(`{"action": "promote"}`)
	h.waitFor("version 2 alone", func() bool { return slices.Equal(h.served(), []string{"2"}) })
	if got := h.split(100, ""); got["2"] != 100 {
		t.Fatalf("after promote: %v", got)
	}

	// A canary of version 3 at 50%, rolled back: version 3 drains and stays
	// out while on disk.
	h.canary(`{"percent": 50, "version": "3"}`)
	h.addVersion(3, model, "")
	h.waitFor("versions 2 and 3", func() bool { return slices.Equal(h.served(), []string{"2", "3"}) })
	if got := h.split(100, ""); got["3"] != 50 {
		t.Fatalf("50%% canary: %v", got)
	}
	h.canary(`{"action": "rollback"}`)
	h.waitFor("version 2 alone after rollback", func() bool { return slices.Equal(h.served(), []string{"2"}) })
	if e, ok := h.entry("3"); !ok || e.State != "UNAVAILABLE" || e.Reason != "canary rolled back" {
		t.Errorf("index of the rolled back version: %+v %v", e, ok)
	}
	if got := h.split(100, ""); got["2"] != 100 {
		t.Fatalf("after rollback: %v", got)
	}
	for _, body := range []string{`{"percent": 101}`, `{"action": "explode"}`, `{}`, `{"percent": 5, "version": "v2"}`} {
		resp, err := h.client.Post(h.http+"/v2/repository/models/add/canary", "application/json", bytes.NewReader([]byte(body)))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("canary %s: %d, want 400", body, resp.StatusCode)
		}
	}
}
