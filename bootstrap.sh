#!/usr/bin/env bash
# Start-up of the VibeVoice worker container: prepare the network volume once, then run the worker.
#
# First boot (or after requirements.txt / the torch spec changed, or the venv broke):
#   1. create the volume layout under VIBEVOICE_HOME (hf_home, hf_cache, models, output, demo/voices, venv,
#      compile_cache)
#   2. build a virtual environment on the volume: torch (CUDA 12.8), flash-attn, requirements.txt
#   3. find the model (MODEL_PATH, MODEL_SOURCE, a model baked into the image, RunPod's cached models,
#      or download MODEL_ID into the volume's cache; resumable)
#      and convert a community-layout checkpoint to the transformers-native layout, once
#   4. write VIBEVOICE_HOME/.first_run_complete (atomically, only after every step succeeded)
# Every later boot checks the flag and the venv (a few milliseconds) and starts the worker offline.
#
# Setup runs under a lock on the volume: workers booting together build once; the others wait
# (at most BOOTSTRAP_LOCK_TIMEOUT seconds) and reuse the result. Each venv lives in venv/<hash of
# what it was built from>, is built in a temporary folder and renamed into place when complete, so
# a running worker never sees its packages change and an interrupted build leaves nothing half-made.
# With VIBEVOICE_PYTHON set (the self-contained image), the venv steps are skipped.
#
# Any failure ends the script with exit status 1 and one line starting "bootstrap: FAILED".
# Arguments are passed on to the worker (e.g. `bootstrap.sh --test_input '{...}'`).
set -Eeuo pipefail

APP_DIR=${APP_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
VIBEVOICE_HOME=${VIBEVOICE_HOME:-/runpod-volume/vibevoice}
PYTHON_BIN=${PYTHON_BIN:-$(command -v python3.12 || command -v python3)}
VIBEVOICE_PYTHON=${VIBEVOICE_PYTHON:-}
REQUIREMENTS_FILE=${REQUIREMENTS_FILE:-$APP_DIR/requirements.txt}
TORCH_SPEC=${TORCH_SPEC-torch==2.8.0}
TORCH_INDEX_ARGS=${TORCH_INDEX_ARGS---index-url https://download.pytorch.org/whl/cu128}
# The prebuilt flash-attn wheel for torch 2.8, CUDA 12, Python 3.12, C++11 ABI. Empty: skip it.
FLASH_ATTN_SPEC=${FLASH_ATTN_SPEC-https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl}
PIP_EXTRA_ARGS=${PIP_EXTRA_ARGS:-}
BOOTSTRAP_CHECK_IMPORTS=${BOOTSTRAP_CHECK_IMPORTS:-torch transformers diffusers runpod}
BOOTSTRAP_LOCK_TIMEOUT=${BOOTSTRAP_LOCK_TIMEOUT:-1500}
BOOTSTRAP_EXEC=${BOOTSTRAP_EXEC:-1}
WORKER_SCRIPT=${WORKER_SCRIPT:-$APP_DIR/handler.py}
MODEL_ID=${MODEL_ID:-vibevoice/VibeVoice-7B-hf}
MODEL_PATH=${MODEL_PATH:-}
MODEL_SOURCE=${MODEL_SOURCE:-}
BAKED_MODEL=${BAKED_MODEL:-/opt/vibevoice-model} # where the self-contained image bakes a model
RUNPOD_HF_CACHE=${RUNPOD_HF_CACHE:-/runpod-volume/huggingface-cache/hub}
TOKENIZER=${TOKENIZER:-}

FLAG="$VIBEVOICE_HOME/.first_run_complete"
LOCK="$VIBEVOICE_HOME/.bootstrap.lock"
export HF_HOME="$VIBEVOICE_HOME/hf_home"
# torch.compile's caches (COMPILE): on the volume, so a later cold start reuses the compiled step.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$VIBEVOICE_HOME/compile_cache/inductor}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$VIBEVOICE_HOME/compile_cache/triton}"
export HF_HUB_DISABLE_PROGRESS_BARS=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

STEP="starting"
FAILED_LINE=""

log() { printf 'bootstrap: %s\n' "$*"; }

# One clear line on any failure: either the message given to die, or the step that was running.
on_exit() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        printf 'bootstrap: FAILED %s\n' "${FAILED_LINE:-while $STEP (exit status $status)}" >&2
    fi
}
trap on_exit EXIT

die() {
    FAILED_LINE=$1
    exit 1
}

# --- what the venv is built from ------------------------------------------------------------------

requirements_hash() {
    {
        cat "$REQUIREMENTS_FILE"
        printf '%s\n' "$TORCH_SPEC" "$TORCH_INDEX_ARGS" "$FLASH_ATTN_SPEC" "$PIP_EXTRA_ARGS"
        "$PYTHON_BIN" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -c1-16
}

# The packages the worker imports are all there (found, not imported: this runs on every boot).
venv_healthy() {
    local python=$1
    [ -x "$python" ] || return 1
    # shellcheck disable=SC2086  # the module list is meant to be split into words
    "$python" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
        $BOOTSTRAP_CHECK_IMPORTS 2>/dev/null
}

pip_install() {
    # shellcheck disable=SC2086  # PIP_EXTRA_ARGS holds several arguments
    "$1" -m pip install --no-cache-dir $PIP_EXTRA_ARGS "${@:2}" 9>&-
}

build_venv() {
    local target=$1 hash=$2 build
    build="$VIBEVOICE_HOME/venv/.build-$hash-$$"
    STEP="creating the virtual environment"
    log "building the virtual environment $target (requirements hash $hash)"
    "$PYTHON_BIN" -m venv "$build" 9>&-
    if [ -n "$TORCH_SPEC" ]; then
        STEP="installing $TORCH_SPEC"
        log "installing $TORCH_SPEC"
        # shellcheck disable=SC2086  # TORCH_INDEX_ARGS holds several arguments
        pip_install "$build/bin/python" $TORCH_INDEX_ARGS "$TORCH_SPEC"
    fi
    if [ -n "$FLASH_ATTN_SPEC" ]; then
        STEP="installing flash-attn"
        log "installing flash-attn"
        # Optional: without it the worker uses sdpa attention and says so in its log.
        pip_install "$build/bin/python" "$FLASH_ATTN_SPEC" ||
            log "warning: flash-attn could not be installed; the worker will use sdpa attention"
    fi
    STEP="installing $REQUIREMENTS_FILE"
    log "installing $REQUIREMENTS_FILE"
    pip_install "$build/bin/python" -r "$REQUIREMENTS_FILE"
    STEP="checking the new virtual environment"
    venv_healthy "$build/bin/python" ||
        die "the new virtual environment lacks one of: $BOOTSTRAP_CHECK_IMPORTS."
    printf '%s\n' "$hash" >"$build/.requirements-hash"
    rm -rf "$target" # a broken venv of the same hash
    mv "$build" "$target"
}

# Keep the current venv and the newest other one (a worker started before an upgrade may still use it).
prune_venvs() {
    local current=$1 kept=0 dir
    while IFS= read -r dir; do
        [ "$dir" = "$current" ] && continue
        if [ "$kept" -eq 0 ]; then
            kept=1
        else
            log "removing the old virtual environment $dir"
            rm -rf "$dir"
        fi
    done < <(find "$VIBEVOICE_HOME/venv" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%T@ %p\n' | sort -rn | cut -d' ' -f2-)
}

# --- the model ----------------------------------------------------------------------------------------

# Which model is asked for: the flag is only valid for the same request.
model_request() {
    if [ -n "$MODEL_PATH" ]; then
        printf 'path:%s' "$MODEL_PATH"
    elif [ -n "$MODEL_SOURCE" ]; then
        printf 'source:%s' "$MODEL_SOURCE"
    else
        printf 'id:%s' "$MODEL_ID"
    fi
}

# Set MODEL_FOLDER to the requested checkpoint, downloading MODEL_ID into hf_cache when needed.
locate_model() {
    local python=$1 output
    if [ -n "$MODEL_PATH" ] || [ -n "$MODEL_SOURCE" ]; then
        MODEL_FOLDER=${MODEL_PATH:-$MODEL_SOURCE}
        [ -f "$MODEL_FOLDER/config.json" ] || die "the model folder $MODEL_FOLDER has no config.json."
        return
    fi
    STEP="downloading $MODEL_ID"
    log "looking for $MODEL_ID in RunPod's cached models, else downloading it (resumable)"
    # RunPod's cached models first (no download), then the volume's cache (resumes a partial download).
    # On failure the script prints one line saying why, instead of the path.
    if ! output=$(MODEL_ID="$MODEL_ID" RUNPOD_HF_CACHE="$RUNPOD_HF_CACHE" HF_CACHE="$VIBEVOICE_HOME/hf_cache" \
        "$python" - 9>&- <<'PY'
import os
import sys

from huggingface_hub import snapshot_download

model_id = os.environ["MODEL_ID"]
try:
    print(snapshot_download(model_id, cache_dir=os.environ["RUNPOD_HF_CACHE"], local_files_only=True))
    sys.exit(0)
except Exception:
    pass
try:
    print(snapshot_download(model_id, cache_dir=os.environ["HF_CACHE"], token=os.environ.get("HF_TOKEN") or None))
except Exception as exc:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"could not download {model_id}: {reason}")
    sys.exit(1)
PY
    ); then
        die "${output##*$'\n'}"
    fi
    MODEL_FOLDER=${output##*$'\n'}
}

# Set NATIVE_MODEL to a native checkpoint for MODEL_FOLDER: itself, or its conversion under models/ (once).
native_model() {
    local python=$1 name
    NATIVE_MODEL=$MODEL_FOLDER
    grep -q -e '"decoder_config"' -e '"acoustic_tokenizer_config"' "$MODEL_FOLDER/config.json" || return 0
    if [ -n "$MODEL_PATH$MODEL_SOURCE" ]; then name=$(basename "$MODEL_FOLDER"); else name=${MODEL_ID//\//--}; fi
    NATIVE_MODEL="$VIBEVOICE_HOME/models/$name-hf"
    [ -f "$NATIVE_MODEL/config.json" ] && return 0
    STEP="converting $MODEL_FOLDER to the transformers-native layout"
    log "converting the community-layout checkpoint $MODEL_FOLDER into $NATIVE_MODEL"
    rm -rf "$NATIVE_MODEL"
    "$python" "$APP_DIR/convert_checkpoint.py" "$MODEL_FOLDER" "$NATIVE_MODEL" ${TOKENIZER:+--tokenizer "$TOKENIZER"} 9>&-
}

# --- the flag --------------------------------------------------------------------------------------------

flag_value() {
    [ -f "$FLAG" ] || return 0
    sed -n "s/^$1=//p" "$FLAG"
}

# The previous setup is complete and still matches what is asked for.
setup_done() {
    local hash=$1 python=$2 model_path
    [ -f "$FLAG" ] || return 1
    [ "$(flag_value requirements)" = "$hash" ] || return 1
    [ "$(flag_value model)" = "$(model_request)" ] || return 1
    model_path=$(flag_value model_path)
    [ -f "$model_path/config.json" ] || return 1
    venv_healthy "$python"
}

write_flag() {
    local tmp="$FLAG.tmp.$$"
    {
        printf 'requirements=%s\n' "$1"
        printf 'python=%s\n' "$2"
        printf 'model=%s\n' "$(model_request)"
        printf 'model_path=%s\n' "$3"
        printf 'completed=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$tmp"
    mv -f "$tmp" "$FLAG"
}

# --- main -------------------------------------------------------------------------------------------------------

run_worker() {
    export MODEL_PATH=$1 VIBEVOICE_HOME HF_HUB_OFFLINE=1
    if [ "$BOOTSTRAP_EXEC" = "0" ]; then
        log "setup complete (BOOTSTRAP_EXEC=0: not starting the worker)"
        exit 0
    fi
    log "starting the worker with $2 (model $1)"
    cd "$APP_DIR"
    exec "$2" "$WORKER_SCRIPT" "${@:3}"
}

main() {
    if [ -z "$MODEL_PATH$MODEL_SOURCE" ] && [ -f "$BAKED_MODEL/config.json" ]; then
        MODEL_PATH=$BAKED_MODEL
    fi
    STEP="creating the volume layout in $VIBEVOICE_HOME"
    mkdir -p "$VIBEVOICE_HOME"/{hf_home,hf_cache,models,output,demo/voices,venv,compile_cache}
    local voice
    for voice in "$APP_DIR"/demo/voices/*.wav; do # voices shipped with the image; never overwrite the volume's
        [ -f "$voice" ] && [ ! -e "$VIBEVOICE_HOME/demo/voices/${voice##*/}" ] && cp "$voice" "$VIBEVOICE_HOME/demo/voices/"
    done

    local hash venv python
    if [ -n "$VIBEVOICE_PYTHON" ]; then
        hash="image"
        python=$VIBEVOICE_PYTHON
        venv=""
    else
        [ -x "$PYTHON_BIN" ] || die "no Python interpreter found (set PYTHON_BIN)."
        [ -r "$REQUIREMENTS_FILE" ] || die "the requirements file $REQUIREMENTS_FILE is missing."
        hash=$(requirements_hash)
        venv="$VIBEVOICE_HOME/venv/$hash"
        python="$venv/bin/python"
    fi

    if setup_done "$hash" "$python"; then
        log "already set up ($FLAG); starting offline"
        run_worker "$(flag_value model_path)" "$python" "$@"
    fi

    STEP="waiting for the setup lock"
    exec 9>"$LOCK"
    if ! flock -n 9; then
        log "another worker is setting up the volume; waiting (at most ${BOOTSTRAP_LOCK_TIMEOUT}s)"
        flock -w "$BOOTSTRAP_LOCK_TIMEOUT" 9 ||
            die "another worker held the setup lock $LOCK for over ${BOOTSTRAP_LOCK_TIMEOUT}s (raise BOOTSTRAP_LOCK_TIMEOUT)."
    fi
    if setup_done "$hash" "$python"; then
        log "set up by another worker; starting offline"
        exec 9>&-
        run_worker "$(flag_value model_path)" "$python" "$@"
    fi

    # We hold the lock: whatever a killed setup left behind can go.
    rm -f "$FLAG" "$FLAG".tmp.*
    rm -rf "$VIBEVOICE_HOME"/venv/.build-* "$VIBEVOICE_HOME"/models/.*.converting-*

    if [ -z "$VIBEVOICE_PYTHON" ]; then
        if venv_healthy "$python" && [ -f "$venv/.requirements-hash" ]; then
            log "reusing the virtual environment $venv"
        else
            build_venv "$venv" "$hash"
            prune_venvs "$venv"
        fi
    elif ! venv_healthy "$python"; then
        die "VIBEVOICE_PYTHON $python lacks one of: $BOOTSTRAP_CHECK_IMPORTS."
    fi

    STEP="locating the model"
    locate_model "$python"
    native_model "$python"

    STEP="writing $FLAG"
    write_flag "$hash" "$python" "$NATIVE_MODEL"
    log "first-run setup complete"
    exec 9>&-
    run_worker "$NATIVE_MODEL" "$python" "$@"
}

main "$@"
