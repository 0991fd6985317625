package handoff

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Config is the agent's handoff: section. Off by default: without it the
// device plugin places slices by its own policy.
type Config struct {
	Enabled bool `yaml:"enabled"`
	// KubeAPI is "in-cluster" or the path of a kubeconfig file.
	KubeAPI string `yaml:"kubeAPI"`
	// AssignmentKeyFile holds the HMAC key shared with the scheduler
	// extender (the same Secret both mount).
	AssignmentKeyFile string `yaml:"assignmentKeyFile"`
}

// MinKeyBytes is the shortest assignment key accepted.
const MinKeyBytes = 16

// Validate checks an enabled section.
func (c Config) Validate() error {
	if !c.Enabled {
		return nil
	}
	var errs []error
	if c.KubeAPI == "" {
		errs = append(errs, errors.New("handoff.kubeAPI is required: in-cluster or a kubeconfig path"))
	}
	if c.AssignmentKeyFile == "" {
		errs = append(errs, errors.New("handoff.assignmentKeyFile is required"))
	}
	return errors.Join(errs...)
}

// NewFromConfig builds a Hinter from an enabled section: a client for
// KubeAPI and the key read from AssignmentKeyFile.
func NewFromConfig(c Config, node string, logger *slog.Logger) (*Hinter, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	key, err := ReadKey(c.AssignmentKeyFile)
	if err != nil {
		return nil, err
	}
	var rc *rest.Config
	if c.KubeAPI == "in-cluster" {
		rc, err = rest.InClusterConfig()
	} else {
		rc, err = clientcmd.BuildConfigFromFlags("", c.KubeAPI)
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client (%s): %w", c.KubeAPI, err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return New(client, node, key, logger)
}

// ReadKey reads an assignment key file (surrounding white space dropped).
func ReadKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read assignment key: %w", err)
	}
	key := []byte(strings.TrimSpace(string(b)))
	if len(key) < MinKeyBytes {
		return nil, fmt.Errorf("assignment key in %s is %d bytes: want at least %d", path, len(key), MinKeyBytes)
	}
	return key, nil
}
