# The node agent and its model worker, with OpenCV 4.6 and ONNX Runtime 1.30.0.
# Build from the repository root:
#   docker build -f manifests/docker/agent.Dockerfile -t visionslice-agent .
FROM golang:1.26-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends npm && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# .ci/deps.sh installs libopencv-dev and fetches ONNX Runtime into the cache,
# checked by sha256, exactly as `make deps` does on a developer's machine.
ENV VISIONSLICE_CACHE=/cache
RUN bash .ci/deps.sh && make build VERSION=$(git describe --tags --always 2>/dev/null || echo image)

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      libopencv-core406 libopencv-imgproc406 libopencv-imgcodecs406 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /cache/onnxruntime-1.30.0/libonnxruntime.so.1 /usr/lib/visionslice/libonnxruntime.so.1
COPY --from=build /src/bin/visionslice-agent /src/bin/visionslice-worker /usr/bin/
USER 0
ENTRYPOINT ["/usr/bin/visionslice-agent"]
