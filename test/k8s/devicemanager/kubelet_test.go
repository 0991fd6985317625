package devicemanager_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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

	"github.com/visionslice/visionslice/deviceplugin"
	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/gpu"
	"github.com/visionslice/visionslice/nodeagent/gpu/sim"
)

const (
	devicePluginDir    = kubeletDir + "/device-plugins"
	podResourcesSocket = kubeletDir + "/pod-resources/kubelet.sock"
	waitLimit          = 20 * time.Second
)

// kubelet is the device-management half of a kubelet: the real device
// manager (registration server on kubelet.sock, endpoints, checkpoint,
// allocation) and the real pod-resources v1 server backed by it. Pods are
// admitted the way the kubelet's admission handler does it: the pod becomes
// active, then Allocate runs for each container; GetDeviceRunContainerOptions
// is what the runtime would get at container start.
type kubelet struct {
	logger klog.Logger
	dm     *devicemanager.ManagerImpl
	pr     *grpc.Server

	mu   sync.Mutex
	pods map[types.UID]*v1.Pod
}

func startKubelet(t *testing.T, pods ...*v1.Pod) *kubelet {
	t.Helper()
	logger := ktesting.NewLogger(t, ktesting.NewConfig(ktesting.Verbosity(2)))
	k := &kubelet{logger: logger, pods: map[types.UID]*v1.Pod{}}
	for _, p := range pods {
		k.pods[p.UID] = p
	}
	dm, err := devicemanager.NewManagerImpl(logger, nil, topologymanager.NewFakeManager(logger))
	if err != nil {
		t.Fatalf("new device manager: %v", err)
	}
	allReady := config.NewSourcesReady(func(sets.Set[string]) bool { return true })
	if err := dm.Start(logger, k.activePods, allReady, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		t.Fatalf("start device manager: %v", err)
	}
	k.dm = dm

	_ = os.Remove(podResourcesSocket)
	lis, err := net.Listen("unix", podResourcesSocket)
	if err != nil {
		t.Fatalf("listen on pod-resources socket: %v", err)
	}
	k.pr = grpc.NewServer()
	podresourcesapi.RegisterPodResourcesListerServer(k.pr, podresources.NewV1PodResourcesServer(klog.NewContext(context.Background(), logger),
		podresources.PodResourcesProviders{Pods: k, Devices: devicesProvider{dm}, Cpus: noCPUs{}, Memory: noMemory{}, DynamicResources: noDRA{}}))
	go func() { _ = k.pr.Serve(lis) }()
	t.Cleanup(k.stop)
	return k
}

// stop ends the kubelet as a kubelet exit does: sockets go away, the
// checkpoint stays.
func (k *kubelet) stop() {
	k.pr.Stop()
	_ = os.Remove(podResourcesSocket)
	_ = k.dm.Stop(k.logger)
}

func (k *kubelet) activePods() []*v1.Pod { return k.GetActivePods() }

// GetActivePods, GetPods and GetPodByName implement podresources.PodsProvider.
func (k *kubelet) GetActivePods() []*v1.Pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]*v1.Pod, 0, len(k.pods))
	for _, p := range k.pods {
		out = append(out, p)
	}
	return out
}

func (k *kubelet) GetPods() []*v1.Pod { return k.GetActivePods() }

func (k *kubelet) GetPodByName(namespace, name string) (*v1.Pod, bool) {
	for _, p := range k.GetActivePods() {
		if p.Namespace == namespace && p.Name == name {
			return p, true
		}
	}
	return nil, false
}

// admit makes the pod active and allocates devices for its containers; a
// failed allocation rejects the pod (it is no longer active).
func (k *kubelet) admit(pod *v1.Pod) error {
	k.mu.Lock()
	k.pods[pod.UID] = pod
	k.mu.Unlock()
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), k.logger), 10*time.Second)
	defer cancel()
	for i := range pod.Spec.Containers {
		if err := k.dm.Allocate(ctx, pod, &pod.Spec.Containers[i], lifecycle.AddOperation); err != nil {
			k.remove(pod)
			return err
		}
	}
	return nil
}

// remove ends the pod: its devices are freed as the kubelet frees them.
func (k *kubelet) remove(pod *v1.Pod) {
	k.mu.Lock()
	delete(k.pods, pod.UID)
	k.mu.Unlock()
	k.dm.UpdateAllocatedDevices(k.logger)
}

// runOptions is what the container runtime receives for the container.
func (k *kubelet) runOptions(t *testing.T, pod *v1.Pod) map[string]string {
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

// slices returns the slice IDs the device manager holds for the pod's container.
func (k *kubelet) slices(pod *v1.Pod) []string {
	return sets.List(sets.KeySet(k.dm.GetDevices(string(pod.UID), pod.Spec.Containers[0].Name)[slice.ResourceName]))
}

// capacity returns the node's capacity and allocatable slices as the kubelet
// would publish them in the Node status.
func (k *kubelet) capacity() (capacity, allocatable int64) {
	c, a, _ := k.dm.GetCapacity(k.logger)
	cq, aq := c[slice.ResourceName], a[slice.ResourceName]
	return cq.Value(), aq.Value()
}

func (k *kubelet) waitCapacity(t *testing.T, capacity, allocatable int64) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for {
		c, a := k.capacity()
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

// node is a GPU node's agent half: simulated GPUs behind the real NVML
// adapter and poller, and the visionslice device plugin in its kubelet
// device-plugins folder.
type node struct {
	gpus   *sim.GPUs
	plugin *deviceplugin.Plugin
}

const sliceMiB = 20480 // an 80 GiB H100 holds exactly 4 slices

func startNode(t *testing.T, spec string) *node {
	t.Helper()
	logger := testLogger(t)
	gpus, err := sim.New(spec, t.Name())
	if err != nil {
		t.Fatal(err)
	}
	reader := gpu.NewReader(gpus.Interface(), logger)
	if err := reader.Init(); err != nil {
		t.Fatalf("nvml init: %v", err)
	}
	poller := gpu.NewPoller(reader, 20*time.Millisecond, logger)
	plugin, err := deviceplugin.New(deviceplugin.Config{
		SocketDir:          devicePluginDir,
		PodResourcesSocket: podResourcesSocket,
		SliceMiB:           sliceMiB,
		ReconcileInterval:  100 * time.Millisecond,
	}, poller, prometheus.NewRegistry(), logger)
	if err != nil {
		t.Fatalf("new device plugin: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Add(2)
	go func() { defer wg.Done(); errs <- poller.Run(ctx) }()
	go func() { defer wg.Done(); errs <- plugin.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil && !errors.Is(err, context.Canceled) {
				t.Errorf("node component: %v", err)
			}
		}
		reader.Shutdown()
		if _, err := os.Stat(plugin.SocketPath()); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("plugin socket %s left behind (stat: %v)", plugin.SocketPath(), err)
		}
	})
	return &node{gpus: gpus, plugin: plugin}
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("test", t.Name())
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// slicePod is a pod with one container requesting n slices.
func slicePod(name string, n int64) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "vision", UID: types.UID("uid-" + name)},
		Spec: v1.PodSpec{Containers: []v1.Container{{
			Name: "infer",
			Resources: v1.ResourceRequirements{
				Limits:   v1.ResourceList{slice.ResourceName: *resource.NewQuantity(n, resource.DecimalSI)},
				Requests: v1.ResourceList{slice.ResourceName: *resource.NewQuantity(n, resource.DecimalSI)},
			},
		}}},
	}
}

// gpuOf returns the single GPU of a set of slice IDs, failing if they span GPUs.
func gpuOf(t *testing.T, ids []string) string {
	t.Helper()
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

func checkpointPath() string {
	return filepath.Join(devicePluginDir, "kubelet_internal_checkpoint")
}
