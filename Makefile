# visionslice: `make run` and `make test` are the contract; both install what is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

export VISIONSLICE_CACHE ?= $(HOME)/.cache/visionslice
export VISIONSLICE_ORT_LIB ?= $(VISIONSLICE_CACHE)/onnxruntime-1.30.0/libonnxruntime.so.1
export VISIONSLICE_PPOCR_MODEL ?= $(VISIONSLICE_CACHE)/models/ch_PP-OCRv4_det_infer.onnx

BIN := bin
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/visionslice/visionslice/nodeagent.Version=$(VERSION)
GOTESTFLAGS ?=

.PHONY: all deps build run test unit bench lint clean k8s-tools e2e

all: build

deps:
	@bash .ci/deps.sh

build: deps
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/...

run: build
	@mkdir -p /tmp/visionslice-run/device-plugins
	./$(BIN)/visionslice-agent --config=manifests/local/agent.yaml

# Every tier: unit, integration (real ORT, OpenCV, cgroup v2, gRPC over unix
# sockets) and the binary-level tests.
# go test -v, filtered by .ci/testlog.awk so the log names every skip and its
# reason; the whole output is kept in $(BIN)/test.log.
TESTLOG = | tee -a $(CURDIR)/$(BIN)/test.log | awk -f $(CURDIR)/.ci/testlog.awk

test: deps
	@mkdir -p $(BIN) && : > $(BIN)/test.log
	$(GO) vet ./...
	$(GO) test -v $(GOTESTFLAGS) -count=1 ./... 2>&1 $(TESTLOG)
	@$(MAKE) --no-print-directory e2e

# The Kubernetes tier: test/k8s is a Go module of its own (k8s.io/kubernetes
# with its staging replace lines stays out of go.mod), run against a real etcd,
# kube-apiserver and kube-scheduler built once into $(VISIONSLICE_CACHE)/k8s.
k8s-tools:
	@bash test/k8s/build-tools.sh

e2e: deps
	@bin=$$(bash test/k8s/build-tools.sh); cd test/k8s && $(GO) vet ./... && \
		VISIONSLICE_K8S_BIN=$$bin $(GO) test -v $(GOTESTFLAGS) -count=1 ./... 2>&1 $(TESTLOG)

bench: deps
	$(GO) test -run='^$$' -bench=. -benchmem -count=1 ./...

lint:
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi

clean:
	rm -rf $(BIN)
