# `make demo` and `make test` each create .venv when missing, install, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test clean device-wheels

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the local CPU build: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# The pure-Python wheels the GPU machine's image lacks (it reaches no package index; carry=[".whl"], installed there
# with pip install --no-index --no-deps --target, docs/triton.md "Next calls"). Versions with loose requirements:
# diffusers 0.35 wants huggingface-hub>=0.34 (0.42: >=1.32), importlib_metadata 10 needs lazy-importer, not in the
# image's package list; our tests pass with diffusers 0.35.2 on the CPU.
DEVICE_WHEELS ?= diffusers==0.35.2 importlib_metadata==8.7.0 mlxtend==0.23.4
device-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .whl $(DEVICE_WHEELS)

clean:
	rm -rf demo_out build *.egg-info
