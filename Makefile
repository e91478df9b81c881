# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv and install the project with its test extras first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench histories clean

SCENARIOS := rollback budget approval abort flapping verify-fails shadow sweep

# The tests check the torch scorer against numpy on the CPU. 2.13.0 is the CPU
# build that this project's machines keep on disk; on other machines pip may
# fetch a CUDA build of several GB instead. Override with TORCH=... if needed.
TORCH ?= torch==2.13.0
TORCH_STAMP := $(VENV)/.torch

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(TORCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	touch $(TORCH_STAMP)

demo: $(STAMP)
	$(BIN)/remediator demo $(ARGS)

test: $(STAMP) $(TORCH_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/loop_latency.py

# Record the workflow histories that the replay tests check new code against.
# Run after an intended, versioned change of the workflows.
histories: $(STAMP)
	rm -f tests/histories/*.json
	for scenario in $(SCENARIOS); do \
		$(BIN)/remediator demo --scenario $$scenario --save-histories tests/histories || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
