package podresources_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionslice/visionslice/nodeagent/podresources"
	"github.com/visionslice/visionslice/nodeagent/podresources/podresourcestest"
)

const res = "visionslice.io/gpu-slice"

func dial(t *testing.T, srv *podresourcestest.Server) *podresources.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := podresources.Dial(ctx, srv.Socket())
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestList(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		set  []podresources.ContainerDevices
		want []podresources.ContainerDevices
	}{
		{name: "empty", set: nil, want: nil},
		{
			name: "flattened and ordered",
			set: []podresources.ContainerDevices{
				{Namespace: "b", Pod: "p2", Container: "main", ResourceName: res, DeviceIDs: []string{"GPU-1::3", "GPU-1::2"}},
				{Namespace: "a", Pod: "p1", Container: "side", ResourceName: "nvidia.com/gpu", DeviceIDs: []string{"GPU-9"}},
				{Namespace: "a", Pod: "p1", Container: "main", ResourceName: res, DeviceIDs: []string{"GPU-0::0"}},
				{Namespace: "a", Pod: "p1", Container: "main", ResourceName: "example.com/nic", DeviceIDs: []string{"nic0"}},
			},
			want: []podresources.ContainerDevices{
				{Namespace: "a", Pod: "p1", Container: "main", ResourceName: "example.com/nic", DeviceIDs: []string{"nic0"}},
				{Namespace: "a", Pod: "p1", Container: "main", ResourceName: res, DeviceIDs: []string{"GPU-0::0"}},
				{Namespace: "a", Pod: "p1", Container: "side", ResourceName: "nvidia.com/gpu", DeviceIDs: []string{"GPU-9"}},
				{Namespace: "b", Pod: "p2", Container: "main", ResourceName: res, DeviceIDs: []string{"GPU-1::3", "GPU-1::2"}},
			},
		},
		{
			name: "containers without devices left out",
			set: []podresources.ContainerDevices{
				{Namespace: "a", Pod: "p1", Container: "main", ResourceName: res},
			},
			want: nil,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := podresourcestest.New(t)
			srv.SetContainers(tc.set)
			c := dial(t, srv)
			got, err := c.List(context.Background())
			if err != nil {
				t.Fatalf("List: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("List =\n%+v\nwant\n%+v", got, tc.want)
			}
			if srv.ListCalls() != 1 {
				t.Errorf("server saw %d List calls, want 1", srv.ListCalls())
			}
		})
	}
}

func TestAllocatable(t *testing.T) {
	t.Parallel()
	srv := podresourcestest.New(t)
	want := map[string][]string{
		res:              {"GPU-0::0", "GPU-0::1"},
		"nvidia.com/gpu": {"GPU-9"},
	}
	srv.SetAllocatable(want)
	c := dial(t, srv)
	got, err := c.Allocatable(context.Background())
	if err != nil {
		t.Fatalf("Allocatable: %v", err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Allocatable = %v, want %v", got, want)
	}
}

func TestServerErrorsKeepTheirCode(t *testing.T) {
	t.Parallel()
	srv := podresourcestest.New(t)
	srv.SetError(status.Error(codes.Unavailable, "kubelet is restarting"))
	c := dial(t, srv)
	_, err := c.List(context.Background())
	if status.Code(errors.Unwrap(err)) != codes.Unavailable {
		t.Errorf("List error = %v, want wrapped Unavailable", err)
	}
	_, err = c.Allocatable(context.Background())
	if status.Code(errors.Unwrap(err)) != codes.Unavailable {
		t.Errorf("Allocatable error = %v, want wrapped Unavailable", err)
	}
	srv.SetError(nil)
	if _, err := c.List(context.Background()); err != nil {
		t.Errorf("List after the error cleared: %v", err)
	}
}

func TestDialErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{filepath.Join(dir, "missing.sock"), plain} {
		_, err := podresources.Dial(context.Background(), path)
		if !errors.Is(err, podresources.ErrNoSocket) {
			t.Errorf("Dial(%s) = %v, want ErrNoSocket", path, err)
		}
	}
}

func TestKubeletGoneAfterDial(t *testing.T) {
	t.Parallel()
	srv := podresourcestest.New(t)
	c := dial(t, srv)
	srv.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := c.List(ctx); err == nil {
		t.Fatal("List after the server stopped succeeded")
	}
}
