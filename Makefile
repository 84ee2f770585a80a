VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo
setup: $(VENV)/.installed
# safejudge/perf.py pins what the set-up installs for perf_analyzer.
$(VENV)/.installed: pyproject.toml scripts/setup.sh safejudge/perf.py
	VENV=$(VENV) bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/safejudge demo --served
