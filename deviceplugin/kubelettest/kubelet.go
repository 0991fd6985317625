// Package kubelettest serves the kubelet's device plugin Registration service
// (k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1) on a real unix socket, as
// the kubelet does on kubelet.sock, for tests of device plugins.
package kubelettest

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// Kubelet is a Registration server on <dir>/kubelet.sock.
type Kubelet struct {
	pluginapi.UnimplementedRegistrationServer

	path string
	srv  *grpc.Server
	regs chan *pluginapi.RegisterRequest
	done chan struct{}
	once sync.Once
}

// Start serves on <dir>/kubelet.sock until Stop or the end of the test.
func Start(tb testing.TB, dir string) *Kubelet {
	tb.Helper()
	path := filepath.Join(dir, "kubelet.sock")
	lis, err := net.Listen("unix", path)
	if err != nil {
		tb.Fatalf("kubelettest: listen: %v", err)
	}
	k := &Kubelet{path: path, srv: grpc.NewServer(), regs: make(chan *pluginapi.RegisterRequest, 16), done: make(chan struct{})}
	pluginapi.RegisterRegistrationServer(k.srv, k)
	go func() {
		defer close(k.done)
		_ = k.srv.Serve(lis)
	}()
	tb.Cleanup(k.Stop)
	return k
}

// Register implements pluginapi.RegistrationServer: it records the request.
func (k *Kubelet) Register(_ context.Context, r *pluginapi.RegisterRequest) (*pluginapi.Empty, error) {
	select {
	case k.regs <- r:
	default: // a test that stopped reading
	}
	return &pluginapi.Empty{}, nil
}

// Stop stops serving and removes the socket, as a kubelet restart does. It
// is safe to call twice.
func (k *Kubelet) Stop() {
	k.once.Do(func() {
		k.srv.Stop()
		<-k.done
		_ = os.Remove(k.path)
	})
}

// WaitRegistration returns the next registration, failing the test when none
// comes within limit.
func (k *Kubelet) WaitRegistration(tb testing.TB, limit time.Duration) *pluginapi.RegisterRequest {
	tb.Helper()
	select {
	case r := <-k.regs:
		return r
	case <-time.After(limit):
		tb.Fatalf("kubelettest: no registration within %s", limit)
		return nil
	}
}
