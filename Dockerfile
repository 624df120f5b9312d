# evod container image: `docker build -t evod .`
#
#   docker run -d --name evod -v evod-state:/var/lib/evod evod
#   docker exec evod evod status
#
# Build stage: the full toolchain. Runtime stage: Debian slim with only the
# binary, a non-root user, and the state folder as a volume. `evod run` is
# PID 1: it reaps orphans and turns SIGTERM (`docker stop`) into a graceful
# stop within --grace-period (keep it below docker's stop timeout, 10 s by
# default, or raise that with `docker stop -t`).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p evod \
 && install -D -m 0755 target/release/evod /out/evod

FROM debian:bookworm-slim AS runtime
RUN useradd --system --uid 10001 --home-dir /var/lib/evod --create-home evod \
 && install -d -o evod -g evod -m 0700 /var/lib/evod
COPY --from=build /out/evod /usr/local/bin/evod
USER evod
WORKDIR /var/lib/evod
ENV EVOD_DIR=/var/lib/evod \
    EVOD_LOG_FORMAT=json \
    EVOD_GRACE_PERIOD=8s
VOLUME ["/var/lib/evod"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["evod", "status", "--check"]
ENTRYPOINT ["evod", "run"]
