# forkproxy ambassador image: a forking TCP proxy (one process per connection)
# configured from Docker link variables.
#
#   docker build -t forkproxy .
#   docker run -d --name redis_ambassador --network app \
#       -e REDIS_PORT_6379_TCP=tcp://redis:6379 forkproxy
#
# BASE_IMAGE must be a Debian-like image with python3 and its venv module
# (python:3.11-slim, or debian:trixie with python3-venv). scripts/image-test
# builds against a local debootstrapped Debian trixie base (Python 3.13).
# A forked CPython child's cost depends on the interpreter, so the default was
# measured (docs/benchmarks.md, "Which Python"): 3.13 and 3.11 cost the same
# per connection (~330-340 KiB per idle one; 3.12 ~385 and 10% slower to
# connect), and 3.13 has security fixes until October 2029, 3.11 until 2027.
ARG BASE_IMAGE=python:3.13-slim

# ---- build stage: pip, the wheel cache and build backends stay here --------
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# .dockerignore lets through only what the package build needs.
COPY . .

# A venv keeps forkproxy and its dependencies away from the base image's own
# Python packages; pip is removed from it once the install is done. Its
# bytecode is then compiled again, checked by no timestamp: pip's records each
# source file's mtime, which a layer stores rounded to the second, so in the
# runtime stage about half of the modules were stale and compiled again on every
# import, never written (PYTHONDONTWRITEBYTECODE, a read-only venv): ~5 MiB more
# of the container's memory for every `forkproxy status` (psutil's), ~7 MiB for
# any command through typer, and the supervisor's own, in whatever build it fell.
RUN python3 -m venv /opt/forkproxy \
    && /opt/forkproxy/bin/pip install . \
    && /opt/forkproxy/bin/pip uninstall --yes pip \
    && /opt/forkproxy/bin/python -m compileall -q -f --invalidation-mode unchecked-hash \
        /opt/forkproxy/lib \
    && /opt/forkproxy/bin/forkproxy --help > /dev/null

# ---- runtime stage: the base image plus the venv, nothing else -------------
FROM ${BASE_IMAGE}

# The base named, as the interpreter sets much of a connection's cost (see above);
# the version as `forkproxy --version` says it (tests/test_packaging.py holds the two
# equal, scripts/image-test the label and the version installed in the image).
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="forkproxy" \
      org.opencontainers.image.description="Docker ambassador: a forking TCP proxy configured from link variables" \
      org.opencontainers.image.version="0.1.0.dev0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

COPY --from=build /opt/forkproxy /opt/forkproxy

# PYTHONDONTWRITEBYTECODE: the venv is read-only to the runtime user and its
# bytecode was compiled at build time. PYTHONUNBUFFERED: what the `forkproxy`
# command prints is not held in a buffer. Both reach the command only: the
# supervisor that `serve` execs runs with `python -I`, which ignores them, and
# flushes its "listening ..." lines and writes each log line unbuffered itself.
ENV PATH=/opt/forkproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Numeric, so that runtimes enforcing runAsNonRoot can verify it without an
# /etc/passwd entry. Ports come from link variables; unprivileged ports
# (>= 1024) need no capability; README.md "Ambassador image" covers lower ones.
USER 10001:10001

# forkproxy is PID 1: it handles SIGTERM itself (close listeners, drain live
# connections for --grace seconds, default 8, inside docker's 10 s) and reaps
# every child, its own and re-parented orphans alike. No init shim needed.
STOPSIGNAL SIGTERM

HEALTHCHECK --interval=30s --timeout=7s --start-period=5s --retries=3 \
    CMD ["forkproxy", "check"]

ENTRYPOINT ["forkproxy", "serve"]
CMD ["--from-env"]
