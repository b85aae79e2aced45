# Two commands on a fresh machine:
#   make demo   runs the worker on test_input.json and writes out/demo.mp4
#   make test   runs the test suite (what CI runs)
# Both create the virtual environment in .venv first if it is missing or out of date.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

# pip's constraint file is constraints.txt alone: a constraint file named in the machine's pip
# configuration (a cap on torch, say) would otherwise be added to it and could make the pins unresolvable.
$(STAMP): export PIP_CONSTRAINT := constraints.txt
$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip==26.3
	$(PIP) install --quiet -c constraints.txt torch
	$(PIP) install --quiet -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PIP) install --quiet -c constraints.txt --no-deps -r requirements-nodeps.txt
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/run_job.py test_input.json out/demo.mp4

bench: setup
	$(PY) scripts/bench_speedups.py

clean:
	rm -rf $(VENV) out .pytest_cache .rehearsal
