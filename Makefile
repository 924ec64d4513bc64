# The two set-up commands are `make run` and `make test`; both create .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build for development and CI; production installs torch 2.8.0 for CUDA 12.8 (Dockerfile).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
SERVE_PORT ?= 8000

.PHONY: venv run serve test lint format clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

venv: $(STAMP)

## One real synthesis job through the RunPod SDK's local test mode; prints the audio file's path.
run: $(STAMP)
	$(PY) -m tools.run_job

## RunPod's public API on 127.0.0.1:$(SERVE_PORT) (an emulator) with a live worker; Ctrl-C stops both.
serve: $(STAMP)
	$(PY) -m tools.runpod_emulator --port $(SERVE_PORT)

## The whole test suite (CI runs this through .ci/run).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .local
