# The two commands README.md opens with: `make demo` and `make test`. Both set up everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
BUF_VERSION := 1.75.0

.PHONY: demo test lint typecheck proto proto-check docs lint-proto pytest clean

$(BIN)/auris-agent: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/auris-agent
	bash packaging/demo.sh

test: $(BIN)/auris-agent lint typecheck proto-check lint-proto pytest

lint: $(BIN)/auris-agent
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/auris-agent
	$(BIN)/mypy

proto: $(BIN)/auris-agent
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python proto/generate.py

proto-check: $(BIN)/auris-agent
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python proto/generate.py --check

# docs/cli.md and docs/api.md, from the parsers and the .proto files (tests/test_docs.py checks them).
docs: $(BIN)/auris-agent
	$(BIN)/python docs/generate.py

# buf comes from the npm registry; without npm the buf test is skipped and the hand check runs.
lint-proto:
	@if command -v npm >/dev/null 2>&1; then \
		[ -x $(BUF) ] || npm install --silent --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION) >/dev/null; \
		cd proto && ../$(BUF) lint && echo "buf lint (STANDARD): clean"; \
	else echo "npm not found: buf lint skipped (tests/test_contract.py checks the STANDARD rules by hand)"; fi

pytest: $(BIN)/auris-agent
	AURIS_BUF="$$( [ -x $(BUF) ] && echo $(CURDIR)/$(BUF) )" $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(TOOLS) .demo .mypy_cache .ruff_cache .pytest_cache
