package sim

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strconv"

	"github.com/visionslice/visionslice/nodeagent/gpu"
)

// State is the simulator's scripted state, as the debug endpoint shows it.
type State struct {
	GPUs []GPUState `json:"gpus"`
}

// GPUState is one simulated GPU.
type GPUState struct {
	Index            int            `json:"index"`
	UUID             string         `json:"uuid"`
	MemoryTotalBytes uint64         `json:"memoryTotalBytes"`
	Lost             bool           `json:"lost"`
	UtilizationPct   uint32         `json:"utilizationPercent"`
	Processes        []ProcessState `json:"processes"`
}

// ProcessState is one scripted process.
type ProcessState struct {
	PID       uint32          `json:"pid"`
	UsedBytes uint64          `json:"usedBytes"`
	Kind      gpu.ProcessKind `json:"kind"`
}

// State returns a copy of the scripted state.
func (g *GPUs) State() State {
	g.mu.Lock()
	defer g.mu.Unlock()
	var s State
	for i, sd := range g.devs {
		gs := GPUState{Index: i, UUID: sd.d.UUID, MemoryTotalBytes: sd.d.Config.MemoryMB << 20, Lost: sd.lost, UtilizationPct: sd.util, Processes: []ProcessState{}}
		for pid, p := range sd.procs {
			gs.Processes = append(gs.Processes, ProcessState{PID: pid, UsedBytes: p.used, Kind: p.kind})
		}
		sort.Slice(gs.Processes, func(a, b int) bool { return gs.Processes[a].PID < gs.Processes[b].PID })
		s.GPUs = append(s.GPUs, gs)
	}
	return s
}

const maxDebugBody = 4 << 10

// Handler serves the simulator's debug endpoint, meant to be mounted at
// /debug/sim/ on the agent's metrics port:
//
//	GET    /debug/sim                               scripted state
//	PUT    /debug/sim/gpus/{gpu}/processes/{pid}    {"usedBytes": 1073741824, "kind": "compute"} or {"usedMiB": 1024}
//	DELETE /debug/sim/gpus/{gpu}/processes/{pid}
//	PUT    /debug/sim/gpus/{gpu}/health             {"healthy": false, "reason": "gpu_lost" | "xid_79"}
//	PUT    /debug/sim/gpus/{gpu}/utilization        {"percent": 80}
func (g *GPUs) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /debug/sim", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, g.State())
	})
	mux.HandleFunc("PUT /debug/sim/gpus/{gpu}/processes/{pid}", func(w http.ResponseWriter, r *http.Request) {
		i, pid, ok := gpuAndPID(w, r)
		if !ok {
			return
		}
		var body struct {
			UsedBytes *uint64         `json:"usedBytes"`
			UsedMiB   *uint64         `json:"usedMiB"`
			Kind      gpu.ProcessKind `json:"kind"`
		}
		if !decode(w, r, &body) {
			return
		}
		var used uint64
		switch {
		case body.UsedBytes != nil && body.UsedMiB != nil:
			httpError(w, http.StatusBadRequest, "give usedBytes or usedMiB, not both")
			return
		case body.UsedBytes != nil:
			used = *body.UsedBytes
		case body.UsedMiB != nil:
			used = *body.UsedMiB << 20
		default:
			httpError(w, http.StatusBadRequest, "usedBytes or usedMiB is required")
			return
		}
		if err := g.SetProcess(i, pid, used, body.Kind); err != nil {
			httpError(w, http.StatusBadRequest, err.Error())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("DELETE /debug/sim/gpus/{gpu}/processes/{pid}", func(w http.ResponseWriter, r *http.Request) {
		i, pid, ok := gpuAndPID(w, r)
		if !ok {
			return
		}
		g.RemoveProcess(i, pid)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("PUT /debug/sim/gpus/{gpu}/health", func(w http.ResponseWriter, r *http.Request) {
		i, ok := gpuIndex(w, r)
		if !ok {
			return
		}
		var body struct {
			Healthy *bool  `json:"healthy"`
			Reason  string `json:"reason"`
		}
		if !decode(w, r, &body) {
			return
		}
		if body.Healthy == nil {
			httpError(w, http.StatusBadRequest, "healthy (true or false) is required")
			return
		}
		var err error
		if *body.Healthy {
			err = g.SetHealthy(i)
		} else {
			if body.Reason == "" {
				body.Reason = "gpu_lost"
			}
			err = g.SetUnhealthy(i, body.Reason)
		}
		if err != nil {
			httpError(w, http.StatusBadRequest, err.Error())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("PUT /debug/sim/gpus/{gpu}/utilization", func(w http.ResponseWriter, r *http.Request) {
		i, ok := gpuIndex(w, r)
		if !ok {
			return
		}
		var body struct {
			Percent *uint32 `json:"percent"`
		}
		if !decode(w, r, &body) {
			return
		}
		if body.Percent == nil {
			httpError(w, http.StatusBadRequest, "percent is required")
			return
		}
		if err := g.SetUtilization(i, *body.Percent); err != nil {
			httpError(w, http.StatusBadRequest, err.Error())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	return mux
}

func gpuIndex(w http.ResponseWriter, r *http.Request) (int, bool) {
	i, err := strconv.Atoi(r.PathValue("gpu"))
	if err != nil || i < 0 {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("gpu %q is not an index", r.PathValue("gpu")))
		return 0, false
	}
	return i, true
}

func gpuAndPID(w http.ResponseWriter, r *http.Request) (int, uint32, bool) {
	i, ok := gpuIndex(w, r)
	if !ok {
		return 0, 0, false
	}
	pid, err := strconv.ParseUint(r.PathValue("pid"), 10, 32)
	if err != nil || pid == 0 {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("pid %q is not a positive integer", r.PathValue("pid")))
		return 0, 0, false
	}
	return i, uint32(pid), true
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxDebugBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		httpError(w, http.StatusBadRequest, "bad json body: "+err.Error())
		return false
	}
	return true
}

func httpError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]string{"error": msg})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
