# The two commands of the README: `make run` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test install

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch (taken from local disk where it lies there).
	$(PY) -m pip install -q "torch==2.13.0"
	# kt-kernel pins torch==2.9.1 in its metadata but does not link libtorch: install it without deps.
	$(PY) -m pip install -q --no-deps "kt-kernel==0.7.2"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/hybrid serve $(ARGS)

test: install
	$(PY) -m pytest -q
