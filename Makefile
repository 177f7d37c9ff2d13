# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PY := .venv/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.venv/installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the wheels this workplace keeps on disk (CPU/GPU build alike).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: .venv/installed

demo: install
	$(PY) -m traitsae.demo

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

.PHONY: install demo test
