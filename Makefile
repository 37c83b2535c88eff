# The two commands of the README. Both start from nothing: they create .venv, install the
# pinned dependencies (torch 2.13.0 CPU first, from local disk), then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo test lint typecheck-tree install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedtune simulate

# mypy cannot follow setuptools' editable import hook (the folders are mapped into the
# fedtune namespace), so it checks a tree of links shaped like the installed package.
TYPECHECK := build/typecheck/fedtune
typecheck-tree:
	rm -rf build/typecheck && mkdir -p $(TYPECHECK)
	for f in fedtune/*; do ln -s "$(CURDIR)/$$f" $(TYPECHECK)/; done
	for d in common server client deploy; do ln -s "$(CURDIR)/$$d" $(TYPECHECK)/$$d; done

# Lint and type checks first (zero findings), then the whole suite.
lint: $(STAMP) typecheck-tree
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Two workers, each test file on one (module fixtures such as the loopback deployment stay whole).
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs .cache .pytest_cache .hypothesis .mypy_cache .ruff_cache build
