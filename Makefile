# Two commands: `make test` and `make bench`. Each bootstraps .venv on a fresh machine
# (Python >= 3.11, nothing else installed). The install is editable in setuptools' strict
# mode (a tree of symlinks that type checkers and IDEs can follow): edits are live, and it
# is redone when pyproject.toml changes or a module is added, moved or deleted.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.paperjax-installed
MODULES := $(VENV)/.paperjax-modules
PACKAGES := models ops align interp compress bench
SCALE  ?= small
# worksteal: an idle worker takes tests queued on the other, so the smoke test's long groups
# do not leave one core idle at the end (a warm run: 246 s with --dist load, 206 s).
PYTEST_ARGS ?= -n 2 --dist worksteal --durations=25

.PHONY: test lint format bench venv clean clean-cache FORCE

venv: $(STAMP)

# Rewritten only when the set of package files changes, so its mtime marks that change.
$(MODULES): FORCE
	@mkdir -p $(VENV)
	@find $(PACKAGES) \( -name '*.py' -o -name py.typed \) -not -path '*/__pycache__/*' | sort > $@.new
	@cmp -s $@.new $@ && rm $@.new || mv $@.new $@

$(STAMP): pyproject.toml $(MODULES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench,lint]' --config-settings editable_mode=strict
	@touch $@

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m paperjax.bench --scale=$(SCALE) --out=results

# The compilation cache is outside the repository (bench/compile_cache.py): `clean` keeps it.
clean:
	rm -rf $(VENV) results .pytest_cache build

clean-cache:
	rm -rf "$${JAX_COMPILATION_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/paperjax/xla}"
