#!/usr/bin/env bash
# Downloads the wheels `make gpu-bench` needs on a bare CUDA machine whose python3 (3.12, x86-64
# Linux) already has torch: transformers and diffusers at this repository's pins, and exactly the
# packages they import that torch does not bring (no dependency resolution: --no-deps). They go
# into GPU_BENCH_WHEELS (default bench/wheels, git-ignored); bench/gpu_bench.sh installs them there.
# The set must stay within 60 MB (it travels with the working tree). See docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${GPU_BENCH_WHEELS:-bench/wheels}
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
limit=$((60 * 1000 * 1000))

pinned() { # the version requirements.txt pins
  sed -n "s/^$1==\([^ ]*\).*/\1/p" requirements.txt | grep . || { echo "gpu_wheels: $1 is not pinned in requirements.txt" >&2; exit 1; }
}
packages=(
  "transformers==$(pinned transformers)" "diffusers==$(pinned diffusers)"
  "huggingface_hub==$(pinned huggingface_hub)" "safetensors==$(pinned safetensors)" "numpy==$(pinned numpy)"
  "urllib3==$(pinned urllib3)"
  # WEIGHTS=int8/fp8 rows (bench/gpu_weights.py): 7 MB, its Python API runs on the device's torch.
  "torchao==$(pinned torchao)"
  # accelerate is not needed, but transformers uses it where it is installed: this keeps it at the pin.
  "accelerate==$(pinned accelerate)" psutil==7.2.2
  # What transformers, huggingface_hub and diffusers import (diffusers needs PIL and requests).
  tokenizers==0.23.3 regex==2026.11.19 PyYAML==6.0.4 packaging==26.4 tqdm==4.70.1
  httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5
  requests==2.34.2 charset-normalizer==3.5.3 certifi==2026.10.19.post1
  importlib_metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0 pillow==13.0.0
)

rm -rf "$out"
mkdir -p "$out"
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --dest "$out" "${packages[@]}"
size=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
count=$(find "$out" -name '*.whl' | wc -l)
echo "gpu_wheels: $count wheels, $((size / 1000000)) MB in $out"
if [ "$count" -ne "${#packages[@]}" ]; then
  echo "gpu_wheels: expected ${#packages[@]} wheels" >&2
  exit 1
fi
if [ "$size" -gt "$limit" ]; then
  echo "gpu_wheels: the wheels exceed $((limit / 1000000)) MB" >&2
  exit 1
fi
