// Package stack starts the visionslice binaries beside a test control plane
// with the shipped configuration from manifests/, changed only where a test
// must (addresses, key file, intervals, targets).
package stack

import (
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/visionslice/visionslice/test/k8s/controlplane"
	"github.com/visionslice/visionslice/test/k8s/gobuild"
)

// SchedulerProfile is the schedulerName of the shipped KubeSchedulerConfiguration.
const SchedulerProfile = "visionslice-scheduler"

func manifest(t testing.TB, name string) map[string]any {
	t.Helper()
	path := filepath.Join(gobuild.RepoRoot(t), "manifests", "scheduler", name)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return m
}

// FreeAddr returns a free 127.0.0.1:port.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// WriteFile writes data to name in a fresh temporary folder.
func WriteFile(t testing.TB, name string, data []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Extender configures StartExtender.
type Extender struct {
	Key []byte
	// Targets maps node names to their agent's /metrics URL.
	Targets map[string]string
	// Strategy overrides the shipped strategy when set (binpack, spread).
	Strategy string
}

// StartExtender runs cmd/visionslice-scheduler with the shipped
// manifests/scheduler/scheduler.yaml, its listen address, key file, scrape
// interval (200ms) and targets (static, in place of pod discovery) changed.
// It returns the extender's base URL once /readyz answers.
func StartExtender(t testing.TB, cp *controlplane.ControlPlane, e Extender) (string, *controlplane.Process) {
	t.Helper()
	cfg := manifest(t, "scheduler.yaml")
	addr := FreeAddr(t)
	cfg["listen"] = addr
	cfg["assignmentKeyFile"] = WriteFile(t, "key", e.Key)
	scrape, _ := cfg["scrape"].(map[string]any)
	if scrape == nil {
		scrape = map[string]any{}
	}
	scrape["interval"] = "200ms"
	cfg["scrape"] = scrape
	cfg["targets"] = map[string]any{"static": e.Targets}
	if e.Strategy != "" {
		cfg["strategy"] = e.Strategy
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	bin := gobuild.Command(t, "visionslice-scheduler")
	p := cp.StartProcess(t, "visionslice-scheduler", bin,
		"--config="+WriteFile(t, "scheduler.yaml", b), "--kubeconfig="+cp.Kubeconfig, "--log-level=debug")
	url := "http://" + addr
	p.WaitHTTP(t, url+"/readyz", "", time.Minute)
	return url, p
}

// SchedulerConfig is the shipped manifests/scheduler/kube-scheduler-config.yaml
// with its extenders pointed at extenderURL.
func SchedulerConfig(t testing.TB, extenderURL string) map[string]any {
	t.Helper()
	cfg := manifest(t, "kube-scheduler-config.yaml")
	exts, _ := cfg["extenders"].([]any)
	if len(exts) == 0 {
		t.Fatal("kube-scheduler-config.yaml has no extenders")
	}
	for _, e := range exts {
		e.(map[string]any)["urlPrefix"] = extenderURL + "/"
	}
	return cfg
}
