# `make demo` and `make test` work on a fresh machine: the first use creates .venv and installs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastadapters-installed

.PHONY: demo test bench lint format clean

$(STAMP): setup.py pyproject.toml scripts/setup_venv.sh
	PYTHON=$(PYTHON) bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastadapters demo

test: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadfile --timeout 600 --durations 15

bench: $(STAMP)
	$(PY) -m bench --update-readme

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info fastadapters/_C*.so
