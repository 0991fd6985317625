package procfs_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visionslice/visionslice/nodeagent/procfs"
)

const (
	fixID  = "4f8b2a1c9d3e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4"
	fixUID = "0d4b3c2a-1e5f-4a6b-8c7d-9e0f1a2b3c4d"
	sdPod  = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0d4b3c2a_1e5f_4a6b_8c7d_9e0f1a2b3c4d.slice"
)

func TestParseFixtures(t *testing.T) {
	t.Parallel()
	cases := []struct {
		file string
		want procfs.Container
		err  error  // sentinel the error must wrap
		msg  string // text the error must contain
	}{
		{file: "systemd-containerd-burstable.txt", want: procfs.Container{PodUID: fixUID, ID: fixID, Runtime: "containerd", QoS: "burstable",
			CgroupPath: sdPod + "/cri-containerd-" + fixID + ".scope"}},
		{file: "systemd-crio-besteffort.txt", want: procfs.Container{PodUID: fixUID, ID: fixID, Runtime: "cri-o", QoS: "besteffort",
			CgroupPath: "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d4b3c2a_1e5f_4a6b_8c7d_9e0f1a2b3c4d.slice/crio-" + fixID + ".scope"}},
		{file: "systemd-docker-guaranteed.txt", want: procfs.Container{PodUID: fixUID, ID: fixID, Runtime: "docker", QoS: "guaranteed",
			CgroupPath: "/kubepods.slice/kubepods-pod0d4b3c2a_1e5f_4a6b_8c7d_9e0f1a2b3c4d.slice/docker-" + fixID + ".scope"}},
		{file: "cgroupfs-burstable-v1.txt", want: procfs.Container{PodUID: fixUID, ID: fixID, QoS: "burstable"}},
		{file: "cgroupfs-guaranteed-v2.txt", want: procfs.Container{PodUID: fixUID, ID: fixID, QoS: "guaranteed",
			CgroupPath: "/kubepods/pod" + fixUID + "/" + fixID}},
		{file: "cgroupfs-besteffort-v2.txt", want: procfs.Container{PodUID: fixUID, ID: fixID, QoS: "besteffort",
			CgroupPath: "/kubepods/besteffort/pod" + fixUID + "/" + fixID}},
		{file: "hybrid-systemd-containerd.txt", want: procfs.Container{PodUID: fixUID, ID: fixID, Runtime: "containerd", QoS: "burstable",
			CgroupPath: sdPod + "/cri-containerd-" + fixID + ".scope"}},
		{file: "kind-nested.txt", want: procfs.Container{PodUID: fixUID, ID: fixID, Runtime: "containerd", QoS: "besteffort",
			CgroupPath: "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0d4b3c2a_1e5f_4a6b_8c7d_9e0f1a2b3c4d.slice/cri-containerd-" + fixID + ".scope"}},
		{file: "static-pod-md5-uid.txt", want: procfs.Container{PodUID: "6c1f4a2e9b8d7c6f5e4d3c2b1a098f7e", ID: fixID, QoS: "burstable",
			CgroupPath: "/kubepods/burstable/pod6c1f4a2e9b8d7c6f5e4d3c2b1a098f7e/" + fixID}},
		{file: "other-ns-systemd.txt", want: procfs.Container{PodUID: fixUID, ID: fixID, Runtime: "containerd", QoS: "besteffort",
			CgroupPath: "/../../kubepods-besteffort.slice/kubepods-besteffort-pod0d4b3c2a_1e5f_4a6b_8c7d_9e0f1a2b3c4d.slice/cri-containerd-" + fixID + ".scope"}},
		{file: "other-ns-cgroupfs.txt", want: procfs.Container{PodUID: fixUID, ID: fixID, QoS: "besteffort",
			CgroupPath: "/../../../besteffort/pod" + fixUID + "/" + fixID}},
		{file: "other-ns-cgroupfs-same-qos.txt", want: procfs.Container{PodUID: fixUID, ID: fixID,
			CgroupPath: "/../../pod" + fixUID + "/" + fixID}},
		{file: "host-process.txt", err: procfs.ErrNotContainer},
		{file: "pod-level.txt", err: procfs.ErrNotContainer, msg: "pod's cgroup"},
		{file: "qos-level.txt", err: procfs.ErrNotContainer},
		{file: "crio-conmon.txt", err: procfs.ErrNotContainer, msg: "conmon"},
		{file: "malformed-no-colons.txt", err: procfs.ErrMalformed, msg: "want hierarchy-id:controllers:path"},
		{file: "malformed-hierarchy-id.txt", err: procfs.ErrMalformed, msg: `hierarchy id "x"`},
		{file: "malformed-relative-path.txt", err: procfs.ErrMalformed, msg: "not absolute"},
		{file: "malformed-container-id.txt", err: procfs.ErrMalformed, msg: "not a container scope"},
		{file: "malformed-unknown-scope.txt", err: procfs.ErrMalformed, msg: "runc-"},
		{file: "malformed-pod-uid.txt", err: procfs.ErrMalformed, msg: "is not pod<uid>"},
		{file: "malformed-short-container-id.txt", err: procfs.ErrMalformed, msg: `container id "short"`},
		{file: "malformed-v2-with-controllers.txt", err: procfs.ErrMalformed, msg: "names no controllers"},
		{file: "malformed-conflicting-v1.txt", err: procfs.ErrMalformed, msg: "two containers"},
		{file: "malformed-empty.txt", err: procfs.ErrMalformed, msg: "empty"},
	}
	seen := map[string]bool{}
	for _, tc := range cases {
		seen[tc.file] = true
		t.Run(tc.file, func(t *testing.T) {
			t.Parallel()
			f, err := os.Open(filepath.Join("testdata", "cgroup", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got, err := procfs.Parse(f)
			if tc.err != nil {
				if !errors.Is(err, tc.err) || !strings.Contains(err.Error(), tc.msg) {
					t.Fatalf("Parse = %+v, %v; want error %v containing %q", got, err, tc.err, tc.msg)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("Parse =\n %+v, %v\nwant\n %+v", got, err, tc.want)
			}
		})
	}
	entries, err := os.ReadDir(filepath.Join("testdata", "cgroup"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !seen[e.Name()] {
			t.Errorf("fixture %s has no case", e.Name())
		}
	}
}

func TestReaderFixtureTree(t *testing.T) {
	t.Parallel()
	r := procfs.NewReader(filepath.Join("testdata", "proc"))
	c, err := r.Container(4242)
	if err != nil || c.ID != fixID || c.PodUID != fixUID {
		t.Fatalf("Container(4242) = %+v, %v", c, err)
	}
	if _, err := r.Container(1); !errors.Is(err, procfs.ErrNotContainer) {
		t.Fatalf("Container(1) = %v, want ErrNotContainer", err)
	}
	if _, err := r.Container(999999); !errors.Is(err, procfs.ErrNoProcess) {
		t.Fatalf("Container(999999) = %v, want ErrNoProcess", err)
	}
	if _, err := r.Container(0); !errors.Is(err, procfs.ErrNoProcess) {
		t.Fatalf("Container(0) = %v, want ErrNoProcess", err)
	}
}

// The real /proc of a process on this host parses, as a host process.
func TestReaderRealProc(t *testing.T) {
	t.Parallel()
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	_, err := procfs.NewReader("").Container(cmd.Process.Pid)
	if err != nil && !errors.Is(err, procfs.ErrNotContainer) {
		t.Fatalf("Container(real sleep) = %v, want a parse or ErrNotContainer", err)
	}
}

func FuzzParse(f *testing.F) {
	entries, _ := os.ReadDir(filepath.Join("testdata", "cgroup"))
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join("testdata", "cgroup", e.Name()))
		if err == nil {
			f.Add(string(b))
		}
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := procfs.Parse(strings.NewReader(s))
		if err != nil {
			if !errors.Is(err, procfs.ErrMalformed) && !errors.Is(err, procfs.ErrNotContainer) {
				t.Fatalf("Parse(%q) error %v wraps neither ErrMalformed nor ErrNotContainer", s, err)
			}
			return
		}
		if c.PodUID == "" || c.ID == "" {
			t.Fatalf("Parse(%q) = %+v without error but with empty fields", s, c)
		}
		if c.CgroupPath != "" && !strings.Contains(s, c.CgroupPath) {
			t.Fatalf("Parse(%q) cgroup path %q is not in the input", s, c.CgroupPath)
		}
	})
}
