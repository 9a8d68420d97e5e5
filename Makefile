# GeoCATE: `make demo` runs the main job on the bundled demo, `make test` runs the tests.
# Both install what is missing first (Debian packages, a venv, the plugin's QGIS profile); a second run skips it.

SHELL := /bin/bash
ROOT := $(CURDIR)
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
SITE := $(VENV)/lib/python3.11/site-packages
PROFILE := $(ROOT)/.qgis-profile
PLUGINS := $(PROFILE)/profiles/default/python/plugins
APT_PACKAGES := qgis python3-qgis qgis-providers xvfb python3-venv
DEMO := $(ROOT)/outputs/demo

export QGIS_CUSTOM_CONFIG_PATH := $(PROFILE)
export QT_QPA_PLATFORM := offscreen
export XDG_RUNTIME_DIR := /tmp/runtime-$(shell id -u)
export PYTHONPATH := $(PLUGINS):$(SITE)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup system venv profile demo test test-fast lint bench package clean

setup: system venv profile

system:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
	  echo "Installing Debian packages: $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; }
	@mkdir -p $(XDG_RUNTIME_DIR) && chmod 700 $(XDG_RUNTIME_DIR)

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt | system
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

profile: $(PLUGINS)/geocate $(PROFILE)/.enabled

$(PLUGINS)/geocate:
	mkdir -p $(PLUGINS)
	ln -sfn $(ROOT) $@

$(PROFILE)/.enabled: | $(PLUGINS)/geocate system
	qgis_process.bin plugins enable geocate >/dev/null 2>&1 || true
	touch $@

demo: setup
	@bash scripts/run_demo.sh $(DEMO)

test: setup lint
	$(PY) -m pytest -p no:cacheprovider tests

# For development: the core tests without the slow studies (under a minute); `make test` stays the whole suite.
test-fast: venv profile
	$(PY) -m pytest -p no:cacheprovider tests/core -m "not slow"

# ruff (ruff.toml): Python 3.9 syntax and library behaviour, pyflakes, import order, bugbear.
lint: venv
	$(VENV)/bin/ruff check .

bench: setup
	@mkdir -p outputs
	$(PY) bench/bench_validity.py all --json outputs/bench_validity.json
	$(PY) bench/bench_evaluate.py
	$(PY) bench/bench_clusters.py
	$(PY) bench/bench_estimate.py
	$(PY) bench/bench_corrections.py --json outputs/bench_corrections.json
	$(PY) bench/bench_observational.py --json outputs/bench_observational.json
	$(PY) bench/bench_panel.py --json outputs/bench_panel.json
	$(PY) bench/bench_representations.py all --reps 3 --json outputs/bench_representations.json
	$(PY) bench/bench_maps.py --json outputs/bench_maps.json
	$(PY) bench/bench_blocks.py --json outputs/bench_blocks.json

# The release ZIP, outputs/geocate.zip: the plugin's own files in a folder geocate/, for Install from ZIP.
package:
	$(if $(wildcard $(PY)),$(PY),python3) scripts/package.py

clean:
	rm -rf outputs .qgis-profile
