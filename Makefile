# pricelab: `make demo` runs the main job on the embedded simulated market; `make test` runs the
# tests. Both set up everything first (a virtual environment from the pinned lock, Java 17, the
# pinned JVM jars).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9

export DAGSTER_HOME := $(CURDIR)/.dagster_home
export PRICELAB_DATA_DIR ?= $(CURDIR)/data
export GX_ANALYTICS_ENABLED := False
export SPARK_LOCAL_IP := 127.0.0.1
export PYSPARK_PYTHON := $(CURDIR)/$(PY)

.PHONY: setup java maven demo test test-fast ui lock clean-data validate validate-inputs bench-setup

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

maven:
	@if ! command -v mvn >/dev/null; then \
		echo "Maven not found: installing maven"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq maven; \
	fi

# The JVM jars pinned in jvm/pom.xml (GraphFrames) and their runtime dependencies, copied into
# ./jars once; the Spark session puts ./jars/*.jar on its classpath, so runs need no network.
# When the registry does not serve them, setup still succeeds: jars/UNAVAILABLE says why, the
# clustering falls back to plain Spark (and logs it), and the next setup tries again.
jars/.fetched: jvm/pom.xml | java maven
	@rm -rf jars && mkdir -p jars
	@if mvn -q -B -f jvm/pom.xml dependency:copy-dependencies -DincludeScope=runtime \
			-DoutputDirectory=$(CURDIR)/jars >jars/fetch.log 2>&1; then \
		touch $@; echo "fetched the JVM jars of jvm/pom.xml into jars/: $$(cd jars && ls *.jar | tr '\n' ' ')"; \
	else \
		missing=$$(grep -m1 -oE '[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+:jar:[A-Za-z0-9_.-]+' jars/fetch.log); \
		echo "the Maven registry did not serve $${missing:-the pinned artifacts} (see jars/fetch.log)" >jars/UNAVAILABLE; \
		echo "WARNING: the JVM jars of jvm/pom.xml not fetched: $$(cat jars/UNAVAILABLE); connected components will use the plain Spark fallback"; \
	fi

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME) && cp dagster.yaml $@

setup: $(VENV)/.installed java jars/.fetched $(DAGSTER_HOME)/dagster.yaml

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

# every input under $(PRICELAB_DATA_DIR)/input checked without Spark; every refusal printed (exit 3 when any)
validate-inputs: setup
	$(VENV)/bin/pricelab validate-inputs
