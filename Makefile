VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo
setup: $(VENV)/.installed
# safejudge/perf.py pins what the set-up installs for perf_analyzer.
$(VENV)/.installed: pyproject.toml scripts/setup.sh safejudge/perf.py
	VENV=$(VENV) bash scripts/setup.sh
# The client's own venv (scripts/setup.sh) follows the client's dependencies and sources.
$(VENV)/.installed: client/pyproject.toml $(wildcard client/safejudge_client/*.py)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/safejudge demo --served
