package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoad(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	if err := os.WriteFile(good, []byte("version: v1\nlisten: ':9000'\nstrategy: spread\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("version: v1\nlisen: ':9000'\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := parseFlags([]string{"--config=" + good, "--listen=127.0.0.1:1", "--assignment-key-file=/k"})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := f.load()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:1" || cfg.AssignmentKeyFile != "/k" || cfg.Strategy != "spread" {
		t.Fatalf("flags not applied over the file: %+v", cfg)
	}
	f, _ = parseFlags([]string{"--config=" + bad})
	if _, err := f.load(); err == nil || !strings.Contains(err.Error(), "line 2: field lisen not found") {
		t.Fatalf("unknown key: %v", err)
	}
	if err := run([]string{"--standalone", "--log-level=loud"}); err == nil || !strings.Contains(err.Error(), "log level") {
		t.Fatalf("bad log level: %v", err)
	}
	if os.Getenv("KUBERNETES_SERVICE_HOST") != "" {
		return // inside a pod the in-cluster config exists
	}
	if err := run([]string{"--kubeconfig=", "--config=" + good}); err == nil || !strings.Contains(err.Error(), "in-cluster") {
		t.Fatalf("outside a cluster without --kubeconfig: %v", err)
	}
}
