package enforce_test

import (
	"bufio"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/visionslice/visionslice/nodeagent/cgroup/cgrouptest"
	"github.com/visionslice/visionslice/nodeagent/enforce"
	"github.com/visionslice/visionslice/nodeagent/gpu"
)

// torchScript allocates 1 GiB on cuda:0, says "stage1", waits for a line on
// stdin, allocates 2 GiB more, says "stage2" and sleeps.
const torchScript = `
import sys, time, torch
a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0"); a.fill_(1)
torch.cuda.synchronize(); print("stage1", flush=True)
sys.stdin.readline()
b = torch.empty(2 << 30, dtype=torch.uint8, device="cuda:0"); b.fill_(1)
torch.cuda.synchronize(); print("stage2", flush=True)
time.sleep(600)
`

// TestRealGPUEnforcement runs on a machine with an NVIDIA GPU, its driver
// and python3 with PyTorch (VISIONSLICE_REAL_GPU=1): a real CUDA process in
// a kubelet-like cgroup holds two 1 GiB slices; under quota nothing happens,
// over quota the enforcer freezes it, and after the grace period kills it,
// and the GPU gets its memory back.
func TestRealGPUEnforcement(t *testing.T) {
	if os.Getenv("VISIONSLICE_REAL_GPU") != "1" {
		t.Skip("skipping: set VISIONSLICE_REAL_GPU=1 on a machine with an NVIDIA GPU and PyTorch")
	}
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("skipping: no python3")
	}
	m := cgrouptest.Manager(t)
	logger := slog.New(slog.NewJSONHandler(io.Discard, nil))
	reader := gpu.NewReader(nvml.New(), logger)
	if err := reader.Init(); err != nil {
		if errors.Is(err, gpu.ErrLibraryNotFound) {
			t.Skipf("skipping: %v", err)
		}
		t.Fatal(err)
	}
	snap, err := reader.Read(t.Context())
	if err != nil || len(snap.Devices) == 0 {
		t.Fatalf("read gpus: %v", err)
	}
	gpu0 := snap.Devices[0]
	t.Logf("gpu 0: %s %s, %d MiB", gpu0.Name, gpu0.UUID, gpu0.MemoryTotalBytes>>20)

	pol := enforce.DefaultConfig()
	pol.DefaultAction = enforce.ActionFreeze
	pol.Hysteresis.OverFor = 0
	pol.GracePeriod = 2 * time.Second
	pol.CheckInterval = 10 * time.Millisecond
	poll := 100 * time.Millisecond

	cmd := exec.Command("python3", "-u", "-c", torchScript)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	s := buildStack(t, m, pol, nil, poll, reader, gpu0.UUID, cmd)
	lines := bufio.NewScanner(stdout)
	waitLine := func(want string) {
		t.Helper()
		got := make(chan bool, 1)
		go func() {
			for lines.Scan() {
				if strings.TrimSpace(lines.Text()) == want {
					got <- true
					return
				}
			}
			got <- false
		}()
		select {
		case ok := <-got:
			if !ok {
				t.Fatalf("torch ended before %s", want)
			}
		case <-time.After(120 * time.Second):
			t.Fatalf("torch did not reach %s", want)
		}
	}

	waitLine("stage1")
	var used uint64
	waitFor(t, func() bool {
		r := s.tracker.Latest()
		if r == nil || len(r.Groups) != 1 {
			return false
		}
		used = r.Groups[0].UsageBytes
		return used >= 1<<30
	})
	t.Logf("under quota: container uses %d MiB of its 2048 MiB (NVML per-process memory, attributed through /proc/%d/cgroup)", used>>20, s.pid)
	select {
	case r := <-s.records:
		t.Fatalf("action under quota: %+v", r.Record)
	default:
	}

	if _, err := io.WriteString(stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	fr := s.next(t, enforce.ActionFreeze)
	t.Logf("over quota: usage %d MiB > quota %d MiB; frozen %.2f ms after the poll that saw it (freeze itself %.2f ms)",
		fr.UsageBytes>>20, fr.QuotaBytes>>20, float64(fr.at.Sub(fr.SnapshotTime).Microseconds())/1000, float64(fr.ActionDuration.Microseconds())/1000)
	if !s.frozen(t) {
		t.Fatal("not frozen")
	}
	kr := s.next(t, enforce.ActionKill)
	t.Logf("killed %.2f s after the freeze (grace %s)", kr.at.Sub(fr.at).Seconds(), pol.GracePeriod)
	s.killed(t)
	start := time.Now()
	waitFor(t, func() bool {
		sn, err := reader.Read(t.Context())
		return err == nil && len(sn.ProcessesOf(uint32(s.pid))) == 0
	})
	t.Logf("NVML no longer lists the process %.0f ms after it died (checked from the first read on)", float64(time.Since(start).Milliseconds()))
}
