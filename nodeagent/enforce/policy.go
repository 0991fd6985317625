// Package enforce decides and carries out what happens when a container uses
// more GPU memory than its slices allow: observe (metric, Kubernetes Event,
// audit record), freeze (cgroup.freeze until usage drops under quota or a
// grace period ends, then kill) or kill (cgroup.kill). The node's policy
// names the allowed actions and the default; a pod may choose among the
// allowed ones with the visionslice.io/enforcement-action annotation, and a
// value that is malformed or not allowed is rejected and audited. Every
// action is an audit record in the JSON log.
package enforce

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

// Action is what happens to a container over its GPU memory quota.
type Action string

// Actions, mildest first.
const (
	ActionObserve Action = "observe"
	ActionFreeze  Action = "freeze"
	ActionKill    Action = "kill"
)

// Actions that appear only in audit records.
const (
	actionThaw             Action = "thaw"
	actionRejectAnnotation Action = "reject_annotation"
)

var knownActions = []Action{ActionObserve, ActionFreeze, ActionKill}

// ParseAction parses an action name.
func ParseAction(s string) (Action, error) {
	a := Action(s)
	if slices.Contains(knownActions, a) {
		return a, nil
	}
	return "", unknownAction(s)
}

func unknownAction(s string) error {
	return fmt.Errorf("%w %q (want observe, freeze or kill)", ErrUnknownAction, s)
}

// Errors.
var (
	ErrUnknownAction = errors.New("unknown enforcement action")
	ErrNotAllowed    = errors.New("enforcement action not allowed on this node")
)

// Config is the node's enforcement policy. All of it is live: SetPolicy
// applies a new one to the running enforcer.
type Config struct {
	// DefaultAction applies to pods without a valid annotation.
	DefaultAction Action `yaml:"defaultAction"`
	// AllowedActions are the actions a pod's annotation may choose.
	// DefaultAction must be one of them.
	AllowedActions []Action `yaml:"allowedActions"`
	// GracePeriod is how long a frozen container may stay frozen over quota
	// before it is killed.
	GracePeriod time.Duration `yaml:"gracePeriod"`
	// Hysteresis keeps brief spikes from triggering an action.
	Hysteresis Hysteresis `yaml:"hysteresis"`
	// CheckInterval is how often grace periods and sustained overruns are
	// checked between GPU polls that change nothing.
	CheckInterval time.Duration `yaml:"checkInterval"`
	// KillRetry is how long after a kill a container still over quota is
	// killed again.
	KillRetry time.Duration `yaml:"killRetry"`
}

// Hysteresis is when an overrun counts and when it ends.
type Hysteresis struct {
	// OverFor is how long usage must stay over quota (by GPU poll times)
	// before the action; 0 acts on the first poll that sees it.
	OverFor time.Duration `yaml:"overFor"`
	// MarginBytes is how far over quota usage must go to count as over.
	MarginBytes uint64 `yaml:"marginBytes"`
	// ReleaseRatio: a frozen container is thawed once usage <= quota ×
	// ReleaseRatio (0 < ratio <= 1).
	ReleaseRatio float64 `yaml:"releaseRatio"`
}

// DefaultConfig is a cautious policy: observe by default; pods may ask to be
// frozen; a freeze turns into a kill after 30 s; spikes under 1 s are ignored.
func DefaultConfig() Config {
	return Config{
		DefaultAction:  ActionObserve,
		AllowedActions: []Action{ActionObserve, ActionFreeze},
		GracePeriod:    30 * time.Second,
		Hysteresis:     Hysteresis{OverFor: time.Second, ReleaseRatio: 1},
		CheckInterval:  100 * time.Millisecond,
		KillRetry:      5 * time.Second,
	}
}

// Validate names every wrong field.
func (c Config) Validate() error {
	var errs []error
	for _, a := range c.AllowedActions {
		if _, err := ParseAction(string(a)); err != nil {
			errs = append(errs, fmt.Errorf("allowedActions: %w", err))
		}
	}
	if len(c.AllowedActions) == 0 {
		errs = append(errs, errors.New("allowedActions: must name at least one action"))
	}
	if _, err := ParseAction(string(c.DefaultAction)); err != nil {
		errs = append(errs, fmt.Errorf("defaultAction: %w", err))
	} else if !slices.Contains(c.AllowedActions, c.DefaultAction) {
		errs = append(errs, fmt.Errorf("defaultAction %q is not in allowedActions %v", c.DefaultAction, c.AllowedActions))
	}
	if c.GracePeriod < 0 {
		errs = append(errs, errors.New("gracePeriod must not be negative"))
	}
	if c.Hysteresis.OverFor < 0 {
		errs = append(errs, errors.New("hysteresis.overFor must not be negative"))
	}
	if r := c.Hysteresis.ReleaseRatio; !(r > 0 && r <= 1) {
		errs = append(errs, fmt.Errorf("hysteresis.releaseRatio %v must be in (0, 1]", r))
	}
	if c.CheckInterval < time.Millisecond {
		errs = append(errs, fmt.Errorf("checkInterval %s must be at least 1ms", c.CheckInterval))
	}
	if c.KillRetry <= 0 {
		errs = append(errs, errors.New("killRetry must be positive"))
	}
	return errors.Join(errs...)
}

// decision is the action chosen for one pod, and a rejected annotation.
type decision struct {
	action Action
	source string // "default" or "annotation"
	// rejected is the annotation value that was not honoured, with why.
	rejected, reason string
}

// decide picks the action for a pod from its annotations.
func (c Config) decide(ann map[string]string) decision {
	d := decision{action: c.DefaultAction, source: "default"}
	v, ok := ann[slice.AnnotationEnforcementAction]
	if !ok {
		return d
	}
	shown := v
	if len(shown) > 64 {
		shown = shown[:64] + "..."
	}
	a, err := ParseAction(v)
	switch {
	case err != nil:
		d.rejected, d.reason = shown, unknownAction(shown).Error()
	case !slices.Contains(c.AllowedActions, a):
		d.rejected, d.reason = shown, fmt.Sprintf("%v: %q is not in %v", ErrNotAllowed, a, c.AllowedActions)
	default:
		d.action, d.source = a, "annotation"
	}
	return d
}
