// Package scrape is the extender's Prometheus-style metrics source: it finds
// the node agents (static targets or the agent DaemonSet's pods through
// client-go informers), scrapes each one's /metrics on an interval with a
// per-target offset so scrapes spread over the interval as Prometheus spreads
// them, parses the exposition with github.com/prometheus/common/expfmt, and
// keeps per-GPU samples with their timestamps. Whether a sample is too old is
// the reader's decision (a TTL), not this package's.
package scrape

import (
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

// GPU is one GPU as the node's agent last reported it.
type GPU struct {
	UUID             string
	Index            int
	Healthy          bool
	Capacity         int
	Allocated        int
	SliceBytes       uint64
	UnaccountedBytes uint64
	MemoryTotalBytes uint64
	MemoryUsedBytes  uint64
	Utilization      float64
	// Timestamp is the oldest timestamp among the samples that make up this
	// GPU: the sample's own when the exposition carries one, the scrape's
	// time otherwise (as Prometheus stores them).
	Timestamp time.Time
}

// ErrNoGPUMetrics is returned by Parse for an exposition without the agent's
// per-GPU capacity metric: the target is not a visionslice agent, or it has
// no GPUs registered yet.
var ErrNoGPUMetrics = errors.New("exposition has no " + slice.MetricGPUSlicesCapacity + " samples")

// Parse decodes an exposition in the given format (see expfmt.ResponseFormat)
// into per-GPU state, sorted by GPU index. scrapeTime stamps samples that
// carry no timestamp. samples counts the samples read, of any metric.
func Parse(r io.Reader, format expfmt.Format, scrapeTime time.Time) (gpus []GPU, samples int, err error) {
	dec := expfmt.NewDecoder(r, format)
	var b Builder
	for {
		var mf dto.MetricFamily
		if err := dec.Decode(&mf); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, samples, fmt.Errorf("decode exposition: %w", err)
		}
		name := mf.GetName()
		samples += len(mf.GetMetric())
		if !Wanted(name) {
			continue
		}
		for _, m := range mf.GetMetric() {
			uuid, idx := gpuLabels(m)
			v, ok := value(m)
			if !ok {
				return nil, samples, fmt.Errorf("metric %s{%s=%q} has no gauge value", name, slice.LabelGPUUUID, uuid)
			}
			ts := scrapeTime
			if m.TimestampMs != nil {
				ts = time.UnixMilli(m.GetTimestampMs())
			}
			if err := b.Add(name, uuid, idx, v, ts); err != nil {
				return nil, samples, err
			}
		}
	}
	gpus, err = b.GPUs()
	return gpus, samples, err
}

// Wanted reports whether a metric name is one of the agent metrics that
// make up a GPU's state.
func Wanted(name string) bool {
	_, ok := setters[name]
	return ok
}

// WantedNames lists the agent metric names that make up a GPU's state.
func WantedNames() []string {
	out := make([]string, 0, len(setters))
	for n := range setters {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Builder assembles GPUs from agent samples, whatever they were read from
// (an exposition, or a Prometheus query). The zero value is ready.
type Builder struct {
	byUUID map[string]*GPU
	seen   map[string]map[string]bool // gpu uuid -> metric names seen
}

// Add records one sample of metric name for the GPU with the given uuid and
// index labels (idx may be empty). Metrics not Wanted are ignored.
func (b *Builder) Add(name, uuid, idx string, v float64, ts time.Time) error {
	set, ok := setters[name]
	if !ok {
		return nil
	}
	if uuid == "" {
		return fmt.Errorf("metric %s has a sample without the %s label", name, slice.LabelGPUUUID)
	}
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return fmt.Errorf("metric %s{%s=%q} has no finite gauge value", name, slice.LabelGPUUUID, uuid)
	}
	if b.byUUID == nil {
		b.byUUID, b.seen = map[string]*GPU{}, map[string]map[string]bool{}
	}
	g := b.byUUID[uuid]
	if g == nil {
		g = &GPU{UUID: uuid, Index: -1}
		b.byUUID[uuid] = g
		b.seen[uuid] = map[string]bool{}
	}
	if idx != "" {
		n, err := strconv.Atoi(idx)
		if err != nil || n < 0 {
			return fmt.Errorf("metric %s{%s=%q} has %s=%q, not a gpu index", name, slice.LabelGPUUUID, uuid, slice.LabelGPUIndex, idx)
		}
		g.Index = n
	}
	if g.Timestamp.IsZero() || ts.Before(g.Timestamp) {
		g.Timestamp = ts
	}
	set(g, v)
	b.seen[uuid][name] = true
	return nil
}

// GPUs returns the GPUs that have a capacity sample, sorted by index. A GPU
// without a health sample counts as unhealthy. It returns ErrNoGPUMetrics
// when there is none.
func (b *Builder) GPUs() ([]GPU, error) {
	var gpus []GPU
	for uuid, g := range b.byUUID {
		if !b.seen[uuid][slice.MetricGPUSlicesCapacity] {
			// A GPU without capacity cannot be placed on: leave it out
			// rather than count it as a GPU with zero slices.
			continue
		}
		if !b.seen[uuid][slice.MetricGPUHealthy] {
			g.Healthy = false // unknown health is not health
		}
		gpus = append(gpus, *g)
	}
	if len(gpus) == 0 {
		return nil, ErrNoGPUMetrics
	}
	sort.Slice(gpus, func(i, j int) bool {
		if gpus[i].Index != gpus[j].Index {
			return gpus[i].Index < gpus[j].Index
		}
		return gpus[i].UUID < gpus[j].UUID
	})
	return gpus, nil
}

var setters = map[string]func(*GPU, float64){
	slice.MetricGPUHealthy:             func(g *GPU, v float64) { g.Healthy = v == 1 },
	slice.MetricGPUSlicesCapacity:      func(g *GPU, v float64) { g.Capacity = toInt(v) },
	slice.MetricGPUSlicesAllocated:     func(g *GPU, v float64) { g.Allocated = toInt(v) },
	slice.MetricGPUSliceBytes:          func(g *GPU, v float64) { g.SliceBytes = toUint(v) },
	slice.MetricGPUUnaccountedMemBytes: func(g *GPU, v float64) { g.UnaccountedBytes = toUint(v) },
	slice.MetricGPUMemoryTotalBytes:    func(g *GPU, v float64) { g.MemoryTotalBytes = toUint(v) },
	slice.MetricGPUMemoryUsedBytes:     func(g *GPU, v float64) { g.MemoryUsedBytes = toUint(v) },
	slice.MetricGPUUtilizationRatio:    func(g *GPU, v float64) { g.Utilization = v },
}

func gpuLabels(m *dto.Metric) (uuid, idx string) {
	for _, l := range m.GetLabel() {
		switch l.GetName() {
		case slice.LabelGPUUUID:
			uuid = l.GetValue()
		case slice.LabelGPUIndex:
			idx = l.GetValue()
		}
	}
	return uuid, idx
}

func value(m *dto.Metric) (float64, bool) {
	switch {
	case m.Gauge != nil:
		return m.GetGauge().GetValue(), true
	case m.Untyped != nil:
		return m.GetUntyped().GetValue(), true
	case m.Counter != nil:
		return m.GetCounter().GetValue(), true
	}
	return 0, false
}

func toInt(v float64) int {
	if v < 0 {
		return 0
	}
	return int(v)
}

func toUint(v float64) uint64 {
	if v < 0 {
		return 0
	}
	return uint64(v)
}
