# syntax=docker/dockerfile:1
# iam-key-operator: a static binary on distroless/static, running as the non-root user 65532.
#
#   docker build -t iam-key-operator:0.1.0 .          (or: make image)
#   docker buildx build --platform linux/amd64,linux/arm64 -t <registry>/iam-key-operator:0.1.0 --push .
#
# Each platform is built natively for its own musl target (under emulation when the builder's
# architecture differs), so no cross toolchain is needed.

# The toolchain the image is built with; at least the crate's rust-version.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
# musl-tools: the C toolchain for the static musl target (aws-lc-sys compiles C, and uses cmake
# when its pregenerated build does not fit the target).
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build directory between builds (BuildKit). The script is
# the one `make bench` builds with (same target, profile and allocator), so the benchmarks measure
# this binary; it refuses anything but a static binary: distroless/static has no libc.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    bin="$(hack/build-image-binary.sh)"; \
    cp "$bin" /iam-key-operator; \
    /iam-key-operator --version

FROM gcr.io/distroless/static:nonroot
LABEL org.opencontainers.image.title="iam-key-operator" \
      org.opencontainers.image.description="Kubernetes operator that reconciles IamAccessKey resources into AWS IAM access keys and Secrets" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /iam-key-operator /usr/local/bin/iam-key-operator
# distroless/static's `nonroot` user; the Helm chart and deploy/ run the Pod as this UID/GID.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/iam-key-operator"]
CMD ["run"]
