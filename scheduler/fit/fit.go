// Package fit holds the extender's placement rules as pure functions: whether
// a pod's slice request fits a node, on which GPU, and how well. It knows
// nothing of HTTP, scraping or the API server; callers give it a snapshot of
// each GPU and get back a decision.
//
// The placement rule: a pod's slices all go to ONE GPU. The pod's request is
// the slices its containers ask for (limits of visionslice.io/gpu-slice),
// summed over the regular containers; an init container runs alone, so the
// request is the larger of that sum and the largest init container, as the
// kubelet computes a pod's effective request. The device plugin gives every
// container its slices on the GPU named by the scheduler's signed record, and
// the record names one GPU per pod, so one GPU must hold them all.
package fit

import (
	"fmt"
	"strconv"
	"strings"
)

// GPU is what the extender knows of one GPU when it decides.
type GPU struct {
	UUID    string
	Index   int
	Healthy bool
	// Capacity and Allocated are slice counts reported by the node's agent.
	Capacity  int
	Allocated int
	// Assumed counts slices of pods this extender bound to the GPU that the
	// agent's metrics do not show yet.
	Assumed int
	// SliceBytes is the size of one slice; UnaccountedBytes is GPU memory in
	// use by processes outside any slice (other tenants, leaks, the driver's
	// growth). Each started slice of such memory is a slice nobody can use.
	SliceBytes       uint64
	UnaccountedBytes uint64
	// MemoryTotalBytes and MemoryUsedBytes are live NVML readings; Utilization
	// is 0..1. They weigh the score, never the fit.
	MemoryTotalBytes uint64
	MemoryUsedBytes  uint64
	Utilization      float64
}

// EatenByUnaccounted returns how many slices memory outside the accounting
// takes away: unaccounted bytes over the slice size, rounded up.
func (g GPU) EatenByUnaccounted() int {
	if g.SliceBytes == 0 || g.UnaccountedBytes == 0 {
		return 0
	}
	return int((g.UnaccountedBytes + g.SliceBytes - 1) / g.SliceBytes)
}

// Free returns the slices a new pod can still get on the GPU:
// capacity - allocated - assumed - slices eaten by unaccounted memory, never
// below zero. An unhealthy GPU has none.
func (g GPU) Free() int {
	if !g.Healthy {
		return 0
	}
	f := g.Capacity - g.Allocated - g.Assumed - g.EatenByUnaccounted()
	if f < 0 {
		return 0
	}
	return f
}

// Headroom returns the live free-memory ratio 0..1 (1 when unknown).
func (g GPU) Headroom() float64 {
	if g.MemoryTotalBytes == 0 {
		return 1
	}
	if g.MemoryUsedBytes >= g.MemoryTotalBytes {
		return 0
	}
	return float64(g.MemoryTotalBytes-g.MemoryUsedBytes) / float64(g.MemoryTotalBytes)
}

// Strategy chooses among GPUs and nodes that fit.
type Strategy string

const (
	// Binpack fills the fullest GPU that still fits, keeping whole GPUs free
	// for large requests (the default).
	Binpack Strategy = "binpack"
	// Spread places on the emptiest GPU, spreading load and blast radius.
	Spread Strategy = "spread"
)

// Validate reports an unknown strategy.
func (s Strategy) Validate() error {
	switch s {
	case Binpack, Spread:
		return nil
	}
	return fmt.Errorf("unknown strategy %q: want binpack or spread", string(s))
}

// Weights weigh the parts of a node's score. Zero weights drop a part; all
// zero means the slice fit alone decides.
type Weights struct {
	// Fit weighs the strategy's view of slice occupancy after placement.
	Fit float64 `yaml:"fit"`
	// Headroom weighs live free GPU memory (more is better).
	Headroom float64 `yaml:"headroom"`
	// Utilization weighs live idleness, 1 - utilisation (more idle is better).
	Utilization float64 `yaml:"utilization"`
}

// DefaultWeights favour the slice fit and still steer away from busy GPUs.
func DefaultWeights() Weights { return Weights{Fit: 1, Headroom: 0.5, Utilization: 0.5} }

// Validate rejects negative weights.
func (w Weights) Validate() error {
	if w.Fit < 0 || w.Headroom < 0 || w.Utilization < 0 {
		return fmt.Errorf("weights must not be negative (fit %g, headroom %g, utilization %g)", w.Fit, w.Headroom, w.Utilization)
	}
	return nil
}

// Choice is the GPU picked on a node and its score in 0..maxScore.
type Choice struct {
	GPU   GPU
	Score int64
}

// Place picks the GPU for a request of n slices among gpus under strategy s,
// and scores it in 0..maxScore. ok is false when no healthy GPU has n free
// slices; reason then says why in words fit for the extender's FailedNodes.
func Place(gpus []GPU, n int, s Strategy, w Weights, maxScore int64) (c Choice, ok bool, reason string) {
	if n <= 0 {
		return Choice{}, false, "pod requests no slices"
	}
	best := -1
	for i := range gpus {
		g := &gpus[i]
		free := g.Free()
		if free < n {
			continue
		}
		if best < 0 {
			best = i
			continue
		}
		bf := gpus[best].Free()
		switch {
		case s == Spread && free > bf, s != Spread && free < bf:
			best = i
		case free == bf && better(g, &gpus[best]):
			best = i
		}
	}
	if best < 0 {
		return Choice{}, false, noFitReason(gpus, n)
	}
	g := gpus[best]
	return Choice{GPU: g, Score: score(g, n, s, w, maxScore)}, true, ""
}

// Resolvable reports whether n slices could fit on one of gpus if pods
// holding slices there went away: a healthy GPU whose capacity, less what
// unaccounted memory eats, is at least n. When it is false, preempting pods
// on the node cannot help.
func Resolvable(gpus []GPU, n int) bool {
	for i := range gpus {
		if gpus[i].Healthy && gpus[i].Capacity-gpus[i].EatenByUnaccounted() >= n {
			return true
		}
	}
	return false
}

// better breaks ties between GPUs with equal free slices: more headroom, then
// less utilisation, then the lower index, so a choice is deterministic.
func better(a, b *GPU) bool {
	if ha, hb := a.Headroom(), b.Headroom(); ha != hb {
		return ha > hb
	}
	if a.Utilization != b.Utilization {
		return a.Utilization < b.Utilization
	}
	return a.Index < b.Index
}

func score(g GPU, n int, s Strategy, w Weights, maxScore int64) int64 {
	var fitPart float64
	if g.Capacity > 0 {
		after := float64(g.Free()-n) / float64(g.Capacity) // free share left after placing
		if after < 0 {
			after = 0
		}
		if s == Spread {
			fitPart = after
		} else {
			fitPart = 1 - after
		}
	}
	util := g.Utilization
	if util < 0 {
		util = 0
	} else if util > 1 {
		util = 1
	}
	sum := w.Fit + w.Headroom + w.Utilization
	if sum == 0 {
		w, sum = Weights{Fit: 1}, 1
	}
	v := (w.Fit*fitPart + w.Headroom*g.Headroom() + w.Utilization*(1-util)) / sum
	sc := int64(v*float64(maxScore) + 0.5)
	if sc < 0 {
		return 0
	}
	if sc > maxScore {
		return maxScore
	}
	return sc
}

func noFitReason(gpus []GPU, n int) string {
	if len(gpus) == 0 {
		return "node reports no gpus"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "no healthy gpu with %d free slices (free per gpu:", n)
	for i, g := range gpus {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte(' ')
		if !g.Healthy {
			b.WriteString("unhealthy")
			continue
		}
		b.WriteString(strconv.Itoa(g.Free()))
	}
	b.WriteByte(')')
	return b.String()
}
