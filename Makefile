# make setup | test | demo | bench  (see README.md)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp's name carries a hash of every pinned version: change a pin and setup reruns;
# with everything in place a second `make setup` does nothing.
PINS   := $(shell cat requirements.txt requirements-dev.txt requirements-fairseq.txt setup.py | sha1sum | cut -c1-12)
STAMP  := $(VENV)/.installed-$(PINS)

.PHONY: setup test demo bench clean
setup: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps --no-build-isolation -r requirements-fairseq.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	$(PY) -m d2v_plugin_quiet --install
	# the repository on the path as a path entry too: pip's editable finder comes after the folder fairseq
	# puts first for common.user_dir, so from the repository's parent folder (the clone named d2v_plugin)
	# the clone itself would be imported as an empty namespace package ("Could not infer task type")
	$(PY) -c "import os, sysconfig; open(os.path.join(sysconfig.get_paths()['purelib'], 'd2v_plugin_repository.pth'), 'w').write(os.getcwd() + '\n')"
	$(PY) -c "import fairseq, timm, torch, d2v_plugin; print('torch', torch.__version__, 'timm', timm.__version__, 'fairseq', fairseq.__version__)"
	rm -f $(VENV)/.installed-*
	touch $@

# the suite on TEST_WORKERS pytest-xdist workers, a test file to a worker (its module fixtures built once), the
# costliest files first (tests/conftest.py: HEAVY_FIRST); the 15 slowest tests listed at the end, so that
# growth is seen when it happens
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests --durations=15

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) demo_work bench_work outputs
