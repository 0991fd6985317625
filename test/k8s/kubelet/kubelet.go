// Package kubelet is the device-management half of a kubelet for tests:
// the kubelet's own device manager and pod-resources server, at the kubelet's
// real paths inside a private mount namespace (RunIsolated).
package kubelet

import (
	"context"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"
	podresourcesapi "k8s.io/kubelet/pkg/apis/podresources/v1"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/config"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

// Paths of the kubelet's sockets.
const (
	DevicePluginDir    = Dir + "/device-plugins"
	PodResourcesSocket = Dir + "/pod-resources/kubelet.sock"
	CheckpointFile     = DevicePluginDir + "/kubelet_internal_checkpoint"
	waitLimit          = 20 * time.Second
)

// Kubelet is the device-management half of a kubelet: the real device
// manager (registration server on kubelet.sock, endpoints, checkpoint,
// allocation) and the real pod-resources v1 server backed by it. Pods are
// admitted the way the kubelet's admission handler does it: the pod becomes
// active, then Allocate runs for each container; GetDeviceRunContainerOptions
// is what the runtime would get at container start.
type Kubelet struct {
	logger klog.Logger
	dm     *devicemanager.ManagerImpl
	pr     *grpc.Server

	mu   sync.Mutex
	pods map[types.UID]*v1.Pod
}

// Start starts the device manager (registration server on kubelet.sock,
// checkpoint restored) and the pod-resources server; pods are already
// admitted (a restart). Stopped by t.Cleanup.
func Start(t testing.TB, pods ...*v1.Pod) *Kubelet {
	t.Helper()
	logger := ktesting.NewLogger(t, ktesting.NewConfig(ktesting.Verbosity(2)))
	k := &Kubelet{logger: logger, pods: map[types.UID]*v1.Pod{}}
	for _, p := range pods {
		k.pods[p.UID] = p
	}
	dm, err := devicemanager.NewManagerImpl(logger, nil, topologymanager.NewFakeManager(logger))
	if err != nil {
		t.Fatalf("new device manager: %v", err)
	}
	allReady := config.NewSourcesReady(func(sets.Set[string]) bool { return true })
	if err := dm.Start(logger, k.GetActivePods, allReady, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		t.Fatalf("start device manager: %v", err)
	}
	k.dm = dm

	_ = os.Remove(PodResourcesSocket)
	lis, err := net.Listen("unix", PodResourcesSocket)
	if err != nil {
		t.Fatalf("listen on pod-resources socket: %v", err)
	}
	k.pr = grpc.NewServer()
	podresourcesapi.RegisterPodResourcesListerServer(k.pr, podresources.NewV1PodResourcesServer(klog.NewContext(context.Background(), logger),
		podresources.PodResourcesProviders{Pods: k, Devices: devicesProvider{dm}, Cpus: noCPUs{}, Memory: noMemory{}, DynamicResources: noDRA{}}))
	go func() { _ = k.pr.Serve(lis) }()
	t.Cleanup(k.Stop)
	return k
}

// Stop ends the kubelet as a kubelet exit does: sockets go away, the
// checkpoint stays.
func (k *Kubelet) Stop() {
	k.pr.Stop()
	_ = os.Remove(PodResourcesSocket)
	_ = k.dm.Stop(k.logger)
}

// GetActivePods, GetPods and GetPodByName implement podresources.PodsProvider.
func (k *Kubelet) GetActivePods() []*v1.Pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]*v1.Pod, 0, len(k.pods))
	for _, p := range k.pods {
		out = append(out, p)
	}
	return out
}

func (k *Kubelet) GetPods() []*v1.Pod { return k.GetActivePods() }

func (k *Kubelet) GetPodByName(namespace, name string) (*v1.Pod, bool) {
	for _, p := range k.GetActivePods() {
		if p.Namespace == namespace && p.Name == name {
			return p, true
		}
	}
	return nil, false
}

// Admit makes the pod active and allocates devices for its containers; a
// failed allocation rejects the pod (it is no longer active).
func (k *Kubelet) Admit(pod *v1.Pod) error {
	k.mu.Lock()
	k.pods[pod.UID] = pod
	k.mu.Unlock()
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), k.logger), 10*time.Second)
	defer cancel()
	for i := range pod.Spec.Containers {
		if err := k.dm.Allocate(ctx, pod, &pod.Spec.Containers[i], lifecycle.AddOperation); err != nil {
			k.Remove(pod)
			return err
		}
	}
	return nil
}

// Remove ends the pod: its devices are freed as the kubelet frees them.
func (k *Kubelet) Remove(pod *v1.Pod) {
	k.mu.Lock()
	delete(k.pods, pod.UID)
	k.mu.Unlock()
	k.dm.UpdateAllocatedDevices(k.logger)
}

// RunOptions returns the environment what the container runtime receives for the container.
func (k *Kubelet) RunOptions(t testing.TB, pod *v1.Pod) map[string]string {
	t.Helper()
	ctx := klog.NewContext(context.Background(), k.logger)
	opts, err := k.dm.GetDeviceRunContainerOptions(ctx, pod, &pod.Spec.Containers[0])
	if err != nil {
		t.Fatalf("GetDeviceRunContainerOptions(%s): %v", pod.Name, err)
	}
	env := map[string]string{}
	for _, e := range opts.Envs {
		env[e.Name] = e.Value
	}
	return env
}

// Slices returns the slice IDs the device manager holds for the pod's container.
func (k *Kubelet) Slices(pod *v1.Pod) []string {
	return sets.List(sets.KeySet(k.dm.GetDevices(string(pod.UID), pod.Spec.Containers[0].Name)[slice.ResourceName]))
}

// GPU returns the one GPU that holds the pod's slices, failing the test
// when they lie on none or on several.
func (k *Kubelet) GPU(t testing.TB, pod *v1.Pod) string {
	t.Helper()
	ids := k.Slices(pod)
	gpus := sets.New[string]()
	for _, s := range ids {
		id, err := slice.ParseID(s)
		if err != nil {
			t.Fatalf("device manager holds a device that is not a slice ID: %v", err)
		}
		gpus.Insert(id.GPU)
	}
	if gpus.Len() != 1 {
		t.Fatalf("slices %v lie on %d GPUs, want exactly 1", ids, gpus.Len())
	}
	return gpus.UnsortedList()[0]
}

// Capacity returns the node's capacity and allocatable slices as the kubelet
// would publish them in the Node status.
func (k *Kubelet) Capacity() (capacity, allocatable int64) {
	c, a, _ := k.dm.GetCapacity(k.logger)
	cq, aq := c[slice.ResourceName], a[slice.ResourceName]
	return cq.Value(), aq.Value()
}

// WaitCapacity waits until the device manager reports the given slices.
func (k *Kubelet) WaitCapacity(t testing.TB, capacity, allocatable int64) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for {
		c, a := k.Capacity()
		if c == capacity && a == allocatable {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("kubelet sees %s capacity %d allocatable %d; want %d and %d", slice.ResourceName, c, a, capacity, allocatable)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// devicesProvider adapts the device manager to the pod-resources server, as
// the kubelet's container manager does.
type devicesProvider struct{ dm *devicemanager.ManagerImpl }

func (d devicesProvider) UpdateAllocatedDevices(logger klog.Logger) {
	d.dm.UpdateAllocatedDevices(logger)
}

func (d devicesProvider) GetDevices(podUID, containerName string) []*podresourcesapi.ContainerDevices {
	return containerDevices(d.dm.GetDevices(podUID, containerName))
}

func (d devicesProvider) GetAllocatableDevices(logger klog.Logger) []*podresourcesapi.ContainerDevices {
	return containerDevices(d.dm.GetAllocatableDevices(logger))
}

func containerDevices(devs devicemanager.ResourceDeviceInstances) []*podresourcesapi.ContainerDevices {
	var out []*podresourcesapi.ContainerDevices
	for resourceName, byID := range devs {
		for id := range byID {
			out = append(out, &podresourcesapi.ContainerDevices{ResourceName: resourceName, DeviceIds: []string{id}})
		}
	}
	return out
}

type noCPUs struct{}

func (noCPUs) GetCPUs(*v1.Pod, *v1.Container) []int64 { return nil }
func (noCPUs) GetPodCPUs(string) []int64              { return nil }
func (noCPUs) GetAllocatableCPUs() []int64            { return nil }

type noDRA struct{}

func (noDRA) GetDynamicResources(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesapi.DynamicResource {
	return nil
}

type noMemory struct{}

func (noMemory) GetMemory(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesapi.ContainerMemory {
	return nil
}
func (noMemory) GetPodMemory(klog.Logger, string) []*podresourcesapi.ContainerMemory { return nil }
func (noMemory) GetAllocatableMemory(klog.Logger) []*podresourcesapi.ContainerMemory { return nil }
