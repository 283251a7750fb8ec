"""Dataset access for fine-tuning and evaluation (thin layer over :mod:`calseg.io.dataset`)."""

from __future__ import annotations

from pathlib import Path

from calseg.io.dataset import DatasetError, VideoEntry, load_dataset

__all__ = ["DatasetError", "split_videos"]


def split_videos(dataset: Path | str, split: str) -> list[VideoEntry]:
    """Videos of one split (``"train"``, ``"val"``, ``"test"``) of a ``calseg-dataset`` directory.

    Raises:
        DatasetError: missing/invalid manifest (from :func:`calseg.io.dataset.load_dataset`).
    """
    return list(load_dataset(Path(dataset)).split(split))
