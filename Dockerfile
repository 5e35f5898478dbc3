# productsvc container image.
#
#   docker build --build-arg VERSION=$(git describe --always --dirty) -t productsvc .
#   docker run -p 8080:8080 -e API_TOKEN=... -v productsvc-data:/data productsvc
#
# The binary is pure Go (modernc.org/sqlite, no cgo), so the final stage needs
# no C library beyond what alpine ships; it stays on alpine rather than
# scratch/distroless for the shell and ca-certificates (OTLP over HTTPS).

# The builder runs on the build host's platform and cross-compiles for the
# target, so multi-arch builds (buildx --platform) need no emulation.
FROM --platform=$BUILDPLATFORM golang:1.26-alpine AS build
WORKDIR /src

# Dependencies first: this layer is reused until go.mod or go.sum changes.
COPY go.mod go.sum ./
RUN go mod download && go mod verify

COPY . .
ARG VERSION=dev
ARG TARGETOS
ARG TARGETARCH
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w -X main.version=${VERSION}" -o /out/productsvc .

FROM alpine:3.22
ARG VERSION=dev
LABEL org.opencontainers.image.title="productsvc" \
      org.opencontainers.image.description="Product catalogue HTTP service" \
      org.opencontainers.image.version="${VERSION}"

# A fixed, numeric, unprivileged uid/gid: Kubernetes' runAsNonRoot can only
# verify a numeric USER, and the deployment's securityContext uses the same ids.
# /data is created and chowned before VOLUME so a fresh named volume inherits
# the ownership.
RUN apk add --no-cache ca-certificates \
 && addgroup -S -g 10001 productsvc \
 && adduser -S -D -H -u 10001 -G productsvc -h /data -s /sbin/nologin productsvc \
 && mkdir -p /data \
 && chown 10001:10001 /data \
 && chmod 0750 /data

COPY --from=build /out/productsvc /usr/local/bin/productsvc

ENV DB_PATH=/data/products.db \
    ADDR=:8080
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8080

# -healthcheck GETs the service's own /health on ADDR and exits 0 or 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["/usr/local/bin/productsvc", "-healthcheck"]

# Exec form: productsvc is PID 1 and receives SIGTERM directly, which starts
# its graceful shutdown (/ready turns 503, SHUTDOWN_DELAY, drain, checkpoint).
ENTRYPOINT ["/usr/local/bin/productsvc"]
