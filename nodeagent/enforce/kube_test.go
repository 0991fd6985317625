package enforce

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

func TestKubeEventsPostsPodEvents(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset()
	ev := NewKubeEvents(client, "node-a")
	defer ev.Shutdown()
	ev.Event(PodRef{Namespace: testNS, Name: testPod, UID: testUID}, corev1.EventTypeWarning, "GPUMemoryOverQuota", "container detector uses too much")
	deadline := time.Now().Add(10 * time.Second)
	for {
		list, err := client.CoreV1().Events(testNS).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(list.Items) == 1 {
			e := list.Items[0]
			if e.Reason != "GPUMemoryOverQuota" || e.InvolvedObject.Kind != "Pod" || e.InvolvedObject.Name != testPod ||
				string(e.InvolvedObject.UID) != testUID || e.Source.Component != EventSource || e.Source.Host != "node-a" || e.Type != corev1.EventTypeWarning {
				t.Fatalf("event = %+v", e)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no event posted; have %d", len(list.Items))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestKubePodsAnnotations(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(&corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: testNS, Name: testPod, UID: testUID,
			Annotations: map[string]string{slice.AnnotationEnforcementAction: "freeze"}},
		Spec: corev1.PodSpec{NodeName: "node-a"},
	})
	pods := NewKubePods(client, "node-a")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pods.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ann, ok := pods.Annotations(testNS, testPod)
		if ok {
			if ann[slice.AnnotationEnforcementAction] != "freeze" {
				t.Fatalf("annotations = %v", ann)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("pod never appeared in the cache")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, ok := pods.Annotations(testNS, "absent"); ok {
		t.Fatal("absent pod reported present")
	}
}
