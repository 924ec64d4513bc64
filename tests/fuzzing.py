"""The seed of this run's generated inputs (hypothesis, mutated audio, generated worker jobs).

Set FUZZ_SEED to replay a run; otherwise a fresh seed is drawn once per test session. Every
generated-input test puts the seed in its failure message (`replay()`), and hypothesis tests run
with `@hypothesis.seed(SEED)`, so a failure names the command that reproduces it.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

SEED = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(2**32))


def replay() -> str:
    return f"replay with FUZZ_SEED={SEED}"


@dataclass
class Timings:
    """Per-case wall times of a generated suite: reported (slowest case), never asserted."""

    name: str
    times: list[tuple[float, str]] = field(default_factory=list)

    def measure(self, label: str):
        timings = self

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()
                return self

            def __exit__(self, *exc_info):
                timings.times.append((time.perf_counter() - self.start, label))
                return False

        return _Timer()

    def summary(self) -> str:
        if not self.times:
            return f"{self.name}: no cases"
        slowest, label = max(self.times)
        median = sorted(t for t, _ in self.times)[len(self.times) // 2]
        return (
            f"{self.name}: {len(self.times)} cases, median {median * 1000:.1f} ms, "
            f"slowest {slowest * 1000:.1f} ms ({label})"
        )
