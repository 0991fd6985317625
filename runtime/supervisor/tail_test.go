package supervisor

import (
	"log/slog"
	"testing"
)

// TestTail: the last three lines of a worker's stderr, then any line not
// yet ended, whatever the writes' boundaries.
func TestTail(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		writes []string
		want   string
	}{
		{"nothing", nil, "[]"},
		{"partial only", []string{"load"}, "[load]"},
		{"lines split across writes", []string{"a\nb", "\nc\n"}, "[a b c]"},
		{"only the last three", []string{"1\n2\n3\n4\n"}, "[2 3 4]"},
		{"lines and a partial", []string{"1\n2\n3\n4\n{\"msg\":", "\"x\""}, `[2 3 4 {"msg":"x"]`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tl := &tail{logger: slog.New(slog.DiscardHandler)}
			for _, w := range tc.writes {
				if n, err := tl.Write([]byte(w)); n != len(w) || err != nil {
					t.Fatalf("write %q: %d, %v", w, n, err)
				}
			}
			if got := tl.last(); got != tc.want {
				t.Errorf("last() = %s, want %s", got, tc.want)
			}
		})
	}
}
