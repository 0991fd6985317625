package deviceplugin

import (
	"fmt"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

// metrics are the plugin's Prometheus metrics. Per-GPU gauges are read from
// the inventory and ledger at scrape time.
type metrics struct {
	p             *Plugin
	capacity      *prometheus.Desc
	allocated     *prometheus.Desc
	sliceSize     *prometheus.Desc
	allocations   *prometheus.CounterVec
	registrations *prometheus.CounterVec
}

func newMetrics(p *Plugin, reg prometheus.Registerer) (*metrics, error) {
	labels := []string{slice.LabelGPUUUID, slice.LabelGPUIndex}
	m := &metrics{
		p: p,
		capacity: prometheus.NewDesc(slice.MetricGPUSlicesCapacity,
			"Slices of "+slice.ResourceName+" advertised on the GPU.", labels, nil),
		allocated: prometheus.NewDesc(slice.MetricGPUSlicesAllocated,
			"Slices of the GPU held by containers, from the device plugin's ledger.", labels, nil),
		sliceSize: prometheus.NewDesc(slice.MetricGPUSliceBytes,
			"GPU memory of one slice in bytes.", labels, nil),
		allocations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "visionslice_deviceplugin_allocate_requests_total",
			Help: "Allocate calls from the kubelet, by result (success, invalid_argument, failed_precondition).",
		}, []string{"result"}),
		registrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "visionslice_deviceplugin_registrations_total",
			Help: "Registration attempts with the kubelet, by result (success, error).",
		}, []string{"result"}),
	}
	for _, r := range []string{resultSuccess, resultInvalidArgument, resultFailedPrecondition} {
		m.allocations.WithLabelValues(r)
	}
	for _, r := range []string{resultSuccess, "error"} {
		m.registrations.WithLabelValues(r)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m, m.allocations, m.registrations} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register device plugin metrics: %w", err)
			}
		}
	}
	return m, nil
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.capacity
	ch <- m.allocated
	ch <- m.sliceSize
}

// Collect implements prometheus.Collector.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	inv, _ := m.p.current()
	held := m.p.ledger.perGPU()
	size := float64(m.p.cfg.sliceBytes())
	for _, g := range inv.gpus {
		lv := []string{g.UUID, strconv.Itoa(g.Index)}
		ch <- prometheus.MustNewConstMetric(m.capacity, prometheus.GaugeValue, float64(g.Slices), lv...)
		ch <- prometheus.MustNewConstMetric(m.allocated, prometheus.GaugeValue, float64(held[g.UUID]), lv...)
		ch <- prometheus.MustNewConstMetric(m.sliceSize, prometheus.GaugeValue, size, lv...)
	}
}
