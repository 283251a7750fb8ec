"""Progress reporting shared by the science code, the CLI and the job runners."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[float, str, str | None], None]
"""``progress(fraction, stage, message)``: fraction of the whole task done in [0, 1],
a short stage name (e.g. ``"integrate"``), and an optional human-readable message."""


def null_progress(fraction: float, stage: str, message: str | None = None) -> None:
    """A :data:`ProgressFn` that ignores every report."""


def scaled(progress: ProgressFn | None, start: float, stop: float) -> ProgressFn:
    """Map a sub-task's progress in [0, 1] onto ``[start, stop]`` of the parent task.

    Args:
        progress: the parent's callback (``None`` gives a no-op).
        start: parent fraction at which the sub-task begins, in [0, 1].
        stop: parent fraction at which the sub-task ends, in [start, 1].

    Returns:
        A :data:`ProgressFn` for the sub-task.
    """
    parent = progress or null_progress

    def report(fraction: float, stage: str, message: str | None = None) -> None:
        f = min(max(float(fraction), 0.0), 1.0)
        parent(start + (stop - start) * f, stage, message)

    return report
