package agent_test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// BenchmarkAgentPollingCost runs the agent binary on 8 simulated GPUs with
// 64 processes each, polled at 5 Hz, and reports its CPU use (percent of one
// core) and resident memory over a 10 s window. Run it once:
//
//	go test ./test/agent -run '^$' -bench AgentPollingCost -benchtime 1x
func BenchmarkAgentPollingCost(b *testing.B) {
	p := start(b, strings.Replace(strings.Replace(baseConfig, "sim:h100x2", "sim:h100x8", 1), "50ms", "200ms", 1))
	for g := 0; g < 8; g++ {
		for i := 0; i < 64; i++ {
			body := fmt.Sprintf(`{"usedMiB": %d}`, 256+i)
			req, _ := http.NewRequest(http.MethodPut, fmt.Sprintf("http://%s/debug/sim/gpus/%d/processes/%d", p.addr, g, 10000+g*100+i), strings.NewReader(body))
			resp, err := http.DefaultClient.Do(req)
			if err != nil || resp.StatusCode != http.StatusNoContent {
				b.Fatalf("script process: %v %v", err, resp)
			}
			resp.Body.Close()
		}
	}
	time.Sleep(2 * time.Second) // settle
	pid := p.cmd.Process.Pid
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		cpu0, at0 := cpuSeconds(b, pid), time.Now()
		time.Sleep(10 * time.Second)
		cpu1, at1 := cpuSeconds(b, pid), time.Now()
		b.ReportMetric(100*(cpu1-cpu0)/at1.Sub(at0).Seconds(), "%core")
	}
	b.StopTimer()
	b.ReportMetric(rssMiB(b, pid), "rss_MiB")

	// /metrics over HTTP at this size.
	const scrapes = 50
	start := time.Now()
	for i := 0; i < scrapes; i++ {
		resp, err := http.Get("http://" + p.addr + "/metrics")
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	b.ReportMetric(float64(time.Since(start).Microseconds())/scrapes, "us/scrape")
}

func cpuSeconds(b *testing.B, pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / 100 // USER_HZ
}

func rssMiB(b *testing.B, pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			kb, _ := strconv.ParseFloat(strings.Fields(line)[1], 64)
			return kb / 1024
		}
	}
	return 0
}
