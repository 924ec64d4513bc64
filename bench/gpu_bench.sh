#!/usr/bin/env bash
# `make gpu-bench`: runs bench/gpu_bench.py (arguments are passed on; see docs/testing.md).
#
# With the repository's .venv (a development machine) it runs there. Elsewhere it runs python3
# (or GPU_BENCH_PYTHON), which must already have torch: on a bare CUDA machine the wheels that
# bench/gpu_wheels.sh downloaded (GPU_BENCH_WHEELS, default bench/wheels) are installed first into a
# folder of their own (GPU_BENCH_SITE) that goes in front on PYTHONPATH; torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${GPU_BENCH_PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  exec .venv/bin/python -m bench.gpu_bench "$@"
fi
python=${GPU_BENCH_PYTHON:-python3}
wheels=${GPU_BENCH_WHEELS:-bench/wheels}
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=${GPU_BENCH_SITE:-/tmp/vibevoice-gpu-bench-site}
  rm -rf "$site"
  if "$python" -m pip --version >/dev/null 2>&1; then
    "$python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-cache-dir --target "$site" "$wheels"/*.whl
  else
    # No pip: a wheel is a zip archive whose contents go into site-packages as they are.
    "$python" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$site" "$wheels"/*.whl
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$python" -c "import torch" 2>/dev/null; then
  echo "gpu-bench: $python cannot import torch; install torch (2.8-2.13) or set GPU_BENCH_PYTHON" >&2
  exit 1
fi
exec "$python" -m bench.gpu_bench "$@"
