# tropd: `make demo` runs the main job on the offline toy lab, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-slow lint toylab clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/tropd distill --preset toylab --out runs/demo --overwrite

test: install
	$(VENV)/bin/ruff check tropd_cli tests bench
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check tropd_cli tests bench

toylab: install
	$(VENV)/bin/tropd toylab build

clean:
	rm -rf $(VENV) runs
