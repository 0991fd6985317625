// Package procfs maps a host PID to the Kubernetes pod and container it runs
// in, from <host proc>/<pid>/cgroup. It knows the kubelet's cgroup layouts:
// the systemd driver (kubepods.slice/kubepods-burstable.slice/
// kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope, crio-<id>.scope,
// docker-<id>.scope), the cgroupfs driver (/kubepods/burstable/pod<uid>/<id>),
// the burstable, besteffort and guaranteed QoS classes (guaranteed pods sit
// directly under kubepods), nested kubelets (kind's /kubelet.slice/...), and
// both the cgroup v1 ("4:memory:/...") and v2 ("0::/...") line formats.
package procfs

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// DefaultRoot is the host's proc mount as the agent sees it with hostPID.
const DefaultRoot = "/proc"

// QoS classes of a pod.
const (
	QoSGuaranteed = "guaranteed"
	QoSBurstable  = "burstable"
	QoSBestEffort = "besteffort"
)

// Container is where a process runs.
type Container struct {
	// PodUID is the pod's UID in its API form (dashes, not underscores).
	PodUID string
	// ID is the container ID as the runtime knows it (hex).
	ID string
	// Runtime is "containerd", "cri-o" or "docker" for the systemd driver's
	// scopes, "" for the cgroupfs driver, which does not say.
	Runtime string
	// QoS is the pod's QoS class; empty when the path does not show it
	// (read from another cgroup namespace that shares the QoS cgroup).
	QoS string
	// CgroupPath is the container's cgroup in the v2 hierarchy as the
	// reader's cgroup namespace shows it: from the hierarchy root
	// ("/kubepods.slice/.../cri-containerd-<id>.scope") when the reader is in
	// the root namespace, else relative to the reader's namespace root, and
	// then possibly climbing ("/../../kubepods-besteffort.slice/..."); see
	// cgroup.Manager.ResolveProcPath. Empty when the process shows only
	// cgroup v1 lines (it cannot be frozen or killed through cgroup v2 then).
	CgroupPath string
}

// Errors.
var (
	// ErrNotContainer is returned for a process outside any pod (a host
	// process, or one in a pod's own cgroup but no container's).
	ErrNotContainer = errors.New("process is not in a kubernetes container")
	// ErrMalformed is wrapped for a cgroup file that does not parse.
	ErrMalformed = errors.New("malformed cgroup file")
	// ErrNoProcess is wrapped when the PID does not exist (it exited).
	ErrNoProcess = errors.New("no such process")
)

const maxLines = 64

var (
	// systemd driver: kubepods[-qos]-pod<uid>.slice, optionally under a
	// nested kubelet's prefix (kind: kubelet-kubepods-...).
	systemdPod = regexp.MustCompile(`^(?:[a-z0-9]+-)*kubepods(?:-(burstable|besteffort))?-pod([0-9a-f_]+)\.slice$`)
	// systemd driver container scope.
	systemdScope = regexp.MustCompile(`^(cri-containerd|crio|docker)-([0-9a-f]+)\.scope$`)
	// cgroupfs driver pod directory.
	cgroupfsPod = regexp.MustCompile(`^pod([0-9a-f-]+)$`)
	hexID       = regexp.MustCompile(`^[0-9a-f]{12,128}$`)
	podUID      = regexp.MustCompile(`^[0-9a-f]+(?:-[0-9a-f]+)*$`)
)

var runtimes = map[string]string{"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker"}

// Line is one parsed line of a cgroup file.
type Line struct {
	HierarchyID int
	Controllers []string // empty for the v2 line
	Path        string
}

// ParseLine parses one "<id>:<controllers>:<path>" line.
func ParseLine(s string) (Line, error) {
	id, rest, ok := strings.Cut(s, ":")
	if !ok {
		return Line{}, fmt.Errorf("%w: line %q: want hierarchy-id:controllers:path", ErrMalformed, s)
	}
	ctrls, p, ok := strings.Cut(rest, ":")
	if !ok {
		return Line{}, fmt.Errorf("%w: line %q: want hierarchy-id:controllers:path", ErrMalformed, s)
	}
	n, err := strconv.Atoi(id)
	if err != nil || n < 0 {
		return Line{}, fmt.Errorf("%w: line %q: hierarchy id %q is not a non-negative integer", ErrMalformed, s, id)
	}
	if !strings.HasPrefix(p, "/") {
		return Line{}, fmt.Errorf("%w: line %q: path %q is not absolute", ErrMalformed, s, p)
	}
	if n == 0 && ctrls != "" {
		return Line{}, fmt.Errorf("%w: line %q: hierarchy 0 is cgroup v2 and names no controllers", ErrMalformed, s)
	}
	l := Line{HierarchyID: n, Path: p}
	if ctrls != "" {
		l.Controllers = strings.Split(ctrls, ",")
	}
	return l, nil
}

// ParsePath finds the pod and container in one cgroup path. It returns
// ErrNotContainer when the path is outside any pod's container, and an
// ErrMalformed error when it names a pod or container in a form that does
// not parse.
func ParsePath(p string) (Container, error) {
	segs := strings.Split(strings.Trim(p, "/"), "/")
	for i, seg := range segs {
		var c Container
		var next int
		m := systemdPod.FindStringSubmatch(seg)
		switch {
		case m != nil:
			c.QoS = qosOf(m[1])
			c.PodUID = strings.ReplaceAll(m[2], "_", "-")
			if i+1 >= len(segs) {
				return Container{}, fmt.Errorf("%w: %s is the pod's cgroup, not a container's", ErrNotContainer, p)
			}
			sm := systemdScope.FindStringSubmatch(segs[i+1])
			if sm == nil {
				if strings.HasPrefix(segs[i+1], "crio-conmon-") {
					return Container{}, fmt.Errorf("%w: %s is CRI-O's conmon, not a container", ErrNotContainer, p)
				}
				return Container{}, fmt.Errorf("%w: path %q: %q is not a container scope (cri-containerd-, crio- or docker-<id>.scope)", ErrMalformed, p, segs[i+1])
			}
			c.Runtime, c.ID = runtimes[sm[1]], sm[2]
			next = i + 2
		case seg == "kubepods" || (strings.HasSuffix(seg, "kubepods") && !strings.Contains(seg, ".")):
			j := i + 1
			c.QoS = QoSGuaranteed
			if j < len(segs) && (segs[j] == QoSBurstable || segs[j] == QoSBestEffort) {
				c.QoS = segs[j]
				j++
			}
			var err error
			if c.PodUID, c.ID, next, err = cgroupfsPodAt(segs, j, p); err != nil {
				return Container{}, err
			}
		case i > 0 && segs[i-1] == ".." && (seg == QoSBurstable || seg == QoSBestEffort || cgroupfsPod.MatchString(seg)):
			// Read from another cgroup namespace, the path climbs ("..")
			// to the common ancestor and hides what is above: the
			// kubepods directory, and the QoS class when the reader
			// shares it.
			j := i
			if seg == QoSBurstable || seg == QoSBestEffort {
				c.QoS = seg
				j++
			}
			var err error
			if c.PodUID, c.ID, next, err = cgroupfsPodAt(segs, j, p); err != nil {
				return Container{}, err
			}
		default:
			continue
		}
		if !podUID.MatchString(c.PodUID) || len(c.PodUID) < 32 || len(c.PodUID) > 36 {
			return Container{}, fmt.Errorf("%w: path %q: pod uid %q is not a UID", ErrMalformed, p, c.PodUID)
		}
		if !hexID.MatchString(c.ID) {
			return Container{}, fmt.Errorf("%w: path %q: container id %q is not 12 to 128 hex digits", ErrMalformed, p, c.ID)
		}
		c.CgroupPath = "/" + strings.Join(segs[:next], "/")
		return c, nil
	}
	return Container{}, fmt.Errorf("%w: %s", ErrNotContainer, p)
}

// cgroupfsPodAt reads "pod<uid>/<container id>" at segs[j:].
func cgroupfsPodAt(segs []string, j int, p string) (uid, id string, next int, err error) {
	if j >= len(segs) {
		return "", "", 0, fmt.Errorf("%w: %s is a QoS cgroup, not a container's", ErrNotContainer, p)
	}
	m := cgroupfsPod.FindStringSubmatch(segs[j])
	if m == nil {
		return "", "", 0, fmt.Errorf("%w: path %q: %q is not pod<uid>", ErrMalformed, p, segs[j])
	}
	if j+1 >= len(segs) {
		return "", "", 0, fmt.Errorf("%w: %s is the pod's cgroup, not a container's", ErrNotContainer, p)
	}
	return m[1], segs[j+1], j + 2, nil
}

func qosOf(s string) string {
	if s == "" {
		return QoSGuaranteed
	}
	return s
}

// Parse reads a whole /proc/<pid>/cgroup file. The v2 line decides where it
// names a container; otherwise the v1 lines must agree on one container.
func Parse(r io.Reader) (Container, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 64<<10)
	var (
		v2, v1    *Container
		n         int
		lastErr   error
		notCtrErr = ErrNotContainer
	)
	for sc.Scan() {
		text := sc.Text()
		if text == "" {
			continue
		}
		n++
		if n > maxLines {
			return Container{}, fmt.Errorf("%w: more than %d lines", ErrMalformed, maxLines)
		}
		l, err := ParseLine(text)
		if err != nil {
			return Container{}, err
		}
		c, err := ParsePath(l.Path)
		if errors.Is(err, ErrNotContainer) {
			if err != ErrNotContainer && strings.Contains(l.Path, "pod") {
				notCtrErr = err
			}
			continue
		}
		if err != nil {
			lastErr = err
			continue
		}
		if l.HierarchyID == 0 {
			v2 = &c
			continue
		}
		if v1 != nil && (v1.PodUID != c.PodUID || v1.ID != c.ID) {
			return Container{}, fmt.Errorf("%w: cgroup v1 lines name two containers, %s and %s", ErrMalformed, v1.ID, c.ID)
		}
		v1 = &c
	}
	if err := sc.Err(); err != nil {
		return Container{}, fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	if n == 0 {
		return Container{}, fmt.Errorf("%w: empty", ErrMalformed)
	}
	switch {
	case v2 != nil:
		return *v2, nil
	case v1 != nil:
		c := *v1
		c.CgroupPath = ""
		return c, nil
	case lastErr != nil:
		return Container{}, lastErr
	}
	return Container{}, notCtrErr
}

// Reader reads processes' cgroups under a host proc root.
type Reader struct {
	root string
}

// NewReader returns a reader for the proc tree at root ("" means DefaultRoot).
func NewReader(root string) *Reader {
	if root == "" {
		root = DefaultRoot
	}
	return &Reader{root: root}
}

// Container returns the container that pid runs in.
func (r *Reader) Container(pid int) (Container, error) {
	if pid <= 0 {
		return Container{}, fmt.Errorf("pid %d: %w", pid, ErrNoProcess)
	}
	f, err := os.Open(filepath.Join(r.root, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return Container{}, fmt.Errorf("pid %d: %w", pid, ErrNoProcess)
		}
		return Container{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	defer f.Close()
	c, err := Parse(io.LimitReader(f, 64<<10))
	if err != nil {
		return Container{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	return c, nil
}
