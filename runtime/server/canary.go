package server

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/visionslice/visionslice/runtime/inferr"
)

// VersionHeader names the version a request wants; it routes exactly,
// as the version in the URL does.
const VersionHeader = "X-Model-Version"

// canaryState sends Percent of a model's requests that name no version to
// Version (0: the newest served), the rest to the newest other version.
type canaryState struct {
	Version int64
	Percent float64
	n       *atomic.Uint64 // requests routed so far, for an exact split
}

// pickDefaultLocked chooses the version for a request that names none:
// the newest, or with a canary the canary's share (spread evenly, not
// randomly, so the split holds on any count). Called with mu read-held.
func (s *Server) pickDefaultLocked(e *modelEntry) *modelVersion {
	last := e.versions[len(e.versions)-1]
	c, ok := s.hot.canary[e.model.Name]
	if !ok || len(e.versions) < 2 {
		return last
	}
	canary, stable := last, (*modelVersion)(nil)
	if c.Version != 0 {
		canary = nil
		for _, v := range e.versions {
			if v.v.Number == c.Version {
				canary = v
			}
		}
		if canary == nil {
			return last
		}
	}
	for _, v := range e.versions {
		if v != canary {
			stable = v // ascending: ends at the newest other version
		}
	}
	n := c.n.Add(1)
	p := c.Percent / 100
	if math.Floor(float64(n)*p) > math.Floor(float64(n-1)*p) {
		return canary
	}
	return stable
}

// SetCanary sends percent (0..100) of the requests to model that name no
// version to version (0: the newest version served), and keeps the older
// version served while the canary lasts.
func (s *Server) SetCanary(model string, version int64, percent float64) error {
	if percent < 0 || percent > 100 || math.IsNaN(percent) {
		return fmt.Errorf("canary percent %v is not within 0..100", percent)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.models[model] == nil {
		return fmt.Errorf("model %q: %w", model, inferr.ErrNotFound)
	}
	if s.hot.canary == nil {
		s.hot.canary = map[string]canaryState{}
	}
	s.hot.canary[model] = canaryState{Version: version, Percent: percent, n: new(atomic.Uint64)}
	s.logger.Info("model canary set", "model", model, "version", version, "percent", percent)
	return nil
}

// PromoteCanary ends the canary: the canary version takes all traffic and
// the version policy applies again (the older version drains).
func (s *Server) PromoteCanary(model string) error {
	s.mu.Lock()
	_, ok := s.hot.canary[model]
	delete(s.hot.canary, model)
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("model %q has no canary", model)
	}
	s.logger.Info("model canary promoted", "model", model)
	return s.reload(model)
}

// RollbackCanary ends the canary: the canary version is drained and kept
// out (even though it is on disk) until it is loaded through the API.
func (s *Server) RollbackCanary(model string) error {
	s.mu.Lock()
	c, ok := s.hot.canary[model]
	var version int64
	if ok {
		version = c.Version
		if e := s.models[model]; version == 0 && e != nil && len(e.versions) > 0 {
			version = e.versions[len(e.versions)-1].v.Number
		}
		delete(s.hot.canary, model)
		if s.hot.rolledBack == nil {
			s.hot.rolledBack = map[string]map[int64]bool{}
		}
		if s.hot.rolledBack[model] == nil {
			s.hot.rolledBack[model] = map[int64]bool{}
		}
		s.hot.rolledBack[model][version] = true
	}
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("model %q has no canary", model)
	}
	s.logger.Info("model canary rolled back", "model", model, "version", version)
	return s.reload(model)
}

// routeVersionHeader turns an inference request that names its version in
// VersionHeader into the request for that version's URL.
func routeVersionHeader(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v := r.Header.Get(VersionHeader)
		if v == "" || r.Method != http.MethodPost {
			next.ServeHTTP(w, r)
			return
		}
		rest, ok := strings.CutPrefix(r.URL.Path, "/v2/models/")
		model, ok2 := strings.CutSuffix(rest, "/infer")
		if !ok || !ok2 || strings.Contains(model, "/") {
			next.ServeHTTP(w, r)
			return
		}
		if _, err := strconv.ParseInt(v, 10, 64); err != nil {
			writeErrorBody(w, http.StatusBadRequest, fmt.Errorf("%s %q is not a version number", VersionHeader, v))
			return
		}
		r2 := r.Clone(r.Context())
		r2.URL.Path = "/v2/models/" + model + "/versions/" + v + "/infer"
		r2.URL.RawPath = ""
		next.ServeHTTP(w, r2)
	})
}

func (s *Server) serveCanary(w http.ResponseWriter, r *http.Request) {
	var req struct {
		// Action is "set" (default), "promote" or "rollback".
		Action  string   `json:"action"`
		Version string   `json:"version"`
		Percent *float64 `json:"percent"`
	}
	if !readBody(w, r, &req) {
		return
	}
	name := r.PathValue("model")
	var err error
	switch req.Action {
	case "", "set":
		if req.Percent == nil {
			err = errors.New("percent is required")
			break
		}
		var v int64
		if req.Version != "" {
			if v, err = strconv.ParseInt(req.Version, 10, 64); err != nil || v < 1 {
				err = fmt.Errorf("version %q is not a version number", req.Version)
				break
			}
		}
		err = s.SetCanary(name, v, *req.Percent)
	case "promote":
		err = s.PromoteCanary(name)
	case "rollback":
		err = s.RollbackCanary(name)
	default:
		err = fmt.Errorf("action %q is not set, promote or rollback", req.Action)
	}
	if err != nil {
		code := http.StatusBadRequest
		if errors.Is(err, inferr.ErrNotFound) {
			code = http.StatusNotFound
		}
		writeErrorBody(w, code, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}
