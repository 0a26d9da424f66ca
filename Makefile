# Two entry points, each sets itself up: `make demo` and `make test`.
# torch is installed first from an exact pin, so that resolving the package never pulls a newer,
# multi-GB CUDA build. On this project's CPU machines `torch==2.13.0` resolves to a CPU wheel kept on
# disk. Elsewhere, plain PyPI gives the CUDA build on Linux: for a light CPU install pass
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` (or set TORCH_SPEC).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/tapernorm demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
