package manifests_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

var metricRE = regexp.MustCompile(`visionslice_[a-z0-9_]+`)

// TestManifests_MetricsExist: every visionslice_* metric that an alert rule or
// the Grafana dashboard queries is a metric name the project's code defines
// (a string literal in a non-test Go file of the main module), so an alert
// can never watch a series that does not exist.
func TestManifests_MetricsExist(t *testing.T) {
	defined := definedMetrics(t, filepath.Join(manifestsDir, ".."))
	if len(defined) == 0 {
		t.Fatal("found no visionslice_* metric names in the project's Go code")
	}
	files, err := filepath.Glob(filepath.Join(manifestsDir, "monitoring", "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no monitoring manifests (%v)", err)
	}
	used := 0
	for _, f := range files {
		if ext := filepath.Ext(f); ext != ".yaml" && ext != ".json" {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range slices.Compact(slices.Sorted(slices.Values(metricRE.FindAllString(string(b), -1)))) {
			used++
			base := name
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if b, ok := strings.CutSuffix(name, suffix); ok && defined[b] {
					base = b
				}
			}
			if !defined[base] {
				t.Errorf("%s queries %s, which no Go code of the project defines", filepath.Base(f), name)
			}
		}
	}
	if used == 0 {
		t.Fatal("the monitoring manifests query no visionslice_* metric")
	}
}

// definedMetrics collects string literals that look like metric names from
// the non-test Go files of the main module under root (test/ excluded).
func definedMetrics(t *testing.T, root string) map[string]bool {
	t.Helper()
	names := map[string]bool{}
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if rel, _ := filepath.Rel(root, path); rel == "test" || strings.HasPrefix(d.Name(), ".") && rel != "." {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			if lit, ok := n.(*ast.BasicLit); ok && lit.Kind == token.STRING {
				if s, err := strconv.Unquote(lit.Value); err == nil && metricRE.FindString(s) == s {
					names[s] = true
				}
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatalf("read the project's Go code: %v", err)
	}
	return names
}
