# Two entry points a newcomer needs: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
# The CPU build of torch; an unpinned torch would pull several GB of CUDA packages.
TORCH ?= torch==2.13.0
DATA ?=

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[test,export,demo,fast]"

demo: install
	$(PYTHON) demo.py $(if $(DATA),--corpus=$(DATA),)

test: install
	$(PYTHON) -m pytest -q tests
