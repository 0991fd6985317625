package scheduler

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	schedconfigv1 "k8s.io/kube-scheduler/config/v1"
	sigyaml "sigs.k8s.io/yaml"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/scheduler/fit"
)

func TestParseConfig(t *testing.T) {
	t.Parallel()
	good := `version: v1
strategy: spread
weights: {fit: 2, headroom: 0, utilization: 1}
staleness: {ttl: 20s, policy: failOpen}
scrape: {interval: 2s}
targets:
  pods: {namespace: visionslice, selector: app.kubernetes.io/name=visionslice-agent, port: 9402}
`
	c, err := ParseConfig([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if c.Strategy != fit.Spread || c.Weights.Fit != 2 || c.Staleness.TTL != 20*time.Second || c.Staleness.Policy != FailOpen ||
		c.Scrape.Interval != 2*time.Second || c.Scrape.Timeout != 2*time.Second || c.Targets.Pods.Path != "/metrics" ||
		c.AssumeTimeout != 2*time.Minute {
		t.Fatalf("parsed %+v", c)
	}
	p, err := ParseConfig([]byte("version: v1\nprometheus: {url: 'http://prometheus:9090'}\n"))
	if err != nil || p.Prometheus.NodeLabel != "node" || p.Prometheus.Lookback != 2*time.Minute {
		t.Fatalf("prometheus source: %+v %v", p.Prometheus, err)
	}
	d, err := ParseConfig([]byte("version: v1\nscrape: {interval: 10s}\n"))
	if err != nil || d.Staleness.TTL != 30*time.Second || *d.Weights != fit.DefaultWeights() {
		t.Fatalf("defaults: %+v %v", d, err)
	}

	tests := []struct{ name, yaml, want string }{
		{"unknown key", "version: v1\nstrategy: binpack\ncolour: red\n", "line 3: field colour not found"},
		{"wrong version", "strategy: binpack\nversion: v2\n", `line 2: version "v2" is not supported`},
		{"no version", "strategy: binpack\n", `version "" is not supported`},
		{"not a mapping", "- a\n", "YAML mapping"},
		{"bad strategy", "version: v1\nstrategy: tetris\n", "unknown strategy"},
		{"bad policy", "version: v1\nstaleness: {policy: maybe}\n", "failClosed or failOpen"},
		{"negative weight", "version: v1\nweights: {fit: -1}\n", "must not be negative"},
		{"both targets", "version: v1\ntargets: {static: {n1: 'http://a:1/metrics'}, pods: {selector: a=b, port: 1}}\n", "not both"},
		{"bad static url", "version: v1\ntargets: {static: {n1: 'ftp://a'}}\n", "not an http(s) URL"},
		{"pods without port", "version: v1\ntargets: {pods: {selector: a=b}}\n", "port in 1..65535"},
		{"timeout over interval", "version: v1\nscrape: {interval: 1s, timeout: 2s}\n", "at most the interval"},
		{"prometheus and targets", "version: v1\nprometheus: {url: 'http://p:9090'}\ntargets: {static: {n1: 'http://a:1/metrics'}}\n", "exclude each other"},
		{"prometheus bad url", "version: v1\nprometheus: {url: 'p:9090'}\n", "not an http(s) URL"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := ParseConfig([]byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
		})
	}
}

// TestManifestConfigs parses the configs shipped in manifests/scheduler with
// the real parsers: ours, and the KubeSchedulerConfiguration types.
func TestManifestConfigs(t *testing.T) {
	t.Parallel()
	dir := filepath.Join("..", "manifests", "scheduler")
	c, err := LoadConfig(filepath.Join(dir, "scheduler.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Targets.Pods == nil || c.Targets.Pods.Port != 9402 || c.AssignmentKeyFile == "" {
		t.Fatalf("shipped config %+v", c)
	}
	b, err := os.ReadFile(filepath.Join(dir, "kube-scheduler-config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var ksc schedconfigv1.KubeSchedulerConfiguration
	if err := sigyaml.UnmarshalStrict(b, &ksc); err != nil {
		t.Fatalf("kube-scheduler config: %v", err)
	}
	if len(ksc.Extenders) != 1 {
		t.Fatalf("%d extenders", len(ksc.Extenders))
	}
	x := ksc.Extenders[0]
	if x.FilterVerb != "filter" || x.PrioritizeVerb != "prioritize" || x.BindVerb != "bind" || !x.NodeCacheCapable ||
		len(x.ManagedResources) != 1 || x.ManagedResources[0].Name != slice.ResourceName || x.ManagedResources[0].IgnoredByScheduler ||
		!strings.Contains(x.URLPrefix, ":8888") {
		t.Fatalf("extender entry %+v", x)
	}
}
