"""Progress reporting and cooperative cancellation, shared by the science code, the CLI and the
job runners.

Cancellation (issue 13): long loops in :mod:`calseg` call :func:`check_cancelled` (directly, or
by reporting progress through :func:`scaled`). It does nothing unless a :class:`CancelToken` is
installed with :func:`cancellable` around the work; then it raises :class:`Cancelled` once the
token is cancelled. The service installs a token whose poll asks the database whether the job
was cancelled (:meth:`calseg.service.context.JobContext.check_cancelled`); the library never
imports the service. A check costs a ContextVar lookup and a clock read, and the token's poll
runs at most every ``interval_s`` seconds, so it can sit in a per-frame or per-step loop.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ProgressFn = Callable[[float, str, str | None], None]
"""``progress(fraction, stage, message)``: fraction of the whole task done in [0, 1],
a short stage name (e.g. ``"integrate"``), and an optional human-readable message."""


class Cancelled(BaseException):  # noqa: N818 - the name says what happened, like asyncio's
    """The work was cancelled (raised by :func:`check_cancelled`).

    A :class:`BaseException`, like :class:`asyncio.CancelledError` and
    :class:`KeyboardInterrupt`, so that an ``except Exception`` meant for a failing optional
    step (e.g. an export) does not swallow it.
    """


class CancelToken:
    """Tells long-running work to stop.

    Args:
        poll: optional function asked (at most every ``interval_s`` seconds, from the checking
            thread) whether the work was cancelled meanwhile; it returns the reason (str) or
            None, or raises :class:`Cancelled` itself.
        interval_s: least time between two calls of ``poll`` (seconds).
        error: the exception class :meth:`check` raises (a :class:`Cancelled` subclass).
    """

    def __init__(
        self,
        poll: Callable[[], str | None] | None = None,
        interval_s: float = 0.5,
        error: type[Cancelled] = Cancelled,
    ) -> None:
        self.poll = poll
        self.interval_s = float(interval_s)
        self.error = error
        self.reason: str | None = None
        self.checks = 0
        """How many times :meth:`check` ran (tests and benchmarks read it)."""
        self.polls = 0
        """How many times ``poll`` was called."""
        self._event = threading.Event()
        self._next_poll = 0.0

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called (or a poll reported a cancel)."""
        return self._event.is_set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Mark the work cancelled; the next :meth:`check` raises. Thread-safe."""
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def check(self) -> None:
        """Raise :class:`Cancelled` when cancelled; polls at most every ``interval_s`` s."""
        self.checks += 1
        if not self._event.is_set() and self.poll is not None:
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + self.interval_s
                self.polls += 1
                reason = self.poll()
                if reason:
                    self.cancel(reason)
        if self._event.is_set():
            raise self.error(self.reason or "cancelled")


_current: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar(
    "calseg_cancel_token", default=None
)
_process_token: CancelToken | None = None


@contextmanager
def cancellable(token: CancelToken, *, process_wide: bool = False) -> Iterator[CancelToken]:
    """Install ``token`` for the work run inside the ``with`` block.

    Args:
        token: the token :func:`check_cancelled` consults.
        process_wide: also consult it from threads that did not inherit the context (e.g. a
            ``ThreadPoolExecutor`` inside the science code). Only for a process that runs one
            piece of work at a time (a job's own process); in-process runs keep it per context.
    """
    global _process_token
    reset = _current.set(token)
    previous = _process_token
    if process_wide:
        _process_token = token
    try:
        yield token
    finally:
        _current.reset(reset)
        if process_wide:
            _process_token = previous


def current_token() -> CancelToken | None:
    """The token installed by :func:`cancellable` for this context (or process), if any."""
    token = _current.get()
    return token if token is not None else _process_token


def check_cancelled() -> None:
    """A cancellation point: raise :class:`Cancelled` if the installed token was cancelled.

    Put it in every loop whose whole run can take more than a second or so (per frame, per
    step, per cell). Without an installed token it is a no-op.
    """
    token = _current.get()
    if token is None:
        token = _process_token
        if token is None:
            return
    token.check()


def null_progress(fraction: float, stage: str, message: str | None = None) -> None:
    """A :data:`ProgressFn` that ignores every report (but is a cancellation point)."""
    check_cancelled()


def scaled(
    progress: ProgressFn | None, start: float, stop: float, prefix: str | None = None
) -> ProgressFn:
    """Map a sub-task's progress in [0, 1] onto ``[start, stop]`` of the parent task.

    Every report is also a cancellation point (:func:`check_cancelled`).

    Args:
        progress: the parent's callback (``None`` gives a no-op).
        start: parent fraction at which the sub-task begins, in [0, 1].
        stop: parent fraction at which the sub-task ends, in [start, 1].
        prefix: put before each message (which sub-task of several this is, e.g. ``"SAM2
            untuned on v005 (2/12)"``), so that per-sub-task counters ("frame 1/48") that
            start again are read as a new sub-task, not as progress going back.

    Returns:
        A :data:`ProgressFn` for the sub-task.
    """
    parent = progress or null_progress

    def report(fraction: float, stage: str, message: str | None = None) -> None:
        check_cancelled()
        f = min(max(float(fraction), 0.0), 1.0)
        if prefix:
            message = f"{prefix}: {message}" if message else prefix
        parent(start + (stop - start) * f, stage, message)

    return report
