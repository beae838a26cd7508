# Set-up and the two commands users run. Everything installs into .venv inside the repo.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU machine gets the CPU build of torch; a GPU user installs their own torch into .venv
# first (see README) and this step leaves it alone.
TORCH_CPU := torch==2.13.0
# mergekit, the reference tests/test_mergekit_run.py runs on evomerge's exported recipes, in a
# venv of its own (never a dependency of evomerge): mergekit==0.1.5 over the CPU torch.
MERGEKIT_VENV := .venv-mergekit

.PHONY: install mergekit run test wheel-check lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_CPU)
	$(PY) -m pip install -e '.[dev]'
	touch $@

# Builds the venv once (about 1.5 min, 1.6 GB); later a check that takes a second.
mergekit:
	$(PYTHON) experiments/benchmarks/mergekit_venv.py --venv $(MERGEKIT_VENV)

run: install
	$(VENV)/bin/evomerge demo

# The report test renders pages in headless Chromium (Debian's package); installed when missing
# and possible, otherwise that one test skips and says how to install it.
test: install mergekit
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 || echo "chromium not installed (apt-get failed): the report page test will skip"
	EVOMERGE_MERGEKIT_YAML=$(CURDIR)/$(MERGEKIT_VENV)/bin/mergekit-yaml $(PY) -m pytest -q tests

# The wheel as a user gets it: built from this checkout, installed (not editable) into a fresh
# venv and run from outside the repository on the test zoo (.ci/wheel-check; about a minute).
wheel-check: install
	PY=$(PY) .ci/wheel-check

lint: install
	$(VENV)/bin/ruff check evomerge tests experiments

clean:
	rm -rf $(VENV) $(MERGEKIT_VENV) build *.egg-info
