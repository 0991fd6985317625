// Package controlplane runs a real Kubernetes control plane for tests: etcd,
// kube-apiserver and kube-scheduler, built from the Go module proxy by
// test/k8s/build-tools.sh, on free loopback ports, with a throwaway PKI made in
// Go. Authentication is by client certificate, authorization RBAC and Node, as
// in a real cluster. No controller-manager and no kubelet run: tests create the
// Nodes and each namespace's default ServiceAccount themselves (CreateNode,
// CreateNamespace). Everything started is stopped and removed by t.Cleanup.
package controlplane

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	schedconfigv1 "k8s.io/kube-scheduler/config/v1"
)

// EnvBinDir names the environment variable that points at the directory with
// etcd, kube-apiserver and kube-scheduler (the Makefile sets it).
const EnvBinDir = "VISIONSLICE_K8S_BIN"

// Options configure Start.
type Options struct {
	// BinDir holds etcd, kube-apiserver and kube-scheduler. Required: see
	// RequireBinaries.
	BinDir string
	// Extenders are added to the KubeSchedulerConfiguration as written.
	Extenders []schedconfigv1.Extender
	// NoScheduler starts only etcd and kube-apiserver.
	NoScheduler bool
	// APIServerArgs are appended to kube-apiserver's flags.
	APIServerArgs []string
	// StartTimeout bounds the wait for every component to be ready (default 2 min:
	// a loaded 2-core CI machine is slow to start an apiserver).
	StartTimeout time.Duration
}

// ControlPlane is a running control plane.
type ControlPlane struct {
	// Dir holds the PKI, the kubeconfig, etcd's data and the components' logs.
	Dir string
	// Kubeconfig is the path of an admin kubeconfig (group system:masters).
	Kubeconfig string
	// Config is the admin client configuration.
	Config *rest.Config
	// Client is an admin clientset.
	Client kubernetes.Interface
	// APIServerURL is https://127.0.0.1:<port>.
	APIServerURL string

	binDir string
	procs  []*process // in start order
}

// RequireBinaries returns the directory of the control-plane binaries: $VISIONSLICE_K8S_BIN
// when set, else the cache that build-tools.sh fills, when it is up to date.
// Without them the test is skipped with the command that builds them.
func RequireBinaries(t testing.TB) string {
	t.Helper()
	if dir := os.Getenv(EnvBinDir); dir != "" {
		for _, b := range []string{"etcd", "kube-apiserver", "kube-scheduler"} {
			if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
				t.Fatalf("%s=%s lacks %s: run `make k8s-tools`: %v", EnvBinDir, dir, b, err)
			}
		}
		return dir
	}
	_, self, _, ok := runtime.Caller(0)
	if !ok {
		t.Skipf("control-plane binaries: %s is unset; run `make k8s-tools` and set it", EnvBinDir)
	}
	script := filepath.Join(filepath.Dir(self), "..", "build-tools.sh")
	out, err := exec.Command("bash", script, "--check").Output()
	if err != nil {
		t.Skipf("control-plane binaries are not built (%s --check: %v): run `make k8s-tools` or set %s", script, err, EnvBinDir)
	}
	return strings.TrimSpace(string(out))
}

// Start runs etcd, kube-apiserver and (unless opts.NoScheduler) kube-scheduler
// and waits until each is ready. It fails the test if any cannot start.
func Start(t testing.TB, opts Options) *ControlPlane {
	t.Helper()
	if opts.BinDir == "" {
		t.Fatal("controlplane.Start: Options.BinDir is empty (use RequireBinaries)")
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 2 * time.Minute
	}
	dir, err := os.MkdirTemp("", "visionslice-controlplane-")
	if err != nil {
		t.Fatal(err)
	}
	cp := &ControlPlane{Dir: dir, binDir: opts.BinDir}
	t.Cleanup(func() {
		cp.stop(t)
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove control plane dir: %v", err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), opts.StartTimeout)
	defer cancel()
	start := time.Now()
	if err := cp.start(ctx, opts); err != nil {
		t.Fatalf("start control plane: %v", err)
	}
	t.Logf("control plane ready in %s (apiserver %s)", time.Since(start).Round(time.Millisecond), cp.APIServerURL)
	return cp
}

func (cp *ControlPlane) start(ctx context.Context, opts Options) error {
	p, err := newPKI(cp.Dir)
	if err != nil {
		return err
	}
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdClient, etcdPeer, apiPort := ports[0], ports[1], ports[2]

	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdClient)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(etcdPeer)
	etcd, err := cp.run("etcd", filepath.Join(opts.BinDir, "etcd"),
		"--name=default",
		"--data-dir="+filepath.Join(cp.Dir, "etcd-data"),
		"--listen-client-urls="+etcdURL,
		"--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=default="+peerURL,
		"--unsafe-no-fsync=true", // throwaway data: fsync only slows tests
		"--log-level=warn",
	)
	if err != nil {
		return err
	}
	if err := etcd.waitReady(ctx, httpCheck(http.DefaultClient, etcdURL+"/health", `"health":"true"`)); err != nil {
		return err
	}

	cp.APIServerURL = "https://127.0.0.1:" + strconv.Itoa(apiPort)
	apiArgs := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(apiPort),
		"--cert-dir=" + filepath.Join(cp.Dir, "apiserver-certs"),
		"--tls-cert-file=" + p.servingCertFile,
		"--tls-private-key-file=" + p.servingKeyFile,
		"--client-ca-file=" + p.caFile,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.saPubFile,
		"--service-account-signing-key-file=" + p.saKeyFile,
		"--service-cluster-ip-range=10.96.0.0/16",
		"--authorization-mode=Node,RBAC",
		"--allow-privileged=true",
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
	}
	api, err := cp.run("kube-apiserver", filepath.Join(opts.BinDir, "kube-apiserver"), append(apiArgs, opts.APIServerArgs...)...)
	if err != nil {
		return err
	}
	cp.Config = &rest.Config{
		Host: cp.APIServerURL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   p.caPEM,
			CertData: p.adminCertPEM,
			KeyData:  p.adminKeyPEM,
		},
		QPS:   200,
		Burst: 400,
	}
	if cp.Client, err = kubernetes.NewForConfig(cp.Config); err != nil {
		return fmt.Errorf("admin client: %w", err)
	}
	if err := api.waitReady(ctx, func(ctx context.Context) error {
		body, err := cp.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return err
		}
		if string(body) != "ok" {
			return fmt.Errorf("%w: /readyz says %q", errNotReady, body)
		}
		return nil
	}); err != nil {
		return err
	}
	if cp.Kubeconfig, err = cp.writeKubeconfig(); err != nil {
		return err
	}
	if opts.NoScheduler {
		return nil
	}

	cfg := map[string]any{}
	if len(opts.Extenders) > 0 {
		cfg["extenders"] = opts.Extenders
	}
	return cp.startScheduler(ctx, cfg)
}

// StartScheduler starts kube-scheduler (after Start with NoScheduler) with
// config as its KubeSchedulerConfiguration: typically a shipped file with its
// extender URLs pointed at the test's extender. The harness sets apiVersion,
// kind, clientConnection and leaderElection (off).
func (cp *ControlPlane) StartScheduler(t testing.TB, config map[string]any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := cp.startScheduler(ctx, config); err != nil {
		t.Fatalf("start kube-scheduler: %v", err)
	}
}

func (cp *ControlPlane) startScheduler(ctx context.Context, config map[string]any) error {
	ports, err := freePorts(1)
	if err != nil {
		return err
	}
	schedCfg, err := cp.writeSchedulerConfig(config)
	if err != nil {
		return err
	}
	sched, err := cp.run("kube-scheduler", filepath.Join(cp.binDir, "kube-scheduler"),
		"--config="+schedCfg,
		"--bind-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(ports[0]),
		"--authentication-kubeconfig="+cp.Kubeconfig,
		"--authorization-kubeconfig="+cp.Kubeconfig,
		"--v=2",
	)
	if err != nil {
		return err
	}
	// The scheduler serves a self-signed certificate made in memory.
	insecure := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // loopback, self-signed
	return sched.waitReady(ctx, httpCheck(insecure, "https://127.0.0.1:"+strconv.Itoa(ports[0])+"/readyz", "ok"))
}

func (cp *ControlPlane) run(name, bin string, args ...string) (*process, error) {
	p, err := startProcess(cp.Dir, name, bin, args...)
	if err != nil {
		return nil, err
	}
	cp.procs = append(cp.procs, p)
	return p, nil
}

func (cp *ControlPlane) writeKubeconfig() (string, error) {
	path := filepath.Join(cp.Dir, "admin.kubeconfig")
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["test"] = &clientcmdapi.Cluster{Server: cp.APIServerURL, CertificateAuthorityData: cp.Config.CAData}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: cp.Config.CertData, ClientKeyData: cp.Config.KeyData}
	cfg.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "admin"}
	cfg.CurrentContext = "test"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return "", fmt.Errorf("write kubeconfig: %w", err)
	}
	return path, nil
}

// writeSchedulerConfig writes a KubeSchedulerConfiguration (JSON is YAML):
// base with the admin kubeconfig and no leader election.
func (cp *ControlPlane) writeSchedulerConfig(base map[string]any) (string, error) {
	cfg := map[string]any{}
	for k, v := range base {
		cfg[k] = v
	}
	cfg["apiVersion"] = "kubescheduler.config.k8s.io/v1"
	cfg["kind"] = "KubeSchedulerConfiguration"
	cfg["clientConnection"] = map[string]any{"kubeconfig": cp.Kubeconfig, "qps": 100, "burst": 200}
	cfg["leaderElection"] = map[string]any{"leaderElect": false}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return "", fmt.Errorf("marshal scheduler config: %w", err)
	}
	path := filepath.Join(cp.Dir, "kube-scheduler.yaml")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return "", fmt.Errorf("write scheduler config: %w", err)
	}
	return path, nil
}

// stop ends the components in reverse start order; on a failed test it logs
// the end of each component's log first.
func (cp *ControlPlane) stop(t testing.TB) {
	for i := len(cp.procs) - 1; i >= 0; i-- {
		p := cp.procs[i]
		if t.Failed() {
			t.Logf("--- %s log tail ---\n%s", p.name, p.tail(6000))
		}
		if err := p.stop(15 * time.Second); err != nil {
			t.Errorf("stop %s: %v", p.name, err)
		}
	}
}

func httpCheck(c *http.Client, url, want string) func(context.Context) error {
	return func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := c.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
			return fmt.Errorf("%w: %s: %s %q", errNotReady, url, resp.Status, body)
		}
		return nil
	}
}
