# The scheduler extender: pure Go, no cgo, distroless and non-root.
#   docker build -f manifests/docker/scheduler.Dockerfile -t visionslice-scheduler .
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -o /out/visionslice-scheduler ./cmd/visionslice-scheduler

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/visionslice-scheduler /usr/bin/visionslice-scheduler
USER 65532:65532
ENTRYPOINT ["/usr/bin/visionslice-scheduler"]
