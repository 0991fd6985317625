// Package slice is the leaf contract shared by the agent, the device plugin and
// the scheduler extender: the resource name, slice IDs, the annotation keys of
// the scheduler's GPU handoff, the environment given to containers, and the
// names of the agent metrics that the scheduler reads. It imports nothing of
// the project.
package slice

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ResourceName is the extended resource advertised by the device plugin.
const ResourceName = "visionslice.io/gpu-slice"

// DefaultSliceMiB is the default size of one slice in MiB.
const DefaultSliceMiB = 1024

// Environment variables set by Allocate in every container that holds slices.
const (
	EnvVisibleDevices   = "NVIDIA_VISIBLE_DEVICES"
	EnvMemoryLimitBytes = "VISIONSLICE_GPU_MEMORY_LIMIT_BYTES"
	EnvSliceIDs         = "VISIONSLICE_SLICE_IDS"
	EnvGPUUUID          = "VISIONSLICE_GPU_UUID"
)

// Pod annotations.
const (
	// AnnotationAssignedGPU names the GPU UUID the scheduler extender chose at bind.
	AnnotationAssignedGPU = "visionslice.io/assigned-gpu"
	// AnnotationAssignedNode names the node of that choice (part of the signed record).
	AnnotationAssignedNode = "visionslice.io/assigned-node"
	// AnnotationAssignmentSignature is hex(HMAC-SHA256(key, pod UID|node|gpu)).
	AnnotationAssignmentSignature = "visionslice.io/assignment-signature"
	// AnnotationEnforcementAction lets a pod choose among the overrun actions
	// the node's admin allows (observe, freeze, kill).
	AnnotationEnforcementAction = "visionslice.io/enforcement-action"
)

// Agent metric names read by the scheduler extender. Labels: gpu_uuid, gpu (index).
const (
	MetricGPUInfo                = "visionslice_gpu_info"
	MetricGPUMemoryTotalBytes    = "visionslice_gpu_memory_total_bytes"
	MetricGPUMemoryUsedBytes     = "visionslice_gpu_memory_used_bytes"
	MetricGPUUtilizationRatio    = "visionslice_gpu_utilization_ratio"
	MetricGPUHealthy             = "visionslice_gpu_healthy"
	MetricGPUSlicesCapacity      = "visionslice_gpu_slices_capacity"
	MetricGPUSlicesAllocated     = "visionslice_gpu_slices_allocated"
	MetricGPUSliceBytes          = "visionslice_gpu_slice_size_bytes"
	MetricGPUUnaccountedMemBytes = "visionslice_gpu_unaccounted_memory_bytes"
)

// LabelGPUUUID and LabelGPUIndex are the label names of per-GPU agent metrics.
const (
	LabelGPUUUID  = "gpu_uuid"
	LabelGPUIndex = "gpu"
)

// ID names one slice: "<gpu uuid>::<n>", n counting from 0. The GPU UUID
// contains no "::", so the form parses back without ambiguity.
type ID struct {
	GPU   string
	Index int
}

const idSep = "::"

// String formats the ID as the device ID advertised to the kubelet.
func (id ID) String() string { return id.GPU + idSep + strconv.Itoa(id.Index) }

// ErrBadID is wrapped by ParseID's errors.
var ErrBadID = errors.New("malformed slice id")

// ParseID parses a device ID made by ID.String.
func ParseID(s string) (ID, error) {
	i := strings.LastIndex(s, idSep)
	if i <= 0 {
		return ID{}, fmt.Errorf("%w %q: want <gpu uuid>::<index>", ErrBadID, s)
	}
	n, err := strconv.Atoi(s[i+len(idSep):])
	if err != nil || n < 0 {
		return ID{}, fmt.Errorf("%w %q: index is not a non-negative integer", ErrBadID, s)
	}
	return ID{GPU: s[:i], Index: n}, nil
}

// Count returns how many slices of sliceBytes fit in a GPU of totalBytes after
// reservedBytes are set aside for the driver and outside users.
func Count(totalBytes, reservedBytes, sliceBytes uint64) int {
	if sliceBytes == 0 || reservedBytes >= totalBytes {
		return 0
	}
	return int((totalBytes - reservedBytes) / sliceBytes)
}

// MinKeyBytes is the shortest assignment key accepted.
const MinKeyBytes = 16

// ReadKey reads the assignment key shared by the scheduler extender and the
// agents from a file (a mounted Secret), surrounding white space dropped.
func ReadKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read assignment key: %w", err)
	}
	key := []byte(strings.TrimSpace(string(b)))
	if len(key) < MinKeyBytes {
		return nil, fmt.Errorf("assignment key in %s is %d bytes: want at least %d", path, len(key), MinKeyBytes)
	}
	return key, nil
}

// Assignment is the scheduler's record of the GPU it chose for a pod.
type Assignment struct {
	PodUID string
	Node   string
	GPU    string
}

func (a Assignment) message() []byte {
	return []byte(a.PodUID + "|" + a.Node + "|" + a.GPU)
}

// Sign returns the hex HMAC-SHA256 of the assignment under key.
func (a Assignment) Sign(key []byte) string {
	m := hmac.New(sha256.New, key)
	m.Write(a.message())
	return hex.EncodeToString(m.Sum(nil))
}

// ErrForgedAssignment is returned by Verify for a record whose signature does
// not match: a pod owner wrote or altered it, or the keys differ.
var ErrForgedAssignment = errors.New("assignment signature does not match")

// Verify checks sig against the assignment in constant time.
func (a Assignment) Verify(key []byte, sig string) error {
	if len(key) == 0 {
		return errors.New("no assignment key configured")
	}
	got, err := hex.DecodeString(sig)
	if err != nil {
		return fmt.Errorf("%w: signature is not hex", ErrForgedAssignment)
	}
	m := hmac.New(sha256.New, key)
	m.Write(a.message())
	if !hmac.Equal(got, m.Sum(nil)) {
		return ErrForgedAssignment
	}
	return nil
}

// AssignmentFromAnnotations reads and verifies the scheduler's record from a
// pod's annotations. It returns ok=false without error when there is none.
func AssignmentFromAnnotations(podUID string, ann map[string]string, key []byte) (a Assignment, ok bool, err error) {
	gpu, node, sig := ann[AnnotationAssignedGPU], ann[AnnotationAssignedNode], ann[AnnotationAssignmentSignature]
	if gpu == "" && sig == "" {
		return Assignment{}, false, nil
	}
	a = Assignment{PodUID: podUID, Node: node, GPU: gpu}
	if err := a.Verify(key, sig); err != nil {
		return Assignment{}, false, err
	}
	return a, true, nil
}
