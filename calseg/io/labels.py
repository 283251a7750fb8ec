"""Label stacks on disk: lossless TIFF, ImageJ-readable when the ids fit in 16 bit.

A label stack is ``(T, H, W)`` with 0 = background and one id per cell, stable across frames
(docs/ARCHITECTURE.md). On disk it is ``uint16`` when every id is <= 65535 (written as an ImageJ
hyperstack with axes ``TYX``, so Fiji opens it as a time series) and ``uint32`` otherwise (ImageJ
cannot read 32-bit integer TIFFs; tifffile, napari and Python readers can). Pages are
deflate-compressed (TIFF compression 8, which ImageJ reads); labels are never stored lossily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["LabelStackError", "read_label_stack", "write_label_stack"]

UINT16_MAX = 65535


class LabelStackError(ValueError):
    """A label stack cannot be written or read; the message says why and what to do."""


def _as_label_stack(labels: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise LabelStackError(
            f"{what} must be (T, H, W) or (H, W), got shape {arr.shape}; squeeze or select axes."
        )
    if arr.dtype == np.bool_:
        return arr.astype(np.uint32)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all() or not np.array_equal(arr, np.round(arr)):
            raise LabelStackError(
                f"{what} holds non-integer or non-finite values (dtype {arr.dtype}); a label "
                "stack holds integer cell ids (0 = background)."
            )
    elif arr.dtype.kind not in "ui":
        raise LabelStackError(f"{what} has dtype {arr.dtype}; expected integer cell ids.")
    if arr.size and arr.min() < 0:
        raise LabelStackError(
            f"{what} holds negative ids (min {arr.min()}); ids must be >= 0 (0 = background)."
        )
    if arr.size and arr.max() > np.iinfo(np.uint32).max:
        raise LabelStackError(f"{what} holds ids above 2**32 - 1 (max {arr.max()}).")
    return arr.astype(np.uint32, copy=False)


def write_label_stack(path: str | Path, labels: np.ndarray) -> Path:
    """Write a label stack losslessly as TIFF.

    Args:
        path: output file (``.tif``); parent folders are created.
        labels: ``(T, H, W)`` or ``(H, W)`` integer ids (any integer or bool dtype, or float
            holding whole numbers), 0 = background.

    Returns:
        The path written. ``uint16`` ImageJ hyperstack (axes ``TYX``) when the largest id is
        <= 65535, otherwise ``uint32`` TIFF with axes ``TYX`` in its description.

    Raises:
        LabelStackError: wrong shape, negative or non-integer ids.
    """
    import tifffile

    arr = _as_label_stack(labels, "labels")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    max_id = int(arr.max()) if arr.size else 0
    if max_id <= UINT16_MAX:
        tifffile.imwrite(
            out,
            arr.astype(np.uint16),
            imagej=True,
            metadata={"axes": "TYX", "min": 0.0, "max": float(max(max_id, 1))},
            photometric="minisblack",
            compression="zlib",
        )
    else:
        tifffile.imwrite(
            out,
            arr,
            metadata={"axes": "TYX"},
            photometric="minisblack",
            compression="zlib",
        )
    return out


def read_label_stack(path: str | Path) -> np.ndarray:
    """Read a label stack written by :func:`write_label_stack` (or any integer TIFF).

    Args:
        path: a TIFF holding ``(T, H, W)`` or ``(H, W)`` integer labels.

    Returns:
        ``(T, H, W)`` ``uint32`` label stack (a 2-D label image becomes ``T = 1``).

    Raises:
        LabelStackError: missing/unreadable file, non-integer data, or not 2-/3-D.
    """
    import tifffile

    p = Path(path)
    if not p.is_file():
        raise LabelStackError(f"{p}: no such label file.")
    if p.stat().st_size == 0:
        raise LabelStackError(f"{p.name} is empty (0 bytes); write the label stack again.")
    try:
        data = tifffile.imread(p)
    except Exception as exc:
        raise LabelStackError(
            f"{p.name} is not a readable TIFF label stack ({exc}); write it again."
        ) from exc
    data = np.squeeze(data) if data.ndim > 3 else data
    return _as_label_stack(data, p.name)
