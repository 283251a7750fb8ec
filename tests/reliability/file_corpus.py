"""The bad-file corpus of issue 8 ("Files"): each case writes one file, generated here (or a
real one from ``settings.real_data_dir``), and states what CalSeg must make of it.

A case either is *accepted* (read as a ``(T, H, W)`` stack of the given shape and dtype, with
value checks) or *refused* (``RecordingError`` from :func:`calseg.io.recordings.read_recording`
and 422 from ``POST /api/recordings``, both with the given message fragment).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

BADMETA = "sima_example-tiffs_0_badmeta.tif"
"""The real recording (in ``settings.real_data_dir``) of the ``needs_real`` case."""


@dataclass
class Case:
    """One file of the corpus and its expected outcome."""

    id: str
    filename: str
    write: Callable[[Path], None]
    shape: tuple[int, int, int] | None = None  # accepted: (T, H, W)
    dtype: str | None = None
    error: str | None = None  # refused: fragment of the message (case-insensitive)
    check: Callable[[np.ndarray], None] | None = None  # value checks on the frames
    warns: str | None = None  # fragment of a warning the reader must give
    read_kwargs: dict = field(default_factory=dict)
    needs_real: bool = False


def _tif(arr: np.ndarray, **kw) -> Callable[[Path], None]:
    """Write ``arr`` as a plain grey TIFF (tifffile would store a 3- or 4-image stack as
    planar colour otherwise)."""
    kw.setdefault("photometric", "minisblack")
    return lambda p: tifffile.imwrite(p, arr, **kw)


def _stack(t: int, h: int, w: int, dtype=np.uint16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(100, 4000, (t, h, w)).astype(dtype)


def _truncated(p: Path) -> None:
    buf = io.BytesIO()
    tifffile.imwrite(buf, _stack(20, 64, 64))
    data = buf.getvalue()
    p.write_bytes(data[: len(data) // 2])


def _image(fmt: str) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        arr = (np.arange(48 * 40) % 251).reshape(48, 40).astype(np.uint8)
        Image.fromarray(arr).save(p, format=fmt)

    return write


def _near_max(frames: np.ndarray) -> None:
    assert frames.dtype == np.uint16
    assert int(frames.max()) == 65535 and int(frames.min()) == 65530  # no wrap, no rescale


def _nan_inf_kept(frames: np.ndarray) -> None:
    assert frames.dtype == np.float32
    assert np.isnan(frames[0, 0, 0]) and np.isposinf(frames[0, 0, 1])
    assert np.isneginf(frames[0, 0, 2]) and np.isfinite(frames[1]).all()


def _constant(value: int) -> Callable[[np.ndarray], None]:
    def check(frames: np.ndarray) -> None:
        assert (frames == value).all()

    return check


def _rgb_to_gray(frames: np.ndarray) -> None:
    # R=G=B=100 everywhere except a pure red pixel: grey stays 100, red becomes darker
    assert frames.shape[1:] == (32, 48)
    assert abs(float(frames[0, 1, 1]) - 100) < 1 and frames[0, 0, 0] < frames[0, 1, 1]


def _five_d(p: Path) -> None:
    arr = np.zeros((6, 3, 2, 40, 50), np.uint16)  # T Z C Y X
    arr[:, :, 0] = 1000
    arr[:, :, 1] = 7  # the second channel must not leak into channel 0
    arr[:, 1, 0] = 3000  # a bright middle slice
    tifffile.imwrite(p, arr, imagej=True, metadata={"axes": "TZCYX"})


def _five_d_check(frames: np.ndarray) -> None:
    assert frames.min() >= 1000  # channel 0 only (channel 1 holds 7)


def _interleaved(p: Path) -> None:
    arr = np.zeros((10, 32, 32), np.uint16)
    arr[0::2] = 500  # channel 0
    arr[1::2] = 9  # channel 1
    tifffile.imwrite(p, arr, photometric="minisblack")


def _bigtiff(p: Path) -> None:
    tifffile.imwrite(p, _stack(5, 40, 40), bigtiff=True, photometric="minisblack")


def _badmeta(p: Path) -> None:
    from calseg.service.settings import Settings

    src = Settings().real_data_dir / BADMETA
    os.symlink(src, p)


def cases() -> list[Case]:
    """The corpus."""
    near_max = np.full((4, 32, 32), 65530, np.uint16)
    near_max[:, 0, 0] = 65535
    nan = np.ones((3, 32, 32), np.float32)
    nan[0, 0, 0], nan[0, 0, 1], nan[0, 0, 2] = np.nan, np.inf, -np.inf
    rgb = np.full((3, 32, 48, 3), 100, np.uint8)
    rgb[:, 0, 0] = (255, 0, 0)
    return [
        Case("header-lies-frame-count", "badmeta.tif", _badmeta, (1, 173, 173), "uint16",
             warns="3500", needs_real=True),
        Case("truncated-tiff", "cut.tif", _truncated, error="truncated"),
        Case("zero-byte", "empty.tif", lambda p: p.write_bytes(b""), error="empty"),
        Case("non-image-named-tif", "notes.tif",
             lambda p: p.write_text("these are my lab notes, not an image\n" * 20),
             error="not"),
        Case("single-png", "one.png", _image("PNG"), (1, 48, 40), "uint8"),
        Case("single-jpeg", "one.jpg", _image("JPEG"), (1, 48, 40), "uint8"),
        Case("rgb-frames", "rgb.tif", _tif(rgb, photometric="rgb"), (3, 32, 48), None,
             check=_rgb_to_gray),
        Case("uint16-near-65535", "bright.tif", _tif(near_max), (4, 32, 32), "uint16",
             check=_near_max),
        Case("float32-nan-inf", "nan.tif", _tif(nan), (3, 32, 32), "float32",
             check=_nan_inf_kept),
        Case("constant-frames", "const.tif", _tif(np.full((5, 32, 32), 1234, np.uint16)),
             (5, 32, 32), "uint16", check=_constant(1234)),
        Case("all-zero", "zero.tif", _tif(np.zeros((5, 32, 32), np.uint16)), (5, 32, 32),
             "uint16", check=_constant(0)),
        Case("one-frame", "t1.tif", _tif(_stack(1, 32, 32)), (1, 32, 32), "uint16"),
        Case("two-frames", "t2.tif", _tif(_stack(2, 32, 32)), (2, 32, 32), "uint16"),
        Case("tiny-21x14", "tiny.tif", _tif(_stack(6, 21, 14)), (6, 21, 14), "uint16"),
        Case("odd-173x173", "odd.tif", _tif(_stack(4, 173, 173)), (4, 173, 173), "uint16"),
        Case("non-square-40x100", "wide.tif", _tif(_stack(4, 40, 100)), (4, 40, 100),
             "uint16"),
        Case("5d-tzcyx", "tzc.tif", _five_d, (6, 40, 50), None, check=_five_d_check),
        Case("interleaved-channels", "inter.tif", _interleaved, (5, 32, 32), "uint16",
             check=_constant(500), read_kwargs={"interleaved_channels": 2}),
        Case("bigtiff", "big.tif", _bigtiff, (5, 40, 40), "uint16"),
        Case("frames-too-small-5x5", "speck.tif", _tif(_stack(4, 5, 5)), error="too small"),
    ]  # fmt: skip
