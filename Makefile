# The two set-up commands are `make run` and `make test`; both create .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build for development and CI; production installs torch 2.8.0 for CUDA 12.8 (Dockerfile).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
SERVE_PORT ?= 8000

.PHONY: venv run serve test bench lint format clean

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

## Speed, memory and start-up figures against baselines measured in the same run (not part of
## `make test`; about 5-10 minutes on 2 cores). Writes bench/results.json and bench/results.md.
## The design's post-processing baseline needs the ffmpeg command: installed with apt-get if missing.
bench: $(STAMP)
	@command -v ffmpeg >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null) \
		|| { echo "make bench needs the ffmpeg command (apt-get install ffmpeg)"; exit 1; }
	$(PY) -m bench.run

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .local
