package kubelet

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

// Dir is the kubelet's root folder: the device manager hard-codes
// Dir/device-plugins/kubelet.sock.
const Dir = "/var/lib/kubelet"

const childEnv = "VISIONSLICE_KUBELET_NAMESPACE"

// Isolation is what RunIsolated decided for a test binary.
type Isolation struct {
	isolated   bool
	skipReason string
}

// RunIsolated is a TestMain: it re-runs the test binary, with the same flags,
// in a new mount namespace (Go makes / private in it before exec) with a fresh
// tmpfs over /var/lib/kubelet, so the kubelet's real paths are used and
// nothing of the host's (a real kubelet's sockets and checkpoint) is touched
// or left behind. Without root the tests run unisolated and Require skips
// them. It exits the process.
func RunIsolated(m *testing.M, iso *Isolation) {
	if os.Getenv(childEnv) != "" {
		if err := mountPrivateDir(); err != nil {
			if !errors.Is(err, syscall.EPERM) {
				fmt.Fprintf(os.Stderr, "kubelet namespace: %v\n", err)
				os.Exit(1)
			}
			iso.skipReason = "the kubelet tier cannot mount over " + Dir + " here: " + err.Error()
		} else {
			iso.isolated = true
		}
		os.Exit(m.Run())
	}
	if os.Geteuid() != 0 {
		iso.skipReason = "the kubelet tier needs root (a private mount namespace over " + Dir + ")"
		os.Exit(m.Run())
	}
	code, err := rerun()
	if err != nil {
		// No mount namespace for us (root without CAP_SYS_ADMIN, seccomp).
		iso.skipReason = "the kubelet tier needs a private mount namespace: " + err.Error()
		os.Exit(m.Run())
	}
	os.Exit(code)
}

// Require skips the test outside the private namespace.
func (iso *Isolation) Require(t testing.TB) {
	t.Helper()
	if !iso.isolated {
		t.Skip(iso.skipReason)
	}
}

// rerun returns the re-run's exit code, or an error when it could not start.
func rerun() (int, error) {
	if _, err := os.Stat(Dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(Dir, 0o755); err != nil {
			return 0, fmt.Errorf("create mount point: %w", err)
		}
		defer os.Remove(Dir) // only if empty: never a real kubelet's folder
	}
	cmd := exec.Command(os.Args[0], os.Args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), childEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return exit.ExitCode(), nil
		}
		return 0, fmt.Errorf("run in a private mount namespace: %w", err)
	}
	return 0, nil
}

func mountPrivateDir() error {
	if err := syscall.Mount("tmpfs", Dir, "tmpfs", 0, "size=16m,mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs on %s: %w", Dir, err)
	}
	for _, d := range []string{"device-plugins", "pod-resources"} {
		if err := os.MkdirAll(filepath.Join(Dir, d), 0o750); err != nil {
			return err
		}
	}
	return nil
}
