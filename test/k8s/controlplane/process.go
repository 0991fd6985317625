package controlplane

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// process is one control-plane binary run by the harness. Its output goes to
// a log file in the control plane's directory.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error // valid after done is closed
}

func startProcess(dir, name, bin string, args ...string) (*process, error) {
	logPath := filepath.Join(dir, name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("create %s log: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Own process group, so a stop reaches anything it forks; killed with the
	// test binary should the test die without running its cleanups.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	return p, nil
}

// exited reports whether the process has ended.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the process group, then SIGKILL after grace.
func (p *process) stop(grace time.Duration) error {
	if p.exited() {
		return nil
	}
	pgid := -p.cmd.Process.Pid
	_ = syscall.Kill(pgid, syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	_ = syscall.Kill(pgid, syscall.SIGKILL)
	select {
	case <-p.done:
		return fmt.Errorf("%s did not stop within %s of SIGTERM: killed", p.name, grace)
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s survived SIGKILL", p.name)
	}
}

// tail returns the last n bytes of the process log.
func (p *process) tail(n int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	if len(b) > n {
		b = b[len(b)-n:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return string(b)
}

// waitReady polls check every 100 ms until it succeeds, the context ends or
// the process exits; errors carry the end of the process log.
func (p *process) waitReady(ctx context.Context, check func(context.Context) error) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if p.exited() {
			return fmt.Errorf("%s exited before becoming ready (%v); log tail:\n%s", p.name, p.err, p.tail(4000))
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		last = check(cctx)
		cancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w (last check: %v); log tail:\n%s", p.name, ctx.Err(), last, p.tail(4000))
		case <-tick.C:
		}
	}
}

// freePorts returns n distinct free TCP ports on 127.0.0.1. They are free when
// returned; the binaries bind them moments later.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

var errNotReady = errors.New("not ready")

// Process is a binary a test runs beside the control plane (the extender, an
// agent). It is stopped before the control plane (SIGTERM, then SIGKILL) and
// its log tail is shown when the test fails.
type Process struct{ p *process }

// StartProcess starts bin with args; its output goes to <Dir>/<name>.log.
func (cp *ControlPlane) StartProcess(t testing.TB, name, bin string, args ...string) *Process {
	t.Helper()
	p, err := cp.run(name, bin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return &Process{p: p}
}

// WaitHTTP waits until GET url answers 200 with a body containing want.
func (p *Process) WaitHTTP(t testing.TB, url, want string, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := p.p.waitReady(ctx, httpCheck(http.DefaultClient, url, want)); err != nil {
		t.Fatal(err)
	}
}

// Stop sends SIGTERM and waits; it reports a kill or a non-zero exit.
func (p *Process) Stop() error {
	if err := p.p.stop(15 * time.Second); err != nil {
		return err
	}
	if p.p.err != nil {
		return fmt.Errorf("%s: %w; log tail:\n%s", p.p.name, p.p.err, p.p.tail(2000))
	}
	return nil
}
