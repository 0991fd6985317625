package slice_test

import (
	"errors"
	"testing"

	"github.com/visionslice/visionslice/deviceplugin/slice"
)

func TestIDRoundTrip(t *testing.T) {
	t.Parallel()
	for _, id := range []slice.ID{
		{GPU: "GPU-8f6c2a3e-1d1b-4b8e-9d0c-1c2d3e4f5a6b", Index: 0},
		{GPU: "GPU-x", Index: 79},
		{GPU: "MIG-GPU-a/1/0", Index: 3},
	} {
		got, err := slice.ParseID(id.String())
		if err != nil || got != id {
			t.Errorf("ParseID(%q) = %+v, %v; want %+v", id.String(), got, err, id)
		}
	}
}

func TestParseIDErrors(t *testing.T) {
	t.Parallel()
	for _, s := range []string{"", "GPU-x", "::3", "GPU-x::", "GPU-x::-1", "GPU-x::a", "GPU-x:3"} {
		if _, err := slice.ParseID(s); !errors.Is(err, slice.ErrBadID) {
			t.Errorf("ParseID(%q): err = %v, want ErrBadID", s, err)
		}
	}
}

func FuzzParseID(f *testing.F) {
	for _, s := range []string{"GPU-x::0", "::", "a::b::3", "GPU-x::99999999999999999999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := slice.ParseID(s)
		if err != nil {
			return
		}
		if back, err := slice.ParseID(id.String()); err != nil || back != id {
			t.Fatalf("%q parsed as %+v, which does not round-trip (%v)", s, id, err)
		}
	})
}

func TestCount(t *testing.T) {
	t.Parallel()
	const gib = 1 << 30
	tests := []struct {
		total, reserved, slice uint64
		want                   int
	}{
		{80 * gib, 0, gib, 80},
		{80 * gib, gib / 2, gib, 79},
		{40 * gib, 0, 2 * gib, 20},
		{gib, gib, gib, 0},
		{gib, 2 * gib, gib, 0},
		{gib, 0, 0, 0},
	}
	for _, tc := range tests {
		if got := slice.Count(tc.total, tc.reserved, tc.slice); got != tc.want {
			t.Errorf("Count(%d, %d, %d) = %d, want %d", tc.total, tc.reserved, tc.slice, got, tc.want)
		}
	}
}

func TestAssignmentSignature(t *testing.T) {
	t.Parallel()
	key := []byte("shared-by-scheduler-and-agents")
	a := slice.Assignment{PodUID: "uid-1", Node: "node-a", GPU: "GPU-1"}
	sig := a.Sign(key)
	if err := a.Verify(key, sig); err != nil {
		t.Fatalf("own signature refused: %v", err)
	}
	forged := []struct {
		name string
		a    slice.Assignment
		key  []byte
		sig  string
	}{
		{"other gpu", slice.Assignment{PodUID: "uid-1", Node: "node-a", GPU: "GPU-2"}, key, sig},
		{"other pod", slice.Assignment{PodUID: "uid-2", Node: "node-a", GPU: "GPU-1"}, key, sig},
		{"other node", slice.Assignment{PodUID: "uid-1", Node: "node-b", GPU: "GPU-1"}, key, sig},
		{"other key", a, []byte("guessed"), sig},
		{"not hex", a, key, "zz"},
		{"empty", a, key, ""},
	}
	for _, tc := range forged {
		if err := tc.a.Verify(tc.key, tc.sig); !errors.Is(err, slice.ErrForgedAssignment) {
			t.Errorf("%s: err = %v, want ErrForgedAssignment", tc.name, err)
		}
	}
	if err := a.Verify(nil, sig); err == nil {
		t.Error("verified without a key")
	}
}

func TestAssignmentFromAnnotations(t *testing.T) {
	t.Parallel()
	key := []byte("k")
	a := slice.Assignment{PodUID: "uid", Node: "n", GPU: "GPU-1"}
	ann := map[string]string{
		slice.AnnotationAssignedGPU:         a.GPU,
		slice.AnnotationAssignedNode:        a.Node,
		slice.AnnotationAssignmentSignature: a.Sign(key),
	}
	got, ok, err := slice.AssignmentFromAnnotations("uid", ann, key)
	if err != nil || !ok || got != a {
		t.Fatalf("got %+v %v %v", got, ok, err)
	}
	// The pod's owner copies the record to another pod: refused.
	if _, ok, err := slice.AssignmentFromAnnotations("other-uid", ann, key); ok || err == nil {
		t.Errorf("copied record accepted")
	}
	// No record: neither ok nor an error.
	if _, ok, err := slice.AssignmentFromAnnotations("uid", map[string]string{"x": "y"}, key); ok || err != nil {
		t.Errorf("no record: ok=%v err=%v", ok, err)
	}
}
