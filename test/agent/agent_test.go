// Package agent_test runs the built visionslice-agent binary end to end on a
// simulated node: scrape, script a change, reload, and stop with SIGTERM.
package agent_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var agentBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "visionslice-agent-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	agentBin = filepath.Join(dir, "visionslice-agent")
	build := exec.Command("go", "build", "-o", agentBin, "github.com/visionslice/visionslice/cmd/visionslice-agent")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build agent:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// agentProc is a running agent and its parsed JSON log.
type agentProc struct {
	cmd  *exec.Cmd
	addr string

	mu    sync.Mutex
	lines []map[string]any
	done  chan struct{}
}

func start(t testing.TB, config string) *agentProc {
	t.Helper()
	cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(agentBin, "--config", cfgPath)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &agentProc{cmd: cmd, done: make(chan struct{})}
	addr := make(chan string, 1)
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) != nil {
				continue
			}
			p.mu.Lock()
			p.lines = append(p.lines, m)
			p.mu.Unlock()
			if m["msg"] == "metrics server listening" {
				addr <- m["addr"].(string)
			}
		}
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	select {
	case p.addr = <-addr:
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not start listening")
	}
	return p
}

func (p *agentProc) logged(msg string) map[string]any {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.lines {
		if l["msg"] == msg {
			return l
		}
	}
	return nil
}

func (p *agentProc) get(t *testing.T, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + p.addr + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (p *agentProc) put(t *testing.T, path, body string) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, "http://"+p.addr+path, strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

const baseConfig = `version: v1
nodeName: e2e-node
shutdownTimeout: 5s
gpu:
  backend: sim:h100x2
  pollInterval: 50ms
  simDebug: true
metrics:
  listen: 127.0.0.1:0
`

func TestAgentBinaryOnSimulatedGPUs(t *testing.T) {
	p := start(t, baseConfig)

	eventually(t, "readyz", func() bool { code, _ := p.get(t, "/readyz"); return code == 200 })
	if code, body := p.get(t, "/healthz"); code != 200 || strings.TrimSpace(body) != "ok" {
		t.Errorf("healthz %d %q", code, body)
	}
	_, metrics := p.get(t, "/metrics")
	for _, want := range []string{
		`visionslice_gpu_memory_total_bytes{gpu="0"`,
		`visionslice_gpu_memory_total_bytes{gpu="1"`,
		`visionslice_gpu_healthy{gpu="1"`,
		`visionslice_agent_build_info{`,
		`visionslice_agent_poll_duration_seconds_count`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}

	// A process appears on GPU 1: the group memory metric follows.
	if code := p.put(t, "/debug/sim/gpus/1/processes/4242", `{"usedMiB": 3072}`); code != http.StatusNoContent {
		t.Fatalf("sim put: %d", code)
	}
	eventually(t, "process memory in metrics", func() bool {
		_, m := p.get(t, "/metrics")
		return strings.Contains(m, `group_kind="unattributed"} 3.221225472e+09`) &&
			strings.Contains(m, `visionslice_gpu_processes{gpu="1"`) && !strings.Contains(m, "4242")
	})

	// The GPU is lost, then recovers.
	p.put(t, "/debug/sim/gpus/0/health", `{"healthy": false, "reason": "gpu_lost"}`)
	eventually(t, "gpu 0 unhealthy", func() bool {
		_, m := p.get(t, "/metrics")
		return lineValue(m, `visionslice_gpu_healthy{gpu="0"`) == "0"
	})
	p.put(t, "/debug/sim/gpus/0/health", `{"healthy": true}`)
	eventually(t, "gpu 0 healthy", func() bool {
		_, m := p.get(t, "/metrics")
		return lineValue(m, `visionslice_gpu_healthy{gpu="0"`) == "1"
	})

	// Bad scripting input is a 400.
	if code := p.put(t, "/debug/sim/gpus/9/processes/1", `{"usedMiB": 1}`); code != http.StatusBadRequest {
		t.Errorf("unknown gpu: %d", code)
	}

	// SIGHUP reloads the live fields; a changed listen address needs a restart.
	cfgPath := p.cmd.Args[2]
	updated := strings.Replace(baseConfig, "pollInterval: 50ms", "pollInterval: 100ms", 1)
	updated = strings.Replace(updated, "127.0.0.1:0", "127.0.0.1:1", 1)
	if err := os.WriteFile(cfgPath, []byte(updated), 0o600); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGHUP)
	eventually(t, "config reloaded", func() bool { return p.logged("config reloaded") != nil })
	l := p.logged("config reloaded")
	if l["poll_interval"] != "100ms" || fmt.Sprint(l["restart_required"]) != "[metrics]" {
		t.Errorf("reload log %v", l)
	}

	// SIGTERM: a clean, prompt exit.
	start := time.Now()
	p.cmd.Process.Signal(syscall.SIGTERM)
	err := p.cmd.Wait()
	<-p.done
	if err != nil {
		t.Fatalf("agent exit: %v", err)
	}
	if p.logged("stopped") == nil {
		t.Errorf("no 'stopped' log line")
	}
	t.Logf("stopped %s after SIGTERM", time.Since(start))
}

func TestAgentRejectsBadConfig(t *testing.T) {
	cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
	os.WriteFile(cfgPath, []byte("version: v1\ngpu:\n  backend: sim:h100x2\n  colour: blue\n"), 0o600)
	out, err := exec.Command(agentBin, "--config", cfgPath).CombinedOutput()
	if err == nil {
		t.Fatal("agent accepted an unknown key")
	}
	if !strings.Contains(string(out), "line 4: field colour not found") {
		t.Errorf("output %q does not name the line", out)
	}
}

func TestAgentWithoutDriverSaysWhy(t *testing.T) {
	if _, err := os.Stat("/dev/nvidiactl"); err == nil {
		t.Skip("an NVIDIA driver is present; this checks the no-driver message")
	}
	out, err := exec.Command(agentBin, "--gpu-backend=nvml", "--metrics-listen=127.0.0.1:0").CombinedOutput()
	if err == nil {
		t.Fatal("agent started without a driver")
	}
	if !strings.Contains(string(out), "sim:h100x2") {
		t.Errorf("output %q does not point at the simulator", out)
	}
}

func lineValue(metrics, prefix string) string {
	for _, line := range strings.Split(metrics, "\n") {
		if strings.HasPrefix(line, prefix) {
			f := strings.Fields(line)
			return f[len(f)-1]
		}
	}
	return ""
}
