package controlplane

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

// NodeSpec describes a Node the test creates in place of a kubelet.
type NodeSpec struct {
	Name   string
	Labels map[string]string
	// Extended maps extended resources (e.g. visionslice.io/gpu-slice) to
	// their capacity, also used as allocatable.
	Extended map[corev1.ResourceName]int64
}

// CreateNode creates a schedulable Node as a kubelet would register it: with
// capacity and allocatable (8 CPUs, 32 GiB, 110 pods plus spec.Extended), a
// Ready condition, and without the node.kubernetes.io/not-ready taint that the
// TaintNodesByCondition admission adds (no node lifecycle controller runs here
// to remove it).
func (cp *ControlPlane) CreateNode(t testing.TB, spec NodeSpec) *corev1.Node {
	t.Helper()
	ctx := context.Background()
	res := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("8"),
		corev1.ResourceMemory: resource.MustParse("32Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	for name, n := range spec.Extended {
		res[name] = *resource.NewQuantity(n, resource.DecimalSI)
	}
	node, err := cp.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: spec.Name, Labels: spec.Labels},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create node %s: %v", spec.Name, err)
	}
	// Remove the taints added on create.
	node.Spec.Taints = nil
	if node, err = cp.Client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("clear taints of node %s: %v", spec.Name, err)
	}
	now := metav1.Now()
	node.Status = corev1.NodeStatus{
		Capacity:    res,
		Allocatable: res,
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			Message: "node created by the test", LastHeartbeatTime: now, LastTransitionTime: now,
		}},
		Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}},
	}
	if node, err = cp.Client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("set status of node %s: %v", spec.Name, err)
	}
	return node
}

// SetNodeExtended replaces the node's capacity and allocatable of one extended
// resource, as the kubelet does when a device plugin's device list changes.
func (cp *ControlPlane) SetNodeExtended(ctx context.Context, node string, name corev1.ResourceName, n int64) error {
	return wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		nd, err := cp.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		q := *resource.NewQuantity(n, resource.DecimalSI)
		nd.Status.Capacity[name] = q
		nd.Status.Allocatable[name] = q
		_, err = cp.Client.CoreV1().Nodes().UpdateStatus(ctx, nd, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			return false, nil
		}
		return err == nil, err
	})
}

// CreateNamespace creates a namespace and its default ServiceAccount (the
// ServiceAccount admission plugin rejects pods without it, and no controller
// manager runs to create it).
func (cp *ControlPlane) CreateNamespace(t testing.TB, name string) {
	t.Helper()
	ctx := context.Background()
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name},
	}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	if _, err := cp.Client.CoreV1().ServiceAccounts(name).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
	}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create default service account in %s: %v", name, err)
	}
}

// WaitScheduled waits until the pod is bound to a node and returns it. A pod
// the scheduler reports unschedulable keeps being waited for until timeout;
// the error then includes the scheduler's reason.
func (cp *ControlPlane) WaitScheduled(ctx context.Context, ns, name string, timeout time.Duration) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		var err error
		pod, err = cp.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return pod.Spec.NodeName != "", nil
	})
	if err != nil {
		return pod, fmt.Errorf("pod %s/%s not scheduled: %w (%s)", ns, name, err, ScheduledCondition(pod))
	}
	return pod, nil
}

// ScheduledCondition describes the pod's PodScheduled condition.
func ScheduledCondition(pod *corev1.Pod) string {
	if pod == nil {
		return "no pod"
	}
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodScheduled {
			return fmt.Sprintf("PodScheduled=%s reason=%s message=%q", c.Status, c.Reason, c.Message)
		}
	}
	return "no PodScheduled condition yet"
}

// WaitUnschedulable waits until the scheduler marks the pod Unschedulable and
// returns the condition's message.
func (cp *ControlPlane) WaitUnschedulable(ctx context.Context, ns, name string, timeout time.Duration) (string, error) {
	var msg string
	err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		pod, err := cp.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		if pod.Spec.NodeName != "" {
			return false, fmt.Errorf("pod %s/%s was bound to %s, want unschedulable", ns, name, pod.Spec.NodeName)
		}
		for _, c := range pod.Status.Conditions {
			if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
				msg = c.Message
				return true, nil
			}
		}
		return false, nil
	})
	return msg, err
}

// SlicePod returns a pod with one container that requests n units of the
// extended resource (as limits, which Kubernetes copies to requests).
func SlicePod(name string, resourceName corev1.ResourceName, n int64) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name:  "infer",
				Image: "registry.example/vision:latest",
				Resources: corev1.ResourceRequirements{
					Limits: corev1.ResourceList{resourceName: *resource.NewQuantity(n, resource.DecimalSI)},
				},
			}},
			TerminationGracePeriodSeconds: new(int64),
		},
	}
}
