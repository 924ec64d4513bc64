"""Processes that end with their parent, so nothing the worker or its tools start is left behind.

Linux can send a child a signal when its parent dies (PR_SET_PDEATHSIG). Two uses:

- `die_with_parent` as a `subprocess.Popen(preexec_fn=...)`: a worker, server or tool started by
  a test or by `make serve` is killed when whatever started it dies, however it dies;
- `children_die_with_this_process` in the worker: every process it forks (the runpod SDK's
  heartbeat is a fork) is killed when the worker dies. Without it a SIGKILLed worker (the
  out-of-memory killer) leaves its heartbeat pinging a control plane forever.

Elsewhere than Linux both are no-ops.
"""

from __future__ import annotations

import os
import signal
import sys

_parent_at_fork: int | None = None


def die_with_parent() -> None:
    """Ask for SIGKILL when the parent exits (in a child: a preexec_fn, or just after a fork).

    Linux ties this to the parent's thread that started the child: start children from a thread
    that lives as long as they should (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def children_die_with_this_process() -> None:
    """Every later os.fork() child of this process (multiprocessing's too) dies when it dies."""
    if sys.platform.startswith("linux"):
        os.register_at_fork(before=_note_parent, after_in_child=_child_dies_with_parent)


def _note_parent() -> None:
    global _parent_at_fork
    _parent_at_fork = os.getpid()


def _child_dies_with_parent() -> None:
    die_with_parent()
    if _parent_at_fork is not None and os.getppid() != _parent_at_fork:
        os._exit(0)  # the parent died between the fork and the request: nobody is left to serve
