// Package cgrouptest gives tests a real cgroup v2 manager in a group of their
// own (removed when the test ends), or skips with the reason where no
// writable cgroup v2 hierarchy exists; and an in-memory Fake for tests of
// consumers that only need to see which actions were asked for.
package cgrouptest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/visionslice/visionslice/nodeagent/cgroup"
)

// Roots are the places probed for a writable cgroup v2 hierarchy, in order:
// a pure v2 host, then a hybrid host's unified tree.
var Roots = []string{cgroup.DefaultRoot, cgroup.HybridRoot}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// WritableRoot returns the first cgroup v2 mount point in Roots where a child
// group can be created, or the reason none can.
func WritableRoot() (string, error) {
	var reasons []string
	for _, root := range Roots {
		if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err != nil {
			reasons = append(reasons, fmt.Sprintf("%s: not cgroup v2", root))
			continue
		}
		probe, err := os.MkdirTemp(root, "visionslice-probe-")
		if err != nil {
			reasons = append(reasons, fmt.Sprintf("%s: %v", root, err))
			continue
		}
		_, statErr := os.Stat(filepath.Join(probe, "cgroup.kill"))
		_ = os.Remove(probe)
		if statErr != nil {
			reasons = append(reasons, fmt.Sprintf("%s: no cgroup.kill (kernel before 5.14)", root))
			continue
		}
		return root, nil
	}
	return "", fmt.Errorf("no writable cgroup v2 hierarchy: %s", strings.Join(reasons, "; "))
}

// Manager returns a real manager whose Parent is a unique group for this
// test. It skips the test where no writable cgroup v2 exists. At cleanup it
// kills and removes everything under that group.
func Manager(tb testing.TB) *cgroup.Manager {
	tb.Helper()
	root, err := WritableRoot()
	if err != nil {
		tb.Skipf("skipping: %v", err)
	}
	name := unsafeChars.ReplaceAllString(tb.Name(), "_")
	if len(name) > 60 {
		name = name[:60]
	}
	parent := fmt.Sprintf("visionslice-test-%s-%d-%d", name, os.Getpid(), time.Now().UnixNano())
	m, err := cgroup.NewManager(cgroup.Config{Root: root, Parent: parent})
	if err != nil {
		tb.Fatalf("cgrouptest: %v", err)
	}
	tb.Cleanup(func() {
		dir := filepath.Join(root, parent)
		if _, err := os.Stat(dir); err != nil {
			return
		}
		g, err := m.Open(parent)
		if err != nil {
			tb.Errorf("cgrouptest: open %s for cleanup: %v", dir, err)
			return
		}
		if err := g.Delete(); err != nil {
			tb.Errorf("cgrouptest: remove %s: %v", dir, err)
		}
	})
	return m
}

// Action is one call recorded by Fake.
type Action struct {
	Path string
	Op   string // "freeze", "thaw", "kill", "create", "delete", "addproc"
}

// Fake is an in-memory cgroup.Groups. Groups exist once created, or once
// added with Add (a container's group); Open of any other path fails.
type Fake struct {
	mu      sync.Mutex
	groups  map[string]*fakeGroup
	actions []Action
	// FailOp makes the named operation ("freeze", "kill", ...) fail.
	failOp map[string]error
}

var _ cgroup.Groups = (*Fake)(nil)

// NewFake returns an empty Fake.
func NewFake() *Fake {
	return &Fake{groups: map[string]*fakeGroup{}, failOp: map[string]error{}}
}

// Add makes a group exist at path.
func (f *Fake) Add(path string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.groups[path] = &fakeGroup{f: f, path: path}
}

// Fail makes every later call of op fail with err (nil clears it).
func (f *Fake) Fail(op string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.failOp, op)
		return
	}
	f.failOp[op] = err
}

// Actions returns the calls made so far.
func (f *Fake) Actions() []Action {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Action(nil), f.actions...)
}

// Frozen reports whether the group at path is frozen.
func (f *Fake) Frozen(path string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := f.groups[path]
	return g != nil && g.frozen
}

// Create implements cgroup.Groups.
func (f *Fake) Create(name string, _ cgroup.Limits) (cgroup.Group, error) {
	path := "/visionslice/" + name
	if err := f.record(path, "create"); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	g := &fakeGroup{f: f, path: path}
	f.groups[path] = g
	return g, nil
}

// Open implements cgroup.Groups.
func (f *Fake) Open(path string) (cgroup.Group, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g, ok := f.groups[path]
	if !ok {
		return nil, fmt.Errorf("open cgroup %s: %w", path, os.ErrNotExist)
	}
	return g, nil
}

func (f *Fake) record(path, op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.actions = append(f.actions, Action{Path: path, Op: op})
	if err := f.failOp[op]; err != nil {
		return fmt.Errorf("%s cgroup %s: %w", op, path, err)
	}
	return nil
}

type fakeGroup struct {
	f      *Fake
	path   string
	frozen bool
	procs  []int
	killed bool
}

func (g *fakeGroup) Path() string { return g.path }

func (g *fakeGroup) AddProc(pid int) error {
	if err := g.f.record(g.path, "addproc"); err != nil {
		return err
	}
	g.f.mu.Lock()
	defer g.f.mu.Unlock()
	g.procs = append(g.procs, pid)
	return nil
}

func (g *fakeGroup) Procs() ([]int, error) {
	g.f.mu.Lock()
	defer g.f.mu.Unlock()
	return append([]int(nil), g.procs...), nil
}

func (g *fakeGroup) SetLimits(cgroup.Limits) error { return g.f.record(g.path, "setlimits") }

func (g *fakeGroup) Freeze() error { return g.setFrozen("freeze", true) }
func (g *fakeGroup) Thaw() error   { return g.setFrozen("thaw", false) }

func (g *fakeGroup) setFrozen(op string, v bool) error {
	if err := g.f.record(g.path, op); err != nil {
		return err
	}
	g.f.mu.Lock()
	defer g.f.mu.Unlock()
	g.frozen = v
	return nil
}

func (g *fakeGroup) Kill() error {
	if err := g.f.record(g.path, "kill"); err != nil {
		return err
	}
	g.f.mu.Lock()
	defer g.f.mu.Unlock()
	g.killed, g.procs = true, nil
	return nil
}

func (g *fakeGroup) Stats() (cgroup.Stats, error) {
	g.f.mu.Lock()
	defer g.f.mu.Unlock()
	return cgroup.Stats{Populated: len(g.procs) > 0, Frozen: g.frozen, Procs: len(g.procs)}, nil
}

func (g *fakeGroup) Delete() error {
	if err := g.f.record(g.path, "delete"); err != nil {
		return err
	}
	g.f.mu.Lock()
	defer g.f.mu.Unlock()
	if _, ok := g.f.groups[g.path]; !ok {
		return nil
	}
	delete(g.f.groups, g.path)
	return nil
}

// ErrInjected is a ready error for Fail.
var ErrInjected = errors.New("injected failure")
