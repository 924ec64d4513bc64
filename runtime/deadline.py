"""Wall-clock deadlines on network calls, which no peer can stretch.

A socket timeout bounds one read, not an exchange: a server that sends one byte a second never
trips it, and a download read in large pieces waits for each piece to fill. A `Deadline` bounds
the whole exchange instead:

- `read_timeout()` is the time left, to set on the socket before every read (read with `read1`,
  which returns what has arrived instead of waiting for a full buffer);
- `watch(sock)` shuts the socket down when the time is up, which ends a read blocked anywhere
  (TLS handshake, status line, headers, body) whatever the server sends;
- `call_within` runs a blocking call whose sockets cannot be reached (a resolver, a library's
  own client) in a helper thread and stops waiting when the time is up. Python cannot stop that
  thread: the call must carry its own timeouts so that it ends soon after.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DeadlinePassed(Exception):
    """The time was up before the call finished."""


class Deadline:
    """`seconds` from now, on the monotonic clock; a context manager that releases what it watches."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer: threading.Timer | None = None
        self._cut = False

    def left(self) -> float:
        return max(0.0, self.ends - time.monotonic())

    @property
    def passed(self) -> bool:
        """True once the time is up (a connection cut by the watchdog reads as an early end)."""
        return self._cut or time.monotonic() >= self.ends

    def read_timeout(self) -> float:
        """The timeout for the next read: the time left; DeadlinePassed when none is."""
        left = self.left()
        if left <= 0:
            raise DeadlinePassed
        return left

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` down when the time is up. A duplicate of its descriptor is kept, so the cut
        reaches the connection even if its owner has wrapped (TLS) or replaced the socket object."""
        with self._lock:
            self._sockets.append(sock.dup())
            if self._cut:
                self._shutdown_all()
            elif self._timer is None:
                self._timer = threading.Timer(self.left(), self._time_is_up)
                self._timer.daemon = True
                self._timer.start()

    def _time_is_up(self) -> None:
        with self._lock:
            self._cut = True
            self._shutdown_all()

    def _shutdown_all(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):  # already closed by its owner
                sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked on the connection

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def call_within(seconds: float, function: Callable[[], T], name: str = "deadline-call") -> T:
    """`function()`'s result, or DeadlinePassed after `seconds` (its own exceptions pass through).

    The call runs in a daemon thread that is left to finish on its own when the time is up."""
    if seconds <= 0:
        raise DeadlinePassed
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(function())
        except BaseException as exc:  # handed to the waiting thread as is
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    try:
        return future.result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise DeadlinePassed from None
