package enforce

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
)

// PodRef names the pod an event or annotation lookup is about.
type PodRef struct {
	Namespace string
	Name      string
	UID       string
}

// EventRecorder posts Kubernetes Events on pods.
type EventRecorder interface {
	Event(pod PodRef, eventType, reason, message string)
}

// PodAnnotations returns a pod's annotations; ok is false when the pod is not
// known (yet).
type PodAnnotations interface {
	Annotations(namespace, name string) (ann map[string]string, ok bool)
}

// EventSource is the component named as the source of the agent's Events.
const EventSource = "visionslice-agent"

// KubeEvents records Events through client-go's event broadcaster, which
// aggregates repeats and rate-limits per object.
type KubeEvents struct {
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
}

var _ EventRecorder = (*KubeEvents)(nil)

// NewKubeEvents starts a broadcaster that writes to client's Events API;
// Shutdown stops it.
func NewKubeEvents(client kubernetes.Interface, node string) *KubeEvents {
	b := record.NewBroadcaster()
	b.StartStructuredLogging(0)
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	return &KubeEvents{
		broadcaster: b,
		recorder:    b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: EventSource, Host: node}),
	}
}

// Event implements EventRecorder.
func (k *KubeEvents) Event(pod PodRef, eventType, reason, message string) {
	k.recorder.Event(&corev1.ObjectReference{
		Kind: "Pod", APIVersion: "v1", Namespace: pod.Namespace, Name: pod.Name, UID: types.UID(pod.UID),
	}, eventType, reason, message)
}

// Shutdown stops the broadcaster, flushing what it can.
func (k *KubeEvents) Shutdown() { k.broadcaster.Shutdown() }

// noEvents is the recorder when no Kubernetes client is configured: it says
// so once, then drops events.
type noEvents struct {
	logger *slog.Logger
	once   sync.Once
}

func (n *noEvents) Event(pod PodRef, _, reason, _ string) {
	n.once.Do(func() {
		n.logger.Info("kubernetes events disabled: no kubernetes client configured", "first_reason", reason, "namespace", pod.Namespace, "pod", pod.Name)
	})
}

// KubePods keeps the annotations of this node's pods from an informer
// restricted to spec.nodeName.
type KubePods struct {
	factory informers.SharedInformerFactory
	lister  corelisters.PodLister
	synced  cache.InformerSynced
}

var _ PodAnnotations = (*KubePods)(nil)

// NewKubePods returns a pod cache for node; Run fills it.
func NewKubePods(client kubernetes.Interface, node string) *KubePods {
	f := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		}))
	inf := f.Core().V1().Pods()
	k := &KubePods{factory: f, lister: inf.Lister(), synced: inf.Informer().HasSynced}
	return k
}

// Run watches pods until ctx ends.
func (k *KubePods) Run(ctx context.Context) error {
	k.factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), k.synced) && ctx.Err() == nil {
		return fmt.Errorf("pod cache did not sync")
	}
	<-ctx.Done()
	k.factory.Shutdown()
	return nil
}

// Annotations implements PodAnnotations.
func (k *KubePods) Annotations(namespace, name string) (map[string]string, bool) {
	p, err := k.lister.Pods(namespace).Get(name)
	if err != nil {
		return nil, false
	}
	return p.Annotations, true
}
