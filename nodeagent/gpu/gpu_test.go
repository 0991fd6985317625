package gpu_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newReader(t *testing.T, spec string, opts ...gpu.ReaderOption) (*sim.GPUs, *gpu.Reader) {
	t.Helper()
	s, err := sim.New(spec, t.Name())
	if err != nil {
		t.Fatal(err)
	}
	r := gpu.NewReader(s.Interface(), discard(), opts...)
	if err := r.Init(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Shutdown)
	return s, r
}

func TestReaderInventory(t *testing.T) {
	t.Parallel()
	s, r := newReader(t, "sim:h100x2+a100x1")
	snap, err := r.Read(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Devices) != 3 {
		t.Fatalf("got %d devices, want 3", len(snap.Devices))
	}
	for i, d := range snap.Devices {
		if d.Index != i || d.UUID != s.UUID(i) || !d.Healthy {
			t.Errorf("device %d: %+v", i, d)
		}
		if d.PCIBusID == "" || d.NUMANode < 0 || d.Name == "" {
			t.Errorf("device %d lacks static info: %+v", i, d)
		}
		if d.MemoryTotalBytes != s.MemoryTotalBytes(i) || d.MemoryUsedBytes+d.MemoryFreeBytes != d.MemoryTotalBytes {
			t.Errorf("device %d memory: %+v", i, d)
		}
	}
	if snap.Devices[0].MemoryTotalBytes == snap.Devices[2].MemoryTotalBytes {
		t.Errorf("h100 and a100 should differ in size")
	}
	if got := snap.Devices[0].PCIBusID; got != "0000:10:00.0" {
		t.Errorf("pci bus id %q, want canonical 0000:10:00.0", got)
	}
}

func TestSimUUIDsStablePerSeed(t *testing.T) {
	t.Parallel()
	a, _ := sim.New("h100x2", "node-a")
	a2, _ := sim.New("h100x2", "node-a")
	b, _ := sim.New("h100x2", "node-b")
	if a.UUID(1) != a2.UUID(1) {
		t.Errorf("same seed gave different uuids")
	}
	if a.UUID(1) == b.UUID(1) || a.UUID(0) == a.UUID(1) {
		t.Errorf("uuids collide")
	}
}

func TestSimSpecErrors(t *testing.T) {
	t.Parallel()
	for _, spec := range []string{"", "sim:", "k80x2", "h100x0", "h100xz", "h100x65"} {
		if _, err := sim.New(spec, "x"); err == nil {
			t.Errorf("spec %q: no error", spec)
		}
	}
}

func TestReaderProcesses(t *testing.T) {
	t.Parallel()
	s, r := newReader(t, "h100x2")
	must(t, s.SetProcess(0, 100, 3<<30, gpu.ProcessCompute))
	must(t, s.SetProcess(1, 200, 1<<30, gpu.ProcessGraphics))
	must(t, s.SetProcess(1, 100, 2<<30, ""))
	snap, err := r.Read(context.Background())
	must(t, err)
	want := []gpu.Process{
		{PID: 100, GPUUUID: s.UUID(0), UsedMemoryBytes: 3 << 30, Kind: gpu.ProcessCompute},
		{PID: 100, GPUUUID: s.UUID(1), UsedMemoryBytes: 2 << 30, Kind: gpu.ProcessCompute},
		{PID: 200, GPUUUID: s.UUID(1), UsedMemoryBytes: 1 << 30, Kind: gpu.ProcessGraphics},
	}
	if len(snap.Processes) != len(want) {
		t.Fatalf("processes %+v, want %+v", snap.Processes, want)
	}
	for i := range want {
		if snap.Processes[i] != want[i] {
			t.Errorf("process %d: %+v, want %+v", i, snap.Processes[i], want[i])
		}
	}
	if got := len(snap.ProcessesOf(100)); got != 2 {
		t.Errorf("ProcessesOf(100) = %d entries", got)
	}
	d1, _ := snap.Device(s.UUID(1))
	if d1.MemoryUsedBytes < 3<<30 {
		t.Errorf("device used %d should include processes", d1.MemoryUsedBytes)
	}
	s.RemoveProcess(0, 100)
	snap, _ = r.Read(context.Background())
	if len(snap.ProcessesOn(s.UUID(0))) != 0 {
		t.Errorf("removed process still listed")
	}
	if err := s.SetProcess(0, 1, 1<<50, ""); err == nil {
		t.Errorf("oversized process accepted")
	}
}

func TestReaderHealth(t *testing.T) {
	t.Parallel()
	s, r := newReader(t, "h100x2", gpu.WithXIDRecovery(200*time.Millisecond))
	must(t, s.SetUnhealthy(0, "gpu_lost"))
	snap, _ := r.Read(context.Background())
	if d := snap.Devices[0]; d.Healthy || d.HealthReason != "gpu_lost" {
		t.Errorf("lost gpu: %+v", d)
	}
	if !snap.Devices[1].Healthy {
		t.Errorf("other gpu unhealthy")
	}
	if r.ErrorCounts()["GetMemoryInfo"] == 0 {
		t.Errorf("nvml error not counted")
	}
	must(t, s.SetHealthy(0))
	snap, _ = r.Read(context.Background())
	if !snap.Devices[0].Healthy {
		t.Errorf("gpu did not recover: %+v", snap.Devices[0])
	}

	// An application XID is ignored; a critical one marks the GPU until the
	// recovery period passes without another.
	must(t, s.SetUnhealthy(1, "xid_13"))
	must(t, s.SetUnhealthy(1, "xid_79"))
	waitFor(t, func() bool {
		snap, _ := r.Read(context.Background())
		return snap.Devices[1].HealthReason == "xid_79"
	})
	waitFor(t, func() bool {
		snap, _ := r.Read(context.Background())
		return snap.Devices[1].Healthy
	})
}

func TestPollerSubscribe(t *testing.T) {
	t.Parallel()
	s, r := newReader(t, "a100x1")
	p := gpu.NewPoller(r, 5*time.Millisecond, discard())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- p.Run(ctx) }()
	ch, unsub := p.Subscribe()
	first := <-ch
	if first == nil || len(first.Devices) != 1 || p.Ready() != nil {
		t.Fatalf("first snapshot %+v", first)
	}
	must(t, s.SetProcess(0, 42, 1<<30, ""))
	var got *gpu.Snapshot
	waitFor(t, func() bool {
		select {
		case got = <-ch:
			return len(got.Processes) == 1
		default:
			return false
		}
	})
	if got.Seq <= first.Seq {
		t.Errorf("seq did not increase: %d then %d", first.Seq, got.Seq)
	}
	// No change, no notification, though polls go on.
	seq := p.Snapshot().Seq
	time.Sleep(30 * time.Millisecond)
	select {
	case s := <-ch:
		t.Errorf("notified without change: seq %d", s.Seq)
	default:
	}
	if p.Snapshot().Seq <= seq {
		t.Errorf("poller stopped polling")
	}
	p.SetInterval(time.Millisecond)
	if p.Interval() != time.Millisecond {
		t.Errorf("interval not set")
	}
	unsub()
	unsub()
	if _, open := <-ch; open {
		t.Errorf("channel not closed after cancel")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("run: %v", err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
