# strait: east-west gateway image, a stand-in for the istio-eastwestgateway image.
#
#   docker build -t strait:0.1.0 .
#   docker run --rm -v "$PWD/config:/etc/strait:ro" -v "$PWD/certs:/etc/certs:ro" \
#     -p 15443:15443 -p 15021:15021 -p 15090:15090 strait:0.1.0
#
# The binary is glibc-linked and runs on distroless/cc (glibc, libgcc, CA roots, no shell).
# A static musl build (`--target x86_64-unknown-linux-musl`, with musl-tools for ring's C
# code) could run FROM scratch instead; it is not the recipe here because it has not been
# built and tested, and musl's allocator is slow under many concurrent connections.

# --- planner: reduce the source tree to the manifests plus stub sources ------------------
# The stubs depend only on the Cargo manifests, Cargo.lock and the set of .rs file names, so the
# dependency layer in the builder below stays cached while source contents change.
FROM rust:1-slim-bookworm AS planner
WORKDIR /build
COPY . .
RUN set -eu; \
    mkdir -p /skeleton; \
    cp Cargo.lock /skeleton/; \
    find . -not -path './target/*' \( -name Cargo.toml -o -name '*.rs' \) -exec sh -eu -c ' \
        for f; do \
            mkdir -p "/skeleton/${f%/*}"; \
            case "$f" in \
                *.rs) echo "fn main() { }" > "/skeleton/$f" ;; \
                *) cp "$f" "/skeleton/$f" ;; \
            esac; \
        done' sh {} +

# --- builder: dependencies first (cached), then strait itself ----------------------------
FROM rust:1-slim-bookworm AS builder
WORKDIR /build
COPY --from=planner /skeleton/ ./
RUN cargo build --release --locked
COPY . .
# COPY keeps the build context's mtimes, which may be older than the stub build; touching
# every source makes cargo rebuild strait from the real code instead of reusing the stub.
RUN find . -name '*.rs' -not -path './target/*' -exec touch {} + \
    && cargo build --release --locked

# --- runtime ------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /build/target/release/strait /usr/local/bin/strait
# distroless's "nonroot" user, by number so that runAsNonRoot can verify it.
USER 65532:65532
# 15443 AUTO_PASSTHROUGH/ISTIO_MUTUAL data, 15008 ambient's double HBONE, 15012/15017 istiod
# behind a PASSTHROUGH Gateway, 15021 /healthz/ready, 15090 /stats/prometheus.
# The admin API (15000) binds loopback only and is not exposed.
EXPOSE 15443 15008 15012 15017 15021 15090
# No HEALTHCHECK: distroless has neither a shell nor curl to run one, and strait has no
# probe subcommand. Health is the orchestrator's job: Kubernetes probes GET :15021/healthz/ready
# (200 ready, 503 draining), see deploy/strait-eastwest.yaml.
# Configuration is a mounted directory of Istio YAML (ConfigMap in Kubernetes);
# certificates are read from /etc/certs (cert-chain.pem, key.pem, root-cert.pem).
ENTRYPOINT ["/usr/local/bin/strait"]
CMD ["run", "-c", "/etc/strait"]
