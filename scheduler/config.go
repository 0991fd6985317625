// Package scheduler is the visionslice kube-scheduler extender: it reads the
// node agents' metrics the way Prometheus does (scheduler/scrape), decides
// fit and score with pure rules (scheduler/fit), and serves the extender
// protocol's filter, prioritize and bind verbs over HTTP. At bind it writes a
// signed record of the chosen GPU into the pod's annotations, then binds the
// pod; the node's device plugin honours the record (deviceplugin/handoff).
package scheduler

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"os"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/visionslice/visionslice/scheduler/fit"
	"github.com/visionslice/visionslice/scheduler/promsource"
	"github.com/visionslice/visionslice/scheduler/scrape"
)

// ConfigVersion is the only config file version this build reads.
const ConfigVersion = "v1"

// Policy says what filter does with a node whose metrics are stale or absent.
type Policy string

const (
	// FailClosed filters the node out until its agent reports again.
	FailClosed Policy = "failClosed"
	// FailOpen falls back to allocation accounting from the API server's
	// view: the last GPU inventory the agent reported (or none: then the
	// node passes and kube-scheduler's node-level slice count decides), with
	// allocations taken from the pods bound to the node.
	FailOpen Policy = "failOpen"
)

// Config of the extender. The zero values of durations and sizes take the
// defaults of DefaultConfig through Complete.
type Config struct {
	Version string `yaml:"version"`
	// Listen is the HTTP address of the extender (used by the binary).
	Listen string `yaml:"listen"`
	// Strategy is binpack (default) or spread; Weights weigh the score.
	Strategy fit.Strategy `yaml:"strategy"`
	Weights  *fit.Weights `yaml:"weights"`
	// Staleness decides when a node's metrics are too old and what then.
	Staleness Staleness `yaml:"staleness"`
	// AssumeTimeout is how long a pod bound by this extender counts against
	// its GPU before the agent's metrics show it.
	AssumeTimeout time.Duration `yaml:"assumeTimeout"`
	// MaxRequestBytes caps an extender request body. Without
	// nodeCacheCapable, kube-scheduler sends whole Node objects (a few KiB
	// each); with it, names only.
	MaxRequestBytes int64 `yaml:"maxRequestBytes"`
	// AssignmentKeyFile holds the HMAC key shared with the node agents
	// (read by the binary; the library takes the key in Deps).
	AssignmentKeyFile string `yaml:"assignmentKeyFile"`
	// Scrape is the scrape loop; Targets says where the agents are.
	Scrape  scrape.Config `yaml:"scrape"`
	Targets Targets       `yaml:"targets"`
	// Prometheus, when set, replaces scraping: the extender reads the
	// agents' metrics from this Prometheus over its HTTP API instead, and
	// targets must be empty.
	Prometheus *promsource.Config `yaml:"prometheus"`
}

// Staleness of node metrics.
type Staleness struct {
	// TTL: a GPU sample older than this is stale (default 3 scrape intervals).
	TTL    time.Duration `yaml:"ttl"`
	Policy Policy        `yaml:"policy"`
}

// Targets says where the node agents are: a static map of node name to
// metrics URL, or the agent DaemonSet's pods. Exactly one is set.
type Targets struct {
	Static map[string]string `yaml:"static"`
	Pods   *PodTargets       `yaml:"pods"`
}

// PodTargets finds agents as pods matching Selector in Namespace.
type PodTargets struct {
	Namespace string `yaml:"namespace"`
	Selector  string `yaml:"selector"`
	Port      int    `yaml:"port"`
	Path      string `yaml:"path"`
}

// DefaultConfig returns the defaults: binpack, a 15 s TTL failing closed,
// 2 min assume timeout, 32 MiB requests, scrapes every 5 s.
func DefaultConfig() Config {
	w := fit.DefaultWeights()
	return Config{
		Version:         ConfigVersion,
		Listen:          ":8888",
		Strategy:        fit.Binpack,
		Weights:         &w,
		Staleness:       Staleness{TTL: 15 * time.Second, Policy: FailClosed},
		AssumeTimeout:   2 * time.Minute,
		MaxRequestBytes: 32 << 20,
		Scrape:          scrape.DefaultConfig(),
	}
}

// Complete fills unset fields with defaults.
func (c *Config) Complete() {
	d := DefaultConfig()
	if c.Version == "" {
		c.Version = d.Version
	}
	if c.Listen == "" {
		c.Listen = d.Listen
	}
	if c.Strategy == "" {
		c.Strategy = d.Strategy
	}
	if c.Weights == nil {
		c.Weights = d.Weights
	}
	if c.Scrape.Interval == 0 {
		c.Scrape.Interval = d.Scrape.Interval
	}
	if c.Scrape.Timeout == 0 {
		c.Scrape.Timeout = min(d.Scrape.Timeout, c.Scrape.Interval)
	}
	if c.Scrape.MaxBodyBytes == 0 {
		c.Scrape.MaxBodyBytes = d.Scrape.MaxBodyBytes
	}
	if c.Staleness.TTL == 0 {
		c.Staleness.TTL = 3 * c.Scrape.Interval
	}
	if c.Staleness.Policy == "" {
		c.Staleness.Policy = d.Staleness.Policy
	}
	if c.AssumeTimeout == 0 {
		c.AssumeTimeout = d.AssumeTimeout
	}
	if c.MaxRequestBytes == 0 {
		c.MaxRequestBytes = d.MaxRequestBytes
	}
	if c.Prometheus != nil {
		c.Prometheus.Complete()
	}
	if c.Targets.Pods != nil && c.Targets.Pods.Path == "" {
		c.Targets.Pods.Path = "/metrics"
	}
}

// Validate checks a completed config.
func (c Config) Validate() error {
	var errs []error
	if c.Version != ConfigVersion {
		errs = append(errs, fmt.Errorf("version %q is not supported: want %q", c.Version, ConfigVersion))
	}
	if err := c.Strategy.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Weights != nil {
		if err := c.Weights.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if c.Staleness.TTL <= 0 {
		errs = append(errs, fmt.Errorf("staleness.ttl %s must be positive", c.Staleness.TTL))
	}
	if c.Staleness.Policy != FailClosed && c.Staleness.Policy != FailOpen {
		errs = append(errs, fmt.Errorf("staleness.policy %q: want failClosed or failOpen", c.Staleness.Policy))
	}
	if c.AssumeTimeout <= 0 {
		errs = append(errs, fmt.Errorf("assumeTimeout %s must be positive", c.AssumeTimeout))
	}
	if c.MaxRequestBytes <= 0 {
		errs = append(errs, fmt.Errorf("maxRequestBytes %d must be positive", c.MaxRequestBytes))
	}
	if err := c.Scrape.Validate(); err != nil {
		errs = append(errs, err)
	}
	switch {
	case c.Prometheus != nil:
		if len(c.Targets.Static) > 0 || c.Targets.Pods != nil {
			errs = append(errs, errors.New("prometheus and targets exclude each other: the extender either queries Prometheus or scrapes the agents"))
		}
		if err := c.Prometheus.Validate(); err != nil {
			errs = append(errs, err)
		}
	case len(c.Targets.Static) > 0 && c.Targets.Pods != nil:
		errs = append(errs, errors.New("targets: set static or pods, not both"))
	case c.Targets.Pods != nil:
		if c.Targets.Pods.Selector == "" || c.Targets.Pods.Port <= 0 || c.Targets.Pods.Port > 65535 {
			errs = append(errs, fmt.Errorf("targets.pods needs a selector and a port in 1..65535 (selector %q, port %d)", c.Targets.Pods.Selector, c.Targets.Pods.Port))
		}
	default:
		for node, u := range c.Targets.Static {
			if pu, err := url.Parse(u); err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
				errs = append(errs, fmt.Errorf("targets.static[%s]: %q is not an http(s) URL", node, u))
			}
		}
	}
	return errors.Join(errs...)
}

// ParseConfig reads a YAML config: unknown keys and versions are errors that
// name the line; unset fields take defaults.
func ParseConfig(b []byte) (Config, error) {
	var head yaml.Node
	if err := yaml.Unmarshal(b, &head); err != nil {
		return Config{}, fmt.Errorf("parse scheduler config: %w", err)
	}
	if len(head.Content) == 0 || head.Content[0].Kind != yaml.MappingNode {
		return Config{}, errors.New("parse scheduler config: want a YAML mapping with version: " + ConfigVersion)
	}
	root, line := head.Content[0], head.Content[0].Line
	version := ""
	for i := 0; i+1 < len(root.Content); i += 2 {
		if root.Content[i].Value == "version" {
			version, line = root.Content[i+1].Value, root.Content[i+1].Line
		}
	}
	if version != ConfigVersion {
		return Config{}, fmt.Errorf("parse scheduler config: line %d: version %q is not supported (want %q)", line, version, ConfigVersion)
	}
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return Config{}, fmt.Errorf("parse scheduler config: %w", err)
	}
	c.Complete()
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("scheduler config: %w", err)
	}
	return c, nil
}

// LoadConfig reads and parses a config file.
func LoadConfig(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read scheduler config: %w", err)
	}
	c, err := ParseConfig(b)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}
