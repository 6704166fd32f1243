# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test lint test-trt

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,export,serve]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -ra

demo: install
	bash scripts/demo.sh $(BIN)/qmamba

# Inside docker/ (TensorRT + GPU): engine build, per-stage check on engines, generation, and the GPU suites
# (kernels, plugin harness against the image's TensorRT headers, the CUDA torch backend).
PYTHON_BIN ?= $(BIN)/python
test-trt:
	$(PYTHON_BIN) -m pytest -ra -m "tensorrt or gpu" tests
	$(PYTHON_BIN) -m pytest -ra trt_plugins/tests
