"""Reader of the ``calseg-dataset`` v1 format (see docs/ARCHITECTURE.md and
:mod:`calseg.simulate.dataset`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

FORMAT = "calseg-dataset"
SUPPORTED_VERSIONS = (1,)
SPLITS = ("train", "val", "test")
_REQUIRED_VIDEO_KEYS = (
    "id",
    "split",
    "pattern_class",
    "seed",
    "image",
    "labels",
    "cells",
    "calcium",
    "n_frames",
    "height",
    "width",
    "n_cells",
    "frame_interval_s",
    "pixel_size_um",
    "indicator",
)


class DatasetError(ValueError):
    """A dataset directory or manifest is missing, unreadable or inconsistent."""


@dataclass
class VideoEntry:
    """One recording of a dataset, with lazy loaders for its files.

    Attributes mirror the manifest's video entry; ``extra`` holds the remaining keys
    (``defects``, ``window``, ``tissue``, ``model``...).
    """

    root: Path
    id: str
    split: str
    pattern_class: str
    seed: int
    image: str
    labels: str
    cells: str
    calcium: str
    n_frames: int
    height: int
    width: int
    n_cells: int
    frame_interval_s: float
    pixel_size_um: float
    indicator: str
    defects: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def _path(self, rel: str) -> Path:
        p = self.root / rel
        if not p.is_file():
            raise DatasetError(f"video {self.id}: file {p} listed in the manifest is missing")
        return p

    def _check(self, arr: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        if arr.shape != shape:
            raise DatasetError(
                f"video {self.id}: {what} has shape {arr.shape}, manifest says {shape}"
            )
        return arr

    def load_image(self) -> np.ndarray:
        """The recording, (T, H, W) camera ADU, uint16 (uint8 for 8-bit datasets)."""
        arr = tifffile.imread(self._path(self.image))
        return self._check(arr, (self.n_frames, self.height, self.width), "image")

    def load_labels(self) -> np.ndarray:
        """Label stack of the ACTIVE cells, (T, H, W) uint32, id = cell index + 1, 0 = none."""
        arr = tifffile.imread(self._path(self.labels)).astype(np.uint32)
        return self._check(arr, (self.n_frames, self.height, self.width), "labels")

    def load_cells(self) -> np.ndarray:
        """Label image of all cells, (H, W) uint32 (same ids as the label stack)."""
        arr = tifffile.imread(self._path(self.cells)).astype(np.uint32)
        return self._check(arr, (self.height, self.width), "cells")

    def load_calcium(self) -> np.ndarray:
        """Cytosolic Ca2+ (uM), (n_cells, T) float32 at the frames of the recording."""
        arr = np.load(self._path(self.calcium), allow_pickle=False)
        return self._check(arr, (self.n_cells, self.n_frames), "calcium")


@dataclass
class Dataset:
    """A loaded ``calseg-dataset`` manifest."""

    root: Path
    manifest: dict[str, Any]
    videos: list[VideoEntry]

    @property
    def config(self) -> dict[str, Any]:
        """The simulation config (JSON dict) that produced the dataset."""
        return self.manifest.get("config", {})

    def split(self, name: str) -> list[VideoEntry]:
        """Videos of split ``name`` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; use one of {SPLITS}")
        return [v for v in self.videos if v.split == name]

    def video(self, video_id: str) -> VideoEntry:
        """The video with this id."""
        for v in self.videos:
            if v.id == video_id:
                return v
        ids = ", ".join(v.id for v in self.videos)
        raise DatasetError(f"no video {video_id!r} in {self.root}; its videos are: {ids}")


def load_dataset(path: str | Path) -> Dataset:
    """Open a ``calseg-dataset`` (a directory holding ``manifest.json``, or the manifest itself).

    Raises:
        DatasetError: missing path or manifest, invalid JSON, wrong format or version, missing
            keys, unknown split, or a video listed twice / in two splits.
    """
    p = Path(path)
    manifest_path = p / "manifest.json" if p.is_dir() else p
    if not manifest_path.is_file():
        raise DatasetError(
            f"no dataset manifest at {manifest_path}: pass a calseg-dataset directory or its "
            "manifest.json"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read manifest {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{manifest_path} is not a {FORMAT} manifest (format field)")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise DatasetError(
            f"{manifest_path}: unsupported {FORMAT} version {manifest.get('version')!r}; "
            f"this CalSeg reads {SUPPORTED_VERSIONS}"
        )
    raw_videos = manifest.get("videos")
    if not isinstance(raw_videos, list) or not raw_videos:
        raise DatasetError(f"{manifest_path}: 'videos' must be a non-empty list")
    root = manifest_path.parent
    videos, seen = [], set()
    for i, v in enumerate(raw_videos):
        if not isinstance(v, dict):
            raise DatasetError(f"{manifest_path}: video entry {i} is not an object")
        missing = [k for k in _REQUIRED_VIDEO_KEYS if k not in v]
        if missing:
            raise DatasetError(f"{manifest_path}: video entry {i} lacks keys {missing}")
        if v["split"] not in SPLITS:
            raise DatasetError(f"{manifest_path}: video {v['id']} has unknown split {v['split']!r}")
        if v["id"] in seen:
            raise DatasetError(f"{manifest_path}: video id {v['id']} appears twice")
        seen.add(v["id"])
        extra = {k: val for k, val in v.items() if k not in _REQUIRED_VIDEO_KEYS + ("defects",)}
        videos.append(
            VideoEntry(
                root=root,
                **{k: v[k] for k in _REQUIRED_VIDEO_KEYS},
                defects=v.get("defects", {}),
                extra=extra,
            )
        )
    return Dataset(root=root, manifest=manifest, videos=videos)
