# Two commands on a fresh machine:
#   make notebook   set up and open the tutorial
#   make test       set up and run every test
# Each makes a virtual environment in .venv with what it needs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: notebook test test-slow bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.tutorial: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[tutorial]'
	touch $@

$(VENV)/.test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.bench: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

notebook: $(VENV)/.tutorial
	$(VENV)/bin/jupyter notebook notebooks/

test: $(VENV)/.test
	bash .ci/system-packages
	$(PY) -m pytest -rs

test-slow: $(VENV)/.test
	$(PY) -m pytest -rs -m slow

bench: $(VENV)/.bench
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
