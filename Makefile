# globeflow: one command to set up and run the demo, one to set up and run the tests.
# Works on a fresh offline machine that reaches PyPI (and Debian's packages for the browser test).

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# torch first, pinned: a bare or newer torch requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Index for torch alone. Empty: pip's configured index (where that already serves CPU wheels).
# On CPU machines against the public index use PyTorch's CPU-only wheels:
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_INDEX = $(if $(strip $(TORCH_INDEX_URL)),--index-url $(strip $(TORCH_INDEX_URL)))
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-fast lint bench browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	$(PIP) install -q --disable-pip-version-check $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

## Geolocate the bundled example photos with the bundled default model.
demo: setup
	$(VENV)/bin/globeflow predict examples/ --json out/demo.json --csv out/demo.csv \
		--geojson out/demo.geojson --map out/maps
	@echo "results: out/demo.json, out/demo.csv, out/demo.geojson, maps in out/maps/"

## Headless Chromium for the web-app end-to-end test (skipped with a reason if unavailable).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "could not install chromium; the browser test will be skipped"; \
		else echo "chromium not installed and no root apt-get; the browser test will be skipped"; fi; \
	fi

## Run the whole test suite (sets itself up first).
test: setup browser
	$(VENV)/bin/ruff check src tests benchmarks --output-format concise
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

## Benchmarks (not part of the tests): the runner's default set (hours; `benchmarks/run.py --list`).
bench: setup
	$(PIP) install -q --disable-pip-version-check -e ".[bench]"
	$(PY) benchmarks/run.py --out out/bench -p throughput.busy=true

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
