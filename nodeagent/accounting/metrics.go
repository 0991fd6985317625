package accounting

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/gpu"
)

var (
	containerLabels = []string{"namespace", "pod", "container", slice.LabelGPUUUID}

	descContainerUsed = prometheus.NewDesc("visionslice_container_gpu_memory_used_bytes",
		"GPU memory used by a container's processes on one GPU (NVML per-process memory).", containerLabels, nil)
	descContainerLimit = prometheus.NewDesc("visionslice_container_gpu_memory_limit_bytes",
		"GPU memory quota of a container on one GPU: its slices there times the slice size.", containerLabels, nil)
	descUnaccounted = prometheus.NewDesc(slice.MetricGPUUnaccountedMemBytes,
		"GPU memory used by processes that hold no visionslice slices (outside visionslice).",
		[]string{slice.LabelGPUUUID, slice.LabelGPUIndex}, nil)
)

// Collector exports the tracker's latest report at scrape time.
type Collector struct{ t *Tracker }

var _ prometheus.Collector = Collector{}

// Collector returns a collector of the tracker's latest report.
func (t *Tracker) Collector() Collector { return Collector{t: t} }

// Describe implements prometheus.Collector.
func (c Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descContainerUsed
	ch <- descContainerLimit
	ch <- descUnaccounted
}

// Collect implements prometheus.Collector.
func (c Collector) Collect(ch chan<- prometheus.Metric) {
	r := c.t.Latest()
	if r == nil {
		return
	}
	// Model workers are exported by the runtime, per model version
	// (visionslice_model_worker_gpu_memory_used_bytes), and by the GPU
	// collector's process groups; not a third time here.
	for _, g := range r.Groups {
		if g.Kind == gpu.GroupContainer {
			ch <- prometheus.MustNewConstMetric(descContainerUsed, prometheus.GaugeValue, float64(g.UsageBytes), g.Namespace, g.Pod, g.Container, g.GPUUUID)
			ch <- prometheus.MustNewConstMetric(descContainerLimit, prometheus.GaugeValue, float64(g.QuotaBytes), g.Namespace, g.Pod, g.Container, g.GPUUUID)
		}
	}
	for uuid, v := range r.Unaccounted {
		ch <- prometheus.MustNewConstMetric(descUnaccounted, prometheus.GaugeValue, float64(v), uuid, strconv.Itoa(r.GPUIndex[uuid]))
	}
}
