# flyfn developer commands. Everything installs into .venv; nothing is needed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PORT ?= 8080

.PHONY: install test test-dj6 check demo bench mutate chromium clean

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

# The unit and contract tests on Django 6 (Python >= 3.12) in .venv-dj6; skips with a message without one.
test-dj6:
	@scripts/test-dj6

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict .

demo: $(STAMP)
	@scripts/demo $(PORT)

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# Mutation testing (mutmut) of the core modules, each against its own unit tests, one at a time:
# make mutate [MODULES="replay conf"] [BUDGET=900 seconds per module] [CHILDREN=1]
MODULES ?= replay registry conf middleware
BUDGET ?= 900
CHILDREN ?= 1
mutate: $(STAMP)
	$(BIN)/python scripts/mutate --budget $(BUDGET) --max-children $(CHILDREN) $(MODULES)

clean:
	rm -rf $(VENV) .venv-dj6 .pytest_cache .mypy_cache .ruff_cache build *.egg-info .mutmut mutants
