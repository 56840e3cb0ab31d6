# syntax=docker/dockerfile:1
# The manager and dataplane image: a static binary on distroless, running as
# uid 65532. GO_VERSION matches hack/versions.env (a test checks it).
ARG GO_VERSION=1.26
FROM golang:${GO_VERSION} AS build
ARG TARGETOS=linux
ARG TARGETARCH
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# dockerfile_test.go runs this exact command, so a build that works there works here.
RUN CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} go build -trimpath -ldflags="-s -w" -o /out/stickylb .

FROM gcr.io/distroless/static:nonroot
COPY --from=build /out/stickylb /stickylb
USER 65532:65532
ENTRYPOINT ["/stickylb"]
