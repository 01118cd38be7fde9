# Two entry points: `make demo` (offline encrypted MNIST demo) and `make test` (the suite).
# Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/she: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,serve,convert,bench,ray]"
	touch $(BIN)/she

demo: $(BIN)/she
	$(BIN)/she demo

test: $(BIN)/she
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
