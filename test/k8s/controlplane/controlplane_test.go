package controlplane_test

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/test/k8s/controlplane"
)

// TestControlPlane_SchedulesSliceRequests starts the real control plane and
// checks what the other tests rely on: the default kube-scheduler places a pod
// requesting slices on the one node with enough capacity, binds it, reports a
// pod that fits nowhere as Unschedulable with the resource named, and RBAC is
// really enforced.
func TestControlPlane_SchedulesSliceRequests(t *testing.T) {
	cp := controlplane.Start(t, controlplane.Options{BinDir: controlplane.RequireBinaries(t)})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	const ns = "vision"
	cp.CreateNamespace(t, ns)
	cp.CreateNode(t, controlplane.NodeSpec{Name: "small", Extended: map[corev1.ResourceName]int64{slice.ResourceName: 2}})
	cp.CreateNode(t, controlplane.NodeSpec{Name: "large", Extended: map[corev1.ResourceName]int64{slice.ResourceName: 8}})
	cp.CreateNode(t, controlplane.NodeSpec{Name: "cpu-only"})

	pods := cp.Client.CoreV1().Pods(ns)
	if _, err := pods.Create(ctx, controlplane.SlicePod("fits-large", slice.ResourceName, 4), metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	pod, err := cp.WaitScheduled(ctx, ns, "fits-large", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if pod.Spec.NodeName != "large" {
		t.Errorf("pod requesting 4 slices bound to %q, want large (the only node with 4 free)", pod.Spec.NodeName)
	}
	// Kubernetes copies limits of extended resources to requests.
	if got := pod.Spec.Containers[0].Resources.Requests[slice.ResourceName]; got.Value() != 4 {
		t.Errorf("requests[%s] = %s, want 4", slice.ResourceName, got.String())
	}

	if _, err := pods.Create(ctx, controlplane.SlicePod("fits-nowhere", slice.ResourceName, 5), metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	msg, err := cp.WaitUnschedulable(ctx, ns, "fits-nowhere", time.Minute)
	if err != nil {
		t.Fatalf("pod needing 5 slices with 4+2 free: %v", err)
	}
	if !strings.Contains(msg, "Insufficient "+slice.ResourceName) {
		t.Errorf("unschedulable message %q does not name %s", msg, slice.ResourceName)
	}

	// Authorization is RBAC, not AlwaysAllow: an unprivileged user is refused.
	cfg := rest.CopyConfig(cp.Config)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: "mallory"}
	mallory, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	_, err = mallory.CoreV1().Pods(ns).Get(ctx, "fits-large", metav1.GetOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("unprivileged get pod: err = %v, want Forbidden", err)
	}
}
