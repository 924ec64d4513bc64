#!/usr/bin/env bash
# `make test-deploy`: the production stack on this machine (no GPU needed; not part of `make test`).
#
#   1. first boot on a network volume: bootstrap.sh builds the production venv exactly as on RunPod
#      (Python 3.12, torch 2.8.0 and its CUDA 12.8 libraries, the flash-attn wheel, requirements.txt: the
#      pins the self-contained image installs too, which tests/test_deploy_files.py keeps equal), fetches
#      the reference voices and converts a model (the tiny checkpoint in the community layout: the real
#      weights are not downloadable here);
#   2. second boot: offline, from the flag;
#   3. the default target's boot: the self-contained image (that venv as its VIBEVOICE_PYTHON) with no
#      network volume (an empty VIBEVOICE_HOME on the container disk): nothing is built, no WARNING;
#   4. a job: the README's smallest job, {"text": "Hello!"}, through that boot (bootstrap.sh, handler.py);
#   5. the fast test suite (pytest -m "not slow", plus tests/test_faults.py) on that venv, with the
#      test tools of requirements-dev.txt added to it.
# It downloads several GB (torch and the nvidia-* wheels) on every run: bootstrap installs with
# --no-cache-dir, as in production. Each run starts from an empty volume folder in .local/test-deploy.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${TEST_DEPLOY_DIR:-$ROOT/.local/test-deploy}
DEV_PYTHON=${DEV_PYTHON:-$ROOT/.venv/bin/python}
# torch's own index (the production default) is used where it can be reached; PyPI's torch 2.8.0 for
# Linux x86_64 is the same CUDA 12.8 build with the same nvidia-* dependencies.
TORCH_INDEX_ARGS=${TORCH_INDEX_ARGS-}

say() { printf '\ntest-deploy: %s\n' "$*"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
elapsed() {
    local ms
    ms=$(($(now_ms) - $1))
    printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

# Python 3.12 as in production: on PATH, from pyenv, or from uv; else python3, said loudly.
find_python312() {
    local candidate
    for candidate in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
        "$(uv python find 3.12 2>/dev/null || true)"; do
        [ -n "$candidate" ] && "$candidate" -c 'import sys, venv; assert sys.version_info[:2] == (3, 12)' 2>/dev/null &&
            echo "$candidate" && return 0
    done
    return 1
}
PYTHON_BIN=${PYTHON_BIN:-$(find_python312 || true)}
if [ -z "$PYTHON_BIN" ]; then
    PYTHON_BIN=$(command -v python3)
    say "Python 3.12 was not found; using $("$PYTHON_BIN" --version) instead (production runs 3.12)"
fi

rm -rf "$WORK"
mkdir -p "$WORK"
(cd "$ROOT" && "$DEV_PYTHON" -m tools.tiny_checkpoint "$WORK/tiny-community" --community >/dev/null)
VIBEVOICE_HOME="$WORK/vibevoice"
# bootstrap.sh with this run's volume and pins (not exported: the test suite later sees a clean environment).
# The volume is a folder on this machine's disk, so bootstrap takes it for the container disk: that is
# what the volume-less boots of step 3 need; steps 1 and 2 say it is a volume (BOOTSTRAP_CONTAINER_DISK).
boot() {
    env VIBEVOICE_HOME="$VIBEVOICE_HOME" PYTHON_BIN="$PYTHON_BIN" TORCH_INDEX_ARGS="$TORCH_INDEX_ARGS" \
        MODEL_SOURCE="$WORK/tiny-community" RUNPOD_HF_CACHE="$WORK/no-runpod-cache" DEVICE=cpu "$@" \
        bash "$ROOT/bootstrap.sh" "${BOOT_ARGS[@]}"
}
BOOT_ARGS=()

say "1. first boot with $("$PYTHON_BIN" --version), torch==2.8.0 and requirements.txt (several GB to download)"
started=$(now_ms)
boot BOOTSTRAP_EXEC=0 BOOTSTRAP_CONTAINER_DISK=/proc 2>&1 | tee "$WORK/first-boot.log"
first_boot=$(elapsed "$started")
PYTHON=$(sed -n 's/^python=//p' "$VIBEVOICE_HOME/.first_run_complete")
VENV=$(dirname "$(dirname "$PYTHON")")
"$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "CUDA", torch.version.cuda, "transformers", transformers.__version__)' |
    tee "$WORK/versions.txt"
venv_bytes=$(du -sb "$VENV" | cut -f1)
nvidia_bytes=$(du -scb "$VENV"/lib/python*/site-packages/nvidia 2>/dev/null | tail -1 | cut -f1)

say "2. second boot (offline)"
started=$(now_ms)
boot BOOTSTRAP_EXEC=0 BOOTSTRAP_CONTAINER_DISK=/proc HF_HUB_OFFLINE=1 2>&1 | tee "$WORK/second-boot.log"
grep -q "already set up" "$WORK/second-boot.log"
second_boot=$(elapsed "$started")

say "3. the default target: the self-contained image's boot without a network volume"
started=$(now_ms)
# What the image holds as /opt/venv: the production venv; the container disk starts empty at each cold start.
image_boot() { boot VIBEVOICE_PYTHON="$PYTHON" VIBEVOICE_HOME="$WORK/container-disk/vibevoice" "$@"; }
image_boot BOOTSTRAP_EXEC=0 2>&1 | tee "$WORK/image-boot.log"
image_boot_seconds=$(elapsed "$started")
if grep -q -e "WARNING" -e "building the virtual environment" "$WORK/image-boot.log"; then
    say "FAILED: the self-contained image built something or warned (see $WORK/image-boot.log)"
    exit 1
fi

say "4. a job: {\"text\": \"Hello!\"}"
BOOT_ARGS=(--test_input '{"input": {"text": "Hello!"}}')
image_boot VIBEVOICE_TEST_OUTPUT="$WORK/job.json" 2>&1 | tail -n 20
"$DEV_PYTHON" - "$WORK/job.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))[0]
assert result.get("status") == "completed", result
print(f"job completed: {result['duration_sec']} s of {result['format']}; warnings: {result.get('warnings', [])}")
PY

say "5. the fast test suite on the production venv"
"$PYTHON" -m pip install --quiet -r "$ROOT/requirements-dev.txt"
cd "$ROOT"
started=$(now_ms)
status=0
"$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" tests/ 2>&1 | tee "$WORK/fast-suite.log" | tail -n 15 ||
    status=1
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_faults.py 2>&1 | tee "$WORK/faults.log" | tail -n 5 ||
    status=1
tests_seconds=$(elapsed "$started")

say "summary"
cat "$WORK/versions.txt"
echo "python: $("$PYTHON" --version)"
echo "first boot: ${first_boot} s; second boot: ${second_boot} s; self-contained boot: ${image_boot_seconds} s;" \
    "tests: ${tests_seconds} s"
echo "venv: $((venv_bytes / 1000000)) MB, of which nvidia-* CUDA libraries: $((nvidia_bytes / 1000000)) MB"
grep -h -E "^[0-9]+ (passed|failed)|passed|failed" "$WORK/fast-suite.log" "$WORK/faults.log" | tail -n 2
exit "$status"
