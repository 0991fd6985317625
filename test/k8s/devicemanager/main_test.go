// Package devicemanager_test drives the kubelet's own device manager
// (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager) and the kubelet's
// pod-resources server against the visionslice device plugin, as a real
// kubelet would, at the kubelet's real paths in a private mount namespace
// (see package kubelet). That needs root; without it the tests skip and say so.
package devicemanager_test

import (
	"testing"

	"github.com/visionslice/visionslice/test/k8s/kubelet"
)

var iso kubelet.Isolation

func TestMain(m *testing.M) { kubelet.RunIsolated(m, &iso) }
