"""`python handler.py` with faults that cannot be provoked in a real worker on demand.

Started by tests/test_faults.py through the RunPod emulator in place of `python handler.py`; the
worker loop, the handler and the engine are the real ones. Faults, each switched on by a variable:

FAULT_GENERATION_MARKER=word   a job whose text contains `word` raises inside generation: from the
                               decode loop's step callback, while the engine holds its lock, as
                               a GPU or model fault would (this machine has no GPU to break).
FAULT_GENERATION_MESSAGE=text  the injected exception's message (default: "injected fault inside
                               generation"), e.g. one that quotes a secret, as a careless error would.
FAULT_NO_FILE_WRITES=1         from the moment the SDK's job loop starts, every write to a file
                               fails (RLIMIT_FSIZE=0 with SIGXFSZ ignored: a full disk that
                               refuses every byte). Output goes through a pipe to a copier
                               process, which is not limited, so the log still reaches its file.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pipe_output_through_copier() -> None:
    """Send stdout and stderr through a pipe to a child that writes them where they went before."""
    read_end, write_end = os.pipe()
    if os.fork() == 0:  # the copier: forked before any thread exists
        os.close(write_end)
        while piece := os.read(read_end, 65536):
            os.write(1, piece)
        os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)


def refuse_file_writes() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fault-probe-{os.getpid()}")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    try:  # proof that the limit holds in this process
        os.write(descriptor, b"x")
    except OSError as exc:
        if exc.errno != errno.EFBIG:
            raise
        print("fault: file writes are refused (RLIMIT_FSIZE=0)", flush=True)
    else:
        raise SystemExit("fault: RLIMIT_FSIZE=0 did not refuse a file write")
    finally:
        os.close(descriptor)


def inject_generation_fault(marker: str) -> None:
    import inference

    original = inference.VibeVoiceEngine.synthesize
    message = os.environ.get("FAULT_GENERATION_MESSAGE") or "injected fault inside generation"

    def synthesize(self, chunks, voices, params, on_chunk=None, should_stop=None, on_audio=None, on_progress=None):
        if any(marker in turn.text for chunk in chunks for turn in chunk.turns):

            def on_progress(audio_seconds: float, chunks_done: int) -> None:
                raise RuntimeError(message)

        return original(self, chunks, voices, params, on_chunk, should_stop, on_audio, on_progress)

    inference.VibeVoiceEngine.synthesize = synthesize


def main() -> None:
    sys.path.insert(0, str(ROOT))
    if os.environ.get("FAULT_NO_FILE_WRITES") == "1":
        pipe_output_through_copier()
        from runpod.serverless.modules import rp_scale

        start = rp_scale.JobScaler.start

        def start_without_file_writes(self) -> None:
            refuse_file_writes()
            start(self)

        rp_scale.JobScaler.start = start_without_file_writes
    if os.environ.get("FAULT_GENERATION_MARKER"):
        inject_generation_fault(os.environ["FAULT_GENERATION_MARKER"])

    import handler

    handler.main()


if __name__ == "__main__":
    main()
