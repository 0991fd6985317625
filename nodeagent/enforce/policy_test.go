package enforce

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/nodeagent/accounting"
	"github.com/visionslice/visionslice/nodeagent/cgroup/cgrouptest"
	"github.com/visionslice/visionslice/nodeagent/gpu"
)

const (
	testGPU  = "GPU-00000000-0000-4000-8000-0000000000b0"
	testCg   = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice/cri-containerd-abc.scope"
	testPod  = "detector-0"
	testNS   = "vision"
	testUID  = "aaaaaaaa-0000-4000-8000-000000000001"
	gib      = uint64(1) << 30
	testCtr  = "detector"
	quota    = 2 * gib
	overUse  = 3 * gib
	underUse = gib
)

type staticPods map[string]map[string]string

func (s staticPods) Annotations(ns, name string) (map[string]string, bool) {
	a, ok := s[ns+"/"+name]
	return a, ok
}

type event struct{ typ, reason, msg string }

type eventLog struct {
	mu     sync.Mutex
	events []event
}

func (l *eventLog) Event(_ PodRef, typ, reason, msg string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, event{typ, reason, msg})
}

func (l *eventLog) reasons() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, e := range l.events {
		out = append(out, e.reason)
	}
	return out
}

type nopAccountant struct{}

func (nopAccountant) Account(*gpu.Snapshot) *accounting.Report { return &accounting.Report{} }

type harness struct {
	e      *Enforcer
	cg     *cgrouptest.Fake
	events *eventLog
	log    *bytes.Buffer
	reg    *prometheus.Registry
	recs   []Record
	base   time.Time
}

func newHarness(t *testing.T, pol Config, ann map[string]string) *harness {
	t.Helper()
	h := &harness{cg: cgrouptest.NewFake(), events: &eventLog{}, log: &bytes.Buffer{}, reg: prometheus.NewRegistry(),
		base: time.Unix(1_800_000_000, 0)}
	h.cg.Add(testCg)
	logger := slog.New(slog.NewJSONHandler(h.log, nil))
	var pods PodAnnotations
	if ann != nil {
		pods = staticPods{testNS + "/" + testPod: ann}
	}
	e, err := New(pol, Deps{Accounting: nopAccountant{}, Cgroups: h.cg, Pods: pods, Events: h.events, Registerer: h.reg},
		logger, WithHook(func(r Record) { h.recs = append(h.recs, r) }))
	if err != nil {
		t.Fatal(err)
	}
	h.e = e
	return h
}

// poll evaluates one report at base+at where the container uses usage
// bytes (usage < 0: the container holds no GPU memory at all).
func (h *harness) poll(seq uint64, at time.Duration, usage int64) {
	r := &accounting.Report{Seq: seq, Time: h.base.Add(at)}
	if usage >= 0 {
		r.Groups = []accounting.Usage{{
			Kind: gpu.GroupContainer, GPUUUID: testGPU,
			Identity: accounting.Identity{Namespace: testNS, Pod: testPod, Container: testCtr},
			PodUID:   testUID, ContainerID: "abc", CgroupPath: testCg, Slices: 2,
			QuotaBytes: quota, UsageBytes: uint64(usage), PIDs: []uint32{4242},
		}}
	}
	h.e.Evaluate(r, h.base.Add(at))
}

func (h *harness) actions() []string {
	var out []string
	for _, r := range h.recs {
		out = append(out, string(r.Action)+"/"+r.Result)
	}
	return out
}

type step struct {
	at    time.Duration
	usage int64
}

func policy(mut func(*Config)) Config {
	c := DefaultConfig()
	c.AllowedActions = []Action{ActionObserve, ActionFreeze, ActionKill}
	c.Hysteresis.OverFor = 0
	c.GracePeriod = 5 * time.Second
	c.KillRetry = 5 * time.Second
	if mut != nil {
		mut(&c)
	}
	return c
}

func TestHysteresisAndGrace(t *testing.T) {
	t.Parallel()
	o, u := int64(overUse), int64(underUse)
	s := time.Second
	cases := []struct {
		name    string
		pol     Config
		ann     map[string]string
		steps   []step
		want    []string // audit records action/result
		cgroups []string // cgroup ops, in order
		frozen  bool     // frozen at the end
	}{
		{name: "brief spike ignored", pol: policy(func(c *Config) { c.Hysteresis.OverFor = s }),
			steps: []step{{0, o}, {s / 2, o}, {s * 6 / 10, u}, {2 * s, o}, {2*s + s/2, u}}},
		{name: "sustained overrun observed once per episode", pol: policy(func(c *Config) { c.Hysteresis.OverFor = s }),
			steps: []step{{0, o}, {s, o}, {2 * s, o}, {3 * s, u}, {4 * s, o}, {5 * s, o}},
			want:  []string{"observe/ok", "observe/ok"}},
		{name: "margin absorbs a small overrun", pol: policy(func(c *Config) { c.Hysteresis.MarginBytes = gib / 2 }),
			steps: []step{{0, int64(quota + gib/4)}, {s, int64(quota + gib/4)}}},
		{name: "freeze then thaw when usage drops", pol: policy(func(c *Config) { c.DefaultAction = ActionFreeze }),
			steps: []step{{0, o}, {s, o}, {2 * s, u}},
			want:  []string{"freeze/ok", "thaw/ok"}, cgroups: []string{"freeze", "thaw"}},
		{name: "freeze then kill when grace ends", pol: policy(func(c *Config) { c.DefaultAction = ActionFreeze }),
			steps: []step{{0, o}, {3 * s, o}, {5*s - 1, o}, {5 * s, o}, {6 * s, o}},
			want:  []string{"freeze/ok", "kill/ok"}, cgroups: []string{"freeze", "kill"}, frozen: true},
		{name: "release ratio keeps it frozen near quota", pol: policy(func(c *Config) {
			c.DefaultAction = ActionFreeze
			c.Hysteresis.ReleaseRatio = 0.9
		}),
			steps: []step{{0, o}, {s, int64(quota * 95 / 100)}, {2 * s, int64(quota * 85 / 100)}},
			want:  []string{"freeze/ok", "thaw/ok"}, cgroups: []string{"freeze", "thaw"}},
		{name: "frozen group that lets go of the gpu is thawed", pol: policy(func(c *Config) { c.DefaultAction = ActionFreeze }),
			steps: []step{{0, o}, {s, -1}},
			want:  []string{"freeze/ok", "thaw/ok"}, cgroups: []string{"freeze", "thaw"}},
		{name: "kill and retry while still over", pol: policy(func(c *Config) { c.DefaultAction = ActionKill }),
			steps: []step{{0, o}, {s, o}, {5 * s, o}, {6 * s, u}, {7 * s, o}},
			want:  []string{"kill/ok", "kill/ok", "kill/ok"}, cgroups: []string{"kill", "kill", "kill"}},
		{name: "annotation chooses an allowed action", pol: policy(nil), ann: map[string]string{slice.AnnotationEnforcementAction: "freeze"},
			steps: []step{{0, o}}, want: []string{"freeze/ok"}, cgroups: []string{"freeze"}, frozen: true},
		{name: "annotation choosing a disallowed action is rejected", pol: policy(func(c *Config) {
			c.AllowedActions = []Action{ActionObserve, ActionKill}
			c.DefaultAction = ActionKill
		}), ann: map[string]string{slice.AnnotationEnforcementAction: "freeze"},
			steps: []step{{0, o}, {s, u}, {2 * s, o}},
			want:  []string{"reject_annotation/rejected", "kill/ok", "kill/ok"}, cgroups: []string{"kill", "kill"}},
		{name: "forged annotation asking to be only observed is rejected", pol: policy(func(c *Config) {
			c.AllowedActions = []Action{ActionFreeze, ActionKill}
			c.DefaultAction = ActionFreeze
		}), ann: map[string]string{slice.AnnotationEnforcementAction: "observe"},
			steps: []step{{0, o}}, want: []string{"reject_annotation/rejected", "freeze/ok"}, cgroups: []string{"freeze"}, frozen: true},
		{name: "malformed annotation is rejected", pol: policy(nil), ann: map[string]string{slice.AnnotationEnforcementAction: "Kill "},
			steps: []step{{0, o}}, want: []string{"reject_annotation/rejected", "observe/ok"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, tc.pol, tc.ann)
			for i, st := range tc.steps {
				h.poll(uint64(i+1), st.at, st.usage)
			}
			if got := strings.Join(h.actions(), ","); got != strings.Join(tc.want, ",") {
				t.Errorf("audit = [%s], want [%s]", got, strings.Join(tc.want, ","))
			}
			var ops []string
			for _, a := range h.cg.Actions() {
				ops = append(ops, a.Op)
				if a.Path != testCg {
					t.Errorf("cgroup op on %s, want %s", a.Path, testCg)
				}
			}
			if strings.Join(ops, ",") != strings.Join(tc.cgroups, ",") {
				t.Errorf("cgroup ops = %v, want %v", ops, tc.cgroups)
			}
			if h.cg.Frozen(testCg) != tc.frozen {
				t.Errorf("frozen at end = %v, want %v", h.cg.Frozen(testCg), tc.frozen)
			}
		})
	}
}

// Every audit record is one JSON log line with the fields an auditor needs.
func TestAuditRecordsAndMetrics(t *testing.T) {
	t.Parallel()
	h := newHarness(t, policy(func(c *Config) {
		c.AllowedActions = []Action{ActionObserve, ActionFreeze}
		c.DefaultAction = ActionFreeze
	}), map[string]string{slice.AnnotationEnforcementAction: "kill"})
	h.poll(1, 0, int64(overUse))
	h.poll(2, time.Second, int64(overUse))
	h.poll(3, 2*time.Second, int64(underUse))

	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(h.log.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line %q is not JSON: %v", l, err)
		}
		if m["audit"] == true {
			lines = append(lines, m)
		}
	}
	want := []struct{ action, result string }{{"reject_annotation", "rejected"}, {"freeze", "ok"}, {"thaw", "ok"}}
	if len(lines) != len(want) {
		t.Fatalf("audit lines = %v, want %d", lines, len(want))
	}
	for i, w := range want {
		l := lines[i]
		if l["action"] != w.action || l["result"] != w.result || l["namespace"] != testNS || l["pod"] != testPod ||
			l["container"] != testCtr || l["gpu_uuid"] != testGPU || l["quota_bytes"] != float64(quota) ||
			l["usage_bytes"] == nil || l["msg"] != "enforcement action" {
			t.Errorf("audit line %d = %v, want action %s result %s and pod, container, gpu, quota, usage", i, l, w.action, w.result)
		}
	}
	if !strings.Contains(lines[0]["reason"].(string), `"kill" is not in [observe freeze]`) {
		t.Errorf("rejection reason %q does not say why", lines[0]["reason"])
	}
	if got := strings.Join(h.events.reasons(), ","); got != "EnforcementAnnotationRejected,GPUMemoryOverQuotaFrozen,GPUMemoryThawed" {
		t.Errorf("events = %s", got)
	}
	exp := `
# HELP visionslice_enforcement_actions_total Enforcement actions taken or refused, by action and result.
# TYPE visionslice_enforcement_actions_total counter
visionslice_enforcement_actions_total{action="freeze",result="ok"} 1
visionslice_enforcement_actions_total{action="reject_annotation",result="rejected"} 1
visionslice_enforcement_actions_total{action="thaw",result="ok"} 1
# HELP visionslice_enforcement_frozen_containers Containers frozen for a GPU memory overrun right now.
# TYPE visionslice_enforcement_frozen_containers gauge
visionslice_enforcement_frozen_containers 0
# HELP visionslice_gpu_overruns_total Times a container's GPU memory went over its slice quota (after hysteresis), by GPU.
# TYPE visionslice_gpu_overruns_total counter
visionslice_gpu_overruns_total{gpu_uuid="` + testGPU + `"} 1
`
	if err := testutil.GatherAndCompare(h.reg, strings.NewReader(exp)); err != nil {
		t.Fatal(err)
	}
	if problems, err := testutil.GatherAndLint(h.reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %+v", err, problems)
	}
}

func TestFailedActionIsAudited(t *testing.T) {
	t.Parallel()
	h := newHarness(t, policy(func(c *Config) { c.DefaultAction = ActionFreeze }), nil)
	h.cg.Fail("freeze", cgrouptest.ErrInjected)
	h.poll(1, 0, int64(overUse))
	if got := strings.Join(h.actions(), ","); got != "freeze/failed" {
		t.Fatalf("audit = %s, want freeze/failed", got)
	}
	if !strings.Contains(h.recs[0].Reason, "injected failure") {
		t.Errorf("reason %q does not carry the error", h.recs[0].Reason)
	}
	// No v2 path (cgroup v1 only node): failed, with the reason.
	h2 := newHarness(t, policy(func(c *Config) { c.DefaultAction = ActionKill }), nil)
	r := &accounting.Report{Seq: 1, Time: h2.base, Groups: []accounting.Usage{{Kind: gpu.GroupContainer, GPUUUID: testGPU,
		Identity: accounting.Identity{Namespace: testNS, Pod: testPod, Container: testCtr}, QuotaBytes: quota, UsageBytes: overUse}}}
	h2.e.Evaluate(r, h2.base)
	if len(h2.recs) != 1 || h2.recs[0].Result != ResultFailed || !strings.Contains(h2.recs[0].Reason, "cgroup v1 only") {
		t.Fatalf("records = %+v", h2.recs)
	}
}

func TestPolicyValidateAndSet(t *testing.T) {
	t.Parallel()
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatalf("default: %v", err)
	}
	bad := []struct {
		name string
		mut  func(*Config)
		want string
	}{
		{"default not allowed", func(c *Config) { c.DefaultAction = ActionKill }, "not in allowedActions"},
		{"unknown allowed", func(c *Config) { c.AllowedActions = append(c.AllowedActions, "pause") }, `"pause"`},
		{"no allowed", func(c *Config) { c.AllowedActions = nil }, "at least one"},
		{"unknown default", func(c *Config) { c.DefaultAction = "" }, "defaultAction"},
		{"ratio", func(c *Config) { c.Hysteresis.ReleaseRatio = 1.5 }, "releaseRatio"},
		{"grace", func(c *Config) { c.GracePeriod = -1 }, "gracePeriod"},
		{"check", func(c *Config) { c.CheckInterval = 0 }, "checkInterval"},
	}
	for _, tc := range bad {
		c := DefaultConfig()
		tc.mut(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Validate() = %v, want %q", tc.name, err, tc.want)
		}
	}

	// SetPolicy applies live: the same overrun is observed, then killed.
	h := newHarness(t, policy(nil), nil)
	h.poll(1, 0, int64(overUse))
	if err := h.e.SetPolicy(policy(func(c *Config) { c.DefaultAction = "nope" })); err == nil {
		t.Fatal("SetPolicy accepted an invalid policy")
	}
	if err := h.e.SetPolicy(policy(func(c *Config) { c.DefaultAction = ActionKill })); err != nil {
		t.Fatal(err)
	}
	h.poll(2, time.Second, int64(underUse))
	h.poll(3, 2*time.Second, int64(overUse))
	if got := strings.Join(h.actions(), ","); got != "observe/ok,kill/ok" {
		t.Fatalf("audit = %s, want observe/ok,kill/ok", got)
	}
}
