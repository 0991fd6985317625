package fit

import (
	v1 "k8s.io/api/core/v1"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

// PodSlices returns the slices a pod needs on its one GPU: the sum over
// regular containers of their visionslice.io/gpu-slice limit (the request
// when no limit is set), or the largest init container's if that is more.
// Extended resources cannot be overcommitted, so limit and request agree on
// any pod the API server admitted.
func PodSlices(pod *v1.Pod) int {
	if pod == nil {
		return 0
	}
	sum := 0
	for i := range pod.Spec.Containers {
		sum += containerSlices(&pod.Spec.Containers[i])
	}
	for i := range pod.Spec.InitContainers {
		if n := containerSlices(&pod.Spec.InitContainers[i]); n > sum {
			sum = n
		}
	}
	return sum
}

// containerSlices is a container's slice limit (its request when no limit
// is set); a negative quantity, which the API server never admits, counts 0.
func containerSlices(c *v1.Container) int {
	q, ok := c.Resources.Limits[slice.ResourceName]
	if !ok {
		q, ok = c.Resources.Requests[slice.ResourceName]
	}
	if !ok || q.Sign() < 0 {
		return 0
	}
	return int(q.Value())
}
