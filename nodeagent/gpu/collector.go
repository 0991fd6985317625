package gpu

import (
	"sort"
	"strconv"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// GroupKind says what a process group is.
type GroupKind string

const (
	// GroupContainer is a Kubernetes container holding slices.
	GroupContainer GroupKind = "container"
	// GroupWorker is a model worker the agent itself runs.
	GroupWorker GroupKind = "worker"
	// GroupUnattributed is a process no group claims (outside visionslice).
	GroupUnattributed GroupKind = "unattributed"
)

// ProcessGrouper attributes a GPU process to a group: "namespace/pod/container"
// for a container, the model name and version for an agent-owned worker.
type ProcessGrouper interface {
	GroupOf(pid uint32) (kind GroupKind, group string)
}

type snapshotter interface {
	Snapshot() *Snapshot
	Failures() uint64
}

type errorCounter interface {
	ErrorCounts() map[string]uint64
}

// Collector exports the latest snapshot at scrape time.
type Collector struct {
	src     snapshotter
	errs    errorCounter
	grouper atomic.Pointer[ProcessGrouper]
}

var _ prometheus.Collector = (*Collector)(nil)

var (
	gpuLabels = []string{"gpu", "gpu_uuid"}

	descInfo = prometheus.NewDesc("visionslice_gpu_info",
		"Static information about a GPU; always 1.", append(gpuLabels, "name", "pci_bus_id", "numa_node"), nil)
	descMemTotal = prometheus.NewDesc("visionslice_gpu_memory_total_bytes",
		"Total memory of a GPU.", gpuLabels, nil)
	descMemUsed = prometheus.NewDesc("visionslice_gpu_memory_used_bytes",
		"Memory in use on a GPU, by every process and the driver.", gpuLabels, nil)
	descUtil = prometheus.NewDesc("visionslice_gpu_utilization_ratio",
		"Fraction of the last sample period in which a kernel ran on the GPU.", gpuLabels, nil)
	descHealthy = prometheus.NewDesc("visionslice_gpu_healthy",
		"Whether the GPU is healthy (1) or not (0).", gpuLabels, nil)
	descProcs = prometheus.NewDesc("visionslice_gpu_processes",
		"Processes holding memory on a GPU, by context kind.", append(gpuLabels, "kind"), nil)
	descGroupMem = prometheus.NewDesc("visionslice_process_group_gpu_memory_used_bytes",
		"GPU memory used by a group of processes: a container, an agent model worker, or the unattributed rest.",
		append(gpuLabels, "group_kind", "group"), nil)
	descNVMLErrors = prometheus.NewDesc("visionslice_nvml_errors_total",
		"NVML calls that failed, by call.", []string{"call"}, nil)
	descPollFailures = prometheus.NewDesc("visionslice_agent_poll_failures_total",
		"GPU polls that failed as a whole.", nil, nil)
	descLastPoll = prometheus.NewDesc("visionslice_agent_last_poll_timestamp_seconds",
		"Unix time of the latest successful GPU poll.", nil, nil)
)

// NewCollector returns a collector over the poller's latest snapshot and the
// reader's error counts.
func NewCollector(src snapshotter, errs errorCounter) *Collector {
	return &Collector{src: src, errs: errs}
}

// SetGrouper sets how processes are grouped; without one every process is
// unattributed.
func (c *Collector) SetGrouper(g ProcessGrouper) { c.grouper.Store(&g) }

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descInfo, descMemTotal, descMemUsed, descUtil, descHealthy, descProcs, descGroupMem, descNVMLErrors, descPollFailures, descLastPoll} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(descPollFailures, prometheus.CounterValue, float64(c.src.Failures()))
	errs := c.errs.ErrorCounts()
	calls := make([]string, 0, len(errs))
	for k := range errs {
		calls = append(calls, k)
	}
	sort.Strings(calls)
	for _, k := range calls {
		ch <- prometheus.MustNewConstMetric(descNVMLErrors, prometheus.CounterValue, float64(errs[k]), k)
	}
	s := c.src.Snapshot()
	if s == nil {
		return
	}
	ch <- prometheus.MustNewConstMetric(descLastPoll, prometheus.GaugeValue, float64(s.Time.UnixNano())/1e9)
	index := make(map[string]string, len(s.Devices))
	for _, d := range s.Devices {
		idx := strconv.Itoa(d.Index)
		index[d.UUID] = idx
		ch <- prometheus.MustNewConstMetric(descInfo, prometheus.GaugeValue, 1, idx, d.UUID, d.Name, d.PCIBusID, strconv.Itoa(d.NUMANode))
		ch <- prometheus.MustNewConstMetric(descHealthy, prometheus.GaugeValue, boolFloat(d.Healthy), idx, d.UUID)
		if !d.Healthy && d.MemoryTotalBytes == 0 {
			continue // nothing else could be read
		}
		ch <- prometheus.MustNewConstMetric(descMemTotal, prometheus.GaugeValue, float64(d.MemoryTotalBytes), idx, d.UUID)
		ch <- prometheus.MustNewConstMetric(descMemUsed, prometheus.GaugeValue, float64(d.MemoryUsedBytes), idx, d.UUID)
		if d.Utilization >= 0 {
			ch <- prometheus.MustNewConstMetric(descUtil, prometheus.GaugeValue, d.Utilization, idx, d.UUID)
		}
	}

	type key struct {
		gpu  string
		kind GroupKind
		name string
	}
	type pkey struct{ gpu, kind string }
	groups := map[key]uint64{}
	counts := map[pkey]int{}
	var grouper ProcessGrouper
	if g := c.grouper.Load(); g != nil {
		grouper = *g
	}
	for _, p := range s.Processes {
		counts[pkey{p.GPUUUID, string(p.Kind)}]++
		k := key{gpu: p.GPUUUID, kind: GroupUnattributed}
		if grouper != nil {
			k.kind, k.name = grouper.GroupOf(p.PID)
		}
		groups[k] += p.UsedMemoryBytes
	}
	// Every GPU reports its unattributed total, zero included, so a
	// dashboard never confuses "none" with "unknown".
	for _, d := range s.Devices {
		k := key{gpu: d.UUID, kind: GroupUnattributed}
		if _, ok := groups[k]; !ok {
			groups[k] = 0
		}
		for _, kind := range []ProcessKind{ProcessCompute, ProcessGraphics} {
			ch <- prometheus.MustNewConstMetric(descProcs, prometheus.GaugeValue, float64(counts[pkey{d.UUID, string(kind)}]), index[d.UUID], d.UUID, string(kind))
		}
	}
	for k, v := range groups {
		ch <- prometheus.MustNewConstMetric(descGroupMem, prometheus.GaugeValue, float64(v), index[k.gpu], k.gpu, string(k.kind), k.name)
	}
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
