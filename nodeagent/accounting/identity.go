package accounting

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/visionslice/visionslice/nodeagent/procfs"
)

// Identity names a container the way the pod-resources API does.
type Identity struct {
	Namespace string
	Pod       string
	Container string
}

func (i Identity) String() string { return i.Namespace + "/" + i.Pod + "/" + i.Container }

// ErrUnknownContainer is returned by a Resolver that cannot name a container.
var ErrUnknownContainer = errors.New("container not known on this node")

// Resolver joins what a process's cgroup tells (pod UID, container ID) with
// what the pod-resources API tells (namespace, pod and container names).
type Resolver interface {
	Resolve(c procfs.Container) (Identity, error)
}

// LogDirs resolves containers from the kubelet's log layout, which the
// DaemonSet mounts read-only:
//
//	<PodLogsDir>/<namespace>_<pod>_<pod uid>/<container>/N.log
//	<ContainerLogsDir>/<pod>_<namespace>_<container>-<container id>.log
//
// Kubernetes names (pods, namespaces, containers) never hold "_", so both
// forms split without ambiguity. The directories are rescanned on a miss, at
// most once per MinRescan.
type LogDirs struct {
	podLogs, containerLogs string
	minRescan              time.Duration
	now                    func() time.Time

	mu        sync.Mutex
	lastScan  time.Time
	byID      map[string]Identity
	byPodUID  map[string]Identity // Container empty
	podCtrs   map[string][]string // pod uid -> container names
	scanError error
}

var _ Resolver = (*LogDirs)(nil)

// NewLogDirs returns a resolver over the two log directories.
func NewLogDirs(podLogsDir, containerLogsDir string, minRescan time.Duration) *LogDirs {
	return &LogDirs{podLogs: podLogsDir, containerLogs: containerLogsDir, minRescan: minRescan, now: time.Now}
}

var (
	containerLogName = regexp.MustCompile(`^([a-z0-9][a-z0-9.-]*)_([a-z0-9][a-z0-9-]*)_([a-z0-9][a-z0-9-]*)-([0-9a-f]{12,128})\.log$`)
	podLogDirName    = regexp.MustCompile(`^([a-z0-9][a-z0-9-]*)_([a-z0-9][a-z0-9.-]*)_([0-9a-f-]{32,36})$`)
)

// Resolve implements Resolver. A container ID without a log link is named
// only when its pod's log directory lists exactly one container.
func (l *LogDirs) Resolve(c procfs.Container) (Identity, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if id, ok := l.lookup(c); ok {
		return id, nil
	}
	if l.byID == nil || l.now().Sub(l.lastScan) >= l.minRescan {
		l.scan()
	}
	if id, ok := l.lookup(c); ok {
		return id, nil
	}
	if pod, ok := l.byPodUID[c.PodUID]; ok {
		return Identity{}, fmt.Errorf("%w: container %s of pod %s/%s has no log link and the pod has %d containers",
			ErrUnknownContainer, c.ID, pod.Namespace, pod.Pod, len(l.podCtrs[c.PodUID]))
	}
	if l.scanError != nil {
		return Identity{}, fmt.Errorf("%w: pod %s container %s: %w", ErrUnknownContainer, c.PodUID, c.ID, l.scanError)
	}
	return Identity{}, fmt.Errorf("%w: pod %s container %s has no entry in %s or %s", ErrUnknownContainer, c.PodUID, c.ID, l.podLogs, l.containerLogs)
}

func (l *LogDirs) lookup(c procfs.Container) (Identity, bool) {
	if id, ok := l.byID[c.ID]; ok {
		return id, true
	}
	if ctrs := l.podCtrs[c.PodUID]; len(ctrs) == 1 {
		id := l.byPodUID[c.PodUID]
		id.Container = ctrs[0]
		return id, true
	}
	return Identity{}, false
}

// ContainersOf returns the container names the pod's log directory lists.
func (l *LogDirs) ContainersOf(podUID string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.podCtrs[podUID]...)
}

func (l *LogDirs) scan() {
	l.lastScan = l.now()
	byID := map[string]Identity{}
	byPod := map[string]Identity{}
	podCtrs := map[string][]string{}
	var errs []error
	if ents, err := os.ReadDir(l.containerLogs); err != nil {
		errs = append(errs, fmt.Errorf("read container log dir: %w", err))
	} else {
		for _, e := range ents {
			m := containerLogName.FindStringSubmatch(e.Name())
			if m == nil {
				continue
			}
			byID[m[4]] = Identity{Namespace: m[2], Pod: m[1], Container: m[3]}
		}
	}
	if ents, err := os.ReadDir(l.podLogs); err != nil {
		errs = append(errs, fmt.Errorf("read pod log dir: %w", err))
	} else {
		for _, e := range ents {
			m := podLogDirName.FindStringSubmatch(e.Name())
			if m == nil || !e.IsDir() {
				continue
			}
			byPod[m[3]] = Identity{Namespace: m[1], Pod: m[2]}
			if sub, err := os.ReadDir(l.podLogs + "/" + e.Name()); err == nil {
				for _, s := range sub {
					if s.IsDir() && !strings.HasPrefix(s.Name(), ".") {
						podCtrs[m[3]] = append(podCtrs[m[3]], s.Name())
					}
				}
			}
		}
	}
	l.byID, l.byPodUID, l.podCtrs = byID, byPod, podCtrs
	l.scanError = errors.Join(errs...)
}
