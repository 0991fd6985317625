package repository

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
)

// ConfigFile and ModelFile are the fixed names inside a model directory.
const (
	ConfigFile = "config.yaml"
	ModelFile  = "model.onnx"
)

// ErrNotFound says a model or version is not in the repository.
var ErrNotFound = errors.New("not found")

// Version is one numbered version directory holding a model file.
type Version struct {
	Number int64
	// Path of the model.onnx file.
	Path string
}

// Model is one model directory.
type Model struct {
	Name string
	Dir  string
	// Config is nil when Err is set.
	Config *Config
	// Versions found on disk, ascending.
	Versions []Version
	// Err is why the model cannot be served (bad config, no version).
	Err error
}

// Served returns the versions the model's version policy serves.
func (m *Model) Served() []Version {
	if m.Err != nil || len(m.Versions) == 0 {
		return nil
	}
	if m.Config.VersionPolicy == "all" {
		return slices.Clone(m.Versions)
	}
	return []Version{m.Versions[len(m.Versions)-1]}
}

// Repository is a snapshot of a repository directory.
type Repository struct {
	Root   string
	Models []*Model // sorted by name
}

// Model returns the model named name.
func (r *Repository) Model(name string) (*Model, error) {
	for _, m := range r.Models {
		if m.Name == name {
			return m, nil
		}
	}
	return nil, fmt.Errorf("model %q: %w", name, ErrNotFound)
}

// Load reads root. A model whose config or files are wrong is returned with
// Err set, so one bad model does not keep the others from loading; Load
// itself fails only when root cannot be read.
func Load(root string) (*Repository, error) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("read model repository: %w", err)
	}
	r := &Repository{Root: root}
	for _, e := range entries {
		if !e.IsDir() || e.Name()[0] == '.' {
			continue
		}
		r.Models = append(r.Models, LoadModel(filepath.Join(root, e.Name())))
	}
	sort.Slice(r.Models, func(i, j int) bool { return r.Models[i].Name < r.Models[j].Name })
	return r, nil
}

// LoadModel reads one model directory.
func LoadModel(dir string) *Model {
	m := &Model{Name: filepath.Base(dir), Dir: dir}
	cfgPath := filepath.Join(dir, ConfigFile)
	data, err := os.ReadFile(cfgPath)
	if err != nil {
		m.Err = fmt.Errorf("model %q: read config: %w", m.Name, err)
		return m
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		m.Err = fmt.Errorf("model %q: %s: %w", m.Name, cfgPath, err)
		return m
	}
	m.Config = cfg
	entries, err := os.ReadDir(dir)
	if err != nil {
		m.Err = fmt.Errorf("model %q: %w", m.Name, err)
		return m
	}
	for _, e := range entries {
		n, err := strconv.ParseInt(e.Name(), 10, 64)
		if err != nil || n < 1 || !isDir(dir, e) {
			continue
		}
		p := filepath.Join(dir, e.Name(), ModelFile)
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
			continue
		}
		m.Versions = append(m.Versions, Version{Number: n, Path: p})
	}
	sort.Slice(m.Versions, func(i, j int) bool { return m.Versions[i].Number < m.Versions[j].Number })
	if len(m.Versions) == 0 {
		m.Err = fmt.Errorf("model %q: no version directory with a %s", m.Name, ModelFile)
	}
	return m
}

// isDir follows symlinks, so versions may be linked in.
func isDir(dir string, e fs.DirEntry) bool {
	if e.IsDir() {
		return true
	}
	st, err := os.Stat(filepath.Join(dir, e.Name()))
	return err == nil && st.IsDir()
}
