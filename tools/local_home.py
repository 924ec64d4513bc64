"""A local stand-in for the network volume: the folder layout, a model and demo voices.

`make run` and `make serve` use `.local/vibevoice` inside the checkout (git-ignored). When no
model is configured (MODEL_PATH / MODEL_ID) and there is no GPU, the tiny random-weight
checkpoint is built into `models/tiny-vibevoice`; its audio is noise. Demo voices are
synthetic, speech-like signals (a glottal pulse train through vowel formants), written once: there,
one under the name of each reference voice a deployment fetches (demo/voices.json), so every preset
the bridge offers exists locally too; the tests' volumes hold two (DEMO_VOICES).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOME = ROOT / ".local" / "vibevoice"
LAYOUT = ("hf_home", "hf_cache", "models", "output", "demo/voices")

# name -> (fundamental frequency in Hz, seed)
DEMO_VOICES = {"en-Alice_woman": (210.0, 1), "en-Frank_man": (115.0, 2)}
_VOWEL_FORMANTS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410))


def synthetic_voice(f0: float, seed: int, seconds: float = 4.0, rate: int = 24000) -> np.ndarray:
    """A deterministic speech-like signal: voiced syllables with pitch movement and pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = f0 * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t) + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    source = sum(np.sin(k * phase) / k for k in range(1, 30))  # a bright, buzzy glottal source
    out = np.zeros_like(t)
    syllable = int(0.25 * rate)
    for start in range(0, t.size, syllable):
        formants = _VOWEL_FORMANTS[rng.integers(len(_VOWEL_FORMANTS))]
        piece = source[start : start + syllable]
        local_t = np.arange(piece.size) / rate
        shaped = sum(np.sin(2 * np.pi * f * local_t) * piece / (i + 1) for i, f in enumerate(formants))
        envelope = np.sin(np.pi * np.linspace(0, 1, piece.size)) ** 2
        if rng.random() < 0.15:
            envelope *= 0.0  # a pause
        out[start : start + piece.size] = shaped * envelope
    out += 0.003 * rng.standard_normal(t.size)
    return (0.3 * out / np.max(np.abs(out))).astype(np.float32)


def pinned_voice_names() -> list[str]:
    """The reference voices a deployment's first boot fetches (demo/voices.json), by file stem."""
    files = json.loads((ROOT / "demo" / "voices.json").read_text())["files"]
    return [name.removesuffix(".wav") for name in files]


def voice_pitch(name: str) -> tuple[float, int]:
    """(fundamental frequency, seed) for a stand-in: DEMO_VOICES', else a man's or a woman's pitch by name."""
    if name in DEMO_VOICES:
        return DEMO_VOICES[name]
    seed = zlib.crc32(name.encode()) % 1000 + 3
    return (115.0 if "_man" in name else 210.0) + (seed % 7) * 6, seed


def write_demo_voices(voices_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Synthetic voices named `names` (by default DEMO_VOICES') that `voices_dir` lacks; returns the new files."""
    voices_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or list(DEMO_VOICES):
        path = voices_dir / f"{name}.wav"
        if not path.exists():
            f0, seed = voice_pitch(name)
            soundfile.write(path, synthetic_voice(f0, seed), 24000, subtype="PCM_16")
            written.append(path)
    return written


def wants_tiny_model(environ: dict[str, str]) -> bool:
    """The tiny checkpoint stands in when nothing is configured and no GPU could run the real one."""
    if environ.get("MODEL_PATH") or environ.get("MODEL_ID"):
        return False
    import torch

    return not torch.cuda.is_available()


def prepare(home: Path = DEFAULT_HOME, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Create the layout, the tiny model when needed and demo voices; return the env to run with."""
    environ = dict(os.environ if environ is None else environ)
    for folder in LAYOUT:
        (home / folder).mkdir(parents=True, exist_ok=True)
    write_demo_voices(home / "demo" / "voices", pinned_voice_names())
    env = {"VIBEVOICE_HOME": str(home)}
    if wants_tiny_model(environ):
        model_dir = home / "models" / "tiny-vibevoice"
        if not (model_dir / "tiny_checkpoint.json").exists():
            from tools import tiny_checkpoint

            print(f"building the tiny random-weight checkpoint in {model_dir} (its audio is noise)", flush=True)
            tiny_checkpoint.build_native(model_dir)
        env["MODEL_PATH"] = str(model_dir)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    parser.add_argument("--json", action="store_true", help="print the environment as JSON")
    args = parser.parse_args()
    env = prepare(args.home)
    if args.json:
        print(json.dumps(env))
    else:
        for key, value in env.items():
            print(f"export {key}={value}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
