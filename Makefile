# flyfn developer commands. Everything installs into .venv; nothing is needed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PORT ?= 8080

.PHONY: install test test-unit matrix matrix-unit test-dj6 check docs demo bench mutate chromium dist clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser tests (never `playwright install`).
chromium:
	@scripts/ensure-chromium

test: $(STAMP) chromium
	$(BIN)/python -m pytest

# The unit set: everything but the end-to-end tests; it starts no process (tests/conftest.py fails
# a test not marked e2e that starts one).
test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e"

# The Django x Python matrix (noxfile.py): the unit and contract tests on every supported pair, then
# the whole suite on the default one. A pair whose Python is missing is skipped with a message.
matrix: $(STAMP) chromium
	$(BIN)/nox -s unit full

# The matrix's unit and contract sessions only (what CI runs besides `make test`).
test-dj6 matrix-unit: $(STAMP)
	$(BIN)/nox -s unit

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict .

# The documentation site (mkdocs.yml, docs/) in site/; --strict: a broken link or reference fails.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

demo: $(STAMP)
	@scripts/demo $(PORT)

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# The sdist and the wheel in dist/, checked as PyPI checks an upload.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build
	$(BIN)/twine check --strict dist/*

# Mutation testing (mutmut) of the core modules, each against its own unit tests, one at a time:
# make mutate [MODULES="fly/replay conf"] [BUDGET=900 seconds per module] [CHILDREN=1]
MODULES ?= fly/replay replay_state routing registry conf group_settings settings_errors legacy_setting fly/durations middleware
BUDGET ?= 900
CHILDREN ?= 1
mutate: $(STAMP)
	$(BIN)/python scripts/mutate --budget $(BUDGET) --max-children $(CHILDREN) $(MODULES)

clean:
	rm -rf $(VENV) .venv-dj6 .nox site .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info .mutmut mutants
