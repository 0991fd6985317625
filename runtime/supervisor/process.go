package supervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/visionslice/visionslice/runtime/worker"
)

// process is one running worker: the OS process, its cgroup (if any), its
// socket and the client connected to it.
type process struct {
	cmd    *exec.Cmd
	group  Group
	socket string
	client *worker.Client
	meta   worker.Metadata

	exited  chan struct{} // closed once the process is reaped
	waitErr error         // valid after exited
	stderr  *tail
}

// spawn starts a worker for instance idx, generation gen, and waits until
// it answers with its metadata. On any failure everything it made is gone.
func (p *Pool) spawn(ctx context.Context, idx int, gen uint64) (*process, error) {
	name := fmt.Sprintf("i%dg%d", idx, gen)
	pr := &process{socket: p.dir + "/" + name + ".sock", exited: make(chan struct{})}
	args := []string{
		"--socket=" + pr.socket,
		"--model=" + p.model.ModelPath,
		"--ort-lib=" + p.cfg.ORTLibrary,
		"--device=" + p.model.device(),
		"--threads=" + strconv.Itoa(p.model.threads()),
		"--name=" + p.model.Name,
		"--log-level=" + p.cfg.WorkerLogLevel,
	}
	if p.model.GPUMemLimitBytes > 0 {
		args = append(args, "--gpu-mem-limit-bytes="+strconv.FormatUint(p.model.GPUMemLimitBytes, 10))
	}
	if p.model.Spec != nil {
		b, err := json.Marshal(p.model.Spec)
		if err != nil {
			return nil, fmt.Errorf("encode model spec: %w", err)
		}
		args = append(args, "--spec="+string(b))
	}
	cmd := exec.Command(p.cfg.WorkerBinary, args...)
	pr.stderr = &tail{logger: p.logger.With("instance", idx, "generation", gen)}
	cmd.Stdout = io.Discard
	cmd.Stderr = pr.stderr
	cmd.WaitDelay = time.Second
	// Die with the agent; never outlive it even if it is killed hard.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	pr.cmd = cmd

	if p.groups != nil {
		g, err := p.groups.Create(fmt.Sprintf("%s-%s", p.id, name))
		if err != nil {
			p.logger.Warn("worker runs without its own cgroup", "instance", idx, "err", err)
		} else {
			pr.group = g
		}
	}
	if err := p.startInGroup(pr); err != nil {
		pr.cleanup(p.logger)
		return nil, err
	}
	go func() {
		pr.waitErr = cmd.Wait()
		close(pr.exited)
	}()
	if err := p.waitReady(ctx, pr); err != nil {
		pr.kill()
		<-pr.exited
		pr.cleanup(p.logger)
		return nil, err
	}
	return pr, nil
}

// startInGroup starts the process directly inside its cgroup
// (CLONE_INTO_CGROUP) when there is one, falling back to moving it there
// right after start.
func (p *Pool) startInGroup(pr *process) error {
	if pr.group != nil {
		if fd, err := os.Open(pr.group.Path()); err == nil {
			pr.cmd.SysProcAttr.UseCgroupFD = true
			pr.cmd.SysProcAttr.CgroupFD = int(fd.Fd())
			err = pr.cmd.Start()
			fd.Close()
			if err == nil {
				return nil
			}
			p.logger.Debug("start into cgroup failed, moving the worker after start", "err", err)
			pr.cmd = rebuild(pr.cmd)
		}
	}
	if err := pr.cmd.Start(); err != nil {
		return fmt.Errorf("start worker %s: %w", pr.cmd.Path, err)
	}
	if pr.group != nil {
		if err := pr.group.AddProc(pr.cmd.Process.Pid); err != nil {
			p.logger.Warn("cannot move worker into its cgroup", "pid", pr.cmd.Process.Pid, "err", err)
		}
	}
	return nil
}

// rebuild copies an unstarted command whose Start failed (a Cmd cannot be
// started twice) without the cgroup placement.
func rebuild(c *exec.Cmd) *exec.Cmd {
	n := exec.Command(c.Path, c.Args[1:]...)
	n.Stdout, n.Stderr, n.WaitDelay = c.Stdout, c.Stderr, c.WaitDelay
	n.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	return n
}

// waitReady polls the socket until the worker answers with its metadata,
// the process exits, StartTimeout passes or ctx ends.
func (p *Pool) waitReady(ctx context.Context, pr *process) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.StartTimeout)
	defer cancel()
	pr.client = worker.NewClient(pr.socket, p.cfg.MaxConnsPerWorker)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := os.Stat(pr.socket); err == nil {
			mctx, mcancel := context.WithTimeout(ctx, p.cfg.HealthTimeout)
			md, err := pr.client.Metadata(mctx)
			mcancel()
			if err == nil {
				pr.meta = md
				return nil
			}
		}
		select {
		case <-pr.exited:
			return fmt.Errorf("%w: worker exited while loading the model (%s): %s", ErrStartFailed, exitString(pr.waitErr), pr.stderr.last())
		case <-ctx.Done():
			return fmt.Errorf("%w: worker not ready after %s: %s", ErrStartFailed, p.cfg.StartTimeout, pr.stderr.last())
		case <-tick.C:
		}
	}
}

// kill ends the process (and anything it started): through its cgroup when
// it has one, else its process group.
func (pr *process) kill() {
	if pr.group != nil {
		if err := pr.group.Kill(); err == nil {
			return
		}
	}
	if pr.cmd.Process != nil {
		syscall.Kill(-pr.cmd.Process.Pid, syscall.SIGKILL)
	}
}

// stop asks the worker to finish (SIGTERM), then kills it after grace.
func (pr *process) stop(grace time.Duration) {
	if pr.cmd.Process != nil {
		pr.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-pr.exited:
	case <-time.After(grace):
		pr.kill()
		<-pr.exited
	}
}

// cleanup releases what the process left: client, socket, cgroup. The
// process must have been reaped (or never started).
func (pr *process) cleanup(logger *slog.Logger) {
	if pr.client != nil {
		pr.client.Close()
	}
	os.Remove(pr.socket)
	if pr.group != nil {
		if err := pr.group.Delete(); err != nil {
			logger.Warn("cannot remove worker cgroup", "path", pr.group.Path(), "err", err)
		}
	}
}

func (pr *process) pid() int {
	if pr.cmd.Process == nil {
		return 0
	}
	return pr.cmd.Process.Pid
}

// exitReason classifies how a worker ended.
func exitReason(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return ReasonKilled
		}
	}
	return ReasonExited
}

func exitString(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// tail forwards a worker's stderr lines into the agent's log and keeps the
// last few for error messages.
type tail struct {
	logger *slog.Logger
	mu     sync.Mutex
	buf    []byte
	lines  []string
}

func (t *tail) Write(b []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, b...)
	for {
		i := bytes.IndexByte(t.buf, '\n')
		if i < 0 {
			break
		}
		raw := t.buf[:i]
		line := string(raw)
		t.buf = t.buf[i+1:]
		if json.Valid(raw) {
			t.logger.Info("worker log", "worker", json.RawMessage(line))
		} else {
			t.logger.Info("worker log", "line", line)
		}
		t.lines = append(t.lines, line)
		if len(t.lines) > 3 {
			t.lines = t.lines[1:]
		}
	}
	if len(t.buf) > 64<<10 {
		t.buf = t.buf[:0]
	}
	return len(b), nil
}

// last is the last lines and any unterminated one after them.
func (t *tail) last() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	lines := t.lines
	if len(t.buf) > 0 {
		lines = append(slices.Clip(lines), string(t.buf))
	}
	return fmt.Sprint(lines)
}
