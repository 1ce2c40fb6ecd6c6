# Two commands on a fresh machine: `make demo` and `make test`. Each builds the venv it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch + torchvision resolved together by pip (never pinned apart: see README)
	$(BIN)/pip install -e '.[test,timm,trackers]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/dfbench demo

clean:
	rm -rf $(VENV) *.egg-info
