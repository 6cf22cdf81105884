# Two entry points, each of which sets up what it needs on a fresh clone:
#   make run    - create .venv if needed, install quantcal, run `quantcal run` (the embedded demo)
#   make test   - same set-up (with the dev extra), then the test suite
#
# TORCH picks the PyTorch build installed first. The default pins the release this project is
# tested with (on Linux, PyPI's wheel of it is a CUDA build); for another build pass e.g.
#   make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# or TORCH=skip to let pip resolve torch>=2.3 itself.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
ARGS   ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.quantcal-installed

# timm (for `timm:NAME` models and the outside-model tests) needs torchvision, which needs a
# torch build of its own, so it lives in a second venv: `make test-timm` builds it and runs
# tests/test_timm.py there (the main suite skips that file when timm is absent).
TIMM_VENV  ?= .venv-timm
TIMM_TORCH ?= torch==2.14.1 torchvision==0.29.1

# imagecorruptions (the reference of tests/test_corruptions.py and bench/bench_corruptions.py)
# pulls OpenCV and scikit-image and needs pkg_resources (setuptools < 81), so it lives in a venv
# of its own: `make test-corruptions` builds it and runs that test file there (the main suite
# skips the comparisons when imagecorruptions is absent).
CORRUPT_VENV ?= .venv-corrupt
.PHONY: test-corruptions

.PHONY: run test test-timm screenshots setup lint clean-venv ddp-soak mutation

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ "$(TORCH)" != "skip" ]; then $(BIN)/python -m pip install --quiet $(TORCH); fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/quantcal run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

$(TIMM_VENV)/.quantcal-installed: pyproject.toml
	test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install --quiet $(TIMM_TORCH)
	$(TIMM_VENV)/bin/python -m pip install --quiet -e ".[dev,timm]"
	touch $@

test-timm: $(TIMM_VENV)/.quantcal-installed
	$(TIMM_VENV)/bin/python -m pytest tests/test_timm.py $(ARGS)

$(CORRUPT_VENV)/.quantcal-installed: pyproject.toml
	test -x $(CORRUPT_VENV)/bin/python || $(PYTHON) -m venv $(CORRUPT_VENV)
	echo '*' > $(CORRUPT_VENV)/.gitignore
	if [ "$(TORCH)" != "skip" ]; then $(CORRUPT_VENV)/bin/python -m pip install --quiet $(TORCH); fi
	$(CORRUPT_VENV)/bin/python -m pip install --quiet -e ".[dev]" imagecorruptions "setuptools<81"
	touch $@

test-corruptions: $(CORRUPT_VENV)/.quantcal-installed
	$(CORRUPT_VENV)/bin/python -m pytest tests/test_corruptions.py $(ARGS)

# README images of the demo report (after `make run`; needs Debian's chromium).
screenshots: $(STAMP)
	$(BIN)/python docs/screenshots.py runs/demo docs

# The two-process DDP tests (torchrun, gloo) 20 times in a row: a check that they are not flaky,
# to run beside a loaded machine (e.g. while `make test` runs); stops at the first failure.
ddp-soak: $(STAMP)
	for i in $$(seq 20); do \
	  $(BIN)/python -m pytest -q -p no:randomly tests/test_train.py tests/test_quant_methods_ddp.py \
	    tests/test_study_ddp.py \
	    -k "ddp or torchrun" || { echo "ddp-soak: failed on run $$i of 20"; exit 1; }; \
	done; echo "ddp-soak: 20 of 20 runs passed"

# Mutation testing of the core modules (mutation/groups.toml), each against its own tests; about
# 15 minutes on two cores, not part of CI. GROUPS= picks some groups; see mutation/README.md.
GROUPS ?=
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,mutation]"
	$(BIN)/python mutation/run.py $(GROUPS) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench mutation

clean-venv:
	rm -rf $(VENV)
