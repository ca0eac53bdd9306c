# Two commands set everything up on a fresh machine with python3 and make:
#   make run   - creates .venv, installs, starts Envoy + EPP + simulated pods, prints a curl line
#   make test  - creates .venv if needed, runs lint, type checks and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

.PHONY: venv install run test lint typecheck unit e2e bench bench-quick clean k8s-binaries

venv: $(STAMP)

# xds-protos ships an older copy of opentelemetry-proto's modules; whichever pip installs last wins.
# The OTLP trace exporter needs opentelemetry-proto's own, so it is laid down again after everything.
OTLP_PROTO_FIX = $(PY) -m pip install -q --force-reinstall --no-deps \
	"opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"

# Dependencies are (re)installed only when pyproject.toml / setup.py change.
# A .venv without pip (python3-venv missing: `venv` fails after creating bin/python) or on a Python older than
# 3.11 is made again rather than trusted.
VENV_OK = $(PY) -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
$(STAMP): pyproject.toml setup.py examples/epp-plugin-example/pyproject.toml
	@$(VENV_OK) || { \
		rm -rf $(VENV); \
		$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
			|| { echo "Python 3.11 or newer is needed; $(PYTHON) is $$($(PYTHON) -V 2>&1). Try: make PYTHON=python3.11 ..." >&2; exit 1; }; \
		$(PYTHON) -m venv $(VENV) && $(VENV_OK) \
			|| { rm -rf $(VENV); echo "$(PYTHON) -m venv failed (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }; \
	}
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=strict > $(VENV)/install.log 2>&1 \
		|| (cat $(VENV)/install.log; exit 1)
	$(OTLP_PROTO_FIX)
	$(PY) -m pip install -q --no-build-isolation -e examples/epp-plugin-example > /dev/null
	@touch $(STAMP)

# The strict editable install links each source file; relinking picks up files added since.
install: $(STAMP)
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict \
		> $(VENV)/relink.log 2>&1 || (cat $(VENV)/relink.log; exit 1)

# make run ARGS="--pods 8 --config my-epp-config.yaml", make run ARGS=--precise (python -m llmepp.devstack --help)
run: install
	$(PY) -m llmepp.devstack $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The tests are checked with tests/ as the package base, as pytest imports them (`helpers`, `server.client`).
typecheck: install
	$(VENV)/bin/mypy -p llmepp -p llmepp_sim
	$(VENV)/bin/mypy benchmarks
	MYPYPATH=tests $(VENV)/bin/mypy --explicit-package-bases tests

unit: install
	$(VENV)/bin/pytest -q -m "not e2e"

e2e: install
	$(VENV)/bin/pytest -q -m e2e

test: lint typecheck k8s-binaries
	$(VENV)/bin/pytest -q

# The benchmarks need the `bench` extra (matplotlib, vllm-router, smg); installed once per pyproject change.
BENCH_STAMP := $(VENV)/.bench-deps-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[bench]' --config-settings editable_mode=strict > $(VENV)/bench-install.log 2>&1 \
		|| (cat $(VENV)/bench-install.log; exit 1)
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) install
	$(PY) -m benchmarks.run_all

bench-quick: $(BENCH_STAMP) install
	$(PY) -m benchmarks.run_all --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .run

# kube-apiserver (built once from Debian's source package, ~3 min), etcd and kubectl for the
# Kubernetes tests, cached in ~/.cache/llm-epp/k8s/bin; a no-op when the cache is complete.
k8s-binaries:
	@bash tests/k8s/build-kube-apiserver.sh
