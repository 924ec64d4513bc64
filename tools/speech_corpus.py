"""Real speech with known word boundaries, for measuring the aligner: espeak-ng (Debian's package)
speaks each word on its own, and the words are joined with silences of known, varied length.

The true start of a word is where its own audio begins in the joined signal (its leading and
trailing silence trimmed at 2% of its peak), so the reference is exact by construction.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

RATE = 24000  # the model's rate, as the worker hands chunks to the aligner

# Sentences with names, numbers and an acronym that the dictionary lacks or spells differently.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore every summer morning.",
    "Our meeting with Doctor Zorblax starts at 42 minutes past nine.",
    "Please remember to bring your notebook, a pencil, and some water.",
    "The river flowed quietly beneath the old stone bridge at night.",
    "Scientists discovered a new species of frog in the rain forest.",
    "Would you like coffee or tea with your breakfast this morning?",
    "NASA launched the rocket from Florida in 1969 with three astronauts.",
    "Every child deserves a safe home and a good education.",
    "The orchestra played beautifully until the very last note faded away.",
)


@dataclass(frozen=True)
class SpokenSentence:
    text: str
    audio: np.ndarray  # RATE Hz mono float32
    starts: tuple[float, ...]  # the true start of each word, in seconds


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak_word(word: str, voice: str = "en-us", words_per_minute: int = 170) -> np.ndarray:
    """One word from espeak-ng at RATE Hz, its silence trimmed."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "--stdout", word],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    ratio = Fraction(RATE, rate)
    samples = resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)
    loud = np.nonzero(np.abs(samples) > 0.02 * np.abs(samples).max())[0]
    return samples[loud[0] : loud[-1] + 1]


def build(sentences: tuple[str, ...] = SENTENCES, seed: int = 1) -> list[SpokenSentence]:
    """Each sentence spoken word by word, 20-200 ms of silence before each word, 200 ms after."""
    rng = random.Random(seed)
    spoken = []
    for text in sentences:
        pieces, starts, position = [], [], 0
        for word in text.split():
            samples = speak_word(word)
            gap = int(RATE * rng.uniform(0.02, 0.2))
            pieces += [np.zeros(gap, dtype=np.float32), samples]
            starts.append((position + gap) / RATE)
            position += gap + samples.size
        pieces.append(np.zeros(RATE // 5, dtype=np.float32))
        spoken.append(SpokenSentence(text, np.concatenate(pieces), tuple(starts)))
    return spoken


def start_errors_ms(sentence: SpokenSentence, aligned_starts: list[float]) -> list[float]:
    """|aligned - true| word start, in milliseconds."""
    return [abs(aligned - true) * 1000 for aligned, true in zip(aligned_starts, sentence.starts, strict=True)]
