package scheduler

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"syscall"
	"testing"
	"time"

	extenderv1 "k8s.io/kube-scheduler/extender/v1"

	"github.com/visionslice/visionslice/scheduler/scrape"
)

// BenchmarkFilterPrioritize measures one pod's filter + prioritize round
// (JSON in and out through the handler, as kube-scheduler calls it with
// nodeCacheCapable) over N nodes of 8 GPUs, and reports p50 and p99 per pod.
func BenchmarkFilterPrioritize(b *testing.B) {
	for _, nodes := range []int{1000, 5000} {
		b.Run(fmt.Sprintf("nodes=%d", nodes), func(b *testing.B) {
			src := &memSource{}
			now := time.Now()
			names := make([]string, nodes)
			for i := range nodes {
				names[i] = fmt.Sprintf("node-%05d", i)
				gpus := make([]scrape.GPU, 8)
				for g := range gpus {
					// A mix: some GPUs full, some fragmented, some roomy.
					gpus[g] = sgpu(g, 16, (i*7+g*5)%17, now)
					gpus[g].UUID = fmt.Sprintf("GPU-%05d-%d", i, g)
					gpus[g].Utilization = float64((i+g)%10) / 10
					gpus[g].UnaccountedBytes = uint64((i+g)%3) * gib / 2
				}
				src.set(names[i], gpus...)
			}
			ext, err := New(DefaultConfig(), Deps{Source: src}, discard())
			if err != nil {
				b.Fatal(err)
			}
			// Pods the extender bound that metrics do not show yet, on 1% of nodes.
			for i := 0; i < nodes; i += 100 {
				ext.assumed.add(assumed{podUID: fmt.Sprintf("a-%d", i), node: names[i], gpu: fmt.Sprintf("GPU-%05d-0", i),
					slices: 2, at: now, expectedAllocated: 100})
			}
			body, err := json.Marshal(extenderv1.ExtenderArgs{Pod: slicePod("p", 4), NodeNames: &names})
			if err != nil {
				b.Fatal(err)
			}
			round := func() {
				for _, verb := range []string{"/filter", "/prioritize"} {
					rec := httptest.NewRecorder()
					ext.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, verb, bytes.NewReader(body)))
					if rec.Code != http.StatusOK {
						b.Fatalf("%s: %d %s", verb, rec.Code, rec.Body)
					}
				}
			}
			round()
			durs := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			cpu0 := cpuTime()
			b.ResetTimer()
			for b.Loop() {
				t := time.Now()
				round()
				durs = append(durs, time.Since(t))
			}
			b.StopTimer()
			// CPU time per pod: on a shared machine wall-clock quantiles
			// include waiting for a core; this does not.
			b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/1000/float64(len(durs)), "cpu-ms/pod")
			slices.Sort(durs)
			q := func(p float64) float64 { return float64(durs[int(p*float64(len(durs)-1))].Microseconds()) / 1000 }
			b.ReportMetric(q(0.5), "p50-ms/pod")
			b.ReportMetric(q(0.99), "p99-ms/pod")
		})
	}
}

// cpuTime is this process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
