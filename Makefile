# flyfn developer commands. Everything installs into .venv; nothing is needed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PORT ?= 8080

.PHONY: install test test-dj6 check demo bench chromium dist clean

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

# The sdist and the wheel in dist/, checked as PyPI checks an upload.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build
	$(BIN)/twine check --strict dist/*

clean:
	rm -rf $(VENV) .venv-dj6 .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
