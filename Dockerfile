# syntax=docker/dockerfile:1
# score-proxy: built with cargo in the official Rust image, run from a slim Debian of the
# same release (same glibc) that holds the binary, CA certificates and nothing else. One
# image serves the proxy (default), the upstream simulator (`simulate-upstream`) and the
# load generator (`loadgen`).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# rustls's crypto (aws-lc-sys) compiles C: the slim image has gcc, add g++ to be safe.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artifacts between builds (BuildKit, the default
# builder of docker compose); --locked builds exactly what Cargo.lock pins.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin score-proxy \
    && install -m 0755 target/release/score-proxy /usr/local/bin/score-proxy

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# CA certificates: the real score API is HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin score-proxy
COPY --from=build /usr/local/bin/score-proxy /usr/local/bin/score-proxy
USER 10001:10001
ENV SCORE_PROXY_LISTEN=0.0.0.0:8000
EXPOSE 8000
# No curl in this image: the binary checks /health itself. Services that run another
# subcommand (simulator, load generator) override or disable this in docker-compose.yml.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["score-proxy", "healthcheck", "--url", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["score-proxy"]
