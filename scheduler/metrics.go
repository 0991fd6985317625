package scheduler

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics of the extender itself (scrape health comes from the source).
type metrics struct {
	requests *prometheus.CounterVec   // verb, result
	duration *prometheus.HistogramVec // verb
	filtered *prometheus.CounterVec   // reason
	binds    *prometheus.CounterVec   // result
}

// Filter outcome reasons, a bounded label set.
const (
	reasonNoFit     = "no_fit"
	reasonNoMetrics = "no_metrics"
)

func newMetrics(reg prometheus.Registerer, assumed *assumeCache) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "visionslice_scheduler_requests_total",
			Help: "Extender requests by verb and result (ok, bad_request, error).",
		}, []string{"verb", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "visionslice_scheduler_request_duration_seconds",
			Help:    "Time to answer an extender request, by verb.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1},
		}, []string{"verb"}),
		filtered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "visionslice_scheduler_filtered_nodes_total",
			Help: "Nodes filtered out, by reason (no_fit: no GPU with room; no_metrics: stale or absent metrics under failClosed).",
		}, []string{"reason"}),
		binds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "visionslice_scheduler_binds_total",
			Help: "Binds by result (ok, no_fit, error).",
		}, []string{"result"}),
	}
	reg.MustRegister(m.requests, m.duration, m.filtered, m.binds,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "visionslice_scheduler_assumed_pods",
			Help: "Pods bound by the extender that the agents' metrics do not show yet.",
		}, func() float64 { return float64(assumed.count()) }))
	return m
}
