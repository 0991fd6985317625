package lifecycle

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Reloader brings one model in line with the repository (*server.Server).
type Reloader interface {
	RepositoryRoot() string
	ReloadModel(name string) error
}

// Watcher reloads a model when files under its directory change, once
// they have been quiet for the debounce period.
type Watcher struct {
	r        Reloader
	debounce time.Duration
	logger   *slog.Logger
}

// NewWatcher returns a watcher of r's repository.
func NewWatcher(r Reloader, debounce time.Duration, logger *slog.Logger) *Watcher {
	return &Watcher{r: r, debounce: debounce, logger: logger}
}

// Run watches until ctx ends.
func (w *Watcher) Run(ctx context.Context) error {
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("repository watcher: %w", err)
	}
	defer fw.Close()
	root := filepath.Clean(w.r.RepositoryRoot())
	if err := fw.Add(root); err != nil {
		return fmt.Errorf("watch model repository: %w", err)
	}
	// Model directories and their version directories (fsnotify does not
	// recurse).
	addTree := func(dir string, depth int) {
		if err := fw.Add(dir); err != nil {
			w.logger.Warn("not watching a repository directory", "path", dir, "err", err)
			return
		}
		if depth == 0 {
			return
		}
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
				_ = fw.Add(filepath.Join(dir, e.Name()))
			}
		}
	}
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			addTree(filepath.Join(root, e.Name()), 1)
		}
	}
	w.logger.Info("watching the model repository", "path", root, "debounce_seconds", w.debounce.Seconds())

	due := map[string]time.Time{} // model -> when to reload
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err, ok := <-fw.Errors:
			if !ok {
				return nil
			}
			w.logger.Warn("repository watcher error", "err", err)
		case ev, ok := <-fw.Events:
			if !ok {
				return nil
			}
			rel, err := filepath.Rel(root, ev.Name)
			if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
				continue
			}
			parts := strings.Split(rel, string(filepath.Separator))
			if strings.HasPrefix(parts[0], ".") {
				continue
			}
			if ev.Has(fsnotify.Create) && len(parts) <= 2 {
				if st, err := os.Stat(ev.Name); err == nil && st.IsDir() {
					addTree(ev.Name, 2-len(parts))
				}
			}
			due[parts[0]] = time.Now().Add(w.debounce)
			timer.Reset(w.debounce)
		case <-timer.C:
			now := time.Now()
			next := time.Hour
			for model, at := range due {
				if wait := at.Sub(now); wait > 0 {
					next = min(next, wait)
					continue
				}
				delete(due, model)
				if err := w.r.ReloadModel(model); err != nil {
					w.logger.Warn("model reload failed", "model", model, "err", err)
				}
			}
			timer.Reset(next)
		}
	}
}
