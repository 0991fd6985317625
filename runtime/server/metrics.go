package server

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionslice/visionslice/nodeagent/gpu"
)

// Metric names of the runtime.
const (
	MetricRequests        = "visionslice_inference_requests_total"
	MetricRequestDuration = "visionslice_inference_request_duration_seconds"
	MetricQueueDuration   = "visionslice_inference_queue_duration_seconds"
	MetricComputeDuration = "visionslice_inference_compute_duration_seconds"
	MetricBatchSize       = "visionslice_inference_batch_size"
	// MetricPreprocessDuration is the workers' image preprocessing time.
	MetricPreprocessDuration = "visionslice_inference_preprocess_duration_seconds"
	MetricWorkerRestarts     = "visionslice_model_worker_restarts_total"
	MetricLoadDuration       = "visionslice_model_load_duration_seconds"
	MetricModelReady         = "visionslice_model_ready"
	MetricWorkerGPUMemory    = "visionslice_model_worker_gpu_memory_used_bytes"
)

// latencyBuckets span 100 µs to ~30 s.
var latencyBuckets = prometheus.ExponentialBuckets(0.0001, 2.5, 15)

type metrics struct {
	requests *prometheus.CounterVec
	total    *prometheus.HistogramVec
	queue    *prometheus.HistogramVec
	compute  *prometheus.HistogramVec
	prep     *prometheus.HistogramVec
	batch    *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer, s *Server) (*metrics, error) {
	mv := []string{"model", "version"}
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: MetricRequests,
			Help: "Inference requests finished, by model, version and result (success, invalid_input, not_found, unavailable, timeout, canceled, error)."},
			[]string{"model", "version", "result"}),
		total: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: MetricRequestDuration,
			Help: "Time from a parsed inference request to its answer, in seconds.", Buckets: latencyBuckets}, mv),
		queue: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: MetricQueueDuration,
			Help: "Time a request waited in the batching queue, in seconds.", Buckets: latencyBuckets}, mv),
		compute: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: MetricComputeDuration,
			Help: "Time a worker took for one (batched) inference including preprocessing and transfer, in seconds.", Buckets: latencyBuckets}, mv),
		prep: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: MetricPreprocessDuration,
			Help: "Time a worker spent decoding and preprocessing the images of one (batched) inference, in seconds; models without image inputs have none.", Buckets: latencyBuckets}, mv),
		batch: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: MetricBatchSize,
			Help: "Items per batch handed to a model worker.", Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128}}, mv),
	}
	for _, c := range []prometheus.Collector{m.requests, m.total, m.queue, m.compute, m.prep, m.batch, &stateCollector{s: s}, reloadCollector{s}} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// requestObserver implements oip.Observer. Model names come from clients,
// so names and versions that are not served are labelled "_unknown" to
// keep the label set bounded.
type requestObserver struct{ s *Server }

func (o requestObserver) Request(model, version, result string, d time.Duration) {
	mv := o.s.lookup(model, version)
	if mv == nil {
		model, version = "_unknown", ""
	} else {
		model, version = mv.name, mv.version
	}
	o.s.metrics.requests.WithLabelValues(model, version, result).Inc()
	if d > 0 && result == "success" {
		o.s.metrics.total.WithLabelValues(model, version).Observe(d.Seconds())
	}
}

// batchObserver implements batch.Observer for one model version.
type batchObserver struct {
	queue, compute, batch prometheus.Observer
}

func (o batchObserver) Queued(d time.Duration) { o.queue.Observe(d.Seconds()) }

func (o batchObserver) Dispatched(items int, compute time.Duration, err error) {
	if err == nil {
		o.compute.Observe(compute.Seconds())
	}
	o.batch.Observe(float64(items))
}

// stateCollector reads restarts, load durations, readiness and GPU memory
// per worker at scrape time.
type stateCollector struct{ s *Server }

var (
	descRestarts = prometheus.NewDesc(MetricWorkerRestarts, "Model worker restarts, by the reason the previous worker ended (exited, killed, health, start_failed, replaced).",
		[]string{"model", "version", "reason"}, nil)
	descLoad = prometheus.NewDesc(MetricLoadDuration, "Seconds the last load of a model version took (workers started, model loaded and warmed).",
		[]string{"model", "version"}, nil)
	descReady = prometheus.NewDesc(MetricModelReady, "1 when a model version serves, 0 when it is loading or failed.",
		[]string{"model", "version"}, nil)
	descGPU = prometheus.NewDesc(MetricWorkerGPUMemory, "GPU memory used by a model version's worker processes, per GPU, in bytes.",
		[]string{"model", "version", "gpu_uuid"}, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descRestarts
	ch <- descLoad
	ch <- descReady
	ch <- descGPU
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	var snap *gpu.Snapshot
	if c.s.deps.GPUs != nil {
		snap = c.s.deps.GPUs.Snapshot()
	}
	for _, mv := range c.s.versionsList() {
		ready := 0.0
		if mv.Ready() {
			ready = 1
		}
		ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, ready, mv.name, mv.version)
		if d := mv.loadDuration(); d > 0 {
			ch <- prometheus.MustNewConstMetric(descLoad, prometheus.GaugeValue, d.Seconds(), mv.name, mv.version)
		}
		pool := mv.poolOrNil()
		if pool == nil {
			continue
		}
		for reason, n := range pool.Restarts() {
			ch <- prometheus.MustNewConstMetric(descRestarts, prometheus.CounterValue, float64(n), mv.name, mv.version, reason)
		}
		if snap == nil {
			continue
		}
		perGPU := map[string]uint64{}
		for _, pid := range pool.PIDs() {
			for _, p := range snap.ProcessesOf(uint32(pid)) {
				perGPU[p.GPUUUID] += p.UsedMemoryBytes
			}
		}
		for uuid, b := range perGPU {
			ch <- prometheus.MustNewConstMetric(descGPU, prometheus.GaugeValue, float64(b), mv.name, mv.version, uuid)
		}
	}
}
