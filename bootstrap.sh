#!/usr/bin/env bash
# Start-up of the VibeVoice worker container: prepare the network volume once, then run the worker.
#
# First boot (or after requirements.txt / the torch spec changed, or the venv broke):
#   1. create the volume layout under VIBEVOICE_HOME (hf_home, hf_cache, models, output, demo/voices, venv,
#      compile_cache)
#   2. build a virtual environment on the volume: torch (CUDA 12.8), flash-attn, requirements.txt
#   3. fetch the pinned reference voices (demo/voices.json: source commit, size and sha256 of each file)
#      into demo/voices; a voice that cannot be had is a warning, never a failure
#   4. find the model (MODEL_PATH, MODEL_SOURCE, a model baked into the image, RunPod's cached models,
#      the volume's cache, or download MODEL_ID into it; resumable) and convert a community-layout
#      checkpoint to the transformers-native layout, once
#   5. write VIBEVOICE_HOME/.first_run_complete (atomically, only after every step succeeded)
# Every later boot checks the flag and the venv (a few milliseconds) and starts the worker offline.
#
# Setup runs under a lock on the volume: workers booting together build once; the others wait (at
# most BOOTSTRAP_LOCK_TIMEOUT seconds, which stays below RUNPOD_INIT_TIMEOUT) and reuse the result.
# The lock is flock, or an atomic mkdir with a heartbeat where flock does not work. Whatever a boot
# builds goes into a folder of its own (worker id + random suffix) with an owner file whose heartbeat
# it keeps fresh: a venv is built in place under its final name (so its scripts work), a conversion
# is renamed into place when complete, and only folders whose owner's heartbeat has gone stale are
# ever removed. Long steps log a progress line every BOOTSTRAP_PROGRESS_SECONDS, and each step that
# writes gigabytes first checks the free disk space.
# With VIBEVOICE_PYTHON set (the self-contained image), the venv steps are skipped.
# Without a network volume (VIBEVOICE_HOME on the container disk, which every cold start gets empty),
# one WARNING line says what each cold start rebuilds and what to change.
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
# RunPod marks a worker unhealthy when its start-up takes longer than this (its default is 420 s).
RUNPOD_INIT_TIMEOUT=${RUNPOD_INIT_TIMEOUT:-2400}
# Seconds a worker keeps, after waiting for another worker's setup, to load the model itself.
BOOTSTRAP_START_RESERVE=${BOOTSTRAP_START_RESERVE:-600}
BOOTSTRAP_LOCK_TIMEOUT=${BOOTSTRAP_LOCK_TIMEOUT:-$((RUNPOD_INIT_TIMEOUT - BOOTSTRAP_START_RESERVE))}
BOOTSTRAP_LOCK=${BOOTSTRAP_LOCK:-auto}                            # auto (flock, else mkdir), flock or mkdir
BOOTSTRAP_LOCK_POLL_SECONDS=${BOOTSTRAP_LOCK_POLL_SECONDS:-2}     # how often a mkdir-lock waiter looks
BOOTSTRAP_HEARTBEAT_SECONDS=${BOOTSTRAP_HEARTBEAT_SECONDS:-15}    # owner files are touched this often
BOOTSTRAP_STALE_SECONDS=${BOOTSTRAP_STALE_SECONDS:-120}           # a heartbeat this old means its owner died
BOOTSTRAP_PROGRESS_SECONDS=${BOOTSTRAP_PROGRESS_SECONDS:-15}      # one progress line per long step this often
BOOTSTRAP_STALL_SECONDS=${BOOTSTRAP_STALL_SECONDS:-60}            # a download without new bytes is "stalled"
BOOTSTRAP_VENV_BYTES=${BOOTSTRAP_VENV_BYTES:-9000000000}          # free space a venv build needs (measured 7.5 GB)
BOOTSTRAP_EXEC=${BOOTSTRAP_EXEC:-1}
WORKER_SCRIPT=${WORKER_SCRIPT:-$APP_DIR/handler.py}
MODEL_ID=${MODEL_ID:-vibevoice/VibeVoice-7B-hf}
MODEL_PATH=${MODEL_PATH:-}
MODEL_SOURCE=${MODEL_SOURCE:-}
BAKED_MODEL=${BAKED_MODEL:-/opt/vibevoice-model} # where the self-contained image bakes a model
RUNPOD_HF_CACHE=${RUNPOD_HF_CACHE:-/runpod-volume/huggingface-cache/hub}
TOKENIZER=${TOKENIZER:-}
VOICES_MANIFEST=${VOICES_MANIFEST-$APP_DIR/demo/voices.json} # empty: fetch no voices
VOICES_URLS=${VOICES_URLS:-}                                   # base URLs to fetch from (default: the manifest's)
VOICES_TIMEOUT=${VOICES_TIMEOUT:-120}                          # seconds for all voices together
# The container's own disk is the filesystem of this path: a VIBEVOICE_HOME on it has no network volume.
BOOTSTRAP_CONTAINER_DISK=${BOOTSTRAP_CONTAINER_DISK:-/}

FLAG="$VIBEVOICE_HOME/.first_run_complete"
LOCK="$VIBEVOICE_HOME/.bootstrap.lock"
TOOL_PYTHON=${VIBEVOICE_PYTHON:-$PYTHON_BIN} # runs deploy/provision.py's standard-library steps before a venv exists
# Names a boot's folders: RunPod's pod id or the host name (never $$: bash is PID 1 in every container).
WORKER_ID=${RUNPOD_POD_ID:-${HOSTNAME:-worker}}
WORKER_ID=${WORKER_ID//[^A-Za-z0-9_.-]/_}
export HF_HOME="$VIBEVOICE_HOME/hf_home"
# torch.compile's caches (COMPILE): on the volume, so a later cold start reuses the compiled step.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$VIBEVOICE_HOME/compile_cache/inductor}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$VIBEVOICE_HOME/compile_cache/triton}"
export HF_HUB_DISABLE_PROGRESS_BARS=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off

STEP="starting"
FAILED_LINE=""
LOCK_KIND=""
LOCK_TOKEN=""
BACKGROUND=() # heartbeat loops and progress watchers, stopped before the worker starts
WATCHER=""

log() { printf 'bootstrap: %s\n' "$*"; }

# One clear line on any failure: either the message given to die, or the step that was running.
on_exit() {
    local status=$?
    stop_background
    if [ "$status" -ne 0 ]; then
        release_lock
        printf 'bootstrap: FAILED %s\n' "${FAILED_LINE:-while $STEP (exit status $status)}" >&2
    fi
}
trap on_exit EXIT

die() {
    FAILED_LINE=$1
    exit 1
}

random_suffix() { od -An -N6 -tx1 /dev/urandom | tr -d ' \n'; }

# deploy/provision.py with the given interpreter ($1): its standard-library steps also run before a venv exists.
# The deploy package imports from the application folder, hence PYTHONPATH.
provision() { PYTHONPATH="$APP_DIR" "$1" -m deploy.provision "${@:2}" 9>&-; }

# Stop with deploy/provision.py's one-line reason when a step lacks disk space: $1 folder, $2 bytes, $3 step.
need_space() {
    local reason
    reason=$(provision "$TOOL_PYTHON" space --path "$1" --bytes "$2" --step "$3") || die "$reason"
}

# --- owner files, heartbeats and progress lines ------------------------------------------------------

# Touch $1 every BOOTSTRAP_HEARTBEAT_SECONDS while this script lives (and while $1 exists).
heartbeat() {
    (while kill -0 "$$" 2>/dev/null && [ -e "$1" ]; do
        touch "$1" 2>/dev/null || true
        sleep "$BOOTSTRAP_HEARTBEAT_SECONDS"
    done) 9>&- &
    BACKGROUND+=("$!")
}

# Seconds since the heartbeat of folder $1: its owner file's mtime, else the folder's own.
heartbeat_age() {
    local stamp
    stamp=$(stat -c %Y "$1/.owner" 2>/dev/null || stat -c %Y "$1" 2>/dev/null || date +%s)
    echo $(($(date +%s) - stamp))
}

# Create folder $1 as ours: an owner file inside, kept fresh by a heartbeat.
claim() {
    mkdir -p "$1"
    printf 'owner=%s\nstarted=%s\n' "$WORKER_ID" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$1/.owner"
    heartbeat "$1/.owner"
}

owner_of() { sed -n 's/^owner=//p' "$1/.owner" 2>/dev/null || true; }

# Log a progress line every BOOTSTRAP_PROGRESS_SECONDS: $1 label, $2 expected total bytes (or ""), then folders.
watch_start() {
    local label=$1 total=$2 args=() path
    shift 2
    for path in "$@"; do args+=(--path "$path"); done
    [ -n "$total" ] && args+=(--total "$total")
    # Started directly (not through a function), so $! is the watcher itself.
    PYTHONPATH="$APP_DIR" "$TOOL_PYTHON" -m deploy.provision watch --label "$label" --parent "$$" \
        --interval "$BOOTSTRAP_PROGRESS_SECONDS" "${args[@]}" 9>&- &
    WATCHER=$!
}

watch_stop() {
    [ -n "$WATCHER" ] || return 0
    kill "$WATCHER" 2>/dev/null || true
    wait "$WATCHER" 2>/dev/null || true
    WATCHER=""
}

stop_background() {
    watch_stop
    [ "${#BACKGROUND[@]}" -gt 0 ] || return 0
    kill "${BACKGROUND[@]}" 2>/dev/null || true
    wait "${BACKGROUND[@]}" 2>/dev/null || true
    BACKGROUND=()
}

# Remove what a dead boot left behind: unfinished venvs and conversions whose owner's heartbeat is
# stale. A folder with a fresh heartbeat belongs to a live worker and is left alone.
remove_dead_builds() {
    local dir age
    for dir in "$VIBEVOICE_HOME"/venv/*/ "$VIBEVOICE_HOME"/models/.build-*/ "$VIBEVOICE_HOME"/venv/.build-*/ \
        "$VIBEVOICE_HOME"/models/.*.converting-*/; do
        dir=${dir%/}
        [ -d "$dir" ] || continue
        [ -f "$dir/.requirements-hash" ] && continue # a finished venv (prune_venvs decides about those)
        age=$(heartbeat_age "$dir")
        if [ "$age" -ge "$BOOTSTRAP_STALE_SECONDS" ]; then
            log "removing the unfinished build $dir (owner $(owner_of "$dir" | grep . || echo unknown), no heartbeat for ${age}s)"
            rm -rf "$dir"
        else
            log "leaving $dir alone: its owner $(owner_of "$dir") is alive (heartbeat ${age}s ago)"
        fi
    done
}

# --- the setup lock ---------------------------------------------------------------------------------------

acquire_lock() {
    STEP="waiting for the setup lock"
    if [ $((BOOTSTRAP_LOCK_TIMEOUT + BOOTSTRAP_START_RESERVE)) -gt "$RUNPOD_INIT_TIMEOUT" ]; then
        log "warning: BOOTSTRAP_LOCK_TIMEOUT (${BOOTSTRAP_LOCK_TIMEOUT}s) leaves less than ${BOOTSTRAP_START_RESERVE}s" \
            "of RUNPOD_INIT_TIMEOUT (${RUNPOD_INIT_TIMEOUT}s) to load the model: RunPod may mark this worker unhealthy"
    fi
    if [ "$BOOTSTRAP_LOCK" = mkdir ]; then
        mkdir_lock
        return
    fi
    local status=0
    exec 9>>"$LOCK"
    flock -E 75 -n 9 || status=$?
    if [ "$status" -eq 75 ]; then
        log "another worker is setting up the volume; waiting (at most ${BOOTSTRAP_LOCK_TIMEOUT}s)"
        status=0
        flock -E 75 -w "$BOOTSTRAP_LOCK_TIMEOUT" 9 || status=$?
        [ "$status" -eq 75 ] && die "another worker held the setup lock $LOCK for over ${BOOTSTRAP_LOCK_TIMEOUT}s" \
            "(raise RUNPOD_INIT_TIMEOUT, or prepare the volume once from a pod)."
    fi
    if [ "$status" -ne 0 ]; then
        exec 9>&-
        [ "$BOOTSTRAP_LOCK" = flock ] && die "flock failed on $LOCK (exit status $status); set BOOTSTRAP_LOCK=mkdir."
        log "flock does not work on $VIBEVOICE_HOME (exit status $status); using a mkdir lock with a heartbeat"
        mkdir_lock
        return
    fi
    LOCK_KIND="flock"
}

# An atomic mkdir as the lock, for filesystems without flock. Its owner file carries a heartbeat;
# a lock whose heartbeat is stale (its owner died) is taken over, checked by the owner's token.
mkdir_lock() {
    local dir="$LOCK.d" started=$SECONDS waiting=0 age token grave
    while ! mkdir "$dir" 2>/dev/null; do
        age=$(heartbeat_age "$dir")
        if [ "$age" -ge "$BOOTSTRAP_STALE_SECONDS" ]; then
            token=$(sed -n 's/^token=//p' "$dir/.owner" 2>/dev/null || true)
            log "the setup lock $dir has had no heartbeat for ${age}s (owner $(owner_of "$dir")); taking it over"
            grave="$dir.stale-$WORKER_ID-$(random_suffix)"
            if mv "$dir" "$grave" 2>/dev/null; then
                # Another worker may have taken it over first: then this is its fresh lock; put it back.
                if [ "$(sed -n 's/^token=//p' "$grave/.owner" 2>/dev/null || true)" = "$token" ]; then
                    rm -rf "$grave"
                else
                    mv "$grave" "$dir" 2>/dev/null || true
                fi
            fi
            continue
        fi
        if [ "$waiting" -eq 0 ]; then
            log "another worker ($(owner_of "$dir")) is setting up the volume; waiting (at most ${BOOTSTRAP_LOCK_TIMEOUT}s)"
            waiting=1
        fi
        [ $((SECONDS - started)) -ge "$BOOTSTRAP_LOCK_TIMEOUT" ] &&
            die "another worker held the setup lock $dir for over ${BOOTSTRAP_LOCK_TIMEOUT}s" \
                "(raise RUNPOD_INIT_TIMEOUT, or prepare the volume once from a pod)."
        sleep "$BOOTSTRAP_LOCK_POLL_SECONDS"
    done
    LOCK_TOKEN="$WORKER_ID-$(random_suffix)"
    printf 'owner=%s\ntoken=%s\n' "$WORKER_ID" "$LOCK_TOKEN" >"$dir/.owner"
    heartbeat "$dir/.owner"
    LOCK_KIND="mkdir"
}

release_lock() {
    case "$LOCK_KIND" in
    flock) exec 9>&- ;;
    mkdir)
        # Only our own lock: a stale-lock takeover may have given the folder to another worker.
        if [ "$(sed -n 's/^token=//p' "$LOCK.d/.owner" 2>/dev/null || true)" = "$LOCK_TOKEN" ]; then
            rm -rf "$LOCK.d"
        fi
        ;;
    esac
    LOCK_KIND=""
}

# --- the virtual environment -----------------------------------------------------------------------------------

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

# The newest finished, healthy venv built for requirements hash $1 (venv/<hash>-<worker>-<suffix>).
find_venv() {
    local dir
    while IFS= read -r dir; do
        [ -f "$dir/.requirements-hash" ] && venv_healthy "$dir/bin/python" && {
            echo "$dir"
            return 0
        }
    done < <(find "$VIBEVOICE_HOME/venv" -mindepth 1 -maxdepth 1 -type d -name "$1*" -printf '%T@ %p\n' |
        sort -rn | cut -d' ' -f2-)
    return 1
}

pip_install() {
    # shellcheck disable=SC2086  # PIP_EXTRA_ARGS holds several arguments
    TMPDIR="$PIP_TMP" "$1" -m pip install --no-cache-dir $PIP_EXTRA_ARGS "${@:2}" 9>&-
}

# One phase of the venv build with progress lines: $1 what is installed, then pip's arguments.
install_phase() {
    local what=$1
    shift
    STEP="installing $what"
    log "installing $what"
    watch_start "building the virtual environment (installing $what)" "" "$VENV_BUILD" "$PIP_TMP"
    local status=0
    pip_install "$VENV_BUILD/bin/python" "$@" || status=$?
    watch_stop
    return "$status"
}

# Build a venv in place under its final, unique name and set VENV to it. It counts as finished only
# once .requirements-hash is written, last; until then its owner file's heartbeat marks it as ours.
build_venv() {
    local hash=$1
    VENV_BUILD="$VIBEVOICE_HOME/venv/$hash-$WORKER_ID-$(random_suffix)"
    STEP="creating the virtual environment"
    need_space "$VIBEVOICE_HOME/venv" "$BOOTSTRAP_VENV_BYTES" "building the virtual environment"
    log "building the virtual environment $VENV_BUILD (requirements hash $hash)"
    claim "$VENV_BUILD"
    PIP_TMP=$(mktemp -d "${TMPDIR:-/tmp}/vibevoice-pip.XXXXXX")
    "$PYTHON_BIN" -m venv "$VENV_BUILD" 9>&-
    if [ -n "$TORCH_SPEC" ]; then
        # shellcheck disable=SC2086  # TORCH_INDEX_ARGS holds several arguments
        install_phase "$TORCH_SPEC" $TORCH_INDEX_ARGS "$TORCH_SPEC"
    fi
    if [ -n "$FLASH_ATTN_SPEC" ]; then
        # Optional: without it the worker uses sdpa attention and says so in its log.
        install_phase flash-attn "$FLASH_ATTN_SPEC" ||
            log "warning: flash-attn could not be installed; the worker will use sdpa attention"
    fi
    install_phase "$REQUIREMENTS_FILE" -r "$REQUIREMENTS_FILE"
    rm -rf "$PIP_TMP"
    STEP="checking the new virtual environment"
    venv_healthy "$VENV_BUILD/bin/python" ||
        die "the new virtual environment lacks one of: $BOOTSTRAP_CHECK_IMPORTS."
    rm -f "$VENV_BUILD/.owner"
    printf '%s\n' "$hash" >"$VENV_BUILD/.requirements-hash"
    VENV=$VENV_BUILD
}

# Keep the current venv and the newest other finished one (a worker started before an upgrade may still use it).
prune_venvs() {
    local current=$1 kept=0 dir
    while IFS= read -r dir; do
        [ "$dir" = "$current" ] && continue
        [ -f "$dir/.requirements-hash" ] || continue # unfinished: remove_dead_builds decides
        if [ "$kept" -eq 0 ]; then
            kept=1
        else
            log "removing the old virtual environment $dir"
            rm -rf "$dir"
        fi
    done < <(find "$VIBEVOICE_HOME/venv" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%T@ %p\n' | sort -rn | cut -d' ' -f2-)
}

# --- the reference voices --------------------------------------------------------------------------------------

# Fetch the manifest's voices that demo/voices lacks; set VOICES_STATE. Never fails the boot: a job
# that names no voice runs without a voice prompt (and says so) when the default voice is missing.
fetch_voices() {
    local args=() url
    VOICES_STATE=complete
    [ -n "$VOICES_MANIFEST" ] || return 0
    [ -f "$VOICES_MANIFEST" ] || {
        log "warning: the voice manifest $VOICES_MANIFEST is missing; no reference voices fetched"
        return 0
    }
    for url in $VOICES_URLS; do args+=(--url "$url"); done
    STEP="fetching the reference voices"
    provision "$TOOL_PYTHON" voices --manifest "$VOICES_MANIFEST" --dest "$VIBEVOICE_HOME/demo/voices" \
        --timeout "$VOICES_TIMEOUT" "${args[@]}" >/dev/null || VOICES_STATE=incomplete
}

# --- the model ---------------------------------------------------------------------------------------------------

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

# Set MODEL_FOLDER to the requested checkpoint: a local folder, RunPod's cached model (with or without
# refs/main), a complete copy in the volume's cache, or a download into it (resumable, with progress).
locate_model() {
    local python=$1 output
    if [ -n "$MODEL_PATH" ] || [ -n "$MODEL_SOURCE" ]; then
        MODEL_FOLDER=${MODEL_PATH:-$MODEL_SOURCE}
        [ -f "$MODEL_FOLDER/config.json" ] || die "the model folder $MODEL_FOLDER has no config.json."
        return
    fi
    STEP="looking for $MODEL_ID in the model caches"
    if MODEL_FOLDER=$(provision "$python" find-model "$MODEL_ID" --runpod-cache "$RUNPOD_HF_CACHE" \
        --cache "$VIBEVOICE_HOME/hf_cache"); then
        log "found $MODEL_ID in $MODEL_FOLDER"
        return
    fi
    STEP="downloading $MODEL_ID"
    output=$(provision "$python" download "$MODEL_ID" --cache "$VIBEVOICE_HOME/hf_cache" \
        --interval "$BOOTSTRAP_PROGRESS_SECONDS" --stall "$BOOTSTRAP_STALL_SECONDS") || die "${output##*$'\n'}"
    MODEL_FOLDER=${output##*$'\n'}
}

# Set NATIVE_MODEL to a native checkpoint for MODEL_FOLDER: itself, or its conversion under models/ (once).
native_model() {
    local python=$1 name build size
    NATIVE_MODEL=$MODEL_FOLDER
    grep -q -e '"decoder_config"' -e '"acoustic_tokenizer_config"' "$MODEL_FOLDER/config.json" || return 0
    if [ -n "$MODEL_PATH$MODEL_SOURCE" ]; then name=$(basename "$MODEL_FOLDER"); else name=${MODEL_ID//\//--}; fi
    NATIVE_MODEL="$VIBEVOICE_HOME/models/$name-hf"
    [ -f "$NATIVE_MODEL/config.json" ] && return 0
    STEP="converting $MODEL_FOLDER to the transformers-native layout"
    size=$(du -sbL "$MODEL_FOLDER" | cut -f1)
    need_space "$VIBEVOICE_HOME/models" "$size" "converting $MODEL_FOLDER"
    build="$VIBEVOICE_HOME/models/.build-$WORKER_ID-$(random_suffix)"
    claim "$build"
    log "converting the community-layout checkpoint $MODEL_FOLDER into $NATIVE_MODEL"
    watch_start "converting to the transformers-native layout" "$size" "$build"
    PYTHONPATH="$APP_DIR" "$python" -m deploy.convert_checkpoint "$MODEL_FOLDER" "$build/$name-hf" \
        ${TOKENIZER:+--tokenizer "$TOKENIZER"} 9>&-
    watch_stop
    rm -rf "$NATIVE_MODEL" # a broken leftover without config.json
    mv "$build/$name-hf" "$NATIVE_MODEL"
    rm -rf "$build"
}

# --- the flag --------------------------------------------------------------------------------------------

flag_value() {
    [ -f "$FLAG" ] || return 0
    sed -n "s/^$1=//p" "$FLAG"
}

# The previous setup is complete and still matches what is asked for ($1: the requirements hash).
setup_done() {
    local model_path
    [ -f "$FLAG" ] || return 1
    [ "$(flag_value requirements)" = "$1" ] || return 1
    [ "$(flag_value model)" = "$(model_request)" ] || return 1
    model_path=$(flag_value model_path)
    [ -f "$model_path/config.json" ] || return 1
    venv_healthy "$(flag_value python)"
}

# Write the flag atomically: $1 requirements hash, $2 python, $3 model folder, $4 voices state.
write_flag() {
    local tmp
    tmp="$FLAG.tmp.$WORKER_ID.$(random_suffix)"
    {
        printf 'requirements=%s\n' "$1"
        printf 'python=%s\n' "$2"
        printf 'model=%s\n' "$(model_request)"
        printf 'model_path=%s\n' "$3"
        printf 'voices=%s\n' "$4"
        printf 'completed=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$tmp"
    mv -f "$tmp" "$FLAG"
}

# A later boot retries the voices a first boot could not fetch (bounded by VOICES_TIMEOUT).
retry_voices() {
    [ "$(flag_value voices)" = complete ] && return 0
    log "some reference voices are missing; trying to fetch them again"
    fetch_voices
    write_flag "$(flag_value requirements)" "$(flag_value python)" "$(flag_value model_path)" "$VOICES_STATE" ||
        log "warning: could not update $FLAG"
}

# --- without a network volume -----------------------------------------------------------------------------

# VIBEVOICE_HOME lies on the container's own disk (the same filesystem as BOOTSTRAP_CONTAINER_DISK).
on_container_disk() {
    local folder=$VIBEVOICE_HOME
    while [ ! -e "$folder" ] && [ "$folder" != / ]; do folder=$(dirname "$folder"); done
    [ "$(stat -c %d "$folder")" = "$(stat -c %d "$BOOTSTRAP_CONTAINER_DISK")" ]
}

# The model will be downloaded: no local folder, no baked model, nothing in RunPod's cache or the volume's.
model_needs_download() {
    [ -z "$MODEL_PATH$MODEL_SOURCE" ] || return 1
    ! provision "$TOOL_PYTHON" find-model "$MODEL_ID" --runpod-cache "$RUNPOD_HF_CACHE" \
        --cache "$VIBEVOICE_HOME/hf_cache" >/dev/null 2>&1
}

# A worker without a network volume starts from an empty VIBEVOICE_HOME at every cold start: say, once and
# in one line, what that costs and what to change, before paying it.
warn_without_volume() {
    on_container_disk || return 0
    local rebuilt=()
    [ -n "$VIBEVOICE_PYTHON" ] || rebuilt+=("builds the 7.5 GB virtual environment")
    model_needs_download && rebuilt+=("downloads $MODEL_ID")
    [ "${#rebuilt[@]}" -gt 0 ] || return 0
    local what=${rebuilt[0]}
    [ "${#rebuilt[@]}" -eq 1 ] || what="${rebuilt[0]} and ${rebuilt[1]}"
    log "WARNING: no network volume: $VIBEVOICE_HOME is on the container disk, which starts empty, so this" \
        "and every cold start $what again (minutes each time). Attach a network volume (mounted at" \
        "/runpod-volume), or deploy the self-contained image (the Dockerfile's default target) with the" \
        "endpoint's cached model set to $MODEL_ID."
}

# --- main -------------------------------------------------------------------------------------------------------

run_worker() {
    stop_background
    release_lock
    export MODEL_PATH=$1 VIBEVOICE_HOME HF_HUB_OFFLINE=1
    if [ "$BOOTSTRAP_EXEC" = "0" ]; then
        log "setup complete (BOOTSTRAP_EXEC=0: not starting the worker)"
        exit 0
    fi
    log "starting the worker with $2 (model $1)"
    cd "$APP_DIR"
    exec "$2" "$WORKER_SCRIPT" "${@:3}"
}

prepare_layout() {
    STEP="creating the volume layout in $VIBEVOICE_HOME"
    mkdir -p "$VIBEVOICE_HOME"/{hf_home,hf_cache,models,output,demo/voices,venv,compile_cache}
    local voice
    for voice in "$APP_DIR"/demo/voices/*.wav; do # voices shipped with the image; never overwrite the volume's
        [ -f "$voice" ] && [ ! -e "$VIBEVOICE_HOME/demo/voices/${voice##*/}" ] && cp "$voice" "$VIBEVOICE_HOME/demo/voices/"
    done
    return 0
}

# Set VENV to a venv for requirements hash $1: a finished one, or a new build.
prepare_venv() {
    if VENV=$(find_venv "$1"); then
        log "reusing the virtual environment $VENV"
    else
        build_venv "$1"
        prune_venvs "$VENV"
    fi
}

main() {
    if [ -z "$MODEL_PATH$MODEL_SOURCE" ] && [ -f "$BAKED_MODEL/config.json" ]; then
        MODEL_PATH=$BAKED_MODEL
    fi
    prepare_layout

    local hash python
    if [ -n "$VIBEVOICE_PYTHON" ]; then
        hash="image"
    else
        STEP="checking the Python interpreter $PYTHON_BIN"
        "$PYTHON_BIN" -c 'import venv' >/dev/null 2>&1 || die "no working Python interpreter with venv at '$PYTHON_BIN' (set PYTHON_BIN)."
        [ -r "$REQUIREMENTS_FILE" ] || die "the requirements file $REQUIREMENTS_FILE is missing."
        hash=$(requirements_hash)
    fi

    if setup_done "$hash"; then
        log "already set up ($FLAG); starting offline"
        retry_voices
        run_worker "$(flag_value model_path)" "$(flag_value python)" "$@"
    fi

    acquire_lock
    if setup_done "$hash"; then
        log "set up by another worker; starting offline"
        run_worker "$(flag_value model_path)" "$(flag_value python)" "$@"
    fi

    # We hold the lock: the flag goes until every step succeeded; dead boots' leftovers go too.
    rm -f "$FLAG"
    remove_dead_builds
    warn_without_volume

    if [ -z "$VIBEVOICE_PYTHON" ]; then
        prepare_venv "$hash"
        python="$VENV/bin/python"
    else
        python=$VIBEVOICE_PYTHON
        venv_healthy "$python" || die "VIBEVOICE_PYTHON $python lacks one of: $BOOTSTRAP_CHECK_IMPORTS."
    fi

    fetch_voices
    locate_model "$python"
    native_model "$python"
    remove_dead_builds # again: a folder left alone above may have lost its heartbeat by now

    STEP="writing $FLAG"
    write_flag "$hash" "$python" "$NATIVE_MODEL" "$VOICES_STATE"
    log "first-run setup complete"
    run_worker "$NATIVE_MODEL" "$python" "$@"
}

main "$@"
