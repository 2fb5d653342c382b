# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv in the repository root on first use and reuse it afterwards.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo venv broker-start broker-stop clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,dev]'
	@touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) deploy/demo.py $(DEMO_ARGS)

broker-start:
	bash deploy/kafka/broker.sh start

broker-stop:
	bash deploy/kafka/broker.sh stop

clean-venv:
	rm -rf $(VENV)
