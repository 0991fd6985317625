package enforce_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/accounting"
	"github.com/visionslice/visionslice/nodeagent/cgroup"
	"github.com/visionslice/visionslice/nodeagent/cgroup/cgrouptest"
	"github.com/visionslice/visionslice/nodeagent/enforce"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
	"github.com/visionslice/visionslice/nodeagent/podresources"
	"github.com/visionslice/visionslice/nodeagent/podresources/podresourcestest"
	"github.com/visionslice/visionslice/nodeagent/procfs"
)

const (
	gib    = uint64(1) << 30
	podUID = "0d4b3c2a-1e5f-4a6b-8c7d-9e0f1a2b3c4d"
	ctrID  = "4f8b2a1c9d3e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4"
	ns     = "vision"
	pod    = "detector-0"
	ctr    = "detector"
)

type annotations map[string]string

func (a annotations) Annotations(namespace, name string) (map[string]string, bool) {
	if namespace == ns && name == pod {
		return a, true
	}
	return nil, false
}

// stack is the whole enforcement path on this machine: simulated GPUs read
// through the real NVML adapter and poller, a real sleep process in a real
// cgroup v2 group laid out like a kubelet container, its real
// /proc/<pid>/cgroup, kubelet log links, a pod-resources server on a unix
// socket, and the enforcer acting on the real cgroup.
type stack struct {
	gpus    *sim.GPUs
	pid     int
	exited  chan error // receives the sleep's exit
	group   cgroup.Group
	records chan acted
	enf     *enforce.Enforcer
	stop    func() // stops the poller, tracker and enforcer; idempotent
	tracker *accounting.Tracker
}

// acted is an audit record and when the hook saw it (after the action).
type acted struct {
	enforce.Record
	at time.Time
}

// newStack runs a sleep as the container on one simulated H100.
func newStack(tb testing.TB, pol enforce.Config, ann annotations, poll time.Duration) *stack {
	tb.Helper()
	m := cgrouptest.Manager(tb) // skips where cgroup v2 is not writable
	logger := slog.New(slog.NewJSONHandler(io.Discard, nil))
	gpus, err := sim.New("h100x1", tb.Name())
	if err != nil {
		tb.Fatal(err)
	}
	reader := gpu.NewReader(gpus.Interface(), logger)
	if err := reader.Init(); err != nil {
		tb.Fatal(err)
	}
	s := buildStack(tb, m, pol, ann, poll, reader, gpus.UUID(0), exec.Command("sleep", "600"))
	s.gpus = gpus
	return s
}

// buildStack places cmd in a kubelet-like container cgroup, starts it and
// the enforcement path over reader, with two slices of 1 GiB on gpuUUID.
// It owns reader from here on.
func buildStack(tb testing.TB, m *cgroup.Manager, pol enforce.Config, ann annotations, poll time.Duration,
	reader *gpu.Reader, gpuUUID string, cmd *exec.Cmd) *stack {
	tb.Helper()
	logger := slog.New(slog.NewJSONHandler(io.Discard, nil))
	ctx, cancel := context.WithCancel(context.Background())

	// A container cgroup as the kubelet's systemd driver names it, below
	// this test's own group.
	parent := strings.TrimPrefix(strings.TrimPrefix(mustParent(tb, m), m.Root()), "/")
	rel := filepath.Join(parent, "kubepods.slice", "kubepods-burstable.slice",
		"kubepods-burstable-pod"+strings.ReplaceAll(podUID, "-", "_")+".slice", "cri-containerd-"+ctrID+".scope")
	if err := os.MkdirAll(filepath.Join(m.Root(), rel), 0o755); err != nil {
		tb.Fatal(err)
	}
	g, err := m.Open(rel)
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	tb.Cleanup(func() {
		_ = g.Delete()
		_ = cmd.Process.Kill()
	})
	if err := g.AddProc(cmd.Process.Pid); err != nil {
		tb.Fatal(err)
	}
	c, err := procfs.NewReader("").Container(cmd.Process.Pid)
	if err != nil || c.ID != ctrID || c.PodUID != podUID {
		tb.Fatalf("real /proc/%d/cgroup parsed to %+v, %v", cmd.Process.Pid, c, err)
	}

	poller := gpu.NewPoller(reader, poll, logger)

	logs := tb.TempDir()
	for _, d := range []string{"pods/" + ns + "_" + pod + "_" + podUID + "/" + ctr, "containers"} {
		if err := os.MkdirAll(filepath.Join(logs, d), 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	if err := os.Symlink("../pods/x", filepath.Join(logs, "containers", pod+"_"+ns+"_"+ctr+"-"+ctrID+".log")); err != nil {
		tb.Fatal(err)
	}
	srv := podresourcestest.New(tb)
	srv.SetContainers([]podresources.ContainerDevices{{Namespace: ns, Pod: pod, Container: ctr, ResourceName: slice.ResourceName,
		DeviceIDs: []string{slice.ID{GPU: gpuUUID, Index: 0}.String(), slice.ID{GPU: gpuUUID, Index: 1}.String()}}})
	client, err := podresources.Dial(ctx, srv.Socket())
	if err != nil {
		tb.Fatal(err)
	}
	acfg := accounting.DefaultConfig()
	acfg.SliceBytes = gib
	tracker := accounting.New(acfg, procfs.NewReader(""), accounting.NewLogDirs(filepath.Join(logs, "pods"), filepath.Join(logs, "containers"), time.Second), client, logger)
	if err := tracker.Refresh(ctx); err != nil {
		tb.Fatal(err)
	}

	s := &stack{pid: cmd.Process.Pid, exited: exited, group: g, records: make(chan acted, 64), tracker: tracker}
	var pods enforce.PodAnnotations
	if ann != nil {
		pods = ann
	}
	s.enf, err = enforce.New(pol, enforce.Deps{Snapshots: poller, Accounting: tracker, Cgroups: m, Pods: pods}, logger,
		enforce.WithHook(func(r enforce.Record) { s.records <- acted{r, time.Now()} }))
	if err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{}, 3)
	for _, run := range []func(context.Context) error{poller.Run, tracker.Run, s.enf.Run} {
		go func() { _ = run(ctx); done <- struct{}{} }()
	}
	var once sync.Once
	s.stop = func() {
		once.Do(func() {
			cancel()
			for range 3 {
				<-done
			}
			_ = client.Close()
			reader.Shutdown()
		})
	}
	tb.Cleanup(s.stop)
	return s
}

func mustParent(tb testing.TB, m *cgroup.Manager) string {
	tb.Helper()
	// Create the manager's parent group by creating and deleting a child.
	g, err := m.Create("probe", cgroup.Limits{})
	if err != nil {
		tb.Fatal(err)
	}
	p := filepath.Dir(g.Path())
	if err := g.Delete(); err != nil {
		tb.Fatal(err)
	}
	return p
}

func (s *stack) use(tb testing.TB, bytes uint64) {
	tb.Helper()
	if err := s.gpus.SetProcess(0, uint32(s.pid), bytes, gpu.ProcessCompute); err != nil {
		tb.Fatal(err)
	}
}

func (s *stack) next(tb testing.TB, want enforce.Action) acted {
	tb.Helper()
	select {
	case r := <-s.records:
		if r.Action != want || r.Result != enforce.ResultOK {
			tb.Fatalf("audit record %s/%s (%s), want %s/ok", r.Action, r.Result, r.Reason, want)
		}
		return r
	case <-time.After(10 * time.Second):
		tb.Fatalf("no %s action within 10s", want)
	}
	return acted{}
}

// killed waits for the sleep to die of SIGKILL.
func (s *stack) killed(tb testing.TB) {
	tb.Helper()
	select {
	case err := <-s.exited:
		var exitErr *exec.ExitError
		if !errors.As(err, &exitErr) || exitErr.ProcessState.String() != "signal: killed" {
			tb.Fatalf("sleep ended with %v, want signal: killed", err)
		}
	case <-time.After(5 * time.Second):
		tb.Fatal("sleep still running 5s after cgroup.kill")
	}
}

func (s *stack) frozen(tb testing.TB) bool {
	tb.Helper()
	st, err := s.group.Stats()
	if err != nil {
		tb.Fatal(err)
	}
	return st.Frozen
}

func TestRealCgroupFreezeThawThenKillAfterGrace(t *testing.T) {
	pol := enforce.DefaultConfig()
	pol.DefaultAction = enforce.ActionFreeze
	pol.Hysteresis.OverFor = 0
	pol.GracePeriod = 300 * time.Millisecond
	pol.CheckInterval = 10 * time.Millisecond
	s := newStack(t, pol, nil, 20*time.Millisecond)

	s.use(t, gib) // under its 2 GiB quota
	time.Sleep(100 * time.Millisecond)
	select {
	case r := <-s.records:
		t.Fatalf("action under quota: %+v", r)
	default:
	}

	s.use(t, 3*gib)
	r := s.next(t, enforce.ActionFreeze)
	if r.Namespace != ns || r.Pod != pod || r.Container != ctr || r.QuotaBytes != 2*gib || r.UsageBytes != 3*gib || r.GPUUUID != s.gpus.UUID(0) {
		t.Fatalf("freeze record = %+v", r)
	}
	if !s.frozen(t) {
		t.Fatal("cgroup not frozen after the freeze action")
	}

	s.use(t, gib)
	s.next(t, "thaw")
	if s.frozen(t) {
		t.Fatal("cgroup still frozen after the thaw")
	}

	s.use(t, 3*gib)
	s.next(t, enforce.ActionFreeze)
	k := s.next(t, enforce.ActionKill)
	if d := k.Time.Sub(r.Time); d < pol.GracePeriod {
		t.Fatalf("killed %s after the freeze, before the %s grace period", d, pol.GracePeriod)
	}
	s.killed(t)
	if st, err := s.group.Stats(); err != nil || st.Populated {
		t.Fatalf("container cgroup after kill: %+v, %v", st, err)
	}
}

// A stopping agent leaves no container frozen.
func TestRealCgroupThawedWhenEnforcerStops(t *testing.T) {
	pol := enforce.DefaultConfig()
	pol.DefaultAction = enforce.ActionFreeze
	pol.Hysteresis.OverFor = 0
	pol.GracePeriod = time.Hour
	pol.CheckInterval = 10 * time.Millisecond
	s := newStack(t, pol, nil, 20*time.Millisecond)
	s.use(t, 3*gib)
	s.next(t, enforce.ActionFreeze)
	if !s.frozen(t) {
		t.Fatal("not frozen")
	}
	s.stop()
	r := s.next(t, "thaw")
	if r.Reason != "agent stopping" {
		t.Errorf("thaw reason %q", r.Reason)
	}
	if s.frozen(t) {
		t.Fatal("cgroup left frozen after the enforcer stopped")
	}
}

func TestRealCgroupKillByAnnotation(t *testing.T) {
	pol := enforce.DefaultConfig()
	pol.AllowedActions = []enforce.Action{enforce.ActionObserve, enforce.ActionKill}
	pol.Hysteresis.OverFor = 0
	pol.CheckInterval = 10 * time.Millisecond
	s := newStack(t, pol, annotations{slice.AnnotationEnforcementAction: "kill"}, 20*time.Millisecond)
	s.use(t, 5*gib)
	s.next(t, enforce.ActionKill)
	s.killed(t)
}

// BenchmarkOverrunToAction measures, on real cgroup v2 with the simulated
// GPUs, the time from the GPU poll that first sees a container over quota
// (its snapshot's time stamp, taken as that poll starts) to the end of the
// freeze: the kernel reports the group frozen. It reports p50, p90 and p99,
// the p99 of its two parts (snapshot to the enforcer's decision; the freeze
// itself, until the kernel reports every task stopped, which on a loaded
// host waits for the scheduler to run each task once), and the p99 as a
// ratio of the poll interval (the goal: at most 1).
func BenchmarkOverrunToAction(b *testing.B) {
	for _, poll := range []time.Duration{20 * time.Millisecond, 100 * time.Millisecond} {
		b.Run("poll="+poll.String(), func(b *testing.B) { benchOverrun(b, poll) })
	}
}

func benchOverrun(b *testing.B, poll time.Duration) {
	pol := enforce.DefaultConfig()
	pol.DefaultAction = enforce.ActionFreeze
	pol.Hysteresis.OverFor = 0
	pol.GracePeriod = time.Hour
	pol.CheckInterval = 10 * time.Millisecond
	s := newStack(b, pol, nil, poll)
	lat := make([]time.Duration, 0, b.N)
	decide := make([]time.Duration, 0, b.N)
	freeze := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		s.use(b, 3*gib)
		r := s.next(b, enforce.ActionFreeze)
		lat = append(lat, r.at.Sub(r.SnapshotTime))
		decide = append(decide, r.Time.Sub(r.SnapshotTime))
		freeze = append(freeze, r.ActionDuration)
		s.use(b, gib)
		s.next(b, "thaw")
	}
	b.StopTimer()
	p := func(d []time.Duration, q float64) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[min(len(d)-1, int(q*float64(len(d))))]
	}
	b.ReportMetric(float64(p(lat, 0.5).Microseconds()), "p50-us")
	b.ReportMetric(float64(p(lat, 0.9).Microseconds()), "p90-us")
	b.ReportMetric(float64(p(lat, 0.99).Microseconds()), "p99-us")
	b.ReportMetric(float64(p(decide, 0.99).Microseconds()), "decide-p99-us")
	b.ReportMetric(float64(p(freeze, 0.99).Microseconds()), "freeze-p99-us")
	b.ReportMetric(float64(p(lat, 0.99))/float64(poll), "p99/poll-interval")
}
