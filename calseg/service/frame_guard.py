"""How many frames the API process decodes or draws at once, and for whom.

The API decodes single frames itself: the upload check (first and last frame), the probe of a
job's reading options at submit and estimate, previews, viewer frames and cell lookups. With
frames of up to ``max_frame_pixels`` (2^26 px by default, 537 MB as float64) each, a bound on
how many run at once is a bound on their memory; a bound per user keeps one user's requests
from holding every thread and database connection of the API while they wait (a new user's
attack: 48 previews in flight made another user's ``GET /api/jobs`` fail with 500 after 30 s,
the connection pool exhausted).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

FRAME_SLOTS = 2
"""Frames decoded or drawn at once in the API process, all users together."""
FRAME_WAIT_S = 10.0
"""How long a request waits for a free slot before a 503."""
FRAME_REQUESTS_PER_USER = 3
"""Frame requests of one user decoding or waiting at once; one more is answered 429 at once."""
FRAME_SLOTS_PER_USER = 1
"""Slots one user holds at once (fewer than :data:`FRAME_SLOTS`, so another user always finds
one): a sixth attack run held both slots with two slow decodes of one user for 30 s at a time,
and 6 of another user's 9 uploads were refused (503) after they had been received in full."""

_slots = threading.BoundedSemaphore(FRAME_SLOTS)
_lock = threading.Lock()
_in_flight: dict[str, int] = {}
_user_slots: dict[str, threading.BoundedSemaphore] = {}


class FramesBusy(RuntimeError):
    """No frame slot: ``status`` 429 (this user has :data:`FRAME_REQUESTS_PER_USER` frame
    requests in flight) or 503 (every slot stayed taken for :data:`FRAME_WAIT_S`); both are
    answered with ``Retry-After``."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


@contextmanager
def frame_slot(user: str | None = None) -> Iterator[None]:
    """Hold one of the :data:`FRAME_SLOTS` while decoding or drawing frames for ``user`` (a
    user name or id; None: not counted per user), who holds at most
    :data:`FRAME_SLOTS_PER_USER` of them at once (their other requests wait their turn).

    Raises:
        FramesBusy: ``user`` already has :data:`FRAME_REQUESTS_PER_USER` requests in flight
            (429), or no slot freed within :data:`FRAME_WAIT_S` (503).
    """
    if user is not None:
        with _lock:
            n = _in_flight.get(user, 0)
            if n >= FRAME_REQUESTS_PER_USER:
                raise FramesBusy(
                    f"you have {n} frame requests being decoded or waiting (at most "
                    f"{FRAME_REQUESTS_PER_USER} at once); try again when one has finished",
                    status=429,
                )
            _in_flight[user] = n + 1
            own = _user_slots.setdefault(user, threading.BoundedSemaphore(FRAME_SLOTS_PER_USER))
    deadline = time.monotonic() + FRAME_WAIT_S
    try:
        if user is not None and not own.acquire(timeout=FRAME_WAIT_S):
            raise FramesBusy(
                f"your other frame request{'s' if FRAME_SLOTS_PER_USER > 1 else ''} "
                f"({FRAME_SLOTS_PER_USER} at a time) did not finish within {FRAME_WAIT_S:g} s; "
                "try again shortly"
            )
        try:
            if not _slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise FramesBusy(
                    f"the server is decoding {FRAME_SLOTS} other frames and none finished "
                    f"within {FRAME_WAIT_S:g} s; try again shortly"
                )
            try:
                yield
            finally:
                _slots.release()
        finally:
            if user is not None:
                own.release()
    finally:
        if user is not None:
            with _lock:
                left = _in_flight.get(user, 1) - 1
                if left > 0:
                    _in_flight[user] = left
                else:
                    _in_flight.pop(user, None)
                    _user_slots.pop(user, None)
