# Entry points, each sets itself up: `make demo`, `make test` and `make bench`.
# torch is installed first from an exact pin, so that resolving the package never pulls a newer,
# multi-GB CUDA build. On this project's CPU machines `torch==2.13.0` resolves to a CPU wheel kept on
# disk. Elsewhere, plain PyPI gives the CUDA build on Linux: for a light CPU install pass
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` (or set TORCH_SPEC).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
# `make bench` runs the decode benchmark against its onnxruntime peers (benchmarks/bench_peers.py, ~1 h with the
# defaults; e.g. BENCH_ARGS="--widths 128 --batches 1 --rounds 3 --no-compile" for a quick look). Results go to a
# scratch directory (runs/bench); add --save to BENCH_ARGS to write the committed benchmarks/results/.
BENCH_ARGS ?=

# onnxruntime-genai needs the plain `onnxruntime` package, which installs the same module as onnxruntime-gpu,
# so its engine lives in a venv of its own (.venv-genai, tapernorm installed --no-deps: the runtime imports no
# torch). `make test` builds it so the genai tests run instead of skipping.
GENAI_VENV ?= .venv-genai
GENAI_SPEC ?= onnxruntime-genai==0.18.0

.PHONY: setup genai demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

genai: $(GENAI_VENV)/.installed

$(GENAI_VENV)/.installed: pyproject.toml
	python3 -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/python -m pip install -q --upgrade pip
	$(GENAI_VENV)/bin/python -m pip install -q "$(GENAI_SPEC)" sentencepiece tokenizers jinja2 numpy
	$(GENAI_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/tapernorm demo

test: setup genai
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup genai
	$(VENV)/bin/tapernorm bench --genai-python $(GENAI_VENV)/bin/python $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(GENAI_VENV) build *.egg-info .pytest_cache .hypothesis
