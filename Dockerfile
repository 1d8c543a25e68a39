# syntax=docker/dockerfile:1
# score-proxy: built with cargo in the official Rust image, run from a slim Debian of the
# same release (same glibc). Three images from one build:
#   proxy      (the default, last stage): the proxy binary alone, built without the `demo`
#              feature, so neither the simulator's fault endpoints nor the load generator ship
#   simulator  (`--target simulator`): `score-sim`, the strict stand-in for the score API
#   loadgen    (`--target loadgen`): `score-loadgen`, the compose stack's traffic
# docker-compose.yml builds each service with its target.

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
# builder of docker compose); --locked builds exactly what Cargo.lock pins. The proxy is
# built on its own without default features: the production binary links no simulator.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin score-proxy \
    && install -m 0755 target/release/score-proxy /usr/local/bin/score-proxy \
    && cargo build --release --locked -p score-sim -p score-loadgen \
    && install -m 0755 target/release/score-sim target/release/score-loadgen /usr/local/bin/

FROM debian:${DEBIAN_RELEASE}-slim AS base
# CA certificates: the real score API is HTTPS. /var/lib/score-proxy: the persistent cache's
# directory, owned by the proxy's user, so that a named volume mounted there starts writable.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin score-proxy \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/score-proxy
USER 10001:10001

FROM base AS simulator
COPY --from=build /usr/local/bin/score-sim /usr/local/bin/score-sim
ENV SIM_LISTEN=0.0.0.0:9000
EXPOSE 9000
# No curl here either: bash's /dev/tcp asks /health and looks for a 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9000 && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["score-sim"]

FROM base AS loadgen
COPY --from=build /usr/local/bin/score-loadgen /usr/local/bin/score-loadgen
ENTRYPOINT ["score-loadgen"]

FROM base AS proxy
COPY --from=build /usr/local/bin/score-proxy /usr/local/bin/score-proxy
ENV SCORE_PROXY_LISTEN=0.0.0.0:8000
EXPOSE 8000
# No curl in this image: the binary checks /health itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["score-proxy", "healthcheck", "--url", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["score-proxy"]
