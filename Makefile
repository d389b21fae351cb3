# The two commands of the README's quick start, plus a few conveniences.
# Each target first makes sure the cached virtual environment exists (see .ci/venv.sh).
VENV := $(shell bash .ci/venv.sh)
PY = $(VENV)/bin/python

.PHONY: demo test test-fast bench venv

demo:        ## the main job on an embedded default
	$(VENV)/bin/yoloq demo

test:        ## the whole suite, slow whole-model tests included (what CI runs)
	$(PY) -m pytest -m "slow or not slow" -q

test-fast:   ## unit tests only
	$(PY) -m pytest -m "not slow" -q

bench:
	$(PY) benchmarks/capture.py

venv:
	@echo $(VENV)
