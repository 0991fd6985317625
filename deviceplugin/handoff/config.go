package handoff

import (
	"errors"
	"fmt"
	"log/slog"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/visionslice/visionslice/deviceplugin/slice"
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
	key, err := slice.ReadKey(c.AssignmentKeyFile)
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
