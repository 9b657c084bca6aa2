# pricelab: `make demo` runs the main job on the embedded simulated market; `make test` runs the
# tests. Both set up everything first (a virtual environment from the pinned lock, Java 17).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9

export DAGSTER_HOME := $(CURDIR)/.dagster_home
export PRICELAB_DATA_DIR ?= $(CURDIR)/data
export GX_ANALYTICS_ENABLED := False
export SPARK_LOCAL_IP := 127.0.0.1
export PYSPARK_PYTHON := $(CURDIR)/$(PY)

.PHONY: setup java demo test test-fast ui lock clean-data validate bench-setup

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip sync --quiet --python $(PY) --compile-bytecode requirements.lock
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -e .
	@touch $@

java:
	@if ! java -version 2>&1 | grep -Eq 'version "(1[7-9]|2[0-9])'; then \
		echo "Java 17+ not found: installing openjdk-17-jre-headless"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; \
	fi

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME) && cp dagster.yaml $@

setup: $(VENV)/.installed java $(DAGSTER_HOME)/dagster.yaml

demo: setup
	PRICELAB_DEMO=1 $(PY) -m jobs.demo

# the benchmark's peer estimators (pyproject's optional group `bench`), into the same venv
bench-setup: setup
	$(VENV)/bin/uv pip install --quiet --python $(PY) -c requirements.lock -e ".[bench]"

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

validate: setup
	PRICELAB_DEMO=1 $(VENV)/bin/dagster definitions validate -w workspace.yaml

ui: setup
	PRICELAB_DEMO=1 $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

lock:
	$(VENV)/bin/uv pip compile --quiet --python-version 3.11 --no-header requirements.in -o requirements.lock

clean-data:
	rm -rf data .dagster_home
