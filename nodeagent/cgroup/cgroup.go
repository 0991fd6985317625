// Package cgroup is the agent's cgroup v2 seam, over
// github.com/containerd/cgroups/v3/cgroup2. It freezes, thaws and kills the
// processes of a cgroup (cgroup.freeze, cgroup.kill), sets cpu.max, memory.max
// and pids.max, reads stats, and creates child cgroups and moves processes
// into them (the inference runtime places its model workers with it).
//
// It works on a pure cgroup v2 host (/sys/fs/cgroup) and on a hybrid host
// where the v2 hierarchy (e.g. /sys/fs/cgroup/unified) carries no
// controllers: there freeze, thaw and kill work, and asking for a limit whose
// controller is missing fails with a *MissingControllersError that names
// the missing controllers. Nothing is dropped silently.
package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2"
)

// DefaultRoot is the mount point of the cgroup v2 hierarchy on a pure v2 host.
const DefaultRoot = "/sys/fs/cgroup"

// HybridRoot is where systemd mounts the v2 hierarchy on a hybrid host.
const HybridRoot = "/sys/fs/cgroup/unified"

// Config says where the cgroup v2 hierarchy is mounted and under which group
// Create makes its children.
type Config struct {
	// Root is the mount point of the cgroup v2 hierarchy (default DefaultRoot).
	Root string `yaml:"root"`
	// Parent is the group, relative to Root, under which Create makes its
	// children (default "visionslice").
	Parent string `yaml:"parent"`
	// FreezeTimeout bounds how long Freeze waits for the kernel to report the
	// group frozen and Delete waits for a killed group to empty (default 2s).
	FreezeTimeout time.Duration `yaml:"freezeTimeout"`
}

func (c Config) withDefaults() Config {
	if c.Root == "" {
		c.Root = DefaultRoot
	}
	if c.Parent == "" {
		c.Parent = "visionslice"
	}
	if c.FreezeTimeout == 0 {
		c.FreezeTimeout = 2 * time.Second
	}
	return c
}

// Validate reports a config that cannot work.
func (c Config) Validate() error {
	c = c.withDefaults()
	if !filepath.IsAbs(c.Root) {
		return fmt.Errorf("cgroup root %q: must be an absolute path", c.Root)
	}
	if _, err := cleanRel(c.Parent); err != nil {
		return fmt.Errorf("cgroup parent: %w", err)
	}
	if c.FreezeTimeout < 0 {
		return fmt.Errorf("cgroup freezeTimeout %s: must not be negative", c.FreezeTimeout)
	}
	return nil
}

// Limits are the resource limits of a group. A zero field leaves that limit
// unset (the kernel default, "max").
type Limits struct {
	// CPUMaxCores is the CPU bandwidth in cores (cpu.max quota / period).
	CPUMaxCores float64
	// MemoryMaxBytes is memory.max.
	MemoryMaxBytes int64
	// PidsMax is pids.max.
	PidsMax int64
}

// IsZero reports whether no limit is set.
func (l Limits) IsZero() bool { return l == Limits{} }

// controllers lists the controllers the set limits need.
func (l Limits) controllers() []string {
	var c []string
	if l.CPUMaxCores != 0 {
		c = append(c, "cpu")
	}
	if l.MemoryMaxBytes != 0 {
		c = append(c, "memory")
	}
	if l.PidsMax != 0 {
		c = append(c, "pids")
	}
	return c
}

// without returns l with the limits of the given controllers cleared.
func (l Limits) without(controllers []string) Limits {
	if slices.Contains(controllers, "cpu") {
		l.CPUMaxCores = 0
	}
	if slices.Contains(controllers, "memory") {
		l.MemoryMaxBytes = 0
	}
	if slices.Contains(controllers, "pids") {
		l.PidsMax = 0
	}
	return l
}

const cpuPeriodMicros = 100_000

func (l Limits) validate() error {
	if l.CPUMaxCores < 0 || math.IsNaN(l.CPUMaxCores) || math.IsInf(l.CPUMaxCores, 0) {
		return fmt.Errorf("%w: cpu max %v cores must be a positive number", ErrBadLimits, l.CPUMaxCores)
	}
	if l.CPUMaxCores != 0 && l.CPUMaxCores*cpuPeriodMicros < 1000 {
		return fmt.Errorf("%w: cpu max %v cores is below the kernel minimum of 0.01", ErrBadLimits, l.CPUMaxCores)
	}
	if l.MemoryMaxBytes < 0 {
		return fmt.Errorf("%w: memory max %d bytes must be positive", ErrBadLimits, l.MemoryMaxBytes)
	}
	if l.PidsMax < 0 {
		return fmt.Errorf("%w: pids max %d must be positive", ErrBadLimits, l.PidsMax)
	}
	return nil
}

func (l Limits) resources() *cgroup2.Resources {
	r := &cgroup2.Resources{}
	if l.CPUMaxCores != 0 {
		quota := int64(math.Round(l.CPUMaxCores * cpuPeriodMicros))
		period := uint64(cpuPeriodMicros)
		r.CPU = &cgroup2.CPU{Max: cgroup2.NewCPUMax(&quota, &period)}
	}
	if l.MemoryMaxBytes != 0 {
		m := l.MemoryMaxBytes
		r.Memory = &cgroup2.Memory{Max: &m}
	}
	if l.PidsMax != 0 {
		r.Pids = &cgroup2.Pids{Max: l.PidsMax}
	}
	return r
}

// Errors.
var (
	// ErrControllersUnavailable is wrapped by *MissingControllersError.
	ErrControllersUnavailable = errors.New("cgroup controllers unavailable")
	// ErrBadLimits is wrapped when a Limits value is out of range.
	ErrBadLimits = errors.New("invalid cgroup limits")
	// ErrBadPath is wrapped when a group name or path is not a clean relative path.
	ErrBadPath = errors.New("invalid cgroup path")
	// ErrNotFrozen is wrapped when the kernel does not report a group frozen in time.
	ErrNotFrozen = errors.New("cgroup not frozen in time")
	// ErrNotV2 is wrapped when Root is not a cgroup v2 hierarchy.
	ErrNotV2 = errors.New("not a cgroup v2 hierarchy")
)

// MissingControllersError says which limits cannot be set because the
// hierarchy does not offer their controllers (a hybrid host's v2 tree offers
// none).
type MissingControllersError struct {
	// Path is the cgroup v2 directory whose cgroup.controllers lacks them.
	Path string
	// Missing are the controllers asked for and not offered, sorted.
	Missing []string
	// Available are the controllers that are offered.
	Available []string
}

func (e *MissingControllersError) Error() string {
	avail := strings.Join(e.Available, " ")
	if avail == "" {
		avail = "none"
	}
	return fmt.Sprintf("cannot set limits at %s: controllers %s not available (available: %s)",
		e.Path, strings.Join(e.Missing, ", "), avail)
}

func (e *MissingControllersError) Unwrap() error { return ErrControllersUnavailable }

// Group is one cgroup v2 group. Implementations are safe for concurrent use.
type Group interface {
	// Path is the group's directory.
	Path() string
	// AddProc moves a process into the group.
	AddProc(pid int) error
	// Procs lists the processes in the group and its descendants.
	Procs() ([]int, error)
	// SetLimits sets the group's limits (zero fields are left as they are).
	SetLimits(l Limits) error
	// Freeze asks the kernel to freeze the group and waits until it reports
	// the group frozen.
	Freeze() error
	// Thaw unfreezes the group.
	Thaw() error
	// Kill sends SIGKILL to every process in the group and its descendants.
	Kill() error
	// Stats reads the group's state and counters.
	Stats() (Stats, error)
	// Delete kills whatever still runs in the group, waits for it to empty
	// and removes it. Deleting a group that is gone is not an error.
	Delete() error
}

// Stats is a group's state and counters. Counters of controllers the
// hierarchy does not offer read 0.
type Stats struct {
	// Populated is true while the group or a descendant holds a process.
	Populated bool
	// Frozen is true once the kernel reports the group frozen.
	Frozen bool
	// Procs is the number of processes in the group and its descendants.
	Procs int
	// CPUUsageSeconds is the CPU time consumed (cpu.stat usage_usec).
	CPUUsageSeconds float64
	// MemoryCurrentBytes is memory.current.
	MemoryCurrentBytes uint64
	// PidsCurrent is pids.current.
	PidsCurrent uint64
}

// Manager creates and opens groups in one cgroup v2 hierarchy.
type Manager struct {
	cfg Config

	nsOnce sync.Once
	nsRoot string
	nsErr  error
}

// Groups is what a consumer of the seam needs: create a child for its own
// processes, or open an existing group (a container's) by its path.
type Groups interface {
	Create(name string, limits Limits) (Group, error)
	Open(path string) (Group, error)
}

var _ Groups = (*Manager)(nil)

// Open returns a manager on root, or where root is "" on the first of the
// pure v2 mount (DefaultRoot) and the hybrid one (HybridRoot) that works.
func Open(root string) (*Manager, error) {
	roots := []string{root}
	if root == "" {
		roots = []string{DefaultRoot, HybridRoot}
	}
	var errs []error
	for _, r := range roots {
		m, err := NewManager(Config{Root: r})
		if err == nil {
			return m, nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

// NewManager checks that cfg.Root is a cgroup v2 hierarchy and returns a
// manager for it. It creates nothing.
func NewManager(cfg Config) (*Manager, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	if _, err := os.Stat(filepath.Join(cfg.Root, "cgroup.controllers")); err != nil {
		return nil, fmt.Errorf("%w at %s: %w", ErrNotV2, cfg.Root, err)
	}
	return &Manager{cfg: cfg}, nil
}

// Root is the hierarchy's mount point.
func (m *Manager) Root() string { return m.cfg.Root }

// Controllers returns the controllers the hierarchy's root offers.
func (m *Manager) Controllers() ([]string, error) {
	return readControllers(m.cfg.Root)
}

// Supported splits limits into those the hierarchy can set and the names of
// the controllers it lacks for the rest. A caller that can live without some
// limits (the runtime on a hybrid host) creates its group with the first
// result and logs the second.
func (m *Manager) Supported(l Limits) (Limits, []string, error) {
	avail, err := m.Controllers()
	if err != nil {
		return Limits{}, nil, err
	}
	missing := missingOf(l.controllers(), avail)
	return l.without(missing), missing, nil
}

func missingOf(want, avail []string) []string {
	var missing []string
	for _, c := range want {
		if !slices.Contains(avail, c) {
			missing = append(missing, c)
		}
	}
	slices.Sort(missing)
	return missing
}

// Create makes the group <Root>/<Parent>/<name> (reusing it if it exists)
// with the given limits. When a limit's controller is not offered it creates
// nothing and returns a *MissingControllersError.
func (m *Manager) Create(name string, limits Limits) (Group, error) {
	rel, err := cleanRel(path.Join(m.cfg.Parent, name))
	if err != nil || name == "" || strings.Contains(name, "/") {
		return nil, fmt.Errorf("%w: group name %q must be one non-empty path element", ErrBadPath, name)
	}
	if err := limits.validate(); err != nil {
		return nil, err
	}
	avail, err := m.Controllers()
	if err != nil {
		return nil, err
	}
	if missing := missingOf(limits.controllers(), avail); len(missing) > 0 {
		return nil, &MissingControllersError{Path: m.cfg.Root, Missing: missing, Available: avail}
	}
	mgr, err := cgroup2.NewManager(m.cfg.Root, "/"+rel, limits.resources())
	if err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", filepath.Join(m.cfg.Root, rel), err)
	}
	return &group{mgr: mgr, path: filepath.Join(m.cfg.Root, rel), root: m.cfg.Root, timeout: m.cfg.FreezeTimeout}, nil
}

// Open returns the existing group at path, relative to Root (a leading "/"
// is allowed, as /proc/<pid>/cgroup writes it).
func (m *Manager) Open(p string) (Group, error) {
	rel, err := cleanRel(p)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(m.cfg.Root, rel)
	if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", dir, err)
	}
	mgr, err := cgroup2.Load("/"+rel, cgroup2.WithMountpoint(m.cfg.Root))
	if err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", dir, err)
	}
	return &group{mgr: mgr, path: dir, root: m.cfg.Root, timeout: m.cfg.FreezeTimeout}, nil
}

// ResolveProcPath turns a cgroup path as this process's /proc/<pid>/cgroup
// shows it into a path below Root that Open takes. In the root cgroup
// namespace the two are the same. In a private namespace (a container's) the
// kernel shows paths relative to the namespace root, climbing with ".." to
// reach other containers; the namespace root is found once, as the group
// below Root whose cgroup.procs holds this process, less the path
// /proc/self/cgroup shows for it.
func (m *Manager) ResolveProcPath(p string) (string, error) {
	m.nsOnce.Do(func() { m.nsRoot, m.nsErr = namespaceRoot(m.cfg.Root, "/proc/self/cgroup", os.Getpid()) })
	if m.nsErr != nil {
		return "", m.nsErr
	}
	return joinNamespace(m.nsRoot, p)
}

// joinNamespace resolves p against the namespace root ns (both below the
// hierarchy root); the result must not leave the hierarchy.
func joinNamespace(ns, p string) (string, error) {
	if !strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("%w %q: a /proc cgroup path starts with /", ErrBadPath, p)
	}
	joined := path.Clean("/" + ns + "/" + p)
	// path.Clean keeps a leading ".." only for relative paths: count how
	// far p climbs to catch one that leaves the hierarchy.
	depth := len(strings.FieldsFunc(ns, func(r rune) bool { return r == '/' }))
	for _, seg := range strings.Split(strings.Trim(p, "/"), "/") {
		switch seg {
		case "..":
			depth--
		case "", ".":
		default:
			depth++
		}
		if depth < 0 {
			return "", fmt.Errorf("%w %q: climbs above the cgroup root from namespace root /%s", ErrBadPath, p, ns)
		}
	}
	if joined == "/" {
		return "", fmt.Errorf("%w %q: resolves to the cgroup root", ErrBadPath, p)
	}
	return joined, nil
}

// namespaceRoot finds this process's cgroup namespace root below root.
func namespaceRoot(root, selfCgroup string, pid int) (string, error) {
	b, err := os.ReadFile(selfCgroup)
	if err != nil {
		return "", fmt.Errorf("read own cgroup: %w", err)
	}
	var own string
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "0::"); ok {
			own = rest
		}
	}
	if own == "" || strings.Contains(own, "..") {
		return "", fmt.Errorf("own cgroup in %s: no usable cgroup v2 line in %q", selfCgroup, b)
	}
	want := strconv.Itoa(pid)
	// Fast path: the root namespace, where the shown path exists as is.
	if procsHold(filepath.Join(root, own, "cgroup.procs"), want) {
		return "/", nil
	}
	found := ""
	walkErr := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() || found != "" {
			if found != "" {
				return filepath.SkipAll
			}
			return nil
		}
		if rel, _ := filepath.Rel(root, p); strings.Count(rel, "/") > 12 {
			return filepath.SkipDir
		}
		if procsHold(filepath.Join(p, "cgroup.procs"), want) {
			found = p
			return filepath.SkipAll
		}
		return nil
	})
	if walkErr != nil {
		return "", fmt.Errorf("find own cgroup below %s: %w", root, walkErr)
	}
	if found == "" {
		return "", fmt.Errorf("find own cgroup below %s: no group holds pid %d (is the host's cgroup tree mounted there?)", root, pid)
	}
	abs := "/" + strings.TrimPrefix(strings.TrimPrefix(found, root), "/")
	own = path.Clean(own)
	if own == "/" {
		return abs, nil
	}
	if !strings.HasSuffix(abs, own) {
		return "", fmt.Errorf("own cgroup %s found at %s, which does not end with the namespace's %s", want, abs, own)
	}
	ns := strings.TrimSuffix(abs, own)
	if ns == "" {
		ns = "/"
	}
	return ns, nil
}

func procsHold(file, pid string) bool {
	b, err := os.ReadFile(file)
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if l == pid {
			return true
		}
	}
	return false
}

// cleanRel turns a group path into a clean relative path that stays inside
// the hierarchy.
func cleanRel(p string) (string, error) {
	rel := strings.TrimPrefix(p, "/")
	if rel == "" || path.Clean(rel) != rel || rel == "." || strings.HasPrefix(rel, "../") || rel == ".." ||
		strings.ContainsAny(rel, "\x00\n") {
		return "", fmt.Errorf("%w %q: want a clean path below the cgroup root", ErrBadPath, p)
	}
	return rel, nil
}

type group struct {
	mgr     *cgroup2.Manager
	path    string
	root    string
	timeout time.Duration
}

var _ Group = (*group)(nil)

func (g *group) Path() string { return g.path }

func (g *group) AddProc(pid int) error {
	if pid <= 0 {
		return fmt.Errorf("add pid %d to cgroup %s: pid must be positive", pid, g.path)
	}
	if err := g.mgr.AddProc(uint64(pid)); err != nil {
		return fmt.Errorf("add pid %d to cgroup %s: %w", pid, g.path, err)
	}
	return nil
}

func (g *group) Procs() ([]int, error) {
	pids, err := g.mgr.Procs(true)
	if err != nil {
		return nil, fmt.Errorf("list processes of cgroup %s: %w", g.path, err)
	}
	out := make([]int, len(pids))
	for i, p := range pids {
		out[i] = int(p)
	}
	slices.Sort(out)
	return out, nil
}

func (g *group) SetLimits(l Limits) error {
	if err := l.validate(); err != nil {
		return err
	}
	if l.IsZero() {
		return nil
	}
	parent := filepath.Dir(g.path)
	avail, err := readControllers(parent)
	if err != nil {
		return err
	}
	if missing := missingOf(l.controllers(), avail); len(missing) > 0 {
		// The parent may offer a controller without delegating it yet.
		rootAvail, err := readControllers(g.root)
		if err != nil {
			return err
		}
		if missing := missingOf(l.controllers(), rootAvail); len(missing) > 0 {
			return &MissingControllersError{Path: g.root, Missing: missing, Available: rootAvail}
		}
		res := l.resources()
		if err := g.mgr.ToggleControllers(res.EnabledControllers(), cgroup2.Enable); err != nil {
			return fmt.Errorf("enable controllers for cgroup %s: %w", g.path, err)
		}
	}
	if err := g.mgr.Update(l.resources()); err != nil {
		return fmt.Errorf("set limits of cgroup %s: %w", g.path, err)
	}
	return nil
}

func (g *group) Freeze() error {
	if err := g.mgr.Freeze(); err != nil {
		return fmt.Errorf("freeze cgroup %s: %w", g.path, err)
	}
	deadline := time.Now().Add(g.timeout)
	for {
		ev, err := readEvents(g.path)
		if err != nil {
			return fmt.Errorf("freeze cgroup %s: %w", g.path, err)
		}
		if ev["frozen"] == 1 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("freeze cgroup %s: %w after %s", g.path, ErrNotFrozen, g.timeout)
		}
		time.Sleep(time.Millisecond)
	}
}

func (g *group) Thaw() error {
	if err := g.mgr.Thaw(); err != nil {
		return fmt.Errorf("thaw cgroup %s: %w", g.path, err)
	}
	return nil
}

func (g *group) Kill() error {
	if err := os.WriteFile(filepath.Join(g.path, "cgroup.kill"), []byte("1"), 0); err != nil {
		if !errors.Is(err, os.ErrNotExist) || !exists(g.path) {
			return fmt.Errorf("kill cgroup %s: %w", g.path, err)
		}
		// Kernels before 5.14 have no cgroup.kill: the library freezes,
		// signals every process and thaws.
		if err := g.mgr.Kill(); err != nil {
			return fmt.Errorf("kill cgroup %s: %w", g.path, err)
		}
	}
	return nil
}

func (g *group) Stats() (Stats, error) {
	ev, err := readEvents(g.path)
	if err != nil {
		return Stats{}, fmt.Errorf("stats of cgroup %s: %w", g.path, err)
	}
	m, err := g.mgr.StatFiltered(cgroup2.StatCPU | cgroup2.StatMemory | cgroup2.StatPids)
	if err != nil {
		return Stats{}, fmt.Errorf("stats of cgroup %s: %w", g.path, err)
	}
	procs, err := g.Procs()
	if err != nil {
		return Stats{}, err
	}
	s := Stats{Populated: ev["populated"] == 1, Frozen: ev["frozen"] == 1, Procs: len(procs)}
	if m.CPU != nil {
		s.CPUUsageSeconds = float64(m.CPU.UsageUsec) / 1e6
	}
	if m.Memory != nil {
		s.MemoryCurrentBytes = m.Memory.Usage
	}
	if m.Pids != nil {
		s.PidsCurrent = m.Pids.Current
	}
	return s, nil
}

func (g *group) Delete() error {
	if !exists(g.path) {
		return nil
	}
	ev, err := readEvents(g.path)
	if err != nil {
		return fmt.Errorf("delete cgroup %s: %w", g.path, err)
	}
	if ev["populated"] == 1 {
		if err := g.Kill(); err != nil {
			return fmt.Errorf("delete cgroup %s: %w", g.path, err)
		}
		// A frozen group's processes die only once thawed.
		if ev["frozen"] == 1 {
			_ = g.mgr.Thaw()
		}
		deadline := time.Now().Add(g.timeout)
		for {
			ev, err = readEvents(g.path)
			if err != nil {
				return fmt.Errorf("delete cgroup %s: %w", g.path, err)
			}
			if ev["populated"] == 0 {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("delete cgroup %s: processes still running %s after kill", g.path, g.timeout)
			}
			time.Sleep(time.Millisecond)
		}
	}
	if err := removeTree(g.path); err != nil {
		return fmt.Errorf("delete cgroup %s: %w", g.path, err)
	}
	return nil
}

// removeTree removes a cgroup directory and its child groups, deepest first
// (cgroupfs refuses rmdir of a group that still has children).
func removeTree(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func readControllers(dir string) ([]string, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
	if err != nil {
		return nil, fmt.Errorf("read controllers of %s: %w", dir, err)
	}
	return strings.Fields(string(b)), nil
}

// readEvents parses cgroup.events ("populated 1\nfrozen 0\n").
func readEvents(dir string) (map[string]int64, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("parse %s: line %q: %w", filepath.Join(dir, "cgroup.events"), sc.Text(), err)
		}
		out[k] = n
	}
	return out, nil
}
