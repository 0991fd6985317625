// Package podresourcestest serves the kubelet's pod-resources API
// (k8s.io/kubelet/pkg/apis/podresources/v1) from a real gRPC server on a unix
// socket, with contents a test sets. Tests of the device plugin and of
// enforcement use it in place of a kubelet.
package podresourcestest

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	v1 "k8s.io/kubelet/pkg/apis/podresources/v1"

	"github.com/visionslice/visionslice/nodeagent/podresources"
)

// Server is a pod-resources server. Its methods are safe for concurrent use.
type Server struct {
	v1.UnimplementedPodResourcesListerServer

	path string
	srv  *grpc.Server

	mu          sync.Mutex
	containers  []podresources.ContainerDevices
	allocatable map[string][]string
	err         error

	listCalls        atomic.Int64
	allocatableCalls atomic.Int64
}

var _ v1.PodResourcesListerServer = (*Server)(nil)

// New starts a server on a socket in a fresh short temporary folder (unix
// socket paths are limited to 108 bytes, which long test names overrun in
// t.TempDir()). It stops and removes the folder when the test ends.
func New(tb testing.TB) *Server {
	tb.Helper()
	dir, err := os.MkdirTemp("", "podres-")
	if err != nil {
		tb.Fatalf("podresourcestest: make temp dir: %v", err)
	}
	tb.Cleanup(func() { _ = os.RemoveAll(dir) })
	return NewAt(tb, filepath.Join(dir, "kubelet.sock"))
}

// NewAt starts a server on the unix socket at path; it stops and removes the
// socket when the test ends.
func NewAt(tb testing.TB, path string) *Server {
	tb.Helper()
	lis, err := net.Listen("unix", path)
	if err != nil {
		tb.Fatalf("podresourcestest: listen on %s: %v", path, err)
	}
	s := &Server{path: path, srv: grpc.NewServer(), allocatable: map[string][]string{}}
	v1.RegisterPodResourcesListerServer(s.srv, s)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.srv.Serve(lis)
	}()
	tb.Cleanup(func() {
		s.Stop()
		<-done
	})
	return s
}

// Socket is the path of the server's unix socket.
func (s *Server) Socket() string { return s.path }

// Stop stops serving and removes the socket. It is safe to call twice.
func (s *Server) Stop() {
	s.srv.Stop()
	_ = os.Remove(s.path)
}

// SetContainers sets what List reports. Entries of the same namespace and pod
// are grouped into one pod, and of the same container into one container, as
// the kubelet does.
func (s *Server) SetContainers(cs []podresources.ContainerDevices) {
	cp := make([]podresources.ContainerDevices, len(cs))
	for i, c := range cs {
		c.DeviceIDs = append([]string(nil), c.DeviceIDs...)
		cp[i] = c
	}
	s.mu.Lock()
	s.containers = cp
	s.mu.Unlock()
}

// SetAllocatable sets what GetAllocatableResources reports: device IDs by
// resource name.
func (s *Server) SetAllocatable(m map[string][]string) {
	cp := make(map[string][]string, len(m))
	for k, v := range m {
		cp[k] = append([]string(nil), v...)
	}
	s.mu.Lock()
	s.allocatable = cp
	s.mu.Unlock()
}

// SetError makes every call fail with err (a gRPC status error is returned as
// is); nil restores normal answers.
func (s *Server) SetError(err error) {
	s.mu.Lock()
	s.err = err
	s.mu.Unlock()
}

// ListCalls and AllocatableCalls count the calls served so far.
func (s *Server) ListCalls() int64        { return s.listCalls.Load() }
func (s *Server) AllocatableCalls() int64 { return s.allocatableCalls.Load() }

// List implements v1.PodResourcesListerServer.
func (s *Server) List(context.Context, *v1.ListPodResourcesRequest) (*v1.ListPodResourcesResponse, error) {
	s.listCalls.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	type podKey struct{ ns, name string }
	pods := map[podKey]*v1.PodResources{}
	ctrs := map[podKey]map[string]*v1.ContainerResources{}
	var order []podKey
	for _, c := range s.containers {
		k := podKey{c.Namespace, c.Pod}
		p, ok := pods[k]
		if !ok {
			p = &v1.PodResources{Namespace: c.Namespace, Name: c.Pod}
			pods[k] = p
			ctrs[k] = map[string]*v1.ContainerResources{}
			order = append(order, k)
		}
		cr, ok := ctrs[k][c.Container]
		if !ok {
			cr = &v1.ContainerResources{Name: c.Container}
			ctrs[k][c.Container] = cr
			p.Containers = append(p.Containers, cr)
		}
		cr.Devices = append(cr.Devices, &v1.ContainerDevices{
			ResourceName: c.ResourceName,
			DeviceIds:    append([]string(nil), c.DeviceIDs...),
		})
	}
	resp := &v1.ListPodResourcesResponse{}
	for _, k := range order {
		resp.PodResources = append(resp.PodResources, pods[k])
	}
	return resp, nil
}

// GetAllocatableResources implements v1.PodResourcesListerServer.
func (s *Server) GetAllocatableResources(context.Context, *v1.AllocatableResourcesRequest) (*v1.AllocatableResourcesResponse, error) {
	s.allocatableCalls.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	names := make([]string, 0, len(s.allocatable))
	for n := range s.allocatable {
		names = append(names, n)
	}
	sort.Strings(names)
	resp := &v1.AllocatableResourcesResponse{}
	for _, n := range names {
		resp.Devices = append(resp.Devices, &v1.ContainerDevices{
			ResourceName: n,
			DeviceIds:    append([]string(nil), s.allocatable[n]...),
		})
	}
	return resp, nil
}
