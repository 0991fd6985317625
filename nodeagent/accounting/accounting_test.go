package accounting

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/podresources"
	"github.com/visionslice/visionslice/nodeagent/podresources/podresourcestest"
	"github.com/visionslice/visionslice/nodeagent/procfs"
)

const (
	gpu0 = "GPU-00000000-0000-4000-8000-0000000000a0"
	gpu1 = "GPU-00000000-0000-4000-8000-0000000000a1"
	gib  = uint64(1) << 30
	mib  = uint64(1) << 20

	idDetector = "1111111111111111111111111111111111111111111111111111111111111111"
	idOCR      = "2222222222222222222222222222222222222222222222222222222222222222"
	idPlain    = "3333333333333333333333333333333333333333333333333333333333333333"
	idSolo     = "4444444444444444444444444444444444444444444444444444444444444444"
	idLate     = "5555555555555555555555555555555555555555555555555555555555555555"
	uidDet     = "aaaaaaaa-0000-4000-8000-000000000001"
	uidOCR     = "bbbbbbbb-0000-4000-8000-000000000002"
	uidPlain   = "cccccccc-0000-4000-8000-000000000003"
	uidSolo    = "dddddddd-0000-4000-8000-000000000004"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// ContainerCgroupLine is the v2 line of a containerd container under the
// systemd driver.
func containerCgroupLine(podUID, id string) string {
	return "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" +
		strings.ReplaceAll(podUID, "-", "_") + ".slice/cri-containerd-" + id + ".scope\n"
}

// writeProc makes <dir>/<pid>/cgroup.
func writeProc(t *testing.T, dir string, pid int, content string) {
	t.Helper()
	p := filepath.Join(dir, strconv.Itoa(pid))
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(p, "cgroup"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func sliceIDs(g string, n ...int) []string {
	var out []string
	for _, i := range n {
		out = append(out, slice.ID{GPU: g, Index: i}.String())
	}
	return out
}

type fixture struct {
	proc    string
	server  *podresourcestest.Server
	tracker *Tracker
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	proc := t.TempDir()
	writeProc(t, proc, 101, containerCgroupLine(uidDet, idDetector))
	writeProc(t, proc, 102, containerCgroupLine(uidDet, idDetector))
	writeProc(t, proc, 201, containerCgroupLine(uidOCR, idOCR))
	writeProc(t, proc, 301, containerCgroupLine(uidPlain, idPlain))
	writeProc(t, proc, 401, containerCgroupLine(uidSolo, idSolo))
	writeProc(t, proc, 1, "0::/init.scope\n")
	writeProc(t, proc, 500, "0::/visionslice/worker-ppocr\n")

	srv := podresourcestest.New(t)
	srv.SetContainers([]podresources.ContainerDevices{
		{Namespace: "vision", Pod: "detector-7f9c", Container: "detector", ResourceName: slice.ResourceName, DeviceIDs: sliceIDs(gpu0, 0, 1)},
		{Namespace: "vision", Pod: "ocr-0", Container: "ocr", ResourceName: slice.ResourceName, DeviceIDs: sliceIDs(gpu1, 3)},
		{Namespace: "vision", Pod: "solo", Container: "solo", ResourceName: slice.ResourceName, DeviceIDs: append(sliceIDs(gpu0, 5), "garbage")},
		{Namespace: "other", Pod: "plain-gpu", Container: "cuda", ResourceName: "nvidia.com/gpu", DeviceIDs: []string{gpu0}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := podresources.Dial(ctx, srv.Socket())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })

	cfg := DefaultConfig()
	cfg.SliceBytes = gib
	res := NewLogDirs(filepath.Join("testdata", "logs", "pods"), filepath.Join("testdata", "logs", "containers"), time.Hour)
	tr := New(cfg, procfs.NewReader(proc), res, client, discard())
	tr.RegisterWorker(500, "ppocr-det")
	if err := tr.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	return &fixture{proc: proc, server: srv, tracker: tr}
}

func snapshot(seq uint64, procs ...gpu.Process) *gpu.Snapshot {
	return &gpu.Snapshot{
		Seq:  seq,
		Time: time.Unix(1_800_000_000, 0),
		Devices: []gpu.Device{
			{Index: 0, UUID: gpu0, MemoryTotalBytes: 80 * gib, Healthy: true},
			{Index: 1, UUID: gpu1, MemoryTotalBytes: 80 * gib, Healthy: true},
		},
		Processes: procs,
	}
}

func p(pid uint32, g string, used uint64) gpu.Process {
	return gpu.Process{PID: pid, GPUUUID: g, UsedMemoryBytes: used, Kind: gpu.ProcessCompute}
}

func TestAccountAttributesEveryProcess(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	s := snapshot(7,
		p(101, gpu0, gib+gib/2), p(102, gpu0, gib), // detector: 2.5 GiB of 2 GiB
		p(201, gpu0, gib/4), p(201, gpu1, gib/2), // ocr: slices on gpu1 only
		p(301, gpu0, 3*gib),   // plain nvidia.com/gpu pod: unaccounted
		p(401, gpu0, gib/2),   // solo: no log link, resolved by pod
		p(1, gpu1, 100*mib),   // host process: unaccounted
		p(999, gpu1, 50*mib),  // exited before we read /proc: unaccounted
		p(500, gpu1, 700*mib), // agent worker
	)
	r := f.tracker.Account(s)
	type row struct {
		kind      gpu.GroupKind
		name      string
		gpu       string
		quota     uint64
		usage     uint64
		over      bool
		pids      int
		cgroupHas string
	}
	want := []row{
		{gpu.GroupContainer, "vision/detector-7f9c/detector", gpu0, 2 * gib, gib*2 + gib/2, true, 2, "cri-containerd-" + idDetector},
		{gpu.GroupContainer, "vision/ocr-0/ocr", gpu0, 0, gib / 4, true, 1, idOCR},
		{gpu.GroupContainer, "vision/solo/solo", gpu0, gib, gib / 2, false, 1, idSolo},
		{gpu.GroupContainer, "vision/ocr-0/ocr", gpu1, gib, gib / 2, false, 1, idOCR},
		{gpu.GroupWorker, "ppocr-det", gpu1, 0, 700 * mib, false, 1, ""},
	}
	if len(r.Groups) != len(want) {
		t.Fatalf("got %d groups %+v, want %d", len(r.Groups), r.Groups, len(want))
	}
	for i, w := range want {
		g := r.Groups[i]
		name := g.Identity.String()
		if g.Kind == gpu.GroupWorker {
			name = g.Model
		}
		if g.Kind != w.kind || name != w.name || g.GPUUUID != w.gpu || g.QuotaBytes != w.quota ||
			g.UsageBytes != w.usage || g.Over() != w.over || len(g.PIDs) != w.pids || !strings.Contains(g.CgroupPath, w.cgroupHas) {
			t.Errorf("group %d = %+v (over %v), want %+v", i, g, g.Over(), w)
		}
	}
	if got := r.Unaccounted[gpu0]; got != 3*gib {
		t.Errorf("unaccounted gpu0 = %d, want %d", got, 3*gib)
	}
	if got := r.Unaccounted[gpu1]; got != 150*mib {
		t.Errorf("unaccounted gpu1 = %d, want %d", got, 150*mib)
	}
	if k, g := f.tracker.GroupOf(102); k != gpu.GroupContainer || g != "vision/detector-7f9c/detector" {
		t.Errorf("GroupOf(102) = %s %s", k, g)
	}
	if k, g := f.tracker.GroupOf(500); k != gpu.GroupWorker || g != "ppocr-det" {
		t.Errorf("GroupOf(500) = %s %s", k, g)
	}
	if k, _ := f.tracker.GroupOf(301); k != gpu.GroupUnattributed {
		t.Errorf("GroupOf(301) = %s, want unattributed", k)
	}

	c := f.tracker.Collector()
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %+v", err, problems)
	}
	exp := `
# HELP visionslice_container_gpu_memory_limit_bytes GPU memory quota of a container on one GPU: its slices there times the slice size.
# TYPE visionslice_container_gpu_memory_limit_bytes gauge
visionslice_container_gpu_memory_limit_bytes{container="detector",gpu_uuid="` + gpu0 + `",namespace="vision",pod="detector-7f9c"} 2.147483648e+09
visionslice_container_gpu_memory_limit_bytes{container="ocr",gpu_uuid="` + gpu0 + `",namespace="vision",pod="ocr-0"} 0
visionslice_container_gpu_memory_limit_bytes{container="ocr",gpu_uuid="` + gpu1 + `",namespace="vision",pod="ocr-0"} 1.073741824e+09
visionslice_container_gpu_memory_limit_bytes{container="solo",gpu_uuid="` + gpu0 + `",namespace="vision",pod="solo"} 1.073741824e+09
# HELP visionslice_container_gpu_memory_used_bytes GPU memory used by a container's processes on one GPU (NVML per-process memory).
# TYPE visionslice_container_gpu_memory_used_bytes gauge
visionslice_container_gpu_memory_used_bytes{container="detector",gpu_uuid="` + gpu0 + `",namespace="vision",pod="detector-7f9c"} 2.68435456e+09
visionslice_container_gpu_memory_used_bytes{container="ocr",gpu_uuid="` + gpu0 + `",namespace="vision",pod="ocr-0"} 2.68435456e+08
visionslice_container_gpu_memory_used_bytes{container="ocr",gpu_uuid="` + gpu1 + `",namespace="vision",pod="ocr-0"} 5.36870912e+08
visionslice_container_gpu_memory_used_bytes{container="solo",gpu_uuid="` + gpu0 + `",namespace="vision",pod="solo"} 5.36870912e+08
# HELP visionslice_gpu_unaccounted_memory_bytes GPU memory used by processes that hold no visionslice slices (outside visionslice).
# TYPE visionslice_gpu_unaccounted_memory_bytes gauge
visionslice_gpu_unaccounted_memory_bytes{gpu="0",gpu_uuid="` + gpu0 + `"} 3.221225472e+09
visionslice_gpu_unaccounted_memory_bytes{gpu="1",gpu_uuid="` + gpu1 + `"} 1.572864e+08
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(exp)); err != nil {
		t.Fatal(err)
	}
}

// A container whose slices the cache has not seen is unaccounted at first;
// accounting asks Run for a refresh and a later report attributes it.
func TestRefreshOnChange(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	f.tracker.minRefresh = 10 * time.Millisecond
	f.tracker.SetConfig(Config{SliceBytes: gib, RefreshInterval: time.Hour})
	links := t.TempDir()
	for _, name := range []string{"detector-7f9c_vision_detector-" + idDetector, "detector-7f9c_vision_late-" + idLate} {
		if err := os.Symlink("x", filepath.Join(links, name+".log")); err != nil {
			t.Fatal(err)
		}
	}
	f.tracker.resolver = NewLogDirs(filepath.Join("testdata", "logs", "pods"), links, 0)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.tracker.Run(ctx) }()
	defer func() { cancel(); <-done }()

	// A new container of the detector pod starts using gpu1 before the
	// cache knows its slices.
	writeProc(t, f.proc, 103, containerCgroupLine(uidDet, idLate))
	s := snapshot(1, p(103, gpu1, gib))
	if r := f.tracker.Account(s); len(r.Groups) != 0 || r.Unaccounted[gpu1] != gib {
		t.Fatalf("before assignment: %+v", r)
	}
	f.server.SetContainers([]podresources.ContainerDevices{
		{Namespace: "vision", Pod: "detector-7f9c", Container: "detector", ResourceName: slice.ResourceName, DeviceIDs: sliceIDs(gpu0, 0, 1)},
		{Namespace: "vision", Pod: "detector-7f9c", Container: "late", ResourceName: slice.ResourceName, DeviceIDs: sliceIDs(gpu1, 0, 1, 2)},
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := f.tracker.Account(s)
		if len(r.Groups) == 1 && r.Groups[0].Container == "late" && r.Groups[0].QuotaBytes == 3*gib && r.Unaccounted[gpu1] == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not attributed after a change: %+v; list calls %d", r, f.server.ListCalls())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A container without a log link in a pod of several containers is never
// guessed: its memory stays unaccounted.
func TestNoGuessingInMultiContainerPods(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	writeProc(t, f.proc, 104, containerCgroupLine(uidDet, idLate))
	r := f.tracker.Account(snapshot(1, p(104, gpu0, gib)))
	if len(r.Groups) != 0 || r.Unaccounted[gpu0] != gib {
		t.Fatalf("unlinked container of a two-container pod attributed: %+v", r)
	}
}

func TestRefreshErrorKeepsLastAssignments(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	f.server.SetError(errors.New("kubelet restarting"))
	if err := f.tracker.Refresh(context.Background()); err == nil || !strings.Contains(err.Error(), "kubelet restarting") {
		t.Fatalf("Refresh = %v, want the server's error", err)
	}
	r := f.tracker.Account(snapshot(1, p(101, gpu0, gib)))
	if len(r.Groups) != 1 || r.Groups[0].QuotaBytes != 2*gib {
		t.Fatalf("after failed refresh: %+v", r.Groups)
	}
}

func TestLogDirs(t *testing.T) {
	t.Parallel()
	l := NewLogDirs(filepath.Join("testdata", "logs", "pods"), filepath.Join("testdata", "logs", "containers"), time.Hour)
	cases := []struct {
		c    procfs.Container
		want Identity
		err  bool
	}{
		{procfs.Container{PodUID: uidDet, ID: idDetector}, Identity{"vision", "detector-7f9c", "detector"}, false},
		{procfs.Container{PodUID: uidPlain, ID: idPlain}, Identity{"other", "plain-gpu", "cuda"}, false},
		{procfs.Container{PodUID: uidSolo, ID: idSolo}, Identity{"vision", "solo", "solo"}, false},
		{procfs.Container{PodUID: uidDet, ID: idLate}, Identity{}, true},
		{procfs.Container{PodUID: "eeeeeeee-0000-4000-8000-000000000009", ID: idLate}, Identity{}, true},
	}
	for _, tc := range cases {
		got, err := l.Resolve(tc.c)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("Resolve(%+v) = %+v, %v; want %+v (error %v)", tc.c, got, err, tc.want, tc.err)
		}
		if tc.err && !errors.Is(err, ErrUnknownContainer) {
			t.Errorf("Resolve error %v does not wrap ErrUnknownContainer", err)
		}
	}
	if got := l.ContainersOf(uidDet); strings.Join(got, ",") != "detector,sidecar" {
		t.Errorf("ContainersOf(detector) = %v", got)
	}
	missing := NewLogDirs("/nonexistent/pods", "/nonexistent/containers", 0)
	if _, err := missing.Resolve(procfs.Container{PodUID: uidDet, ID: idDetector}); err == nil || !strings.Contains(err.Error(), "/nonexistent/containers") {
		t.Errorf("Resolve with missing dirs = %v, want an error naming the dir", err)
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	bad := Config{SliceBytes: 10, HostProc: "proc", PodLogsDir: "/p", ContainerLogsDir: "/c", PodResourcesSocket: "/s", RefreshInterval: time.Millisecond}
	err := bad.Validate()
	for _, want := range []string{"sliceBytes", "hostProc", "refreshInterval"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want it to name %s", err, want)
		}
	}
}

// BenchmarkAccount accounts one snapshot of 8 GPUs × 64 processes, each
// process its own container with slices, with the PID cache warm (the
// steady state: only new PIDs read /proc).
func BenchmarkAccount(b *testing.B) {
	proc, logs := b.TempDir(), b.TempDir()
	var cds []podresources.ContainerDevices
	var procs []gpu.Process
	var devs []gpu.Device
	for g := range 8 {
		uuid := "GPU-00000000-0000-4000-8000-0000000001" + strconv.Itoa(10+g)
		devs = append(devs, gpu.Device{Index: g, UUID: uuid, Healthy: true})
		for i := range 64 {
			pid := 1000 + g*64 + i
			uid := "eeeeeeee-0000-4000-8000-" + strings.Repeat("0", 6) + strconv.Itoa(100000+pid)
			id := strings.Repeat("f", 58) + strconv.Itoa(100000+pid)
			name := "c" + strconv.Itoa(pid)
			dir := filepath.Join(proc, strconv.Itoa(pid))
			if err := os.MkdirAll(dir, 0o755); err != nil {
				b.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "cgroup"), []byte(containerCgroupLine(uid, id)), 0o644); err != nil {
				b.Fatal(err)
			}
			if err := os.Symlink("x", filepath.Join(logs, "pod-"+name+"_ns_"+name+"-"+id+".log")); err != nil {
				b.Fatal(err)
			}
			cds = append(cds, podresources.ContainerDevices{Namespace: "ns", Pod: "pod-" + name, Container: name,
				ResourceName: slice.ResourceName, DeviceIDs: sliceIDs(uuid, i)})
			procs = append(procs, p(uint32(pid), uuid, gib))
		}
	}
	srv := podresourcestest.New(b)
	srv.SetContainers(cds)
	client, err := podresources.Dial(context.Background(), srv.Socket())
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	cfg := DefaultConfig()
	tr := New(cfg, procfs.NewReader(proc), NewLogDirs(logs, logs, time.Hour), client, discard())
	if err := tr.Refresh(context.Background()); err != nil {
		b.Fatal(err)
	}
	s := &gpu.Snapshot{Devices: devs, Processes: procs}
	if r := tr.Account(s); len(r.Groups) != 512 {
		b.Fatalf("groups = %d, want 512", len(r.Groups))
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		tr.Account(s)
	}
}

// Workers listed by a source (the runtime's pools) are workers too, and
// leave the unaccounted total.
func TestWorkerSource(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	f.tracker.SetWorkerSource(func() map[uint32]string { return map[uint32]string{1: "yolo"} })
	r := f.tracker.Account(snapshot(1, p(1, gpu1, 300*mib), p(500, gpu1, 100*mib)))
	if len(r.Groups) != 2 || r.Groups[0].Model != "ppocr-det" || r.Groups[1].Model != "yolo" || r.Groups[1].UsageBytes != 300*mib || r.Unaccounted[gpu1] != 0 {
		t.Fatalf("groups %+v, unaccounted %v", r.Groups, r.Unaccounted)
	}
	f.tracker.UnregisterWorker(500)
	r = f.tracker.Account(snapshot(2, p(500, gpu1, 100*mib)))
	if len(r.Groups) != 0 || r.Unaccounted[gpu1] != 100*mib {
		t.Fatalf("after unregister: groups %+v, unaccounted %v", r.Groups, r.Unaccounted)
	}
}
