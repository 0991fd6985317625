package supervisor

import (
	"fmt"
	"log/slog"

	"github.com/visionslice/visionslice/nodeagent/cgroup"
)

// Group is the cgroup of one worker process: what the supervisor needs of
// the cgroup seam.
type Group interface {
	// Path is the group's directory (the worker is started into it).
	Path() string
	// AddProc moves a process into the group.
	AddProc(pid int) error
	// Kill kills every process in the group.
	Kill() error
	// Delete kills what is left, waits for the group to empty and removes it.
	Delete() error
}

// Groups creates one group per worker process.
type Groups interface {
	Create(name string) (Group, error)
}

// CgroupGroups creates worker groups with the cgroup seam, with as many of
// limits as the hierarchy supports: limits whose controller is missing
// (a hybrid host) are dropped with a warning, once.
func CgroupGroups(m *cgroup.Manager, limits cgroup.Limits, logger *slog.Logger) (Groups, error) {
	supported, missing, err := m.Supported(limits)
	if err != nil {
		return nil, fmt.Errorf("cgroup controllers: %w", err)
	}
	if len(missing) > 0 {
		logger.Warn("model worker limits not set: the cgroup hierarchy lacks controllers",
			"root", m.Root(), "missing_controllers", missing)
	}
	return &cgroupGroups{m: m, limits: supported}, nil
}

type cgroupGroups struct {
	m      *cgroup.Manager
	limits cgroup.Limits
}

func (g *cgroupGroups) Create(name string) (Group, error) {
	return g.m.Create(name, g.limits)
}

var (
	_ Group  = cgroup.Group(nil)
	_ Groups = (*cgroupGroups)(nil)
)
