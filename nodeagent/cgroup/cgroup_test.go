package cgroup_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/visionslice/visionslice/nodeagent/cgroup"
	"github.com/visionslice/visionslice/nodeagent/cgroup/cgrouptest"
)

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		cfg  cgroup.Config
		want string
	}{
		{"defaults", cgroup.Config{}, ""},
		{"relative root", cgroup.Config{Root: "sys/fs/cgroup"}, "absolute"},
		{"parent escapes", cgroup.Config{Parent: "../x"}, "invalid cgroup path"},
		{"negative timeout", cgroup.Config{FreezeTimeout: -time.Second}, "negative"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tc.cfg.Validate()
			if tc.want == "" && err != nil {
				t.Fatalf("Validate() = %v, want nil", err)
			}
			if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("Validate() = %v, want error containing %q", err, tc.want)
			}
		})
	}
}

func TestNewManagerRejectsNonV2(t *testing.T) {
	t.Parallel()
	_, err := cgroup.NewManager(cgroup.Config{Root: t.TempDir()})
	if !errors.Is(err, cgroup.ErrNotV2) {
		t.Fatalf("NewManager(empty dir) = %v, want ErrNotV2", err)
	}
}

func TestBadNamesAndLimits(t *testing.T) {
	t.Parallel()
	m := cgrouptest.Manager(t)
	for _, name := range []string{"", "a/b", "..", "../escape", "x\x00y"} {
		if _, err := m.Create(name, cgroup.Limits{}); !errors.Is(err, cgroup.ErrBadPath) {
			t.Errorf("Create(%q) = %v, want ErrBadPath", name, err)
		}
	}
	for _, p := range []string{"", "/", "../etc", "/a/../../b"} {
		if _, err := m.Open(p); !errors.Is(err, cgroup.ErrBadPath) {
			t.Errorf("Open(%q) = %v, want ErrBadPath", p, err)
		}
	}
	for _, l := range []cgroup.Limits{{CPUMaxCores: -1}, {CPUMaxCores: 0.001}, {MemoryMaxBytes: -5}, {PidsMax: -1}} {
		if _, err := m.Create("bad-limits", l); !errors.Is(err, cgroup.ErrBadLimits) {
			t.Errorf("Create(limits %+v) = %v, want ErrBadLimits", l, err)
		}
	}
}

// startSleep starts a real child process that the test reaps at cleanup.
func startSleep(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatalf("start sleep: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

func procState(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return "gone"
	}
	// pid (comm) S ...
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return strings.Fields(s[i+1:])[0]
}

func TestRealFreezeThawKill(t *testing.T) {
	t.Parallel()
	m := cgrouptest.Manager(t)
	g, err := m.Create("worker", cgroup.Limits{})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	cmd := startSleep(t)
	pid := cmd.Process.Pid
	if err := g.AddProc(pid); err != nil {
		t.Fatalf("AddProc: %v", err)
	}
	procs, err := g.Procs()
	if err != nil || !slices.Equal(procs, []int{pid}) {
		t.Fatalf("Procs() = %v, %v; want [%d]", procs, err, pid)
	}
	b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cgroup"))
	if !strings.Contains(string(b), strings.TrimPrefix(g.Path(), m.Root())) {
		t.Fatalf("/proc/%d/cgroup = %q, want it to name %s", pid, b, g.Path())
	}

	if err := g.Freeze(); err != nil {
		t.Fatalf("Freeze: %v", err)
	}
	st, err := g.Stats()
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if !st.Frozen || !st.Populated || st.Procs != 1 {
		t.Fatalf("Stats after freeze = %+v, want frozen, populated, 1 proc", st)
	}
	if err := g.Thaw(); err != nil {
		t.Fatalf("Thaw: %v", err)
	}
	if st, _ := g.Stats(); st.Frozen {
		t.Fatalf("Stats after thaw = %+v, want not frozen", st)
	}
	if err := g.Kill(); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	err = cmd.Wait()
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ProcessState.String() != "signal: killed" {
		t.Fatalf("sleep ended with %v, want signal: killed", err)
	}
	if err := g.Delete(); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := os.Stat(g.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("group dir after Delete: %v, want gone", err)
	}
	if err := g.Delete(); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
}

func TestRealDeleteKillsFrozenAndNested(t *testing.T) {
	t.Parallel()
	m := cgrouptest.Manager(t)
	g, err := m.Create("outer", cgroup.Limits{})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	rel := strings.TrimPrefix(g.Path(), m.Root())
	if err := os.Mkdir(filepath.Join(g.Path(), "inner"), 0o755); err != nil {
		t.Fatalf("mkdir inner: %v", err)
	}
	inner, err := m.Open(rel + "/inner")
	if err != nil {
		t.Fatalf("Open inner: %v", err)
	}
	cmd := startSleep(t)
	if err := inner.AddProc(cmd.Process.Pid); err != nil {
		t.Fatalf("AddProc: %v", err)
	}
	if err := g.Freeze(); err != nil {
		t.Fatalf("Freeze outer: %v", err)
	}
	if s := procState(t, cmd.Process.Pid); s != "S" && s != "D" {
		t.Logf("frozen sleep state %s", s)
	}
	if err := g.Delete(); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if err := cmd.Wait(); err == nil {
		t.Fatal("sleep exited cleanly, want killed")
	}
	if _, err := os.Stat(g.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("group dir after Delete: %v, want gone", err)
	}
}

func TestLimitsReportMissingControllers(t *testing.T) {
	t.Parallel()
	m := cgrouptest.Manager(t)
	avail, err := m.Controllers()
	if err != nil {
		t.Fatal(err)
	}
	want := cgroup.Limits{CPUMaxCores: 0.5, MemoryMaxBytes: 64 << 20, PidsMax: 32}
	supported, missing, err := m.Supported(want)
	if err != nil {
		t.Fatal(err)
	}
	var expectMissing []string
	for _, c := range []string{"cpu", "memory", "pids"} {
		if !slices.Contains(avail, c) {
			expectMissing = append(expectMissing, c)
		}
	}
	if !slices.Equal(missing, expectMissing) {
		t.Fatalf("Supported missing = %v, want %v (available %v)", missing, expectMissing, avail)
	}
	g, err := m.Create("limited", want)
	if len(expectMissing) > 0 {
		var mce *cgroup.MissingControllersError
		if !errors.As(err, &mce) || !errors.Is(err, cgroup.ErrControllersUnavailable) {
			t.Fatalf("Create with limits on %v = %v, want MissingControllersError", avail, err)
		}
		if !slices.Equal(mce.Missing, expectMissing) || !strings.Contains(err.Error(), strings.Join(expectMissing, ", ")) {
			t.Fatalf("error %q does not name missing %v", err, expectMissing)
		}
		if _, statErr := os.Stat(filepath.Join(m.Root(), "visionslice")); statErr == nil {
			entries, _ := os.ReadDir(filepath.Join(m.Root(), "visionslice"))
			for _, e := range entries {
				if e.Name() == "limited" {
					t.Fatal("Create left a group behind after failing")
				}
			}
		}
		// What the host supports can still be created.
		g, err = m.Create("limited", supported)
		if err != nil {
			t.Fatalf("Create(supported %+v): %v", supported, err)
		}
		t.Cleanup(func() { _ = g.Delete() })
		if err := g.SetLimits(cgroup.Limits{PidsMax: 10}); !slices.Contains(avail, "pids") && !errors.Is(err, cgroup.ErrControllersUnavailable) {
			t.Fatalf("SetLimits(pids) on %v = %v, want ErrControllersUnavailable", avail, err)
		}
		return
	}
	if err != nil {
		t.Fatalf("Create with limits: %v", err)
	}
	t.Cleanup(func() { _ = g.Delete() })
	for file, val := range map[string]string{"cpu.max": "50000 100000", "memory.max": "67108864", "pids.max": "32"} {
		b, err := os.ReadFile(filepath.Join(g.Path(), file))
		if err != nil || strings.TrimSpace(string(b)) != val {
			t.Errorf("%s = %q, %v; want %q", file, b, err, val)
		}
	}
}

func TestJoinNamespace(t *testing.T) {
	t.Parallel()
	cases := []struct{ ns, p, want, err string }{
		{"/", "/kubepods.slice/a.scope", "/kubepods.slice/a.scope", ""},
		{"/kubepods.slice/kubepods-burstable.slice/pod1.slice/agent.scope", "/../../../kubepods-besteffort.slice/pod2.slice/c.scope",
			"/kubepods.slice/kubepods-besteffort.slice/pod2.slice/c.scope", ""},
		{"/kubepods/burstable/podA/ctr", "/", "/kubepods/burstable/podA/ctr", ""},
		{"/a/b", "/../../../x", "", "climbs above"},
		{"/a", "/..", "", "cgroup root"},
		{"/a", "relative", "", "starts with /"},
	}
	for _, tc := range cases {
		got, err := cgroup.JoinNamespaceForTest(tc.ns, tc.p)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, cgroup.ErrBadPath) {
				t.Errorf("join(%q, %q) = %q, %v; want error %q", tc.ns, tc.p, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("join(%q, %q) = %q, %v; want %q", tc.ns, tc.p, got, err, tc.want)
		}
	}
}

// In the root cgroup namespace a /proc path is already below the root.
func TestResolveProcPathRootNamespace(t *testing.T) {
	t.Parallel()
	m := cgrouptest.Manager(t)
	own, err := os.ReadFile("/proc/self/cgroup")
	if err != nil || !strings.Contains(string(own), "0::/") {
		t.Skipf("skipping: no cgroup v2 line in /proc/self/cgroup: %q", own)
	}
	if strings.Contains(string(own), "0::/..") {
		t.Skip("skipping: this test runs in a private cgroup namespace")
	}
	got, err := m.ResolveProcPath("/kubepods.slice/x.scope")
	if err != nil || got != "/kubepods.slice/x.scope" {
		t.Fatalf("ResolveProcPath = %q, %v", got, err)
	}
}

// A process in a private cgroup namespace (unshare -C, as a container's
// agent runs) sees another group's path climb with ".."; ResolveProcPath
// turns it back into the group's path below the root, and the group freezes.
func TestResolveProcPathPrivateNamespace(t *testing.T) {
	if os.Getenv("VS_CGROUP_HELPER") == "1" {
		return // the helper is TestResolveProcPathHelper
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("skipping: no unshare")
	}
	m := cgrouptest.Manager(t)
	agent, err := m.Create("agent", cgroup.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	target, err := m.Create("target", cgroup.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	cmd := startSleep(t)
	if err := target.AddProc(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	want := strings.TrimPrefix(target.Path(), m.Root())
	helper := exec.Command("sh", "-c", `echo $$ > "$1/cgroup.procs" && exec unshare -C "$2" -test.run='^TestResolveProcPathHelper$' -test.v`,
		"sh", agent.Path(), os.Args[0])
	helper.Env = append(os.Environ(), "VS_CGROUP_HELPER=1", "VS_CGROUP_ROOT="+m.Root(),
		"VS_CGROUP_PID="+strconv.Itoa(cmd.Process.Pid), "VS_CGROUP_WANT="+want)
	out, err := helper.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestResolveProcPathHelper") {
		t.Fatalf("helper in a private cgroup namespace: %v\n%s", err, out)
	}
	t.Logf("%s", out)
}

func TestResolveProcPathHelper(t *testing.T) {
	if os.Getenv("VS_CGROUP_HELPER") != "1" {
		t.Skip("skipping: run by TestResolveProcPathPrivateNamespace")
	}
	b, err := os.ReadFile("/proc/" + os.Getenv("VS_CGROUP_PID") + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	var shown string
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "0::"); ok {
			shown = rest
		}
	}
	if !strings.HasPrefix(shown, "/..") {
		t.Fatalf("target shown as %q, want a path climbing with ..", shown)
	}
	m, err := cgroup.NewManager(cgroup.Config{Root: os.Getenv("VS_CGROUP_ROOT")})
	if err != nil {
		t.Fatal(err)
	}
	got, err := m.ResolveProcPath(shown)
	if err != nil || got != os.Getenv("VS_CGROUP_WANT") {
		t.Fatalf("ResolveProcPath(%q) = %q, %v; want %q", shown, got, err, os.Getenv("VS_CGROUP_WANT"))
	}
	g, err := m.Open(got)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Freeze(); err != nil {
		t.Fatal(err)
	}
	if err := g.Thaw(); err != nil {
		t.Fatal(err)
	}
	t.Logf("shown %s, resolved %s, frozen and thawed", shown, got)
}

func TestOpenFindsTheV2Hierarchy(t *testing.T) {
	t.Parallel()
	if _, err := cgroup.Open(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Error("Open accepted a folder that is no cgroup v2 hierarchy")
	}
	m, err := cgroup.Open("")
	if err != nil {
		t.Skipf("no cgroup v2 hierarchy at %s or %s on this host: %v", cgroup.DefaultRoot, cgroup.HybridRoot, err)
	}
	if r := m.Root(); r != cgroup.DefaultRoot && r != cgroup.HybridRoot {
		t.Errorf("Open(\"\") chose %s", r)
	}
}
