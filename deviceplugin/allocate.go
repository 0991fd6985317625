package deviceplugin

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

// Results of Allocate, the label of visionslice_deviceplugin_allocate_requests_total.
const (
	resultSuccess            = "success"
	resultInvalidArgument    = "invalid_argument"
	resultFailedPrecondition = "failed_precondition"
)

// hintTimeout bounds one GPUHinter call.
const hintTimeout = time.Second

// GetDevicePluginOptions implements pluginapi.DevicePluginServer.
func (p *Plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{GetPreferredAllocationAvailable: true}, nil
}

// PreStartContainer implements pluginapi.DevicePluginServer; the plugin does
// not ask for it.
func (p *Plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

// ListAndWatch implements pluginapi.DevicePluginServer: it sends the slices
// at once and again whenever their health or number changes, until the
// kubelet closes the stream or the server stops.
func (p *Plugin) ListAndWatch(_ *pluginapi.Empty, stream pluginapi.DevicePlugin_ListAndWatchServer) error {
	for {
		inv, changed := p.current()
		if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: inv.devices}); err != nil {
			return err
		}
		select {
		case <-stream.Context().Done():
			return nil
		case <-changed:
		}
	}
}

// GetPreferredAllocation implements pluginapi.DevicePluginServer: it takes
// all slices of each container from one GPU. A container that no single GPU
// can hold gets an empty answer (the kubelet then picks on its own and
// Allocate explains why that fails).
func (p *Plugin) GetPreferredAllocation(ctx context.Context, req *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	resp := &pluginapi.PreferredAllocationResponse{}
	for i, cr := range req.GetContainerRequests() {
		ids, err := p.preferred(ctx, cr)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "container request %d: %s", i, err)
		}
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerPreferredAllocationResponse{DeviceIDs: ids})
	}
	return resp, nil
}

// freeSlices is the free slices of one GPU among those offered.
type freeSlices struct {
	gpu     gpuSlices
	indexes []int // sorted
}

func (p *Plugin) preferred(ctx context.Context, cr *pluginapi.ContainerPreferredAllocationRequest) ([]string, error) {
	size := int(cr.GetAllocationSize())
	if size <= 0 {
		return nil, fmt.Errorf("allocation size %d: must be positive", size)
	}
	if len(cr.GetMustIncludeDeviceIDs()) > size {
		return nil, fmt.Errorf("%d must-include devices exceed allocation size %d", len(cr.GetMustIncludeDeviceIDs()), size)
	}
	inv, _ := p.current()

	must := map[string]bool{}
	var mustList []string
	mustGPU := ""
	for _, s := range cr.GetMustIncludeDeviceIDs() {
		id, err := p.known(inv, s)
		if err != nil {
			return nil, fmt.Errorf("must-include device: %w", err)
		}
		if must[s] {
			continue
		}
		mustList = append(mustList, s)
		if mustGPU != "" && id.GPU != mustGPU {
			p.logger.Info("no preferred allocation: must-include devices span gpus", "size", size, "gpu_uuid", mustGPU, "other_gpu_uuid", id.GPU)
			return nil, nil
		}
		mustGPU = id.GPU
		must[s] = true
	}

	available := p.offered(ctx, cr.GetAvailableDeviceIDs(), must)
	byGPU := map[string]*freeSlices{}
	seen := map[string]bool{}
	for _, s := range available {
		if seen[s] {
			continue
		}
		seen[s] = true
		id, err := p.known(inv, s)
		if err != nil {
			continue // not ours or no longer advertised: never offer it
		}
		g, _ := inv.gpu(id.GPU)
		if !g.Healthy {
			continue
		}
		f := byGPU[id.GPU]
		if f == nil {
			f = &freeSlices{gpu: g}
			byGPU[id.GPU] = f
		}
		f.indexes = append(f.indexes, id.Index)
	}
	var fits []*freeSlices
	largest := 0
	for _, f := range byGPU {
		sort.Ints(f.indexes)
		largest = max(largest, len(f.indexes))
		if len(f.indexes) >= size && (mustGPU == "" || f.gpu.UUID == mustGPU) {
			fits = append(fits, f)
		}
	}
	if len(fits) == 0 {
		p.logger.Info("no preferred allocation: no single gpu has enough free slices",
			"size", size, "largest_free_slices", largest, "gpus_offered", len(byGPU))
		return nil, nil
	}
	pick := p.choose(ctx, fits, size)

	out := append(make([]string, 0, size), mustList...)
	for _, n := range pick.indexes {
		if len(out) == size {
			break
		}
		s := slice.ID{GPU: pick.gpu.UUID, Index: n}.String()
		if !must[s] {
			out = append(out, s)
		}
	}
	return out, nil
}

// offered returns the kubelet's available IDs less those pod-resources says
// a container holds (must-include IDs are kept: the kubelet reuses them for
// the same container). Pending ledger entries the kubelet offers are released.
func (p *Plugin) offered(ctx context.Context, available []string, must map[string]bool) []string {
	p.ledger.releasePending(available)
	if len(p.ledger.heldByContainer(available)) > 0 {
		// The ledger may be stale: ask pod-resources before excluding.
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		p.reconcile(rctx)
		cancel()
	}
	held := map[string]bool{}
	for _, s := range p.ledger.heldByContainer(available) {
		if !must[s] {
			held[s] = true
		}
	}
	if len(held) == 0 {
		return available
	}
	p.logger.Warn("kubelet offers slices that pod-resources lists as held; not preferring them", "slices", len(held))
	out := make([]string, 0, len(available))
	for _, s := range available {
		if !held[s] {
			out = append(out, s)
		}
	}
	return out
}

// choose picks the GPU for a request among those that fit: the hinter's GPU
// when it names one of them, else by policy; ties go to the lowest index.
func (p *Plugin) choose(ctx context.Context, fits []*freeSlices, size int) *freeSlices {
	if p.hinter != nil {
		hctx, cancel := context.WithTimeout(ctx, hintTimeout)
		uuid, ok := p.hinter.PreferredGPU(hctx, size)
		cancel()
		if ok {
			for _, f := range fits {
				if f.gpu.UUID == uuid {
					return f
				}
			}
			p.logger.Info("hinted gpu cannot hold the request; using policy", "gpu_uuid", uuid, "size", size)
		}
	}
	sort.Slice(fits, func(i, j int) bool {
		a, b := len(fits[i].indexes), len(fits[j].indexes)
		if a != b {
			if p.cfg.Policy == PolicySpread {
				return a > b
			}
			return a < b
		}
		return fits[i].gpu.Index < fits[j].gpu.Index
	})
	return fits[0]
}

// known parses s and checks that it names an advertised slice.
func (p *Plugin) known(inv *inventory, s string) (slice.ID, error) {
	id, err := slice.ParseID(s)
	if err != nil {
		return slice.ID{}, err
	}
	g, ok := inv.gpu(id.GPU)
	if !ok {
		return slice.ID{}, fmt.Errorf("unknown device %q: no GPU %s on this node", s, id.GPU)
	}
	if id.Index >= g.Slices {
		return slice.ID{}, fmt.Errorf("unknown device %q: GPU %s has %d slices (0..%d)", s, id.GPU, g.Slices, g.Slices-1)
	}
	return id, nil
}

// Allocate implements pluginapi.DevicePluginServer. Every container's slices
// must be advertised, distinct, on one healthy GPU; the answer gives the
// container that GPU and its memory limit.
func (p *Plugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp, ids, err := p.allocate(req)
	if err != nil {
		code := status.Code(err)
		result := resultInvalidArgument
		if code == codes.FailedPrecondition {
			result = resultFailedPrecondition
		}
		p.metrics.allocations.WithLabelValues(result).Inc()
		p.logger.Info("allocate refused", "code", code.String(), "err", err)
		return nil, err
	}
	p.ledger.recordAllocate(ids, time.Now())
	p.metrics.allocations.WithLabelValues(resultSuccess).Inc()
	return resp, nil
}

func (p *Plugin) allocate(req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, []slice.ID, error) {
	inv, _ := p.current()
	if len(req.GetContainerRequests()) == 0 {
		return nil, nil, status.Error(codes.InvalidArgument, "allocate request has no container requests")
	}
	resp := &pluginapi.AllocateResponse{}
	var all []slice.ID
	for i, cr := range req.GetContainerRequests() {
		ids, g, err := p.validate(inv, cr.GetDevicesIds())
		if err != nil {
			return nil, nil, status.Errorf(status.Code(err), "container request %d: %s", i, status.Convert(err).Message())
		}
		resp.ContainerResponses = append(resp.ContainerResponses, p.containerResponse(g, ids))
		all = append(all, ids...)
	}
	return resp, all, nil
}

// validate checks one container's device IDs and returns them with their GPU.
func (p *Plugin) validate(inv *inventory, devs []string) ([]slice.ID, gpuSlices, error) {
	if len(devs) == 0 {
		return nil, gpuSlices{}, status.Error(codes.InvalidArgument, "no device IDs")
	}
	seen := map[string]bool{}
	perGPU := map[string]int{}
	var ids []slice.ID
	for _, s := range devs {
		id, err := p.known(inv, s)
		if err != nil {
			return nil, gpuSlices{}, status.Error(codes.InvalidArgument, err.Error())
		}
		if seen[s] {
			return nil, gpuSlices{}, status.Errorf(codes.InvalidArgument, "device %q requested twice", s)
		}
		seen[s] = true
		perGPU[id.GPU]++
		ids = append(ids, id)
	}
	if len(perGPU) > 1 {
		return nil, gpuSlices{}, status.Error(codes.InvalidArgument, p.spanMessage(inv, perGPU, len(devs)))
	}
	g, _ := inv.gpu(ids[0].GPU)
	if !g.Healthy {
		return nil, gpuSlices{}, status.Errorf(codes.FailedPrecondition, "GPU %s (index %d) is unhealthy (%s): its slices cannot be allocated", g.UUID, g.Index, g.Reason)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i].Index < ids[j].Index })
	return ids, g, nil
}

// spanMessage explains a request whose slices lie on several GPUs, with the
// free slices of each GPU so that fragmentation is plain to see.
func (p *Plugin) spanMessage(inv *inventory, perGPU map[string]int, size int) string {
	held := p.ledger.perGPU()
	var parts, free []string
	largest := 0
	for _, g := range inv.gpus {
		if n := perGPU[g.UUID]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d on %s", n, g.UUID))
		}
		if g.Healthy {
			n := max(g.Slices-held[g.UUID], 0)
			largest = max(largest, n)
			free = append(free, fmt.Sprintf("%s: %d", g.UUID, n))
		}
	}
	msg := fmt.Sprintf("%d slices span %d GPUs (%s): all slices of a container must be on one GPU", size, len(perGPU), strings.Join(parts, ", "))
	if largest < size {
		return msg + fmt.Sprintf(", and no GPU on this node has %d free slices (free slices per GPU: %s); request fewer slices or free a GPU",
			size, strings.Join(free, ", "))
	}
	return msg + fmt.Sprintf(" (free slices per GPU: %s)", strings.Join(free, ", "))
}

func (p *Plugin) containerResponse(g gpuSlices, ids []slice.ID) *pluginapi.ContainerAllocateResponse {
	names := make([]string, len(ids))
	for i, id := range ids {
		names[i] = id.String()
	}
	r := &pluginapi.ContainerAllocateResponse{
		Envs: map[string]string{
			slice.EnvVisibleDevices:   g.UUID,
			slice.EnvGPUUUID:          g.UUID,
			slice.EnvMemoryLimitBytes: strconv.FormatUint(uint64(len(ids))*p.cfg.sliceBytes(), 10),
			slice.EnvSliceIDs:         strings.Join(names, ","),
		},
	}
	if p.cfg.CDI.Enabled {
		r.CdiDevices = []*pluginapi.CDIDevice{{Name: p.cfg.CDI.Kind + "=" + g.UUID}}
	}
	for _, path := range p.cfg.DeviceSpecs {
		path = strings.ReplaceAll(path, "{index}", strconv.Itoa(g.Index))
		r.Devices = append(r.Devices, &pluginapi.DeviceSpec{ContainerPath: path, HostPath: path, Permissions: "rw"})
	}
	return r
}
