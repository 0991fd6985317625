// Package gobuild builds the project's commands for tests that run the real
// binaries (the agent, the scheduler extender), with the project's own module
// and Go's build cache, so a rebuild is quick.
package gobuild

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// RepoRoot is the visionslice repository root (the main module).
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, self, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("gobuild: cannot locate the repository root")
	}
	return filepath.Join(filepath.Dir(self), "..", "..", "..")
}

// Command builds ./cmd/<name> of the main module into a temporary folder and
// returns the binary's path.
func Command(t testing.TB, name string) string {
	t.Helper()
	return filepath.Join(Commands(t, name), name)
}

// Commands builds several ./cmd/<name> into one temporary folder, as an
// image installs them side by side (the agent finds its worker there), and
// returns the folder.
func Commands(t testing.TB, names ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, name := range names {
		buildInto(t, dir, name)
	}
	return dir
}

func buildInto(t testing.TB, dir, name string) {
	t.Helper()
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goBin); err != nil {
		if goBin, err = exec.LookPath("go"); err != nil {
			t.Fatalf("gobuild: no go command to build %s: %v", name, err)
		}
	}
	cmd := exec.Command(goBin, "build", "-o", filepath.Join(dir, name), "./cmd/"+name)
	cmd.Dir = RepoRoot(t)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/%s: %v\n%s", name, err, b)
	}
}
