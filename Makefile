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

# The JVM jars pinned in jvm/pom.xml (GraphFrames) and jvm/delta/pom.xml (Delta Lake) and their
# runtime dependencies, copied into ./jars once; the Spark session puts ./jars/*.jar on its
# classpath, so runs need no network. Each pom is fetched on its own (into a staging folder, moved
# in only when complete), so a registry refusing one set does not stop the other. When one is not
# served, setup still succeeds and says why: jars/UNAVAILABLE (GraphFrames: the clustering falls
# back to plain Spark and logs it) or jars/UNAVAILABLE-delta (Delta: the warehouse refuses to run,
# saying so); the next setup tries again.
JVM_SETS := graphframes:jvm/pom.xml delta:jvm/delta/pom.xml
jars/.fetched: jvm/pom.xml jvm/delta/pom.xml | java maven
	@rm -rf jars && mkdir -p jars
	@ok=1; for set in $(JVM_SETS); do \
		name=$${set%%:*}; pom=$${set#*:}; \
		if [ $$name = graphframes ]; then log=jars/fetch.log; refused=jars/UNAVAILABLE; else log=jars/fetch-$$name.log; refused=jars/UNAVAILABLE-$$name; fi; \
		if mvn -q -B -f $$pom dependency:copy-dependencies -DincludeScope=runtime \
				-DoutputDirectory=$(CURDIR)/jars/.staging-$$name >$$log 2>&1; then \
			mv jars/.staging-$$name/*.jar jars/ && rm -rf jars/.staging-$$name; \
			echo "fetched the JVM jars of $$pom ($$name) into jars/"; \
		else \
			ok=0; rm -rf jars/.staging-$$name; \
			missing=$$(grep -m1 -oE '[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+:jar:[A-Za-z0-9_.-]+' $$log); \
			echo "the Maven registry did not serve $${missing:-the pinned artifacts} (see $$log)" >$$refused; \
			if [ $$name = graphframes ]; then then="connected components will use the plain Spark fallback"; \
			else then="the warehouse (Delta tables) cannot run until they are fetched"; fi; \
			echo "WARNING: the JVM jars of $$pom ($$name) not fetched: $$(cat $$refused); $$then"; \
		fi; \
	done; \
	if [ $$ok = 1 ]; then touch $@; fi

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME) && cp dagster.yaml $@

setup: $(VENV)/.installed java jars/.fetched $(DAGSTER_HOME)/dagster.yaml

demo: setup
	PRICELAB_DEMO=1 $(PY) -m jobs.demo

# the benchmark's peer estimators (pyproject's optional group `bench`), into the same venv
bench-setup: setup
	$(VENV)/bin/uv pip install --quiet --python $(PY) -c requirements.lock -e ".[bench]"

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

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
