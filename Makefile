# Two commands: `make test` and `make bench`. Each bootstraps .venv on a fresh machine
# (Python >= 3.11, nothing else installed) and reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.paperjax-installed
SCALE  ?= small
PYTEST_ARGS ?=

.PHONY: test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	@touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m paperjax.bench --scale=$(SCALE) --out=results

clean:
	rm -rf $(VENV) results .pytest_cache
