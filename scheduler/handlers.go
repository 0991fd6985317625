package scheduler

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	extenderv1 "k8s.io/kube-scheduler/extender/v1"

	"github.com/visionslice/visionslice/deviceplugin/slice"
	"github.com/visionslice/visionslice/scheduler/fit"
)

func (e *Extender) routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /filter", e.timed("filter", e.filter))
	mux.HandleFunc("POST /prioritize", e.timed("prioritize", e.prioritize))
	mux.HandleFunc("POST /bind", e.timed("bind", e.bind))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !e.ready() {
			http.Error(w, "pod view not synced", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(e.reg, promhttp.HandlerOpts{Registry: e.reg}))
	return mux
}

// verbFunc answers one verb: the HTTP status and the result to encode.
type verbFunc func(ctx context.Context, r *http.Request) (int, any)

func (e *Extender) timed(verb string, f verbFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		r.Body = http.MaxBytesReader(w, r.Body, e.cfg.MaxRequestBytes)
		code, res := f(r.Context(), r)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		if err := json.NewEncoder(w).Encode(res); err != nil {
			e.logger.Debug("write extender answer", "verb", verb, "err", err)
		}
		result := "ok"
		switch {
		case code >= 400 && code < 500:
			result = "bad_request"
		case code >= 500 || hasError(res):
			result = "error"
		}
		e.metrics.requests.WithLabelValues(verb, result).Inc()
		e.metrics.duration.WithLabelValues(verb).Observe(time.Since(start).Seconds())
	}
}

func hasError(res any) bool {
	switch r := res.(type) {
	case *extenderv1.ExtenderFilterResult:
		return r.Error != ""
	case *extenderv1.ExtenderBindingResult:
		return r.Error != ""
	case *errorBody:
		return true
	}
	return false
}

// errorBody answers a bad prioritize request, whose result type has no
// Error field.
type errorBody struct {
	Error string `json:"error"`
}

// decode reads a JSON body into v, mapping an oversized body to 413 and
// malformed JSON to 400.
func decode(r *http.Request, v any) (int, error) {
	dec := json.NewDecoder(r.Body)
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return http.StatusRequestEntityTooLarge, fmt.Errorf("request body larger than %d bytes", tooBig.Limit)
		}
		return http.StatusBadRequest, fmt.Errorf("malformed request body: %w", err)
	}
	return 0, nil
}

// nodeNames returns the candidate names from either form of ExtenderArgs.
func nodeNames(args *extenderv1.ExtenderArgs) ([]string, error) {
	if args.NodeNames != nil {
		return *args.NodeNames, nil
	}
	if args.Nodes != nil {
		names := make([]string, len(args.Nodes.Items))
		for i := range args.Nodes.Items {
			names[i] = args.Nodes.Items[i].Name
		}
		return names, nil
	}
	return nil, errors.New("request names no nodes: set nodenames (nodeCacheCapable) or nodes")
}

func readArgs(r *http.Request) (*extenderv1.ExtenderArgs, []string, int, error) {
	var args extenderv1.ExtenderArgs
	if code, err := decode(r, &args); err != nil {
		return nil, nil, code, err
	}
	if args.Pod == nil {
		return nil, nil, http.StatusBadRequest, errors.New("request has no pod")
	}
	names, err := nodeNames(&args)
	if err != nil {
		return nil, nil, http.StatusBadRequest, err
	}
	return &args, names, 0, nil
}

func (e *Extender) filter(_ context.Context, r *http.Request) (int, any) {
	args, names, code, err := readArgs(r)
	if err != nil {
		return code, &extenderv1.ExtenderFilterResult{Error: err.Error()}
	}
	n := fit.PodSlices(args.Pod)
	failed := extenderv1.FailedNodesMap{}
	unresolvable := extenderv1.FailedNodesMap{}
	pass := make([]string, 0, len(names))
	now := e.now()
	var buf []fit.GPU
	for _, name := range names {
		if n == 0 {
			pass = append(pass, name) // not ours to judge
			continue
		}
		var v verdict
		v, buf = e.fits(name, n, now, buf)
		switch {
		case v.ok:
			pass = append(pass, name)
		case v.resolvable:
			failed[name] = v.reason
		default:
			unresolvable[name] = v.reason
		}
	}
	res := &extenderv1.ExtenderFilterResult{FailedNodes: failed, FailedAndUnresolvableNodes: unresolvable}
	if args.NodeNames != nil {
		res.NodeNames = &pass
	} else {
		keep := make(map[string]bool, len(pass))
		for _, p := range pass {
			keep[p] = true
		}
		list := &v1.NodeList{}
		for i := range args.Nodes.Items {
			if keep[args.Nodes.Items[i].Name] {
				list.Items = append(list.Items, args.Nodes.Items[i])
			}
		}
		res.Nodes = list
	}
	return http.StatusOK, res
}

// verdict is filter's answer for one node. A node that fails is resolvable
// when preempting pods there could make room; otherwise (no usable metrics,
// no healthy GPU big enough) kube-scheduler need not try preemption on it.
type verdict struct {
	ok, resolvable bool
	reason         string
}

// fits judges n slices on node now. It returns buf for reuse.
func (e *Extender) fits(node string, n int, now time.Time, buf []fit.GPU) (verdict, []fit.GPU) {
	st := e.state(node, now, buf)
	if !st.known {
		if e.cfg.Staleness.Policy == FailOpen {
			return verdict{ok: true}, st.gpus
		}
		e.metrics.filtered.WithLabelValues(reasonNoMetrics).Inc()
		return verdict{reason: st.reason}, st.gpus
	}
	if _, ok, reason := fit.Place(st.gpus, n, e.cfg.Strategy, e.weights, extenderv1.MaxExtenderPriority); !ok {
		e.metrics.filtered.WithLabelValues(reasonNoFit).Inc()
		return verdict{reason: reason, resolvable: fit.Resolvable(st.gpus, n)}, st.gpus
	}
	return verdict{ok: true}, st.gpus
}

func (e *Extender) prioritize(_ context.Context, r *http.Request) (int, any) {
	args, names, code, err := readArgs(r)
	if err != nil {
		return code, &errorBody{Error: err.Error()}
	}
	n := fit.PodSlices(args.Pod)
	now := e.now()
	list := make(extenderv1.HostPriorityList, len(names))
	var buf []fit.GPU
	for i, name := range names {
		list[i].Host = name
		if n == 0 {
			continue
		}
		st := e.state(name, now, buf)
		buf = st.gpus
		if !st.known {
			continue
		}
		if c, ok, _ := fit.Place(st.gpus, n, e.cfg.Strategy, e.weights, extenderv1.MaxExtenderPriority); ok {
			list[i].Score = c.Score
		}
	}
	return http.StatusOK, &list
}

// ErrNoFit is returned when the node chosen by kube-scheduler can no longer
// hold the pod at bind (another pod took the room meanwhile).
var ErrNoFit = errors.New("node can no longer hold the pod")

func (e *Extender) bind(ctx context.Context, r *http.Request) (int, any) {
	var args extenderv1.ExtenderBindingArgs
	if code, err := decode(r, &args); err != nil {
		return code, &extenderv1.ExtenderBindingResult{Error: err.Error()}
	}
	if args.PodName == "" || args.PodNamespace == "" || args.PodUID == "" || args.Node == "" {
		return http.StatusBadRequest, &extenderv1.ExtenderBindingResult{
			Error: "bind request needs podName, podNamespace, podUID and node"}
	}
	log := e.logger.With("namespace", args.PodNamespace, "pod", args.PodName, "node", args.Node)
	gpu, err := e.Bind(ctx, args)
	if err != nil {
		result := "error"
		if errors.Is(err, ErrNoFit) {
			result = "no_fit"
		}
		e.metrics.binds.WithLabelValues(result).Inc()
		log.Warn("bind failed", "err", err)
		return http.StatusOK, &extenderv1.ExtenderBindingResult{Error: err.Error()}
	}
	e.metrics.binds.WithLabelValues("ok").Inc()
	log.Info("pod bound", "gpu_uuid", gpu)
	return http.StatusOK, &extenderv1.ExtenderBindingResult{}
}

// Bind picks the GPU on args.Node, writes the signed record into the pod's
// annotations, then binds the pod to the node. It returns the GPU chosen
// ("" for a pod that requests no slices).
func (e *Extender) Bind(ctx context.Context, args extenderv1.ExtenderBindingArgs) (string, error) {
	client := e.deps.Client
	if client == nil {
		return "", errors.New("bind is not available: the extender has no API server client")
	}
	pod, err := client.CoreV1().Pods(args.PodNamespace).Get(ctx, args.PodName, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("get pod: %w", err)
	}
	if pod.UID != args.PodUID {
		return "", fmt.Errorf("pod uid is %s, the request names %s: the pod was replaced", pod.UID, args.PodUID)
	}
	bindPod := func() error {
		binding := &v1.Binding{
			ObjectMeta: metav1.ObjectMeta{Name: args.PodName, Namespace: args.PodNamespace, UID: args.PodUID},
			Target:     v1.ObjectReference{Kind: "Node", Name: args.Node},
		}
		if err := client.CoreV1().Pods(args.PodNamespace).Bind(ctx, binding, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create binding: %w", err)
		}
		return nil
	}
	n := fit.PodSlices(pod)
	if n == 0 {
		return "", bindPod()
	}

	e.bindMu.Lock()
	defer e.bindMu.Unlock()
	now := e.now()
	st := e.state(args.Node, now, nil)
	if !st.known {
		if e.cfg.Staleness.Policy == FailClosed {
			return "", fmt.Errorf("%w: %s", ErrNoFit, st.reason)
		}
		// failOpen with no GPU inventory at all: bind without a record,
		// and the node's device plugin places the slices by its own policy.
		e.logger.Warn("binding without a gpu record", "namespace", args.PodNamespace, "pod", args.PodName,
			"node", args.Node, "reason", st.reason)
		return "", bindPod()
	}
	choice, ok, reason := fit.Place(st.gpus, n, e.cfg.Strategy, e.weights, extenderv1.MaxExtenderPriority)
	if !ok {
		return "", fmt.Errorf("%w: %s", ErrNoFit, reason)
	}
	g := choice.GPU
	e.assumed.add(assumed{podUID: string(pod.UID), node: args.Node, gpu: g.UUID, slices: n, at: now,
		expectedAllocated: g.Allocated + g.Assumed + n})

	a := slice.Assignment{PodUID: string(pod.UID), Node: args.Node, GPU: g.UUID}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{
		"uid": string(pod.UID), // precondition: patch this pod, not a namesake
		"annotations": map[string]string{
			slice.AnnotationAssignedGPU:         a.GPU,
			slice.AnnotationAssignedNode:        a.Node,
			slice.AnnotationAssignmentSignature: a.Sign(e.deps.Key),
		},
	}})
	if err != nil {
		e.assumed.remove(string(pod.UID))
		return "", fmt.Errorf("encode record patch: %w", err)
	}
	if _, err := client.CoreV1().Pods(args.PodNamespace).Patch(ctx, args.PodName, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		e.assumed.remove(string(pod.UID))
		return "", fmt.Errorf("write gpu record: %w", err)
	}
	if err := bindPod(); err != nil {
		e.assumed.remove(string(pod.UID))
		return "", err
	}
	return g.UUID, nil
}
