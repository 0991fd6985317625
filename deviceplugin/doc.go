// Package deviceplugin is the kubelet device plugin of visionslice: it
// advertises the extended resource visionslice.io/gpu-slice over the kubelet's
// v1beta1 DevicePlugin API so that a container can ask for a share of one GPU:
//
//	resources:
//	  limits:
//	    visionslice.io/gpu-slice: 4
//
// # Slices
//
// A slice is a fixed share of one GPU's memory: sliceMiB (default 1024) after
// reservedMiB (default 0) is held back per GPU for the driver and for users
// outside Kubernetes. A GPU of T MiB gives floor((T - reservedMiB) / sliceMiB)
// slices, so GPUs of different sizes on one node give different counts.
// Slices are memory shares only: compute is time-shared among all containers
// on a GPU, as with CUDA's default scheduling. The agent's enforcement, not
// the device plugin, watches each container's GPU memory against its limit.
//
// Every slice is one device to the kubelet, with ID "<gpu uuid>::<n>"
// (slice.ID), the GPU's NUMA node as topology and the GPU's health. A GPU that
// turns unhealthy marks all its slices Unhealthy in ListAndWatch as soon as
// the GPU poller publishes the change, and Healthy again when it recovers
// (NVIDIA's plugin never recovers a device until it restarts).
//
// # Allocation
//
// All slices of a container come from one GPU. GetPreferredAllocation picks
// that GPU among those whose offered free slices can hold the request:
// policy binpack (default) takes the fullest such GPU, keeping whole GPUs free
// for large requests; spread takes the emptiest. Must-include IDs fix the GPU.
// When no single GPU can hold the request (e.g. two GPUs with 3 free slices
// each and a request of 4) the answer is empty: the kubelet then picks slices
// on its own, and Allocate refuses them with a message that lists the free
// slices per GPU.
//
// Allocate refuses, with gRPC InvalidArgument, malformed or unknown IDs,
// repeated IDs and IDs on more than one GPU, and with FailedPrecondition
// slices of an unhealthy GPU. Otherwise each container gets
//
//	NVIDIA_VISIBLE_DEVICES=<gpu uuid>
//	VISIONSLICE_GPU_UUID=<gpu uuid>
//	VISIONSLICE_GPU_MEMORY_LIMIT_BYTES=<slices * sliceMiB MiB>
//	VISIONSLICE_SLICE_IDS=<comma-separated slice IDs>
//
// plus, when configured, the CDI device name <cdi.kind>=<gpu uuid> and
// device nodes (deviceSpecs, with "{index}" replaced by the GPU's index).
//
// # Scheduler handoff
//
// A GPUHinter (WithHinter) names the GPU the scheduler extender chose for the
// pod being admitted. When it answers with a GPU whose free slices can hold
// the request, GetPreferredAllocation takes the slices from it; otherwise the
// plugin's own policy decides. Without a hinter the plugin decides alone.
//
// # Ledger
//
// The plugin keeps a ledger of held slices and their containers. Allocate
// records slices as held (the kubelet does not say for which pod); the
// kubelet's pod-resources API (List) names their owners and, every
// reconcileInterval, drops slices whose containers are gone. At start the
// ledger is rebuilt from pod-resources (List and GetAllocatableResources), so
// an agent restart never prefers a slice that a running container holds. The
// ledger feeds visionslice_gpu_slices_allocated.
//
// # Lifecycle
//
// Run waits for the first GPU snapshot, serves the plugin socket in socketDir,
// registers with the kubelet's kubelet.sock and watches socketDir with
// fsnotify: when the kubelet restarts (kubelet.sock re-created, or the plugin
// socket removed by the kubelet's cleanup) the plugin serves again if needed
// and registers again at once, retrying with a backoff from 10 ms. When ctx
// ends, Run stops the server (ending ListAndWatch streams) and removes its
// socket.
//
// # Metrics
//
// visionslice_gpu_slices_capacity, visionslice_gpu_slices_allocated and
// visionslice_gpu_slice_size_bytes (labels gpu_uuid, gpu), read at scrape
// time; visionslice_deviceplugin_allocate_requests_total{result} and
// visionslice_deviceplugin_registrations_total{result}.
package deviceplugin
