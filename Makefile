# finetune — set-up, demo and tests. `make demo` and `make test` work on a fresh machine.
#
# Set-up installs exactly the versions in requirements/cpu.lock (every package, hashes checked), so an upstream
# release cannot break a fresh clone. `make lock` refreshes the lock deliberately; `make test-latest` tries the
# newest versions pyproject.toml allows in a separate environment first.
PYTHON ?= python3
VENV   ?= .venv
LOCK   ?= requirements/cpu.lock
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(notdir $(LOCK))
LOCK_ARGS = --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
# torch's CPU build: from this machine's wheel folder when it has one, else from PyTorch's CPU index
TORCH_INDEX ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)

# test processes: each runs its tests on one torch thread (tests/conftest.py), so two use a 2-core machine; files
# stay whole on one process (--dist loadfile), so a module's shared training runs are made once
TEST_WORKERS ?= 2
PYTEST  = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test test-slow lint lock test-latest env clean

setup: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "pip==26.3"
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes --no-deps $(TORCH_INDEX) -r $(LOCK)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(PY) -m finetune env --check
	rm -f $(VENV)/.installed*; touch $(STAMP)

demo: setup
	$(PY) -m finetune recipes/toy/lora.yaml train.output_dir=output/demo train.overwrite=true

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PYTEST) -m "not slow"

test-slow: setup
	$(PYTEST) -m slow

env: setup
	$(PY) -m finetune env

# Re-resolve both locks from pyproject.toml's ranges (CPU: this machine's set; GPU: PyPI's CUDA torch).
lock: setup
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra dev -c requirements/torch-cpu.txt --find-links /opt/wheels \
		--index-strategy unsafe-best-match $(LOCK_ARGS) -o requirements/cpu.lock
	$(VENV)/bin/uv pip compile -q pyproject.toml -c requirements/torch-cuda.txt $(LOCK_ARGS) -o requirements/gpu.lock

# The newest versions pyproject.toml allows, in a throw-away environment, against the fast suite.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
	.venv-latest/bin/python -m pip install -q --disable-pip-version-check $(TORCH_INDEX) "torch==2.13.0"
	echo "torch==2.13.0" > .venv-latest/torch.txt  # torch is the machine's choice, not "the newest": keep it
	.venv-latest/bin/python -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager \
		-c .venv-latest/torch.txt -e ".[dev]"
	.venv-latest/bin/python -m finetune env --diff $(LOCK)
	FINETUNE_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

clean:
	rm -rf $(VENV) .venv-latest output .pytest_cache .ruff_cache
