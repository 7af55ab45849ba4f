# prefloop: the few commands people use. `make demo` and `make test` work on a fresh clone
# with Python 3.11+; everything else they need is installed here.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when the dependency list changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: help demo test lint format install browser serve clean

help:
	@echo "make demo     set up a local demo (SQLite under ./var) and serve it on http://127.0.0.1:8000"
	@echo "make test     install what the tests need and run lint plus the whole suite"
	@echo "make lint     ruff check and format check"
	@echo "make format   apply ruff's fixes and formatting"
	@echo "make serve    serve without resetting the demo"
	@echo "make clean    remove .venv and ./var"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: prefloop needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned to the CPU build: pip would otherwise resolve the newest torch, which
# pulls gigabytes of CUDA libraries. A machine that already has torch (a GPU image) keeps it.
TORCH_VERSION ?= 2.13.0

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: install
	$(BIN)/prefloop demo

serve: install
	PREFLOOP_ENV=$${PREFLOOP_ENV:-dev} $(BIN)/prefloop serve

# Browser tests drive Debian's chromium (Playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian's chromium for the browser tests"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "browser tests need chromium: sudo apt-get install chromium"; \
		fi; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install browser lint
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var
