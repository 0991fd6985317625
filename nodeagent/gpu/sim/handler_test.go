package sim_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
)

func TestHandler(t *testing.T) {
	t.Parallel()
	g, err := sim.New("h100x2", "handler")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(g.Handler())
	defer srv.Close()
	do := func(method, path, body string) (int, string) {
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	tests := []struct {
		name, method, path, body string
		code                     int
		wantBody                 string
	}{
		{"add by MiB", "PUT", "/debug/sim/gpus/0/processes/100", `{"usedMiB": 2048}`, 204, ""},
		{"add by bytes", "PUT", "/debug/sim/gpus/1/processes/200", `{"usedBytes": 1048576, "kind": "graphics"}`, 204, ""},
		{"both sizes", "PUT", "/debug/sim/gpus/0/processes/1", `{"usedMiB": 1, "usedBytes": 1}`, 400, "not both"},
		{"no size", "PUT", "/debug/sim/gpus/0/processes/1", `{}`, 400, "required"},
		{"unknown field", "PUT", "/debug/sim/gpus/0/processes/1", `{"usedGiB": 1}`, 400, "unknown field"},
		{"bad json", "PUT", "/debug/sim/gpus/0/processes/1", `{"usedMiB":`, 400, "bad json"},
		{"unknown gpu", "PUT", "/debug/sim/gpus/7/processes/1", `{"usedMiB": 1}`, 400, "no simulated gpu 7"},
		{"gpu not a number", "PUT", "/debug/sim/gpus/x/processes/1", `{"usedMiB": 1}`, 400, "not an index"},
		{"pid zero", "PUT", "/debug/sim/gpus/0/processes/0", `{"usedMiB": 1}`, 400, "positive"},
		{"bad kind", "PUT", "/debug/sim/gpus/0/processes/1", `{"usedMiB": 1, "kind": "video"}`, 400, "unknown process kind"},
		{"too big", "PUT", "/debug/sim/gpus/0/processes/1", `{"usedMiB": 900000}`, 400, "exceeds"},
		{"health needs healthy", "PUT", "/debug/sim/gpus/0/health", `{"reason": "gpu_lost"}`, 400, "healthy"},
		{"bad reason", "PUT", "/debug/sim/gpus/0/health", `{"healthy": false, "reason": "tired"}`, 400, "unknown unhealthy reason"},
		{"lose gpu 1", "PUT", "/debug/sim/gpus/1/health", `{"healthy": false}`, 204, ""},
		{"utilization", "PUT", "/debug/sim/gpus/0/utilization", `{"percent": 55}`, 204, ""},
		{"utilization over 100", "PUT", "/debug/sim/gpus/0/utilization", `{"percent": 101}`, 400, "over 100"},
		{"remove", "DELETE", "/debug/sim/gpus/0/processes/100", ``, 204, ""},
		{"wrong method", "POST", "/debug/sim/gpus/0/processes/100", `{}`, 405, ""},
	}
	for _, tc := range tests { // in order: later rows see earlier changes
		code, body := do(tc.method, tc.path, tc.body)
		if code != tc.code || !strings.Contains(body, tc.wantBody) {
			t.Errorf("%s: %d %q, want %d containing %q", tc.name, code, body, tc.code, tc.wantBody)
		}
	}
	code, body := do("GET", "/debug/sim", "")
	var st sim.State
	if code != 200 || json.Unmarshal([]byte(body), &st) != nil {
		t.Fatalf("state: %d %s", code, body)
	}
	if len(st.GPUs) != 2 || len(st.GPUs[0].Processes) != 0 || st.GPUs[0].UtilizationPct != 55 ||
		len(st.GPUs[1].Processes) != 1 || st.GPUs[1].Processes[0].UsedBytes != 1<<20 || !st.GPUs[1].Lost {
		t.Errorf("state after the script: %+v", st)
	}
}
