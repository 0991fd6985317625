package deviceplugin

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// ctxStream is a ListAndWatch stream whose context the test ends.
type ctxStream struct {
	grpc.ServerStream
	ctx  context.Context
	sent chan *pluginapi.ListAndWatchResponse
}

func (s *ctxStream) Context() context.Context { return s.ctx }
func (s *ctxStream) Send(r *pluginapi.ListAndWatchResponse) error {
	s.sent <- r
	return nil
}

// TestListAndWatchEndsWithItsContext: the handler returns when the
// kubelet's stream ends, even with no device change to send.
func TestListAndWatchEndsWithItsContext(t *testing.T) {
	t.Parallel()
	p := fuzzPlugin(t)
	ctx, cancel := context.WithCancel(context.Background())
	s := &ctxStream{ctx: ctx, sent: make(chan *pluginapi.ListAndWatchResponse, 4)}
	done := make(chan error, 1)
	go func() { done <- p.ListAndWatch(&pluginapi.Empty{}, s) }()
	if r := <-s.sent; len(r.Devices) != 12 {
		t.Fatalf("first answer has %d devices, want 12", len(r.Devices))
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ListAndWatch = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ListAndWatch still running after its stream's context ended")
	}
}
