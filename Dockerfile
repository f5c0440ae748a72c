# syntax=docker/dockerfile:1
# kfrtrl server image: built in the Rust image, run as a non-root user in a distroless image (no
# shell, no package manager). Build: `docker build -t kfrtrl .`; run:
# `docker run -p 8080:8080 -v kfrtrl-data:/data kfrtrl`. Configure with KFRTRL_* variables
# (README: Configuration). The binary targets x86-64-v3 (AVX2, FMA; .cargo/config.toml).
# tests/service/deploy_image.rs runs the binary exactly as this file does (entrypoint, command, ENV,
# healthcheck), so keep the two in step.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kfrtrl \
    && cp target/release/kfrtrl /usr/local/bin/kfrtrl \
    && mkdir /data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/kfrtrl /usr/local/bin/kfrtrl
# The binary embeds DejaVu Sans (PNG plots); its licence travels with it.
COPY --from=build /src/assets/fonts/LICENSE /usr/share/doc/kfrtrl/DejaVuSans-LICENSE
# An empty data directory owned by the runtime user, so that a fresh named volume inherits it.
COPY --from=build --chown=65532:65532 /data /data
ENV KFRTRL_LISTEN=0.0.0.0:8080 \
    KFRTRL_DATA_DIR=/data \
    KFRTRL_LOG_FORMAT=json
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
USER 65532:65532
# Exec form: no shell; the probe reads KFRTRL_LISTEN like the server does.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/kfrtrl", "healthcheck", "--quiet"]
# Exec form: kfrtrl is PID 1 and receives SIGTERM itself (it drains, then exits).
ENTRYPOINT ["/usr/local/bin/kfrtrl"]
CMD ["serve"]
