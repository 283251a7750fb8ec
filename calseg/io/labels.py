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


def read_label_stack(path: str | Path, fits: tuple[int, int, int] | None = None) -> np.ndarray:
    """Read a label stack written by :func:`write_label_stack` (or any integer TIFF).

    The file is read as uploaded recordings are (:func:`calseg.io.recordings._open_tiff_file`:
    confined to itself, its directory chain walked with a cap, codecs bounded by the declared
    size), and its shape and dtype are checked from the header before any pixel is decoded: a
    1 MB TIFF declaring 4 x 30000 x 30000 ids took 17 GB before its shape was looked at. Whatever
    ``fits``, a stack needing more memory than the machine has available
    (:func:`calseg.machine.available_memory_bytes`; stored samples plus the uint32 copy) is
    refused before decoding.

    Args:
        path: a TIFF holding ``(T, H, W)`` or ``(H, W)`` integer labels.
        fits: the recording's ``(T, H, W)`` (frames, rows, columns) the labels must fit: one
            ``(H, W)`` label image (or a stack of 1) or a ``(T, H, W)`` stack; checked before
            decoding. None: any shape.

    Returns:
        ``(T, H, W)`` ``uint32`` label stack (a 2-D label image becomes ``T = 1``).

    Raises:
        LabelStackError: missing/unreadable/unsafe file, non-integer data, not 2-/3-D, a shape
            that does not fit ``fits``, or too large to hold in memory.
    """
    from calseg.io.recordings import RecordingError, _open_tiff_file
    from calseg.machine import available_memory_bytes

    p = Path(path)
    if not p.is_file():
        raise LabelStackError(f"{p}: no such label file.")
    if p.stat().st_size == 0:
        raise LabelStackError(f"{p.name} is empty (0 bytes); write the label stack again.")
    try:
        tf = _open_tiff_file(p)
    except (RecordingError, ValueError) as exc:  # UnsafeRecording is a ValueError
        raise LabelStackError(f"{p.name} is not a usable TIFF label stack: {exc}") from exc
    except Exception as exc:
        raise LabelStackError(
            f"{p.name} is not a readable TIFF label stack ({exc}); write it again."
        ) from exc
    try:
        series = tf.series[0] if tf.series else None
        if series is None:
            raise LabelStackError(f"{p.name} holds no image; write the label stack again.")
        shape = tuple(int(n) for n in series.shape)
        if len(shape) > 3:  # e.g. ImageJ's TZCYX of one channel and plane
            shape = tuple(n for n in shape if n != 1)
        if len(shape) not in (2, 3):
            raise LabelStackError(
                f"{p.name} holds shape {tuple(series.shape)}; a label stack is (T, H, W) or "
                "(H, W): squeeze or select axes."
            )
        if series.dtype.kind not in "uifb":
            raise LabelStackError(f"{p.name} has dtype {series.dtype}; expected integer cell ids.")
        if fits is not None:
            t, h, w = fits
            ok = shape == (h, w) or shape == (t, h, w) or shape == (1, h, w)
            if not ok:
                raise LabelStackError(
                    f"labels {shape} do not fit the recording {tuple(fits)}: give the label "
                    "stack made for this recording, or one (H, W) label image (nothing was "
                    "decoded)"
                )
        # decoded in its stored dtype, then converted to uint32: both at once at the peak
        need = int(np.prod(shape, dtype=object)) * (series.dtype.itemsize + 4)
        available = available_memory_bytes()
        if available is not None and need > available:
            raise LabelStackError(
                f"{p.name} ({' x '.join(map(str, shape))} ids) needs about "
                f"{need / 2**30:.2f} GiB to read, more than the {available / 2**30:.2f} GiB "
                "this machine has available (nothing was decoded)"
            )
        try:
            data = np.asarray(series.asarray()).reshape(shape)
        except MemoryError:
            raise LabelStackError(
                f"{p.name} ({' x '.join(map(str, shape))} ids) does not fit in memory."
            ) from None
        except Exception as exc:
            raise LabelStackError(
                f"{p.name} is not a readable TIFF label stack ({exc}); write it again."
            ) from exc
    finally:
        tf.close()
    return _as_label_stack(data, p.name)
