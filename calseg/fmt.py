"""Numbers for people: the one place that rounds floats printed by the CLI, the demo and the
report logs. JSON outputs keep full precision (they never go through here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

EXPONENT_FROM = 1e15
"""Magnitude from which :func:`fmt_num` writes exponent notation even with an integer part:
float64 holds integers exactly only below 2**53 (about 9.0e15), so 38 printed digits of a
float32 maximum (found by a new-user check: "strongest z = 36065164101432017307883001880822939648")
were noise."""


def fmt_num(value: Any, digits: int = 4) -> str:
    """A number as short text with ``digits`` significant digits.

    Floats: ``0.0010901965070773344 -> "0.00109"``, ``351.218226965458 -> "351.2"``; values of
    ``10**digits`` or more keep their integer part (``123456.7 -> "123457"``) up to
    :data:`EXPONENT_FROM` (beyond it the digits are not exact in a float64, so ``3.6e+37``);
    tiny ones use exponent notation (``1.5e-07``); NaN/inf print as ``nan``/``inf``; ``None``
    as ``n/a``.
    Integers, booleans and other values are returned as ``str(value)``.

    Args:
        value: the value to show (any type).
        digits: significant digits for floats (>= 1).
    """
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, float):
        # numpy floats are float subclasses only for float64; take the others by duck typing
        if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f":
            value = float(value)
        else:
            return str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and 10**digits <= abs(value) < EXPONENT_FROM:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def fmt_mapping(values: Mapping[str, Any], digits: int = 4) -> str:
    """``key=value`` pairs joined by ", ", floats through :func:`fmt_num` (nested mappings in
    braces), e.g. a pydantic model's ``model_dump()`` for a one-line summary."""
    parts = []
    for k, v in values.items():
        if isinstance(v, Mapping):
            parts.append(f"{k}={{{fmt_mapping(v, digits)}}}")
        elif isinstance(v, list | tuple):
            parts.append(f"{k}=[{', '.join(fmt_num(x, digits) for x in v)}]")
        else:
            parts.append(f"{k}={fmt_num(v, digits)}")
    return ", ".join(parts)


def plural(n: int, word: str, plural_form: str | None = None) -> str:
    """``"1 cell"``, ``"0 cells"``, ``"3 cells"``; ``plural_form`` for irregular words
    (default ``word + "s"``)."""
    return f"{n} {word if n == 1 else (plural_form or word + 's')}"


def first_of(items: Sequence[Any], n: int = 5, sep: str = ", ") -> str:
    """The first ``n`` of ``items`` joined by ``sep``, then ``"and K more"`` when there are
    more: what an error message lists of a user's input, so that a request of 60,000 unknown
    keys does not get a megabyte-long answer."""
    shown = [str(x) for x in items[:n]]
    if len(items) > n:
        shown.append(f"and {len(items) - n:,} more")
    return sep.join(shown)
