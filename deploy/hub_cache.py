"""Finding a model in a Hugging Face cache folder without the network.

A cache folder holds `models--{org}--{name}/snapshots/{commit}/` with `refs/main` naming the
commit. RunPod's cached models (`/runpod-volume/huggingface-cache/hub`) can lack `refs/main`, and
then huggingface_hub's offline lookup fails although the files are there. `find_snapshot` falls
back to the snapshot folders themselves: one is used as it is; of several, the newest (by
modification time) is used and said in the log. Only the standard library is used here, so
bootstrap.sh can call it before any virtual environment exists (through provision.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("vibevoice.cache")


def repo_folder(cache_dir: Path, model_id: str) -> Path:
    """The cache's folder for a model id, e.g. models--vibevoice--VibeVoice-7B-hf."""
    return cache_dir / ("models--" + model_id.replace("/", "--"))


def find_snapshot(cache_dir: Path, model_id: str) -> Path | None:
    """The snapshot folder of `model_id` in `cache_dir`, or None when it holds no usable one.

    `refs/main` wins when it names a snapshot with a config.json; otherwise the snapshots that have
    a config.json are candidates: one is used, several give the newest and a log line.
    """
    repo = repo_folder(cache_dir, model_id)
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        named = snapshots / ref.read_text().strip()
        if (named / "config.json").is_file():
            return named
    try:
        candidates = [entry for entry in snapshots.iterdir() if (entry / "config.json").is_file()]
    except OSError:
        return None
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    newest = max(candidates, key=lambda entry: entry.stat().st_mtime)
    log.warning(
        "%s has %d snapshots of %s and no usable refs/main; using the newest, %s",
        cache_dir, len(candidates), model_id, newest.name,
    )  # fmt: skip
    return newest
