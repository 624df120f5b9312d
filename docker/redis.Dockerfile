# Redis image built WITHOUT a registry: `cargo xtask image --redis` copies
# Debian's redis-server and redis-cli installed on the build machine, with
# the shared libraries `ldd` lists (at the paths the loader finds them), into
# a build context and runs `docker build -f docker/redis.Dockerfile CONTEXT`.
# Nothing is pulled. Used by deploy/compose.yaml, tests/docker_dist.rs and
# `cargo xtask bench dist`.
#
# Context layout (made by xtask/src/image.rs):
#   rootfs/   /usr/bin/redis-server, /usr/bin/redis-cli, their libraries,
#             etc/passwd and etc/group naming uid 6379 (redis)
#   data/     an empty folder, mode 0700: the data folder's template
#
# Arguments after the image are redis-server's (`--requirepass`,
# `--appendonly yes`, ...); the default listens on all interfaces with the
# AOF on and protected mode off: give it a password (`--requirepass`) on any
# network you do not trust.

FROM scratch
COPY rootfs/ /
COPY --chown=6379:6379 data/ /data/
USER 6379:6379
WORKDIR /data
VOLUME ["/data"]
EXPOSE 6379
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/redis-server"]
CMD ["--dir", "/data", "--bind", "0.0.0.0", "--protected-mode", "no", "--appendonly", "yes"]
