// Package devicemanager_test drives the kubelet's own device manager
// (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager) and the kubelet's
// pod-resources server against the visionslice device plugin, as a real
// kubelet would.
//
// The device manager's constructor hard-codes
// /var/lib/kubelet/device-plugins/kubelet.sock, so TestMain re-runs the test
// binary in a private mount namespace with fresh tmpfs mounts over
// /var/lib/kubelet: the real paths are used and nothing of the host's (a real
// kubelet's sockets, checkpoint) is touched or left behind. That needs root;
// without it the tests skip and say so.
package devicemanager_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

const (
	childEnv   = "VISIONSLICE_DEVICEMANAGER_NAMESPACE"
	kubeletDir = "/var/lib/kubelet"
)

// isolated is set in the re-run inside the private mount namespace;
// skipReason says why the tests cannot run otherwise.
var (
	isolated   bool
	skipReason string
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		if err := mountPrivateKubeletDir(); err != nil {
			fmt.Fprintf(os.Stderr, "devicemanager tests: %v\n", err)
			os.Exit(1)
		}
		isolated = true
		os.Exit(m.Run())
	}
	if os.Geteuid() != 0 {
		skipReason = "the kubelet device manager tier needs root (a private mount namespace over " + kubeletDir + ")"
		os.Exit(m.Run())
	}
	os.Exit(rerunIsolated())
}

// rerunIsolated runs this test binary again, with the same flags, in a new
// mount namespace (Go makes / private in it before exec), and returns its exit
// code. /var/lib/kubelet is created for the mount point when missing and
// removed again afterwards if still empty.
func rerunIsolated() int {
	_, statErr := os.Stat(kubeletDir)
	if errors.Is(statErr, os.ErrNotExist) {
		if err := os.MkdirAll(kubeletDir, 0o755); err != nil {
			fmt.Fprintf(os.Stderr, "devicemanager tests: create mount point: %v\n", err)
			return 1
		}
		defer os.Remove(kubeletDir) // only if empty: never a real kubelet's folder
	}
	cmd := exec.Command(os.Args[0], os.Args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), childEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return exit.ExitCode()
		}
		fmt.Fprintf(os.Stderr, "devicemanager tests: run in a private mount namespace: %v\n", err)
		return 1
	}
	return 0
}

// mountPrivateKubeletDir mounts a tmpfs over /var/lib/kubelet (visible only
// in this namespace) and creates the device-plugins and pod-resources folders.
func mountPrivateKubeletDir() error {
	if err := syscall.Mount("tmpfs", kubeletDir, "tmpfs", 0, "size=16m,mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs on %s: %w", kubeletDir, err)
	}
	for _, d := range []string{"device-plugins", "pod-resources"} {
		if err := os.MkdirAll(filepath.Join(kubeletDir, d), 0o750); err != nil {
			return err
		}
	}
	return nil
}

// requireIsolated skips the test outside the private namespace.
func requireIsolated(t *testing.T) {
	t.Helper()
	if !isolated {
		t.Skip(skipReason)
	}
}
