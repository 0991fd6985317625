// Package workertest builds visionslice-worker once per test binary, for
// tests that run real model workers (ONNX Runtime from make deps).
package workertest

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/visionslice/visionslice/runtime/supervisor"
)

// ORTEnv names the ONNX Runtime library the Makefile exports for tests.
const ORTEnv = "VISIONSLICE_ORT_LIB"

// PPOCREnv names the PP-OCRv4 det model the Makefile exports for tests.
const PPOCREnv = "VISIONSLICE_PPOCR_MODEL"

// PPOCRModel returns the path of the PP-OCRv4 det model named by PPOCREnv
// and its bytes; without it the test skips.
func PPOCRModel(tb testing.TB) (path string, model []byte) {
	tb.Helper()
	path = os.Getenv(PPOCREnv)
	if path == "" {
		tb.Skip(PPOCREnv + " is not set (run `make deps` and use `make test`)")
	}
	model, err := os.ReadFile(path)
	if err != nil {
		tb.Skipf("PP-OCRv4 det model: %v", err)
	}
	return path, model
}

// BinEnv names a prebuilt worker binary to use instead of building one
// (a machine without Go, such as a borrowed GPU host, runs a test binary
// built elsewhere).
const BinEnv = "VISIONSLICE_WORKER_BIN"

// Config is the supervisor.Config tests use to run the worker at bin (as
// Main set it): ONNX Runtime from ORTEnv, a private socket directory, a
// minute to start (CI machines are slow and shared), warn-level worker
// logs. Without a worker (bin "") the test skips.
func Config(t testing.TB, bin string) supervisor.Config {
	t.Helper()
	if bin == "" {
		t.Skip(ORTEnv + " is not set (run `make deps` and use `make test`)")
	}
	return supervisor.Config{WorkerBinary: bin, ORTLibrary: os.Getenv(ORTEnv), SocketDir: t.TempDir(),
		StartTimeout: time.Minute, HealthInterval: 500 * time.Millisecond, WorkerLogLevel: "warn"}
}

// Main builds the worker into a temporary directory, sets *bin to its
// path and runs the tests; without ONNX Runtime (ORTEnv unset) *bin stays
// "" and tests that need workers skip.
func Main(m *testing.M, pkg string, bin *string) int {
	if os.Getenv(ORTEnv) == "" {
		fmt.Printf("%s tests with workers skip: %s is not set\n", pkg, ORTEnv)
		return m.Run()
	}
	if prebuilt := os.Getenv(BinEnv); prebuilt != "" {
		*bin = prebuilt
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "vs-worker-bin-")
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer os.RemoveAll(dir)
	*bin = filepath.Join(dir, "visionslice-worker")
	if out, err := exec.Command("go", "build", "-o", *bin, "github.com/visionslice/visionslice/cmd/visionslice-worker").CombinedOutput(); err != nil {
		fmt.Printf("build worker: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// Logger is a test's logger: text on stderr under -v, discarded otherwise.
func Logger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// TextImage returns a real JPEG with text in it: gocv's logo from the module
// cache (gocv is a dependency, so it is there wherever the tests build). It
// skips the test when the module cannot be found.
func TextImage(tb testing.TB) []byte {
	tb.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "gocv.io/x/gocv").Output()
	if err != nil {
		tb.Skipf("locate gocv module: %v", err)
	}
	img, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), "images", "gocvlogo.jpg"))
	if err != nil {
		tb.Skipf("test image: %v", err)
	}
	return img
}
