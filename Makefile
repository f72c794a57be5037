# The commands a newcomer needs. `make test` sets up everything itself: the virtual environment,
# the dependencies, the local control plane binaries (built once per user, then cached).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: help venv control-plane lint test unit bench proto demo lock lock-upgrade clean

help:
	@echo "make demo    the namespace-jail lockdown on a local control plane, before and after"
	@echo "make test    set up .venv and the local control plane, lint, run the whole suite"
	@echo "make bench   benchmarks (policy compile/decide, apply-to-ConfigMap latency)"
	@echo "make lint    ruff and mypy only"
	@echo "make proto   regenerate the gRPC stubs from meshward/identity/_proto/identity.proto"
	@echo "make lock    regenerate requirements.lock and requirements-build.lock from pyproject.toml"

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(STAMP)

control-plane: venv
	$(VENV)/bin/meshward dev build

lint: venv
	$(VENV)/bin/ruff check meshward tests bench scripts
	$(VENV)/bin/ruff format --check meshward tests bench scripts
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -q -m "not cluster"

test: venv control-plane lint
	$(PY) -m pytest -q

bench: venv control-plane
	$(PY) bench/bench_policy.py
	$(PY) bench/bench_apply.py
	$(PY) bench/bench_devcluster.py
	$(PY) bench/bench_identity.py
	$(PY) bench/bench_proxy.py

proto: venv
	$(PY) -m meshward.identity._proto.generate

demo: venv control-plane
	$(VENV)/bin/meshward demo

lock:
	python3 scripts/lock.py

lock-upgrade:
	python3 scripts/lock.py --upgrade

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
