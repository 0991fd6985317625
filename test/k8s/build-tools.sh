#!/usr/bin/env bash
# Builds the real control plane used by the test/k8s tier from the Go module
# proxy, into a cache outside the clone (CI clones afresh; the cache and Go's
# build cache make a rebuild a no-op):
#
#   $VISIONSLICE_CACHE/k8s/<version>/bin/{etcd,kube-apiserver,kube-scheduler}
#
# kube-apiserver and kube-scheduler come from k8s.io/kubernetes (tools/kube,
# a module with the staging replace lines), etcd from go.etcd.io/etcd/server/v3's
# etcdmain (tools/etcd, a module of its own because kubernetes pins etcd v3.7).
# Idempotent: skips when the binaries exist and the stamp (versions, Go
# version, tools go.mod/go.sum hashes) matches. Prints the bin directory last.
# --check: only print the bin directory if it is up to date, else exit 1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
cache=${VISIONSLICE_CACHE:-$HOME/.cache/visionslice}
dir=$cache/k8s/$K8S_VERSION-etcd$ETCD_VERSION
bin=$dir/bin
GO=${GO:-go}

stamp=$(
	echo "kubernetes $K8S_VERSION etcd $ETCD_VERSION"
	"$GO" env GOVERSION GOOS GOARCH
	cat "$here/tools/kube/go.mod" "$here/tools/kube/go.sum" \
		"$here/tools/etcd/go.mod" "$here/tools/etcd/go.sum" "$here/tools/etcd/main.go" | sha256sum
)

fresh() {
	[[ -x $bin/etcd && -x $bin/kube-apiserver && -x $bin/kube-scheduler && -f $dir/stamp ]] &&
		[[ "$(cat "$dir/stamp")" == "$stamp" ]]
}

if fresh; then
	echo "$bin"
	exit 0
fi
if [[ ${1:-} == --check ]]; then
	echo "control-plane binaries missing or stale in $bin: run make k8s-tools" >&2
	exit 1
fi

mkdir -p "$dir"
# One build at a time (make test and make k8s-tools may race).
exec 9>"$dir/.lock"
flock 9
if fresh; then
	echo "$bin"
	exit 0
fi

echo "building kube-apiserver, kube-scheduler $K8S_VERSION and etcd $ETCD_VERSION into $bin (cold: ~10 min on 2 cores)" >&2
tmp=$(mktemp -d "$dir/.build.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

# The version variables hack/lib/version.sh sets: without them the binaries
# report v0.0.0-master and version-skew checks misbehave.
minor=${K8S_VERSION#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

(cd "$here/tools/kube" && CGO_ENABLED=0 "$GO" build -trimpath -ldflags "$ldflags" -o "$tmp/" \
	k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-scheduler)
(cd "$here/tools/etcd" && CGO_ENABLED=0 "$GO" build -trimpath -ldflags "-s -w" -o "$tmp/etcd" .)

rm -rf "$bin"
mv "$tmp" "$bin"
trap - EXIT
echo "$stamp" >"$dir/stamp"
echo "built in $((SECONDS - start))s" >&2
echo "$bin"
