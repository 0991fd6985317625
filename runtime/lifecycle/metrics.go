package lifecycle

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metric names of the model lifecycle.
const (
	MetricModelState       = "visionslice_model_state"
	MetricOverruns         = "visionslice_model_gpu_overruns_total"
	MetricQuota            = "visionslice_model_gpu_quota_bytes"
	MetricRecoveryDuration = "visionslice_model_overrun_recovery_duration_seconds"
)

type metrics struct {
	recovery *prometheus.HistogramVec
}

var (
	descState = prometheus.NewDesc(MetricModelState, "1 for the lifecycle state a model version is in (loading, serving, recovering, failed_over_quota, load_failed), 0 for the others.",
		[]string{"model", "version", "state"}, nil)
	descOverruns = prometheus.NewDesc(MetricOverruns, "GPU memory overruns of a model version's workers (each one replaced the worker or failed the version).",
		[]string{"model", "version"}, nil)
	descQuota = prometheus.NewDesc(MetricQuota, "GPU memory quota of each worker of a model version (slices x slice bytes), in bytes; absent when the model has no slices.",
		[]string{"model", "version"}, nil)
)

func newMetrics(reg prometheus.Registerer, m *Manager) (*metrics, error) {
	mt := &metrics{recovery: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: MetricRecoveryDuration,
		Help:    "Time from detecting a worker's GPU memory overrun (or a quota raise) to the model version serving again, in seconds.",
		Buckets: prometheus.ExponentialBuckets(0.01, 2, 14)}, []string{"model", "version"})}
	for _, c := range []prometheus.Collector{mt.recovery, collector{m}} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return mt, nil
}

// collector reads the states at scrape time.
type collector struct{ m *Manager }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descState
	ch <- descOverruns
	ch <- descQuota
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	for _, vs := range c.m.syncLocked() {
		model, version := vs.h.Model(), vs.h.Version()
		state := vs.state()
		for _, s := range allStates {
			v := 0.0
			if s == state {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(descState, prometheus.GaugeValue, v, model, version, s)
		}
		ch <- prometheus.MustNewConstMetric(descOverruns, prometheus.CounterValue, float64(vs.total), model, version)
		if vs.quota > 0 {
			ch <- prometheus.MustNewConstMetric(descQuota, prometheus.GaugeValue, float64(vs.quota), model, version)
		}
	}
}
