"""Per-frame counts of a decoder's `step`: host synchronisations, operator dispatches outside
compiled regions, and bytes moved. Used by figures a and k-m (bench/weights.py, bench/compiled_step.py),
`make gpu-bench` and tests/engine/test_framestep.py.

Host synchronisations are counted as the operations that make the host wait for a GPU (this
machine has none, so they are counted where they are called):
  - reads of device values on the host: `Tensor.tolist`, `Tensor.numpy`, and the operators
    `aten._local_scalar_dense` (`item`, `bool`, `int` of a tensor), `nonzero`, `masked_select`,
    `unique`, `equal`, `is_nonzero`, whose output size or value the host needs;
  - tensors built from host data (`torch.tensor`): blocking uploads from pageable memory on CUDA.
Dispatches are the operators the torch profiler records from Python, without those it records
inside a "Torch-Compiled Region" (a compiled graph runs them from generated code, or fused).
Bytes moved are counted per operator as if nothing were fused (an upper bound for a compiled graph,
whose fused elementwise chains keep intermediates in registers): each tensor an operator reads is
read once (a gather or an embedding lookup reads only the rows it takes, a broadcast tensor only its
own elements), each tensor it writes is written once (an indexed write only the values written), and
views move nothing. Weights, the KV cache and any copy of it are therefore counted as a GPU moves them.
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


# Composite operators a GPU runs as one kernel (a GEMM with its bias, fused attention): counted whole.
# Other composites (in inference mode this mode sees them undecomposed) are counted by their parts.
KERNELS = {"linear", "scaled_dot_product_attention"}
# Operators that write only the part of their first argument that their values cover.
PARTIAL_WRITES = {"index_put_", "index_put", "_index_put_impl_", "index_copy_", "scatter_", "masked_scatter_"}
# Operators that write their first argument without reading it.
WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_"} | PARTIAL_WRITES
# Operators that read only the rows they gather (their output's size) from their first argument.
GATHERS = {"embedding", "index", "index_select", "gather", "take"}
# Operators that only reinterpret their input (no alias annotation in their schema, yet no copy).
NO_DATA = {"_unsafe_view", "lift_fresh", "detach", "empty", "empty_strided", "empty_like", "new_empty",
           "new_empty_strided", "alias", "_reshape_alias", "resize_", "set_"}  # fmt: skip


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a kernel reads or writes for `tensor`: broadcast (stride 0) dimensions count once."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        elements *= size if stride != 0 else 1
    return elements * tensor.element_size()


def operator_bytes(func, args: tuple, kwargs: dict, out: object) -> int:
    """Bytes one operator call reads and writes, unfused (see the module's docstring)."""
    name = func.overloadpacket.__name__
    if func.is_view or name in NO_DATA:
        return 0
    schema = func._schema.arguments
    values = list(args) + [kwargs[a.name] for a in schema[len(args) :] if a.name in kwargs]
    moved, mutates = 0, False
    for position, (argument, value) in enumerate(zip(schema, values, strict=False)):
        written = argument.alias_info is not None and argument.alias_info.is_write
        mutates |= written
        for tensor in _tensors(value):
            if written and name in PARTIAL_WRITES:  # the values written: the last tensor argument
                moved += tensor_bytes([t for v in values for t in _tensors(v)][-1])
            elif written:  # written whole, and read first unless overwritten
                moved += tensor_bytes(tensor) * (1 if name in WRITE_ONLY else 2)
            elif position == 0 and name in GATHERS:
                moved += sum(tensor_bytes(t) for t in _tensors(out))
            else:
                moved += tensor_bytes(tensor)
    return moved + (0 if mutates else sum(tensor_bytes(t) for t in _tensors(out)))


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, list | tuple) else []


class _BytesMoved(TorchDispatchMode):
    def __init__(self, counter: list[int]):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ not in KERNELS:  # a composite (reshape may copy): count its parts
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        self.counter[0] += operator_bytes(func, args, kwargs, out)
        return out


@contextlib.contextmanager
def counting_bytes() -> Iterator[list[int]]:
    """Bytes moved by the operators run in this thread while open (eager code; a compiled function's
    graph runs inside it only through a backend that runs the graph's operators one by one)."""
    counter = [0]
    with _BytesMoved(counter):
        yield counter


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


@contextlib.contextmanager
def attention_as_compiled_before() -> Iterator[None]:
    """transformers' sdpa attention takes the branch it takes inside torch.compile (`repeat_kv`: the KV
    cache copied once per query head), as the static step's compiled graph did before it had its own
    attention (engine/attention.py). Only for counting: the arithmetic is the same either way."""
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.is_torchdynamo_compiling
    sdpa_attention.is_torchdynamo_compiling = lambda: True
    try:
        yield
    finally:
        sdpa_attention.is_torchdynamo_compiling = original


def frame_bytes(frame_step, bucket: int, capacity: int, steps: int, packed: bool = True) -> int:
    """Bytes one static frame (engine/framestep.py) moves for a bucket, capacity and step count: with the
    static step's own attention (`packed`), or as its compiled graph ran with transformers' sdpa."""
    from engine.attention import PACKED_SDPA, use_attention

    language_model = frame_step.model.model.language_model
    attention = use_attention(language_model, PACKED_SDPA) if packed else attention_as_compiled_before()
    slots = frame_step.allocate(bucket, capacity, steps)
    try:
        with torch.inference_mode(), attention, counting_bytes() as moved:
            frame_step.frame(slots.tensors)  # uncompiled: the operators one by one
    finally:
        frame_step.release(slots)
    return moved[0]
