// Package manifests_test validates manifests/ against a real kube-apiserver:
// every kustomization is rendered with the kustomize API (no kubectl) and
// every object is applied with server-side dry-run and strict field
// validation, so a misspelt field, a bad enum value or a broken patch fails
// here, not on a cluster. The Prometheus Operator kinds are validated against
// CRD fixtures in test/k8s/testdata/crds. Cross-file facts (the real agent
// binary accepts its ConfigMap with the DaemonSet's arguments; the DaemonSet's
// grace period and probe port agree with that config) are checked too.
//
// The agent is run as a binary, not imported: kustomize links Go's plugin
// package, which makes the test binary bind all symbols at start, and
// go-nvml's symbols only resolve on a host with the NVIDIA driver.
package manifests_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/kustomize/api/krusty"
	kusttypes "sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/visionslice/visionslice/test/k8s/controlplane"
	"github.com/visionslice/visionslice/test/k8s/gobuild"
)

const (
	manifestsDir = "../../../manifests"
	crdFixtures  = "../testdata/crds"
	fieldManager = "visionslice-manifests-test"
)

// notObjects are folders of manifests/ that hold no Kubernetes objects.
var notObjects = []string{"docker", "local"}

// manifestSet is one unit that a user applies: a kustomization folder
// (rendered) or a plain YAML file outside any kustomization.
type manifestSet struct {
	name string // path relative to manifests/
	path string
	kust bool
}

func (s manifestSet) objects(t *testing.T) []*unstructured.Unstructured {
	t.Helper()
	if s.kust {
		return render(t, s.path)
	}
	b, err := os.ReadFile(s.path)
	if err != nil {
		t.Fatal(err)
	}
	return decodeAll(t, b)
}

// sets finds every kustomization folder and every YAML file outside one.
func sets(t *testing.T) []manifestSet {
	t.Helper()
	var out []manifestSet
	err := filepath.WalkDir(manifestsDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(manifestsDir, path)
		if d.IsDir() {
			if slices.Contains(notObjects, rel) {
				return filepath.SkipDir
			}
			if isKustomization(path) {
				out = append(out, manifestSet{name: rel, path: path, kust: true})
			}
			return nil
		}
		if ext := filepath.Ext(path); (ext == ".yaml" || ext == ".yml") && !isKustomization(filepath.Dir(path)) {
			out = append(out, manifestSet{name: rel, path: path})
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", manifestsDir, err)
	}
	if len(out) == 0 {
		t.Fatalf("no manifests found under %s", manifestsDir)
	}
	return out
}

func isKustomization(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, "kustomization.yaml"))
	return err == nil
}

// render builds a kustomization as `kustomize build` does.
func render(t *testing.T, dir string) []*unstructured.Unstructured {
	t.Helper()
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), abs)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	var out []*unstructured.Unstructured
	for _, r := range rm.Resources() {
		// Through JSON: the unstructured form wants int64 and float64.
		b, err := r.MarshalJSON()
		if err != nil {
			t.Fatalf("kustomize build %s: %v", dir, err)
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(b); err != nil {
			t.Fatalf("kustomize build %s: %s: %v", dir, r.CurId(), err)
		}
		out = append(out, u)
	}
	return out
}

func decodeAll(t *testing.T, b []byte) []*unstructured.Unstructured {
	t.Helper()
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	var out []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return out
			}
			t.Fatalf("decode manifest: %v", err)
		}
		if len(m) > 0 {
			out = append(out, &unstructured.Unstructured{Object: m})
		}
	}
}

// applier applies objects to the control plane with server-side apply.
type applier struct {
	cp     *controlplane.ControlPlane
	dyn    dynamic.Interface
	mapper *restmapper.DeferredDiscoveryRESTMapper
}

func newApplier(t *testing.T, cp *controlplane.ControlPlane) *applier {
	t.Helper()
	dyn, err := dynamic.NewForConfig(cp.Config)
	if err != nil {
		t.Fatal(err)
	}
	return &applier{cp: cp, dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(cp.Client.Discovery()))}
}

func (a *applier) apply(ctx context.Context, obj *unstructured.Unstructured, dryRun bool) error {
	gvk := obj.GroupVersionKind()
	mapping, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if meta.IsNoMatchError(err) {
		a.mapper.Reset() // a CRD installed since discovery was cached
		mapping, err = a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	}
	if err != nil {
		return err
	}
	var ri dynamic.ResourceInterface = a.dyn.Resource(mapping.Resource)
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		ns := obj.GetNamespace()
		if ns == "" {
			ns = metav1.NamespaceDefault
		}
		ri = a.dyn.Resource(mapping.Resource).Namespace(ns)
	}
	data, err := json.Marshal(obj)
	if err != nil {
		return err
	}
	opts := metav1.PatchOptions{FieldManager: fieldManager, Force: new(true), FieldValidation: metav1.FieldValidationStrict}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	_, err = ri.Patch(ctx, obj.GetName(), types.ApplyPatchType, data, opts)
	return err
}

func describe(o *unstructured.Unstructured) string {
	s := o.GetKind() + " " + o.GetName()
	if ns := o.GetNamespace(); ns != "" {
		s = o.GetKind() + " " + ns + "/" + o.GetName()
	}
	return s
}

// installCRDs creates the CRD fixtures for real and waits until they serve.
func installCRDs(ctx context.Context, t *testing.T, a *applier) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(crdFixtures, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no CRD fixtures in %s (%v)", crdFixtures, err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range decodeAll(t, b) {
			if err := a.apply(ctx, o, false); err != nil {
				t.Fatalf("install CRD fixture %s: %v", o.GetName(), err)
			}
			waitEstablished(ctx, t, a, o.GetName())
		}
	}
}

func waitEstablished(ctx context.Context, t *testing.T, a *applier, name string) {
	t.Helper()
	gvr := apiextensionsv1.SchemeGroupVersion.WithResource("customresourcedefinitions")
	err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		u, err := a.dyn.Resource(gvr).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		var crd apiextensionsv1.CustomResourceDefinition
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &crd); err != nil {
			return false, err
		}
		for _, c := range crd.Status.Conditions {
			if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("CRD %s not established: %v", name, err)
	}
}

// TestManifests_ServerSideDryRun applies every manifest set to a real
// apiserver: namespaces are created for real (objects cannot be dry-run into
// a namespace that does not exist), everything else with dry-run.
func TestManifests_ServerSideDryRun(t *testing.T) {
	cp := controlplane.Start(t, controlplane.Options{BinDir: controlplane.RequireBinaries(t), NoScheduler: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	a := newApplier(t, cp)
	installCRDs(ctx, t, a)

	for _, set := range sets(t) {
		t.Run(set.name, func(t *testing.T) {
			objs := set.objects(t)
			if len(objs) == 0 {
				t.Fatalf("%s holds no objects", set.name)
			}
			for _, o := range objs {
				if o.GetKind() == "Namespace" {
					if err := a.apply(ctx, o, false); err != nil {
						t.Errorf("%s: %v", describe(o), err)
					}
				}
			}
			for _, o := range objs {
				if err := a.apply(ctx, o, true); err != nil {
					t.Errorf("%s (server-side dry-run): %v", describe(o), err)
				}
			}
			t.Logf("%d objects valid: %s", len(objs), kinds(objs))
		})
	}

	// Negative controls: the validation above would have refused a misspelt
	// field in a built-in kind and a malformed duration in a CRD kind.
	t.Run("refuses-broken-objects", func(t *testing.T) {
		var ds, pm *unstructured.Unstructured
		for _, o := range render(t, filepath.Join(manifestsDir, "overlays", "production")) {
			switch o.GetKind() {
			case "DaemonSet":
				ds = o.DeepCopy()
			case "PodMonitor":
				pm = o.DeepCopy()
			}
		}
		if ds == nil || pm == nil {
			t.Fatal("overlays/production lacks the agent DaemonSet or the PodMonitor")
		}
		if err := unstructured.SetNestedField(ds.Object, true, "spec", "template", "spec", "hostPid"); err != nil {
			t.Fatal(err)
		}
		if err := a.apply(ctx, ds, true); err == nil || !strings.Contains(err.Error(), "hostPid") {
			t.Errorf("DaemonSet with a misspelt hostPid: err = %v, want a strict-validation error naming it", err)
		}
		eps, _, _ := unstructured.NestedSlice(pm.Object, "spec", "podMetricsEndpoints")
		eps[0].(map[string]any)["interval"] = "15 seconds"
		if err := unstructured.SetNestedSlice(pm.Object, eps, "spec", "podMetricsEndpoints"); err != nil {
			t.Fatal(err)
		}
		if err := a.apply(ctx, pm, true); err == nil || !strings.Contains(err.Error(), "interval") {
			t.Errorf("PodMonitor with interval \"15 seconds\": err = %v, want a schema error naming interval", err)
		}
	})
}

func kinds(objs []*unstructured.Unstructured) string {
	var ks []string
	for _, o := range objs {
		ks = append(ks, o.GetKind())
	}
	slices.Sort(ks)
	return strings.Join(slices.Compact(ks), ", ")
}

// TestManifests_EveryFileInAKustomization: a YAML or JSON file inside a
// kustomization folder that its kustomization.yaml does not name is never
// applied (nor validated): refuse it.
func TestManifests_EveryFileInAKustomization(t *testing.T) {
	for _, set := range sets(t) {
		if !set.kust {
			continue
		}
		b, err := os.ReadFile(filepath.Join(set.path, "kustomization.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		var k kusttypes.Kustomization
		if err := yaml.UnmarshalStrict(b, &k); err != nil {
			t.Errorf("%s/kustomization.yaml: %v", set.name, err)
			continue
		}
		named := map[string]bool{}
		for _, r := range k.Resources {
			named[filepath.Clean(r)] = true
		}
		for _, p := range k.Patches {
			named[filepath.Clean(p.Path)] = true
		}
		for _, g := range k.ConfigMapGenerator {
			for _, f := range g.FileSources {
				_, file, _ := strings.Cut(f, "=")
				if file == "" {
					file = f
				}
				named[filepath.Clean(file)] = true
			}
		}
		entries, err := os.ReadDir(set.path)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			ext := filepath.Ext(e.Name())
			if e.IsDir() || e.Name() == "kustomization.yaml" || (ext != ".yaml" && ext != ".yml" && ext != ".json") {
				continue
			}
			if !named[e.Name()] {
				t.Errorf("%s/%s is not named by its kustomization.yaml: it would never be applied", set.name, e.Name())
			}
		}
	}
}

// TestManifests_AgentConfigAgreesWithDaemonSet: in every kustomization that
// ships the agent, the real agent binary accepts the ConfigMap's agent.yaml
// with the DaemonSet's own arguments (--check-config: the agent's strict
// parser and validation), the DaemonSet's grace period exceeds the agent's
// shutdown timeout, and its probes use the port the agent serves /healthz and
// /readyz on.
func TestManifests_AgentConfigAgreesWithDaemonSet(t *testing.T) {
	var agent string
	checked := 0
	for _, set := range sets(t) {
		if !set.kust {
			continue
		}
		var cfgData string
		var ds *appsv1.DaemonSet
		for _, o := range set.objects(t) {
			switch {
			case o.GetKind() == "ConfigMap" && o.GetName() == "visionslice-agent":
				cfgData, _, _ = unstructured.NestedString(o.Object, "data", "agent.yaml")
			case o.GetKind() == "DaemonSet" && o.GetName() == "visionslice-agent":
				ds = &appsv1.DaemonSet{}
				if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, ds); err != nil {
					t.Fatalf("%s: DaemonSet: %v", set.name, err)
				}
			}
		}
		if ds == nil && cfgData == "" {
			continue
		}
		if agent == "" {
			// The image installs the worker beside the agent, where the
			// agent looks for it.
			agent = filepath.Join(gobuild.Commands(t, "visionslice-agent", "visionslice-worker"), "visionslice-agent")
		}
		t.Run(set.name, func(t *testing.T) {
			checked++
			if ds == nil || cfgData == "" {
				t.Fatalf("ships the agent DaemonSet (%v) or its ConfigMap (%v) without the other", ds != nil, cfgData != "")
			}
			spec := ds.Spec.Template.Spec
			shutdown, listen := checkAgentConfig(t, agent, spec.Containers[0].Args, cfgData)
			if spec.TerminationGracePeriodSeconds == nil || time.Duration(*spec.TerminationGracePeriodSeconds)*time.Second <= shutdown {
				t.Errorf("terminationGracePeriodSeconds %v must exceed the agent's shutdownTimeout %s", deref(spec.TerminationGracePeriodSeconds), shutdown)
			}
			_, port, _ := strings.Cut(listen, ":")
			for name, p := range map[string]*corev1.Probe{"liveness": spec.Containers[0].LivenessProbe, "readiness": spec.Containers[0].ReadinessProbe} {
				got := probe(p, spec.Containers[0].Ports)
				if got == nil {
					t.Errorf("agent container has no HTTP %s probe", name)
					continue
				}
				if got.port != port {
					t.Errorf("agent %s probe on port %s, the agent serves /healthz and /readyz on %s", name, got.port, port)
				}
			}
		})
	}
	if checked == 0 {
		t.Fatal("no kustomization ships the agent")
	}
}

var (
	shutdownRE = regexp.MustCompile(`ShutdownTimeout:(\S+)`)
	listenRE   = regexp.MustCompile(`Metrics:\{Listen:(\S*?)[ }]`)
)

// checkAgentConfig runs the agent with the DaemonSet's arguments, its
// --config pointing at cfgData, and --check-config; it returns the resolved
// shutdown timeout and metrics address that the agent printed.
func checkAgentConfig(t *testing.T, agent string, args []string, cfgData string) (time.Duration, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(path, []byte(cfgData), 0o600); err != nil {
		t.Fatal(err)
	}
	var argv []string
	for _, a := range args {
		if strings.HasPrefix(a, "--config=") {
			a = "--config=" + path
		}
		argv = append(argv, a)
	}
	out, err := exec.Command(agent, append(argv, "--check-config")...).CombinedOutput()
	if err != nil {
		t.Fatalf("visionslice-agent %s --check-config refuses the ConfigMap: %v\n%s", strings.Join(argv, " "), err, out)
	}
	m1, m2 := shutdownRE.FindSubmatch(out), listenRE.FindSubmatch(out)
	if m1 == nil || m2 == nil {
		t.Fatalf("cannot find ShutdownTimeout and Metrics.Listen in the agent's --check-config output:\n%s", out)
	}
	d, err := time.ParseDuration(string(m1[1]))
	if err != nil {
		t.Fatalf("agent shutdown timeout %q: %v", m1[1], err)
	}
	return d, string(m2[1])
}

// probe returns an HTTP probe's path and port number (a named port resolved
// through the container's ports).
func probe(p *corev1.Probe, ports []corev1.ContainerPort) *struct{ path, port string } {
	if p == nil || p.HTTPGet == nil {
		return nil
	}
	port := p.HTTPGet.Port.String()
	for _, cp := range ports {
		if cp.Name == port {
			port = strconv.Itoa(int(cp.ContainerPort))
		}
	}
	return &struct{ path, port string }{p.HTTPGet.Path, port}
}

func deref(p *int64) any {
	if p == nil {
		return "unset"
	}
	return *p
}
