package fit

import (
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

const gib = 1 << 30

func gpu(i, capacity, allocated int) GPU {
	return GPU{UUID: "GPU-" + string(rune('a'+i)), Index: i, Healthy: true, Capacity: capacity, Allocated: allocated,
		SliceBytes: gib, MemoryTotalBytes: uint64(capacity) * gib, MemoryUsedBytes: uint64(allocated) * gib}
}

func TestPlace(t *testing.T) {
	t.Parallel()
	unhealthy := gpu(0, 8, 0)
	unhealthy.Healthy = false
	outside := gpu(1, 8, 2)
	outside.UnaccountedBytes = 3*gib + 1 // 3 GiB and a byte eat 4 slices: 8-2-4 = 2 free
	assumed := gpu(1, 8, 2)
	assumed.Assumed = 3 // 3 free
	busy, idle := gpu(0, 8, 4), gpu(1, 8, 4)
	busy.Utilization, idle.Utilization = 0.9, 0.1

	tests := []struct {
		name     string
		gpus     []GPU
		n        int
		strategy Strategy
		wantOK   bool
		wantGPU  int
		reason   string
	}{
		{name: "fragmentation 3+3 cannot hold 4", gpus: []GPU{gpu(0, 8, 5), gpu(1, 8, 5)}, n: 4, reason: "free per gpu: 3, 3"},
		{name: "fragmentation 3+3 holds 3", gpus: []GPU{gpu(0, 8, 5), gpu(1, 8, 5)}, n: 3, wantOK: true, wantGPU: 0},
		{name: "one gpu with room", gpus: []GPU{gpu(0, 8, 5), gpu(1, 8, 4)}, n: 4, wantOK: true, wantGPU: 1},
		{name: "unhealthy gpu is skipped", gpus: []GPU{unhealthy, gpu(1, 8, 6)}, n: 4, reason: "unhealthy, 2"},
		{name: "unhealthy gpu skipped, healthy fits", gpus: []GPU{unhealthy, gpu(1, 8, 2)}, n: 4, wantOK: true, wantGPU: 1},
		{name: "outside usage eats slices", gpus: []GPU{outside}, n: 3, reason: "free per gpu: 2"},
		{name: "outside usage leaves two", gpus: []GPU{outside}, n: 2, wantOK: true, wantGPU: 1},
		{name: "assumed pods count", gpus: []GPU{assumed}, n: 4, reason: "free per gpu: 3"},
		{name: "assumed pods leave three", gpus: []GPU{assumed}, n: 3, wantOK: true, wantGPU: 1},
		{name: "binpack picks fullest that fits", gpus: []GPU{gpu(0, 8, 0), gpu(1, 8, 5), gpu(2, 8, 3)}, n: 2, wantOK: true, wantGPU: 1},
		{name: "spread picks emptiest", gpus: []GPU{gpu(0, 8, 4), gpu(1, 8, 0), gpu(2, 8, 3)}, n: 2, strategy: Spread, wantOK: true, wantGPU: 1},
		{name: "tie broken by utilisation", gpus: []GPU{busy, idle}, n: 2, wantOK: true, wantGPU: 1},
		{name: "no gpus", gpus: nil, n: 1, reason: "node reports no gpus"},
		{name: "zero request", gpus: []GPU{gpu(0, 8, 0)}, n: 0, reason: "pod requests no slices"},
		{name: "over-allocated gpu has none free", gpus: []GPU{gpu(0, 8, 9)}, n: 1, reason: "free per gpu: 0"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := tc.strategy
			if s == "" {
				s = Binpack
			}
			c, ok, reason := Place(tc.gpus, tc.n, s, DefaultWeights(), 10)
			if ok != tc.wantOK {
				t.Fatalf("ok = %v (reason %q), want %v", ok, reason, tc.wantOK)
			}
			if !ok {
				if !strings.Contains(reason, tc.reason) {
					t.Fatalf("reason %q does not contain %q", reason, tc.reason)
				}
				return
			}
			if c.GPU.Index != tc.wantGPU {
				t.Fatalf("gpu %d chosen, want %d", c.GPU.Index, tc.wantGPU)
			}
			if c.Score < 0 || c.Score > 10 {
				t.Fatalf("score %d outside 0..10", c.Score)
			}
		})
	}
}

func TestScoreOrdersNodes(t *testing.T) {
	t.Parallel()
	w := Weights{Fit: 1}
	full, empty := []GPU{gpu(0, 8, 6)}, []GPU{gpu(0, 8, 0)}
	score := func(g []GPU, s Strategy, w Weights) int64 {
		c, ok, reason := Place(g, 2, s, w, 10)
		if !ok {
			t.Fatalf("no fit: %s", reason)
		}
		return c.Score
	}
	if f, e := score(full, Binpack, w), score(empty, Binpack, w); f <= e {
		t.Errorf("binpack: full node scored %d, empty %d; want full higher", f, e)
	}
	if f, e := score(full, Spread, w), score(empty, Spread, w); f >= e {
		t.Errorf("spread: full node scored %d, empty %d; want empty higher", f, e)
	}
	busy, idle := gpu(0, 8, 0), gpu(0, 8, 0)
	busy.Utilization = 1
	uw := Weights{Utilization: 1}
	if b, i := score([]GPU{busy}, Binpack, uw), score([]GPU{idle}, Binpack, uw); b != 0 || i != 10 {
		t.Errorf("utilisation weight: busy %d idle %d, want 0 and 10", b, i)
	}
	low := gpu(0, 8, 0)
	low.MemoryUsedBytes = low.MemoryTotalBytes
	hw := Weights{Headroom: 1}
	if l, i := score([]GPU{low}, Binpack, hw), score([]GPU{idle}, Binpack, hw); l != 0 || i != 10 {
		t.Errorf("headroom weight: no headroom %d, all free %d, want 0 and 10", l, i)
	}
	if z := score(empty, Binpack, Weights{}); z != 3 { // all-zero weights: fit alone, 2/8 used after: 2.5 rounds to 3
		t.Errorf("zero weights score %d, want 3", z)
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	if err := Strategy("tetris").Validate(); err == nil {
		t.Error("unknown strategy accepted")
	}
	if err := (Weights{Fit: -1}).Validate(); err == nil {
		t.Error("negative weight accepted")
	}
}

func TestPodSlices(t *testing.T) {
	t.Parallel()
	c := func(limit, request int64) v1.Container {
		var r v1.ResourceRequirements
		if limit > 0 {
			r.Limits = v1.ResourceList{slice.ResourceName: *resource.NewQuantity(limit, resource.DecimalSI)}
		}
		if request > 0 {
			r.Requests = v1.ResourceList{slice.ResourceName: *resource.NewQuantity(request, resource.DecimalSI)}
		}
		return v1.Container{Resources: r}
	}
	tests := []struct {
		name string
		pod  *v1.Pod
		want int
	}{
		{"nil", nil, 0},
		{"none", &v1.Pod{Spec: v1.PodSpec{Containers: []v1.Container{{}}}}, 0},
		{"sum of containers", &v1.Pod{Spec: v1.PodSpec{Containers: []v1.Container{c(2, 0), c(3, 0)}}}, 5},
		{"request when no limit", &v1.Pod{Spec: v1.PodSpec{Containers: []v1.Container{c(0, 2)}}}, 2},
		{"larger init container", &v1.Pod{Spec: v1.PodSpec{InitContainers: []v1.Container{c(6, 0)}, Containers: []v1.Container{c(2, 0)}}}, 6},
		{"smaller init container", &v1.Pod{Spec: v1.PodSpec{InitContainers: []v1.Container{c(1, 0)}, Containers: []v1.Container{c(2, 0)}}}, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := PodSlices(tc.pod); got != tc.want {
				t.Fatalf("PodSlices = %d, want %d", got, tc.want)
			}
		})
	}
}

func TestResolvable(t *testing.T) {
	t.Parallel()
	sick := gpu(0, 8, 0)
	sick.Healthy = false
	eaten := gpu(1, 8, 0)
	eaten.UnaccountedBytes = 5 * gib
	tests := []struct {
		name string
		gpus []GPU
		n    int
		want bool
	}{
		{"full gpu could be emptied", []GPU{gpu(0, 8, 8)}, 4, true},
		{"request above any capacity", []GPU{gpu(0, 8, 0), gpu(1, 8, 0)}, 9, false},
		{"only unhealthy gpus", []GPU{sick}, 1, false},
		{"outside memory is not preemptible", []GPU{eaten}, 4, false},
		{"outside memory leaves three", []GPU{eaten}, 3, true},
		{"no gpus", nil, 1, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := Resolvable(tc.gpus, tc.n); got != tc.want {
				t.Fatalf("Resolvable = %v, want %v", got, tc.want)
			}
		})
	}
}
