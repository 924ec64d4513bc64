"""Per-frame counts of a decoder's `step`: host synchronisations, and operator dispatches outside
compiled regions. Used by figures k-m (bench/compiled_step.py) and tests/engine/test_framestep.py.

Host synchronisations are counted as the operations that make the host wait for a GPU (this
machine has none, so they are counted where they are called):
  - reads of device values on the host: `Tensor.tolist`, `Tensor.numpy`, and the operators
    `aten._local_scalar_dense` (`item`, `bool`, `int` of a tensor), `nonzero`, `masked_select`,
    `unique`, `equal`, `is_nonzero`, whose output size or value the host needs;
  - tensors built from host data (`torch.tensor`): blocking uploads from pageable memory on CUDA.
Dispatches are the operators the torch profiler records from Python, without those it records
inside a "Torch-Compiled Region" (a compiled graph runs them from generated code, or fused).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPERATORS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                     "unique_consecutive", "equal", "is_nonzero", "item"}  # fmt: skip


class _SyncingOperators(TorchDispatchMode):
    def __init__(self, counter: list[int]):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING_OPERATORS:
            self.counter[0] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_syncs() -> Iterator[list[int]]:
    """Counts host synchronisations in this thread while open; yields a one-item list with the count."""
    counter = [0]
    thread = threading.current_thread()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
    original_tensor = torch.tensor

    def counted(function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            if threading.current_thread() is thread:
                counter[0] += 1
            return function(*args, **kwargs)

        return wrapper

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(method))
    torch.tensor = counted(original_tensor)
    try:
        with _SyncingOperators(counter):
            yield counter
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.tensor = original_tensor


def dispatches_outside_compiled(profile) -> int:
    """Operators called from Python (not from another operator) outside any compiled region."""
    count = 0
    for event in profile.events():
        if not event.name.startswith("aten::"):
            continue
        parent, direct = event.cpu_parent, event.cpu_parent
        if direct is not None and direct.name.startswith("aten::"):
            continue
        while parent is not None and not parent.name.startswith("Torch-Compiled Region"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def frames(decoder, requests, measure: Callable[[Callable[[], object]], object]) -> list[object]:
    """Decode `requests` together by hand; `measure(step)` runs each frame's `decoder.step` and
    returns what it measured. Prefill, joining and dropping happen outside the measurement."""
    from engine.batch import Batch, Sequence

    sequences = [Sequence(request) for request in requests]
    batch, results = Batch(), []
    with torch.inference_mode(), decoder.lock:
        for sequence in sequences:
            for _ in decoder.prefill(sequence):
                pass
        decoder.join(batch, sequences)
        while batch.sequences:
            outputs: list = []
            results.append(measure(lambda outputs=outputs: outputs.extend(decoder.step(batch))))
            for output in outputs:
                if output.audio is not None:
                    output.audio.numpy()  # the consumer's read, outside the count
            decoder.drop(batch, [row for row, output in enumerate(outputs) if not output.ended])
    return results


def count_syncs(decoder, requests) -> list[int]:
    """Host synchronisations in each frame's `step`."""

    def measure(step: Callable[[], object]) -> int:
        with counting_syncs() as counter:
            step()
        return counter[0]

    return frames(decoder, requests, measure)


def count_dispatches(decoder, requests) -> list[int]:
    """Operator dispatches outside compiled regions in each frame's `step`."""
    from torch.profiler import ProfilerActivity, profile

    def measure(step: Callable[[], object]) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as recorded:
            step()
        return dispatches_outside_compiled(recorded)

    return frames(decoder, requests, measure)
