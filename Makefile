# The two set-up commands are `make run` and `make test`; both create .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build for development and CI; production installs torch 2.8.0 for CUDA 12.8 (Dockerfile).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The community reference implementation (vibevoice 0.0.1 on transformers 4.51.3) for `make parity`.
REF_VENV := .venv-reference
REF_PY := $(REF_VENV)/bin/python
REF_STAMP := $(REF_VENV)/.installed

# Every shell script in the repository (outside virtual environments, node_modules and .local).
SHELL_SCRIPTS = $(shell find . \( -name '.venv*' -o -name node_modules -o -name .git -o -path ./.local \) -prune -o -type f \( -name '*.sh' -o -path './.ci/run' \) -print)

SERVE_PORT ?= 8000
# The key `make serve` accepts and `make bridge` sends to it (both listen on 127.0.0.1 only).
SERVE_API_KEY ?= local-dev
SERVE_FLAGS ?=
GPU_BENCH_FLAGS ?=
# `make test`'s pytest processes (pytest-xdist) and how tests are shared among them (docs/testing.md).
# Their torch runs one thread each (OMP_NUM_THREADS, inherited by the workers the tests start): the
# processes already share the cores, and more threads only compete for them.
TEST_WORKERS ?= 4
TEST_DIST ?= loadgroup
TEST_THREADS ?= 1

# The bridge (bridge/): Node 20 or newer + npm (deploying with wrangler: Node 22); packages from bridge/package-lock.json, installed by npm ci.
BRIDGE_STAMP := bridge/node_modules/.installed
BRIDGE_PORT ?= 8787
RUNPOD_URL ?= http://127.0.0.1:$(SERVE_PORT)/v2/vibevoice-local
# Debian's Chromium for the playground's browser tests (tests/test_playground.py); playwright-core
# (an npm package of the bridge) drives it and downloads no browser of its own.
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# Quiet, offline runs of the Cloudflare tooling: no metrics, no request.cf lookups.
export WRANGLER_SEND_METRICS := false
export DO_NOT_TRACK := 1
export CLOUDFLARE_CF_FETCH_ENABLED := false

.PHONY: venv run serve soak test test-deploy espeak bench gpu-bench lint lint-deploy parity parity-env format clean bridge bridge-deps bridge-test browser

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

venv: $(STAMP)

$(BRIDGE_STAMP): bridge/package-lock.json
	cd bridge && npm ci --no-audit --no-fund --loglevel=error
	touch $@

bridge-deps: $(BRIDGE_STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null

browser: $(CHROMIUM) $(BRIDGE_STAMP)

## The OpenAI-compatible bridge and its playground (http://127.0.0.1:$(BRIDGE_PORT)/) in workerd, calling
## RUNPOD_URL (default: `make serve`).
bridge: $(BRIDGE_STAMP)
	cd bridge && MINIFLARE_WORKERD_PATH=$(CURDIR)/tools/workerd_with_parent.py BRIDGE_PORT=$(BRIDGE_PORT) \
		RUNPOD_URL=$(RUNPOD_URL) SERVE_API_KEY=$(SERVE_API_KEY) node scripts/serve.js

## The bridge's own tests, inside workerd.
bridge-test: $(BRIDGE_STAMP)
	cd bridge && npx vitest run

$(REF_STAMP): requirements-reference.txt
	test -x $(REF_PY) || $(PYTHON) -m venv $(REF_VENV)
	$(REF_PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(REF_PY) -m pip install --quiet --disable-pip-version-check -r requirements-reference.txt
	$(REF_PY) -m pip install --quiet --disable-pip-version-check --no-deps vibevoice==0.0.1
	touch $@

parity-env: $(REF_STAMP)

## The worker against the community reference implementation on the same tiny weights; prints the differences.
parity: $(STAMP) $(REF_STAMP)
	$(PY) -m pytest -q -s tests/test_parity.py

## One real synthesis job through the RunPod SDK's local test mode; prints the audio file's path.
run: $(STAMP)
	$(PY) -m tools.run_job

## RunPod's public API on 127.0.0.1:$(SERVE_PORT) (an emulator) with a live worker; Ctrl-C stops both.
## SERVE_FLAGS adds RunPod's rough edges (--running-state, --stream-reply-bytes, --rate-limit, --transient-every).
## Its worker may fetch voice URLs on 127.0.0.0/8: `make bridge` hands it created voices that way.
serve: $(STAMP)
	VOICE_URL_ALLOWED_NETWORKS=$${VOICE_URL_ALLOWED_NETWORKS-127.0.0.0/8} \
		$(PY) -m tools.runpod_emulator --port $(SERVE_PORT) --key $(SERVE_API_KEY) $(SERVE_FLAGS)

## 500 mixed jobs through the `make serve` stack; checks memory, fds, threads, losses and the CPU time trend
## (about 5 minutes on 2 cores; not part of `make test`). Writes bench/soak.json and bench/soak.md.
soak: $(STAMP)
	$(PY) -m bench.soak

## The whole test suite (CI runs this through .ci/run): lint, then the bridge's tests in workerd beside
## pytest, whose files are spread over TEST_WORKERS processes (pytest-xdist). The aligner's accuracy
## test speaks with espeak-ng and the playground's browser tests drive Chromium (Debian's packages):
## installed with apt-get if missing.
test: $(STAMP) $(REF_STAMP) $(BRIDGE_STAMP) espeak $(CHROMIUM)
	$(PY) -m ruff check .
	$(MAKE) --no-print-directory lint-deploy
	@mkdir -p .local
	@(cd bridge && npx vitest run > ../.local/vitest.log 2>&1) & vitest=$$!; \
		OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS) --dist $(TEST_DIST); status=$$?; \
		wait $$vitest; bridge=$$?; tail -n 6 .local/vitest.log; \
		if [ $$bridge -ne 0 ]; then cat .local/vitest.log; echo "the bridge's tests failed (make bridge-test)"; fi; \
		[ $$status -eq 0 ] && [ $$bridge -eq 0 ]

## The production stack (not part of `make test`; downloads several GB on every run): bootstrap.sh builds
## the production venv (Python 3.12, torch 2.8.0, requirements.txt) in .local/test-deploy, boots twice,
## runs a job through handler.py, then the fast test suite on that venv. Results: docs' testing section.
test-deploy: $(STAMP)
	bash tools/test_deploy.sh

## shellcheck on every shell script, hadolint on the Dockerfile.
lint-deploy: $(STAMP)
	$(VENV)/bin/shellcheck $(SHELL_SCRIPTS)
	$(VENV)/bin/hadolint Dockerfile

## Speed, memory and start-up figures against baselines measured in the same run (not part of
## `make test`; about 8 minutes). Writes bench/results.json and bench/results.md.
## The design's post-processing baseline needs the ffmpeg command, the aligner's figure espeak-ng:
## installed with apt-get if missing.
bench: $(STAMP) espeak
	@command -v ffmpeg >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null) \
		|| { echo "make bench needs the ffmpeg command (apt-get install ffmpeg)"; exit 1; }
	$(PY) -m bench.run

## The GPU benchmark: VibeVoice-7B and -1.5B at full size with random weights on one CUDA GPU (about 6 minutes,
## the headline rows first; writes gpu_results.md and .json in --out DIR, else in bench/). Runs in .venv when there
## is one, else with python3's torch and the wheels of bench/gpu_wheels.sh. Without CUDA: the tiny configuration
## on the CPU, nothing written. GPU_BENCH_FLAGS adds options (--out DIR, --rows, --models, --frames, --budget,
## --compiled; see bench/gpu_bench.py).
gpu-bench:
	./bench/gpu_bench.sh $(GPU_BENCH_FLAGS)

espeak:
	@command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null) \
		|| { echo "the tests need the espeak-ng command (apt-get install espeak-ng)"; exit 1; }

lint: $(STAMP) $(BRIDGE_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(MAKE) --no-print-directory lint-deploy
	cd bridge && npx prettier --check .

format: $(STAMP) $(BRIDGE_STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
	cd bridge && npx prettier --write .

clean:
	rm -rf $(VENV) $(REF_VENV) .pytest_cache .ruff_cache .local bridge/node_modules
