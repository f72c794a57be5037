# syntax=docker/dockerfile:1
# The meshward image: one image for every component, its entry point the `meshward` command.
#   meshward operator            the operator, and the injector's admission webhook
#   meshward identity serve      the identity service
#   meshward policy serve        the policy server
#   meshward proxy               the sidecar proxy (the injector's proxy container)
#   meshward proxy-init          the iptables rules (the injector's init container)
# Build: docker build -t ghcr.io/meshward/meshward:0.1.0 .   (the tag the injector puts in pods)
#
# The builder installs exactly the pins of requirements.lock, each file checked against its hash,
# and builds the meshward wheel with the setuptools that requirements-build.lock pins; both locks
# come from pyproject.toml through scripts/lock.py. tests/test_image.py runs this builder stage's
# COPY and RUN lines outside Docker, then every entry point's --help from the result.

# A pinned Python patch release on Debian 13. For a release build, pin it by digest too:
# ARG PYTHON_IMAGE=python:3.11.14-slim-trixie@sha256:<docker buildx imagetools inspect ...>
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS builder
# The same paths in both stages: a virtual environment does not survive being moved.
ENV VIRTUAL_ENV=/opt/meshward \
    BUILD_VENV=/opt/build \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
WORKDIR /src
COPY requirements.lock requirements-build.lock ./
# Hash-checking mode also refuses any dependency the lock does not pin; wheels only, no compiler.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv "$BUILD_VENV" \
    && "$BUILD_VENV/bin/pip" install --require-hashes --only-binary=:all: \
        -r requirements-build.lock \
    && python3 -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY crds/ crds/
COPY meshward/ meshward/
# --no-index for meshward itself: every dependency it declares must already be there, from the
# lock, or the install fails; pip check then confirms the environment is whole.
RUN "$BUILD_VENV/bin/python" -m pip wheel --no-build-isolation --no-deps --no-index \
        --wheel-dir dist . \
    && "$VIRTUAL_ENV/bin/pip" install --no-index dist/meshward-*.whl \
    && "$VIRTUAL_ENV/bin/pip" check

FROM ${PYTHON_IMAGE}
# iptables for `meshward proxy-init`, which the injector runs as root with NET_ADMIN and NET_RAW
# (Debian's default is the nf_tables backend; MESHWARD_IPTABLES=/usr/sbin/iptables-legacy picks
# the legacy one). Everything else runs as the proxy's UID, 2102, which proxy-init exempts from
# redirection (meshward/inject.py and meshward/proxy/interception.py name the same UID).
RUN apt-get update \
    && apt-get install --yes --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 2102 meshward \
    && useradd --uid 2102 --gid 2102 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin meshward
COPY --from=builder /opt/meshward /opt/meshward
ENV VIRTUAL_ENV=/opt/meshward \
    PATH=/opt/meshward/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="meshward" \
      org.opencontainers.image.description="Service-mesh identity and authorization for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric, so that Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 2102:2102
ENTRYPOINT ["meshward"]
CMD ["--help"]
