# dynamo-epp image: a release build with LTO, on a minimal nonroot runtime (no shell).
#
#   docker build -t dynamo-epp:0.1.0 .
#
# The dependency layer is cached until Cargo.toml, Cargo.lock or build.rs change: it builds the
# whole dependency graph against stub sources first. build.rs runs `cargo metadata --offline`
# to find envoy-types' protos, which needs every package of the lock file on disk: `cargo fetch`
# (all platforms) provides them before any build step.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
ENV CARGO_PROFILE_RELEASE_LTO=fat \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
    CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo

COPY Cargo.toml Cargo.lock build.rs ./
# `make` builds jemalloc (tikv-jemalloc-sys). One stub per target declared in Cargo.toml
# (tests/deploy_dockerfile.rs keeps this list honest).
RUN apt-get update \
 && apt-get install -y --no-install-recommends make=4.3-4.1 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p src/bin benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > src/bin/dynamo-epp-sim.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/ext_proc_stream.rs \
 && echo 'fn main() {}' > benches/envoy_load.rs \
 && echo 'fn main() {}' > benches/index.rs \
 && echo 'fn main() {}' > benches/tokenize.rs \
 && echo 'fn main() {}' > benches/decision.rs \
 && echo 'fn main() {}' > benches/full_path.rs \
 && echo 'fn main() {}' > benches/queue.rs \
 && cargo fetch --locked \
 && cargo build --release --locked --offline --bin dynamo-epp

COPY src ./src
# COPY keeps the sources' timestamps, which can be older than the stub build: touch them so
# cargo rebuilds the crate itself (dependencies stay cached).
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --offline --bin dynamo-epp \
 && cp target/release/dynamo-epp /dynamo-epp

# glibc and libgcc only; uid/gid 65532 (nonroot), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /dynamo-epp /dynamo-epp
USER 65532:65532
# ext_proc gRPC (TLS), gRPC health, Prometheus metrics.
EXPOSE 9002 9003 9090
ENTRYPOINT ["/dynamo-epp"]
