# Two entry points a newcomer needs: `make demo` and `make test`. Both install what they need first,
# into a project virtualenv (.venv), so they also work where the system Python refuses pip installs
# (PEP 668 "externally-managed-environment", e.g. Debian 12+ / Ubuntu 24.04).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned torch would pull several GB of CUDA packages.
TORCH ?= torch==2.13.0
EXTRAS ?= test,export,demo,fast,tfds,beam,jax
DATA ?=

.PHONY: install demo lint test test-slow test-all bench

# --system-site-packages reuses what the machine already has (nothing is installed outside .venv).
# pip's own lines (Collecting / Downloading / Installing) are the progress: a first install takes
# several minutes, so it is never run --quiet.
$(VENV)/.installed: setup.py
	@$(PYTHON) -m venv --system-site-packages $(VENV) || { echo "make: cannot create $(VENV): install Python's venv module (Debian/Ubuntu: apt install python3-venv)"; exit 1; }
	@echo "make: [install 1/2] $(TORCH) (CPU build) into $(VENV)"
	$(PY) -m pip install "$(TORCH)"
	@echo "make: [install 2/2] this project with extras [$(EXTRAS)] into $(VENV) (TensorFlow, transformers, ...: a few minutes the first time)"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	@echo "make: install complete ($(VENV)); later runs skip it"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) demo.py $(if $(DATA),--corpus=$(DATA),)

# The linter (ruff.toml says which rules and why), then the fast suite; `make test-slow` runs the
# end-to-end tests (whole scripts, the demo, README commands).
lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

test-all: test test-slow
