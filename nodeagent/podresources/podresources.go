// Package podresources is a small client of the kubelet's pod-resources API
// (k8s.io/kubelet/pkg/apis/podresources/v1) on its unix socket. It tells which
// devices the kubelet assigned to which container (List) and which devices the
// node can assign (Allocatable). The device plugin rebuilds its allocation
// ledger from it after a restart; enforcement maps GPU processes to containers
// with it.
package podresources

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	v1 "k8s.io/kubelet/pkg/apis/podresources/v1"
)

// DefaultSocket is where the kubelet serves the pod-resources API.
const DefaultSocket = "/var/lib/kubelet/pod-resources/kubelet.sock"

// maxMessageBytes bounds one response; a node with many pods and devices can
// exceed gRPC's 4 MiB default (the kubelet's own client uses 16 MiB).
const maxMessageBytes = 16 << 20

// ContainerDevices is one container's devices of one resource, flattened out
// of the kubelet's pod -> container -> devices tree.
type ContainerDevices struct {
	Namespace    string
	Pod          string
	Container    string
	ResourceName string
	DeviceIDs    []string
}

// Client talks to the pod-resources API. It is safe for concurrent use.
type Client struct {
	conn *grpc.ClientConn
	api  v1.PodResourcesListerClient
}

// ErrNoSocket is returned by Dial when nothing listens on the socket path.
var ErrNoSocket = errors.New("pod-resources socket not reachable")

// Dial connects to the pod-resources API on the unix socket at path (empty
// means DefaultSocket). It checks that something listens there, so a missing
// kubelet shows up here rather than at the first call.
func Dial(ctx context.Context, path string) (*Client, error) {
	if path == "" {
		path = DefaultSocket
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("resolve pod-resources socket %q: %w", path, err)
	}
	if fi, err := os.Stat(abs); err != nil {
		return nil, fmt.Errorf("%w at %s: %w", ErrNoSocket, abs, err)
	} else if fi.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("%w at %s: not a unix socket", ErrNoSocket, abs)
	}
	probeCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(probeCtx, "unix", abs)
	if err != nil {
		return nil, fmt.Errorf("%w at %s: %w", ErrNoSocket, abs, err)
	}
	_ = c.Close()

	conn, err := grpc.NewClient("unix://"+abs,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageBytes)),
	)
	if err != nil {
		return nil, fmt.Errorf("create pod-resources client for %s: %w", abs, err)
	}
	return &Client{conn: conn, api: v1.NewPodResourcesListerClient(conn)}, nil
}

// List returns every container's devices, one entry per container and
// resource, ordered by namespace, pod, container and resource. Containers
// without devices are left out. Device IDs keep the kubelet's order.
func (c *Client) List(ctx context.Context) ([]ContainerDevices, error) {
	resp, err := c.api.List(ctx, &v1.ListPodResourcesRequest{})
	if err != nil {
		return nil, fmt.Errorf("list pod resources: %w", err)
	}
	var out []ContainerDevices
	for _, p := range resp.GetPodResources() {
		for _, ctr := range p.GetContainers() {
			for _, d := range ctr.GetDevices() {
				if len(d.GetDeviceIds()) == 0 {
					continue
				}
				out = append(out, ContainerDevices{
					Namespace:    p.GetNamespace(),
					Pod:          p.GetName(),
					Container:    ctr.GetName(),
					ResourceName: d.GetResourceName(),
					DeviceIDs:    append([]string(nil), d.GetDeviceIds()...),
				})
			}
		}
	}
	slices.SortStableFunc(out, func(a, b ContainerDevices) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Pod, b.Pod),
			cmp.Compare(a.Container, b.Container), cmp.Compare(a.ResourceName, b.ResourceName))
	})
	return out, nil
}

// Allocatable returns the device IDs the kubelet can assign, by resource name.
func (c *Client) Allocatable(ctx context.Context) (map[string][]string, error) {
	resp, err := c.api.GetAllocatableResources(ctx, &v1.AllocatableResourcesRequest{})
	if err != nil {
		return nil, fmt.Errorf("get allocatable resources: %w", err)
	}
	out := make(map[string][]string)
	for _, d := range resp.GetDevices() {
		out[d.GetResourceName()] = append(out[d.GetResourceName()], d.GetDeviceIds()...)
	}
	return out, nil
}

// Close releases the connection.
func (c *Client) Close() error {
	if err := c.conn.Close(); err != nil {
		return fmt.Errorf("close pod-resources client: %w", err)
	}
	return nil
}
