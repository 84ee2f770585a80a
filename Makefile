VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/safejudge demo --served
