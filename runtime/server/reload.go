package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionslice/visionslice/runtime/inferr"
	"github.com/visionslice/visionslice/runtime/repository"
)

// ChecksumFile, when present next to a version's model file, holds the
// file's sha256 in hex (sha256sum's output works); a version whose file
// does not match never loads.
const ChecksumFile = repository.ModelFile + ".sha256"

// ErrChecksum: a model file does not match its checksum file.
var ErrChecksum = errors.New("model file does not match its checksum")

// Load results, the label values of the version loads metric.
const (
	LoadSuccess     = "success"
	LoadChecksum    = "checksum_mismatch"
	LoadFailed      = "load_failed"
	LoadConfigError = "config_error"
)

// Metric names of hot reload.
const (
	MetricVersionLoads      = "visionslice_model_version_loads_total"
	MetricVersionLoadFailed = "visionslice_model_version_load_failed"
)

// hotState is what hot reload changes while the server runs. Fields are
// guarded by Server.mu; reloadMu serialises reloads.
type hotState struct {
	reloadMu sync.Mutex

	live     bool
	ctx      context.Context // the server's run: loads end with it
	batchCtx context.Context
	batchers *sync.WaitGroup
	cancels  map[*modelVersion]context.CancelFunc // stops a version's batcher
	failures map[string]map[int64]string          // model -> version (0: the model) -> why it does not load
	unloaded map[string]bool                      // unloaded through the API: the watcher leaves them alone
	loads    map[[2]string]uint64                 // {model, result} -> count
	draining int                                  // versions retired but not stopped yet

	canary     map[string]canaryState    // model -> its canary (canary.go)
	rolledBack map[string]map[int64]bool // model -> versions kept out after a rollback
}

// setLive is called by Run once the contexts exist.
func (s *Server) setLive(ctx, batchCtx context.Context, batchers *sync.WaitGroup) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hot.live, s.hot.ctx, s.hot.batchCtx, s.hot.batchers = true, ctx, batchCtx, batchers
}

// versionCtx gives a version's batcher its own context, so that retiring
// the version stops it.
func (s *Server) versionCtx(mv *modelVersion, parent context.Context) context.Context {
	ctx, cancel := context.WithCancel(parent)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hot.cancels == nil {
		s.hot.cancels = map[*modelVersion]context.CancelFunc{}
	}
	s.hot.cancels[mv] = cancel
	return ctx
}

// RepositoryRoot is the model repository directory.
func (s *Server) RepositoryRoot() string { return s.repo.Root }

// servedVersions lists the versions of a model served now.
func (s *Server) servedVersions(name string) []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	e := s.models[name]
	if e == nil {
		return nil
	}
	out := make([]string, len(e.versions))
	for i, v := range e.versions {
		out[i] = v.version
	}
	return out
}

// ReloadModel brings model name in line with the repository on disk, as
// the repository watcher asks: a model unloaded through the API is left
// alone until it is loaded again.
func (s *Server) ReloadModel(name string) error {
	s.mu.RLock()
	skip := s.hot.unloaded[name]
	s.mu.RUnlock()
	if skip {
		return nil
	}
	return s.reload(name)
}

// LoadModel loads (or reloads) model name from the repository, as
// POST /v2/repository/models/{m}/load asks.
func (s *Server) LoadModel(name string) error {
	s.mu.Lock()
	delete(s.hot.unloaded, name)
	delete(s.hot.rolledBack, name)
	s.mu.Unlock()
	return s.reload(name)
}

// UnloadModel stops routing to every version of model name and drains
// them; the model stays listed as unloaded until it is loaded again.
func (s *Server) UnloadModel(name string) error {
	s.hot.reloadMu.Lock()
	defer s.hot.reloadMu.Unlock()
	s.mu.Lock()
	e := s.models[name]
	if e == nil {
		s.mu.Unlock()
		return fmt.Errorf("model %q: %w", name, inferr.ErrNotFound)
	}
	retire := e.versions
	e.versions = nil
	if s.hot.unloaded == nil {
		s.hot.unloaded = map[string]bool{}
	}
	s.hot.unloaded[name] = true
	s.retireLocked(retire)
	s.mu.Unlock()
	s.logger.Info("model unloaded", "model", name, "versions", len(retire))
	return nil
}

// reload verifies and loads the versions of name that the version policy
// serves and that are not served yet, each in fresh workers that must load
// and pass warm-up before it takes traffic, then swaps the served set and
// drains the versions that left it. A version that fails is reported and
// never served; the versions served before keep serving.
func (s *Server) reload(name string) error {
	if !validModelName(name) {
		return fmt.Errorf("model name %q is not a directory name", name)
	}
	s.hot.reloadMu.Lock()
	defer s.hot.reloadMu.Unlock()
	s.mu.RLock()
	live := s.hot.live && s.hot.ctx.Err() == nil
	var cur []*modelVersion
	if e := s.models[name]; e != nil {
		cur = slices.Clone(e.versions)
	}
	s.mu.RUnlock()
	if !live {
		return errors.New("the inference runtime is not running")
	}
	logger := s.logger.With("model", name)
	dir := filepath.Join(s.repo.Root, name)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		s.removeModel(name)
		return fmt.Errorf("model %q: %w", name, inferr.ErrNotFound)
	}
	md := repository.LoadModel(dir)
	if md.Err != nil {
		s.recordLoad(name, 0, LoadConfigError, md.Err)
		logger.Error("model not reloaded; versions served before keep serving", "err", md.Err)
		s.mu.Lock()
		if s.models[name] == nil {
			s.addModelLocked(&modelEntry{model: md})
		}
		s.mu.Unlock()
		return md.Err
	}
	s.recordLoad(name, 0, "", nil)
	have := map[int64]bool{}
	for _, mv := range cur {
		if !mv.loadFailed() {
			have[mv.v.Number] = true
		}
	}
	onDisk := map[int64]bool{}
	for _, v := range md.Versions {
		onDisk[v.Number] = true
	}
	s.mu.RLock()
	rolledBack := map[int64]string{}
	_, canary := s.hot.canary[name]
	for v := range s.hot.rolledBack[name] {
		rolledBack[v] = "rolled back"
	}
	s.mu.RUnlock()
	want := map[int64]bool{}
	var loaded []*modelVersion
	var errs []error
	for _, v := range servedExcept(md, rolledBack) {
		want[v.Number] = true
		if have[v.Number] {
			continue
		}
		mv, result, err := s.loadVersion(md, v)
		s.recordLoad(name, v.Number, result, err)
		if err != nil {
			errs = append(errs, fmt.Errorf("version %d: %w", v.Number, err))
			continue
		}
		loaded = append(loaded, mv)
	}
	next := loaded
	var fallback []*modelVersion
	for _, mv := range cur {
		switch {
		case mv.loadFailed():
			// Reloaded above, or no longer wanted: retired either way.
		case want[mv.v.Number]:
			next = append(next, mv)
		case onDisk[mv.v.Number]:
			fallback = append(fallback, mv)
		}
	}
	if len(next) == 0 || canary {
		// Nothing the policy wants loaded, or a canary runs: keep what
		// served before.
		next = append(next, fallback...)
	}
	sort.Slice(next, func(i, j int) bool { return next[i].v.Number < next[j].v.Number })
	var retire []*modelVersion
	for _, mv := range cur {
		if !slices.Contains(next, mv) {
			retire = append(retire, mv)
		}
	}
	s.mu.Lock()
	if e := s.models[name]; e != nil {
		e.model, e.versions = md, next
		s.repo.Models = slices.Clone(s.repo.Models)
		for i, m := range s.repo.Models {
			if m.Name == name {
				s.repo.Models[i] = md
			}
		}
	} else {
		s.addModelLocked(&modelEntry{model: md, versions: next})
	}
	for v := range s.hot.failures[name] {
		if v != 0 && !onDisk[v] {
			delete(s.hot.failures[name], v)
		}
	}
	s.retireLocked(retire)
	s.mu.Unlock()
	if len(loaded) > 0 || len(retire) > 0 {
		logger.Info("model versions swapped", "serving", s.servedVersions(name), "loaded", len(loaded), "retired", len(retire))
	}
	return errors.Join(errs...)
}

// addModelLocked adds a model new to the server.
func (s *Server) addModelLocked(e *modelEntry) {
	s.models[e.model.Name] = e
	models := append(slices.Clone(s.repo.Models), e.model)
	sort.Slice(models, func(i, j int) bool { return models[i].Name < models[j].Name })
	s.repo.Models = models
}

// removeModel forgets a model whose directory is gone and drains it.
func (s *Server) removeModel(name string) {
	s.mu.Lock()
	e := s.models[name]
	if e == nil {
		s.mu.Unlock()
		return
	}
	delete(s.models, name)
	delete(s.hot.failures, name)
	s.repo.Models = slices.DeleteFunc(slices.Clone(s.repo.Models), func(m *repository.Model) bool { return m.Name == name })
	s.retireLocked(e.versions)
	s.mu.Unlock()
	s.logger.Info("model removed from the repository", "model", name)
}

// loadVersion checks the version's checksum and loads it in fresh workers
// (which warm it up); on failure nothing of it is left.
func (s *Server) loadVersion(md *repository.Model, v repository.Version) (*modelVersion, string, error) {
	if err := verifyChecksum(v.Path); err != nil {
		s.logger.Error("model version failed verification", "model", md.Name, "version", v.Number, "err", err)
		return nil, LoadChecksum, err
	}
	version := strconv.FormatInt(v.Number, 10)
	mv := &modelVersion{s: s, model: md, v: v, name: md.Name, version: version, md: metadataOf(md, version, nil)}
	s.mu.RLock()
	ctx, batchCtx, batchers := s.hot.ctx, s.hot.batchCtx, s.hot.batchers
	s.mu.RUnlock()
	mv.load(ctx, s.versionCtx(mv, batchCtx), batchers)
	mv.mu.Lock()
	err := mv.loadErr
	mv.mu.Unlock()
	if err != nil {
		s.stopVersion(mv)
		return nil, LoadFailed, err
	}
	return mv, LoadSuccess, nil
}

// verifyChecksum compares path with path's checksum file when there is
// one.
func verifyChecksum(path string) error {
	want, err := os.ReadFile(filepath.Join(filepath.Dir(path), ChecksumFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read checksum file: %w", err)
	}
	fields := strings.Fields(string(want))
	if len(fields) == 0 {
		return fmt.Errorf("%w: %s is empty", ErrChecksum, ChecksumFile)
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open model file: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return fmt.Errorf("read model file: %w", err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); !strings.EqualFold(got, fields[0]) {
		return fmt.Errorf("%w: sha256 is %s, %s says %s", ErrChecksum, got, ChecksumFile, fields[0])
	}
	return nil
}

// retireLocked drains versions that no longer take traffic, in the
// background: requests already in them finish (up to ShutdownGrace), then
// their batchers and workers stop. Called with mu held, in the same
// section that takes them out of routing.
func (s *Server) retireLocked(mvs []*modelVersion) {
	s.hot.draining += len(mvs)
	for _, mv := range mvs {
		go func() {
			defer func() {
				s.mu.Lock()
				s.hot.draining--
				s.mu.Unlock()
			}()
			start := time.Now()
			// Requests that picked the version just before the swap.
			time.Sleep(50 * time.Millisecond)
			for mv.inflight.Load() > 0 && time.Since(start) < s.cfg.ShutdownGrace {
				time.Sleep(5 * time.Millisecond)
			}
			left := mv.inflight.Load()
			s.stopVersion(mv)
			s.logger.Info("model version drained", "model", mv.name, "version", mv.version,
				"duration_seconds", time.Since(start).Seconds(), "requests_cut", left)
		}()
	}
}

// WaitDrained waits until retired versions are stopped (tests).
func (s *Server) WaitDrained() {
	for {
		s.mu.RLock()
		n := s.hot.draining
		s.mu.RUnlock()
		if n == 0 {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stopVersion stops a version's batcher and workers.
func (s *Server) stopVersion(mv *modelVersion) {
	s.mu.Lock()
	cancel := s.hot.cancels[mv]
	delete(s.hot.cancels, mv)
	s.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	mv.close()
}

// recordLoad counts a load result and keeps or clears the failure reason
// of a version (0: the model's config).
func (s *Server) recordLoad(name string, version int64, result string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if result != "" {
		if s.hot.loads == nil {
			s.hot.loads = map[[2]string]uint64{}
		}
		s.hot.loads[[2]string{name, result}]++
	}
	if err == nil {
		delete(s.hot.failures[name], version)
		return
	}
	if s.hot.failures == nil {
		s.hot.failures = map[string]map[int64]string{}
	}
	if s.hot.failures[name] == nil {
		s.hot.failures[name] = map[int64]string{}
	}
	s.hot.failures[name][version] = err.Error()
}

func validModelName(name string) bool {
	return name != "" && name != "." && name != ".." && !strings.ContainsAny(name, `/\`) && name[0] != '.'
}

// IndexEntry is one row of the repository index (Triton's repository
// extension).
type IndexEntry struct {
	Name    string `json:"name"`
	Version string `json:"version,omitempty"`
	// State is READY or UNAVAILABLE.
	State  string `json:"state"`
	Reason string `json:"reason,omitempty"`
}

// RepositoryIndex lists every model and version the server knows, with
// the reason a version is not ready or failed to load.
func (s *Server) RepositoryIndex(readyOnly bool) []IndexEntry {
	s.mu.RLock()
	type row struct {
		e        *modelEntry
		failures map[int64]string
		unloaded bool
	}
	var rows []row
	for _, m := range s.repo.Models {
		f := map[int64]string{}
		maps.Copy(f, s.hot.failures[m.Name])
		for v := range s.hot.rolledBack[m.Name] {
			f[v] = "canary rolled back"
		}
		rows = append(rows, row{s.models[m.Name], f, s.hot.unloaded[m.Name]})
	}
	s.mu.RUnlock()
	out := []IndexEntry{}
	for _, r := range rows {
		name := r.e.model.Name
		served := map[int64]bool{}
		for _, mv := range r.e.versions {
			served[mv.v.Number] = true
			ent := IndexEntry{Name: name, Version: mv.version, State: "READY"}
			if !mv.Ready() {
				ent.State, ent.Reason = "UNAVAILABLE", mv.notReadyReason()
			}
			out = append(out, ent)
		}
		if r.e.model.Err != nil && len(r.e.versions) == 0 {
			out = append(out, IndexEntry{Name: name, State: "UNAVAILABLE", Reason: r.e.model.Err.Error()})
		} else if why, ok := r.failures[0]; ok {
			out = append(out, IndexEntry{Name: name, State: "UNAVAILABLE", Reason: "config not reloaded: " + why})
		}
		if r.unloaded {
			out = append(out, IndexEntry{Name: name, State: "UNAVAILABLE", Reason: "unloaded"})
		}
		vs := make([]int64, 0, len(r.failures))
		for v := range r.failures {
			if v != 0 && !served[v] {
				vs = append(vs, v)
			}
		}
		slices.Sort(vs)
		for _, v := range vs {
			out = append(out, IndexEntry{Name: name, Version: strconv.FormatInt(v, 10), State: "UNAVAILABLE", Reason: r.failures[v]})
		}
	}
	if readyOnly {
		out = slices.DeleteFunc(out, func(e IndexEntry) bool { return e.State != "READY" })
	}
	return out
}

func (mv *modelVersion) notReadyReason() string {
	if st := mv.life.Load(); st != nil && st.Reason != "" {
		return st.Reason
	}
	mv.mu.Lock()
	defer mv.mu.Unlock()
	if mv.loadErr != nil {
		return mv.loadErr.Error()
	}
	return "loading"
}

// repositoryAPI adds Triton's model repository extension to the front
// end's routes.
func (s *Server) repositoryAPI(front http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", front)
	mux.HandleFunc("POST /v2/repository/index", s.serveIndex)
	mux.HandleFunc("POST /v2/repository/models/{model}/load", s.serveLoad)
	mux.HandleFunc("POST /v2/repository/models/{model}/unload", s.serveUnload)
	mux.HandleFunc("POST /v2/repository/models/{model}/canary", s.serveCanary)
	return routeVersionHeader(mux)
}

func writeJSONBody(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeErrorBody(w http.ResponseWriter, code int, err error) {
	writeJSONBody(w, code, map[string]string{"error": err.Error()})
}

// readBody decodes an optional JSON object body into v.
func readBody(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
	if err != nil {
		writeErrorBody(w, http.StatusRequestEntityTooLarge, fmt.Errorf("read body: %w", err))
		return false
	}
	if len(strings.TrimSpace(string(body))) == 0 {
		return true
	}
	if err := json.Unmarshal(body, v); err != nil {
		writeErrorBody(w, http.StatusBadRequest, fmt.Errorf("malformed JSON body: %w", err))
		return false
	}
	return true
}

func (s *Server) serveIndex(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Ready bool `json:"ready"`
	}
	if !readBody(w, r, &req) {
		return
	}
	writeJSONBody(w, http.StatusOK, s.RepositoryIndex(req.Ready))
}

func (s *Server) serveLoad(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Parameters map[string]any `json:"parameters"`
	}
	if !readBody(w, r, &req) {
		return
	}
	name := r.PathValue("model")
	if !validModelName(name) {
		writeErrorBody(w, http.StatusBadRequest, fmt.Errorf("model name %q is not a directory name", name))
		return
	}
	if err := s.LoadModel(name); err != nil {
		code := http.StatusBadRequest
		if errors.Is(err, inferr.ErrNotFound) {
			code = http.StatusNotFound
		}
		writeErrorBody(w, code, fmt.Errorf("load model %s: %w", name, err))
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Server) serveUnload(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Parameters map[string]any `json:"parameters"`
	}
	if !readBody(w, r, &req) {
		return
	}
	if err := s.UnloadModel(r.PathValue("model")); err != nil {
		writeErrorBody(w, http.StatusNotFound, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// reloadCollector exports load results and current failures.
type reloadCollector struct{ s *Server }

var (
	descLoads = prometheus.NewDesc(MetricVersionLoads, "Model version loads by hot reload or the repository API, by result (success, checksum_mismatch, load_failed, config_error).",
		[]string{"model", "result"}, nil)
	descLoadFailed = prometheus.NewDesc(MetricVersionLoadFailed, "1 for a model version on disk whose last load failed (it takes no traffic); version \"\" is the model's config.",
		[]string{"model", "version"}, nil)
)

func (c reloadCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descLoads
	ch <- descLoadFailed
}

func (c reloadCollector) Collect(ch chan<- prometheus.Metric) {
	c.s.mu.RLock()
	defer c.s.mu.RUnlock()
	for k, n := range c.s.hot.loads {
		ch <- prometheus.MustNewConstMetric(descLoads, prometheus.CounterValue, float64(n), k[0], k[1])
	}
	for name, fs := range c.s.hot.failures {
		for v := range fs {
			version := ""
			if v != 0 {
				version = strconv.FormatInt(v, 10)
			}
			ch <- prometheus.MustNewConstMetric(descLoadFailed, prometheus.GaugeValue, 1, name, version)
		}
	}
}

// loadFailed reports whether the version's load failed.
func (mv *modelVersion) loadFailed() bool {
	mv.mu.Lock()
	defer mv.mu.Unlock()
	return mv.loadErr != nil
}

// servedExcept is the versions the model's policy serves, leaving out the
// ones in out (as if they were not on disk).
func servedExcept(md *repository.Model, out map[int64]string) []repository.Version {
	if len(out) == 0 {
		return md.Served()
	}
	c := *md
	c.Versions = slices.DeleteFunc(slices.Clone(md.Versions), func(v repository.Version) bool { _, ok := out[v.Number]; return ok })
	if len(c.Versions) == 0 {
		return nil
	}
	return c.Served()
}
