# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project with the CPU build of torch pinned.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# An editable install skips data files, so the install step puts the file that
# enables the Jupyter server extension where a regular install would.
JUPYTER_CONFIG := jupyter-config/jupyter_server_config.d/duet_jupyter.json

.PHONY: install demo test test-fast check bench clean

$(STAMP): pyproject.toml signaling/pyproject.toml constraints.txt $(JUPYTER_CONFIG)
	$(PYTHON) -m venv $(VENV)
	@# The duet-signaling script once came with duet-p2p: uninstalling that after
	@# installing duet-signaling would delete it, so both go first (cheap: editable).
	$(PY) -m pip uninstall -qq --yes duet-p2p duet-signaling
	$(PY) -m pip install --quiet -c constraints.txt -e ./signaling -e '.[test]'
	install -D -m 644 $(JUPYTER_CONFIG) $(VENV)/etc/jupyter/jupyter_server_config.d/duet_jupyter.json
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m duet.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Lint, types and the layers contract (.importlinter); .ci/run calls it before the tests.
check: $(STAMP)
	$(PY) -m ruff check duet signaling extension tests benchmarks
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/p2p.py

clean:
	rm -rf $(VENV) build *.egg-info signaling/build signaling/*.egg-info extension/*.egg-info test-output
