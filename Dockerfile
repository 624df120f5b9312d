# evod container image, for users with a registry: `docker build -t evod .`
#
#   docker run -d --name evod --read-only -v evod-state:/var/lib/evod evod run
#   docker exec evod evod status
#
# The entrypoint is `evod` and the default command `run`: the arguments after
# the image are an evod command line, so the same image runs a single host
# (`run`), a coordinator (`run --broker URL`) or an evaluator (`join URL`).
#
# Build stage: the toolchain image compiles a static binary (glibc and
# libstdc++, with +crt-static) with llama.cpp in it (the `llm` feature: the
# perplexity task runs in this image too; cmake, clang and libclang-dev
# build llama.cpp), without its debug sections. Runtime stage: `FROM scratch` with only that binary, a
# non-root user (uid 65532) and the state folder as a volume. Without a
# registry, `cargo xtask image` builds the same image from docker/Dockerfile,
# whose runtime stage is identical to this one (tests/docker.rs checks it).
# `evod run` is PID 1: it reaps orphans and turns SIGTERM (`docker stop`)
# into a graceful stop within --grace-period (keep it below docker's stop
# timeout, 10 s by default, or raise that with `docker stop -t`).

FROM rust:1.95-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang libclang-dev g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p evod -p evod-llama \
      --features evod/llm,evod-llama/static-stdcxx --target x86_64-unknown-linux-gnu \
 && install -D -m 0755 target/x86_64-unknown-linux-gnu/release/evod /out/usr/local/bin/evod \
 && objcopy --strip-debug /out/usr/local/bin/evod \
 && cp -r docker/rootfs/. /out/ \
 && install -d -m 0700 /state

# --- runtime stage: keep identical in Dockerfile and docker/Dockerfile ---
FROM scratch
COPY --from=build /out/ /
COPY --from=build --chown=65532:65532 /state/ /var/lib/evod/
USER 65532:65532
WORKDIR /var/lib/evod
ENV PATH=/usr/local/bin \
    EVOD_DIR=/var/lib/evod \
    EVOD_LOG_FORMAT=json \
    EVOD_GRACE_PERIOD=8s
VOLUME ["/var/lib/evod"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/evod", "status", "--check"]
ENTRYPOINT ["/usr/local/bin/evod"]
CMD ["run"]
