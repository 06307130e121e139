# Set-up and everyday commands. `make course` and `make test` create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= quick
DATASET ?= digits
DEVICE ?= auto
SEED ?= 0
# Extra pip arguments, for example a CPU-only PyTorch index on Linux:
#   make course PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_ARGS ?=
# On Apple MPS, run the operators that MPS lacks on the CPU instead of raising NotImplementedError. PyTorch reads
# this variable when it is imported, so it must be in the environment before JupyterLab or a kernel starts.
export PYTORCH_ENABLE_MPS_FALLBACK ?= 1

# `make nightly`: the profile it runs and compares, notebooks run at once, and extra flags such as --out DIR.
NIGHTLY_PROFILE ?= full
JOBS ?= 1
NIGHTLY_ARGS ?=

PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install course test lab smoke nightly clean-venv

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10 or newer is required; set PYTHON=python3.11, for example.")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_ARGS) -e ".[dev]"
	touch $(INSTALLED)

install: $(INSTALLED)

# Every notebook, headless, into runs/<timestamp>/ with results.json and report.md.
course: $(INSTALLED)
	$(PY) -m labutils run --profile $(PROFILE) --dataset $(DATASET) --device $(DEVICE) --seed $(SEED)

# Unit tests, runner tests, and every notebook under nbval at the quick profile.
test: $(INSTALLED)
	MPLBACKEND=agg LABUTILS_PROFILE=quick $(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider

lab: $(INSTALLED)
	$(VENV)/bin/jupyter lab notebooks/

smoke: $(INSTALLED)
	$(PY) -m labutils run --profile smoke --dataset $(DATASET) --device $(DEVICE) --seed $(SEED)

# Regression check: every notebook, compared with reference/results-$(NIGHTLY_PROFILE).json; exits 1 on a
# regression. The report is nightly.md and nightly.html in the run folder.
nightly: $(INSTALLED)
	$(PY) -m labutils nightly --profile $(NIGHTLY_PROFILE) --jobs $(JOBS) $(NIGHTLY_ARGS)

clean-venv:
	rm -rf $(VENV)
