"""Access to ``calseg-dataset`` v1 videos for fine-tuning and evaluation.

Uses :func:`calseg.io.dataset.load_dataset` (the project's reader). Only while that module is
absent (parallel development) a minimal reader of the same manifest is used instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class DatasetError(ValueError):
    """Raised when a dataset directory cannot be used (no manifest, empty split...)."""


class VideoLike(Protocol):
    """What CalSeg's segmentation code needs of a dataset video."""

    id: str
    pattern_class: str

    def load_image(self) -> np.ndarray: ...  # (T, H, W) uint16

    def load_labels(self) -> np.ndarray: ...  # (T, H, W) uint32


@dataclass
class _FallbackVideo:
    root: Path
    entry: dict

    @property
    def id(self) -> str:
        return str(self.entry["id"])

    @property
    def pattern_class(self) -> str:
        return str(self.entry.get("pattern_class", "unknown"))

    def load_image(self) -> np.ndarray:
        import tifffile

        return np.asarray(tifffile.imread(self.root / self.entry["image"]))

    def load_labels(self) -> np.ndarray:
        import tifffile

        return np.asarray(tifffile.imread(self.root / self.entry["labels"])).astype(np.uint32)


def split_videos(dataset: Path | str, split: str) -> list[VideoLike]:
    """Videos of one split (``"train"``, ``"val"``, ``"test"``) of a dataset directory."""
    root = Path(dataset)
    try:
        from calseg.io.dataset import load_dataset
    except ImportError:
        load_dataset = None
    if load_dataset is not None:
        return list(load_dataset(root).split(split))
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise DatasetError(f"{root} is not a calseg-dataset directory (no manifest.json)")
    data = json.loads(manifest.read_text())
    if data.get("format") != "calseg-dataset":
        raise DatasetError(f"{manifest} is not a calseg-dataset manifest")
    return [_FallbackVideo(root, v) for v in data["videos"] if v.get("split") == split]
