# Set-up and checks. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format train clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,tensorboard]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check mop_torchrl tests benchmarks examples
	$(BIN)/ruff format --check mop_torchrl tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format mop_torchrl tests benchmarks examples
	$(BIN)/ruff check --fix mop_torchrl tests benchmarks examples

# Two pytest-xdist workers (tests/conftest.py says which tests share one); the suite is mostly
# processes starting and waiting, so two workers overlap well on 2 cores.
test: lint
	$(BIN)/python -m pytest -n 2 --doctest-modules mop_torchrl tests

# The unit tier while editing: no test marked slow or subprocess (seconds, not minutes).
test-fast: lint
	$(BIN)/python -m pytest --doctest-modules -m "not slow and not subprocess" mop_torchrl tests

# The main job: a short BabyAI imitation run (a few minutes on 2 cores) with a progress bar.
train: $(STAMP)
	$(BIN)/mop-torchrl train --config configs/quick.yaml --run_name quick-$$(date +%Y%m%d-%H%M%S)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
