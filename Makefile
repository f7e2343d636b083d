# One command each for the demo and the tests; both create and reuse .venv.
# Another interpreter gets its own venv: make test PYTHON=python3.13 VENV=.venv-3.13
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VENV_MIN ?= .venv-min

.PHONY: test test-min demo bench clean docs dist wheel-test

$(STAMP): setup.cfg pyproject.toml
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); } || { \
	  rm -rf $(VENV); echo "python3 -m venv failed: on Debian run 'apt-get install python3-venv'"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,celery]'
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check flask_koala tests examples benchmarks
	$(BIN)/ruff format --check flask_koala tests examples benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The suite again on the lowest versions we claim (constraints-min.txt); slow process tests
# and the browser/broker tests are left to `make test`.
# Flask-Security-Too has no release that imports on Flask 2.3, so its recipe is left out here.
test-min: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider \
	  --ignore=tests/test_recipe_flask_security.py

$(VENV_MIN)/.installed: setup.cfg pyproject.toml constraints-min.txt
	@$(VENV_MIN)/bin/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV_MIN); $(PYTHON) -m venv $(VENV_MIN); }
	$(VENV_MIN)/bin/python -m pip install -q --upgrade pip
	$(VENV_MIN)/bin/python -m pip install -q -c constraints-min.txt -e '.[test,celery]'
	@touch $@

demo: $(STAMP)
	$(BIN)/python -m examples.demo

# The bench extra adds segment-analytics-python, the client measured alongside.
$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,celery,bench]'
	@touch $@

# Then Celery mode's publishing figures, where a Redis server can be started.
bench: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.run
	@if command -v redis-server >/dev/null || [ -n "$$KOALA_BENCH_REDIS_URL" ]; then \
	  $(BIN)/python -m benchmarks.celery_mode; \
	else echo "Celery figures skipped: no redis-server (apt-get install redis-server)"; fi

# The docs site (Sphinx + MyST, docs/), warnings as errors, in a venv of its own that holds
# only the `docs` extra: what Read the Docs installs (.readthedocs.yaml), so a page that needs
# more fails here first.
VENV_DOCS ?= .venv-docs

$(VENV_DOCS)/.installed: setup.cfg pyproject.toml
	@$(VENV_DOCS)/bin/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV_DOCS); $(PYTHON) -m venv $(VENV_DOCS); }
	$(VENV_DOCS)/bin/python -m pip install -q --upgrade pip
	$(VENV_DOCS)/bin/python -m pip install -q -e '.[docs]'
	@touch $@

docs: $(VENV_DOCS)/.installed
	$(VENV_DOCS)/bin/python -m sphinx -W --keep-going -q -E -b html docs docs/_build/html

# The release artefacts: an sdist and a wheel in dist/, checked by twine.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

# The suite against the BUILT WHEEL in a fresh venv, not the source tree (.ci/run-wheel).
wheel-test: dist
	PYTHON=$(PYTHON) .ci/run-wheel

clean:
	rm -rf $(VENV) $(VENV_MIN) .venv-* build dist docs/_build *.egg-info .pytest_cache .mypy_cache .ruff_cache
