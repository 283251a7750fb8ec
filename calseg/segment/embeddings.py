"""Recording normalisation, frame geometry and the on-disk SAM2 image-embedding cache.

SAM2's image encoder is frozen in CalSeg (fine-tuning trains only the prompt encoder and the
mask decoder), so each frame is embedded once, under ``torch.no_grad``, and the result is
cached on disk keyed by (model config, image size, encoder weights hash, frame hash). The
frame hash is taken over the exact model input (normalised, padded, resized), so a different
normalisation or geometry can never hit a stale entry.

Pipeline for a ``(T, H, W)`` recording (any integer or float dtype):

1. :func:`compute_normalisation` -- ONE pair of percentiles (default 0.5 % and 99.8 %) over the
   whole stack, computed in float64 (uint16 values near 65535 cannot wrap); non-finite pixels
   (NaN/Inf) are excluded from the percentiles and mapped to 0 afterwards. Never per frame
   (DESIGN.md section 5: per-frame normalisation changed contrast frame to frame).
2. :func:`normalise_frames` -- ``(x - low) / (high - low)`` clipped to [0, 1], float32.
3. :class:`FrameGeometry` -- pad bottom/right with zeros to a square of side ``max(H, W)``,
   then bilinear resize to ``image_size`` (a multiple of 32). Masks come back by resizing
   logits to the padded square and cropping ``[:H, :W]`` -- exact shape round trip.
4. Grey value replicated to 3 channels, ImageNet mean/std as in ``SAM2Transforms``.
5. ``model.forward_image`` + ``model._prepare_backbone_features`` (+ ``no_mem_embed``) as in
   ``SAM2ImagePredictor.set_image``, but with feature sizes derived from ``image_size``
   (``S/16``, ``S/8``, ``S/4``) instead of the predictor's hard-coded 1024 sizes.

Note: with ``use_high_res_features_in_sam`` (all SAM2.1 configs) ``forward_image`` already
applies the mask decoder's ``conv_s0``/``conv_s1`` projections to the high-resolution
features; CalSeg therefore treats those two convolutions as part of the frozen encoder
(they are included in the encoder hash and never trained).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calseg.io.recordings import (  # one error type for unusable recordings
    NO_FINITE_VALUE,
    RecordingError,
)
from calseg.progress import ProgressFn, check_cancelled, null_progress

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from calseg.segment.model import LoadedSAM2

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SAM2Transforms (sam2/utils/transforms.py)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PERCENTILE_SAMPLES = 20_000_000  # above this, percentiles use a strided subsample


def as_frame_stack(frames: np.ndarray) -> np.ndarray:
    """Check and return a recording as a ``(T, H, W)`` array (a single ``(H, W)`` frame -> T=1).

    Raises:
        RecordingError: for colour / higher-dimensional input, empty stacks, non-numeric dtypes.
    """
    a = np.asarray(frames)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise RecordingError(
            f"expected a grayscale recording of shape (T, H, W), got shape {a.shape}; "
            "convert colour recordings to one channel first"
        )
    if min(a.shape) == 0:
        raise RecordingError(f"recording has an empty axis: shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        if a.dtype == bool:
            return a.astype(np.uint8)
        raise RecordingError(f"unsupported pixel dtype {a.dtype}; use 8/16/32-bit int or float")
    return a


def check_percentiles(low_percentile: float, high_percentile: float) -> None:
    """Check the intensity normalisation percentiles (in %).

    Raises:
        ValueError: unless ``0 <= low_percentile < high_percentile <= 100``.
    """
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ValueError(
            f"need 0 <= low_percentile < high_percentile <= 100, got "
            f"{low_percentile}, {high_percentile}"
        )


def compute_normalisation(
    frames: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.8
) -> dict:
    """Per-recording intensity normalisation parameters.

    Args:
        frames: ``(T, H, W)`` recording, any integer/float dtype (counts or arbitrary units).
        low_percentile: percentile (in %) mapped to 0.
        high_percentile: percentile (in %) mapped to 1.

    Returns:
        JSON-able dict: ``method`` ("percentile-per-recording"), ``low``, ``high`` (in input
        units), the percentiles, ``input_dtype``, ``n_nonfinite`` (NaN/Inf pixels, set to 0
        after normalisation), ``subsample_stride`` (1 = every pixel used).

    Raises:
        RecordingError: if the recording has no finite pixel.
    """
    check_percentiles(low_percentile, high_percentile)
    a = as_frame_stack(frames)
    flat = a.reshape(-1)
    stride = max(1, int(np.ceil(flat.size / MAX_PERCENTILE_SAMPLES)))
    sample = flat[::stride].astype(np.float64)
    n_nonfinite = 0
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        n_nonfinite = int(a.size - np.count_nonzero(finite))
        sample = sample[np.isfinite(sample)]
        if sample.size == 0 and n_nonfinite < a.size:  # finite values off the stride
            sample = a[finite][:MAX_PERCENTILE_SAMPLES].astype(np.float64)
    if sample.size == 0:
        raise RecordingError(NO_FINITE_VALUE)
    low, high = np.percentile(sample, [low_percentile, high_percentile])
    if not high > low:  # flat image: fall back to the full range, then to a unit range
        low, high = float(sample.min()), float(sample.max())
        if not high > low:
            high = low + 1.0
    return {
        "method": "percentile-per-recording",
        "low_percentile": float(low_percentile),
        "high_percentile": float(high_percentile),
        "low": float(low),
        "high": float(high),
        "input_dtype": str(a.dtype),
        "n_nonfinite": n_nonfinite,
        "subsample_stride": stride,
    }


def normalise_frames(frames: np.ndarray, normalisation: dict) -> np.ndarray:
    """Map a recording to float32 in [0, 1] with per-recording parameters.

    Args:
        frames: ``(T, H, W)`` (or ``(H, W)``) array in input units.
        normalisation: output of :func:`compute_normalisation` for the same recording.

    Returns:
        float32 array of the same shape, values in [0, 1]; NaN/Inf -> 0.
    """
    low = np.float64(normalisation["low"])
    scale = np.float64(normalisation["high"]) - low
    out = (np.asarray(frames, dtype=np.float64) - low) / scale
    out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class FrameGeometry:
    """Mapping between a recording's frame grid ``(height, width)`` and the model's square grid.

    Frames are zero-padded at the bottom/right to a square of side ``max(height, width)``
    and resized (bilinear) to ``image_size`` x ``image_size``.
    """

    height: int
    width: int
    image_size: int

    def __post_init__(self) -> None:
        if self.image_size % 32 or self.image_size <= 0:
            raise ValueError(
                "image_size must be a positive multiple of 32 (SAM2 strides), "
                f"got {self.image_size}"
            )
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"frame size must be positive, got {self.height} x {self.width}")

    @property
    def side(self) -> int:
        """Side (px) of the padded square in frame pixels."""
        return max(self.height, self.width)

    @property
    def scale(self) -> float:
        """Model pixels per frame pixel."""
        return self.image_size / self.side

    def to_model_points(self, xy: np.ndarray) -> np.ndarray:
        """Frame pixel coordinates ``(..., 2)`` as (x=column, y=row) -> model coordinates.

        Pixel centres map onto pixel centres: ``x_m = (x + 0.5) * scale - 0.5`` (SAM's prompt
        encoder adds the 0.5 back).
        """
        return (np.asarray(xy, dtype=np.float32) + 0.5) * np.float32(self.scale) - 0.5

    def to_dict(self) -> dict:
        """JSON-able description."""
        return {
            "height": self.height,
            "width": self.width,
            "image_size": self.image_size,
            "padded_side": self.side,
            "scale": self.scale,
        }


def frames_to_model(frames01: np.ndarray, geometry: FrameGeometry) -> torch.Tensor:
    """Normalised frames ``(T, H, W)`` float32 in [0, 1] -> ``(T, 1, S, S)`` float32 tensor.

    Zero-pad bottom/right to the square, then bilinear resize (antialiased when shrinking)
    to ``S = geometry.image_size``. The 3-channel ImageNet normalisation is applied in
    :func:`encode_frames`.
    """
    import torch
    import torch.nn.functional as F

    t, h, w = frames01.shape
    if (h, w) != (geometry.height, geometry.width):
        raise RecordingError(
            f"frames are {h}x{w} but geometry is {geometry.height}x{geometry.width}"
        )
    x = torch.zeros((t, 1, geometry.side, geometry.side), dtype=torch.float32)
    x[:, 0, :h, :w] = torch.from_numpy(np.ascontiguousarray(frames01, dtype=np.float32))
    if geometry.side != geometry.image_size:
        x = F.interpolate(
            x,
            size=(geometry.image_size, geometry.image_size),
            mode="bilinear",
            align_corners=False,
            antialias=geometry.side > geometry.image_size,
        )
    return x.clamp_(0.0, 1.0)


def labels_to_model(labels: np.ndarray, geometry: FrameGeometry) -> np.ndarray:
    """Label image(s) ``(..., H, W)`` -> model grid ``(..., S, S)`` by nearest-neighbour sampling
    of the padded square (pixel centres), same dtype."""
    lab = np.asarray(labels)
    side = geometry.side
    s = geometry.image_size
    src = np.minimum(((np.arange(s) + 0.5) / geometry.scale).astype(np.int64), side - 1)
    pad = np.zeros(lab.shape[:-2] + (side, side), dtype=lab.dtype)
    pad[..., : geometry.height, : geometry.width] = lab
    return pad[..., src[:, None], src[None, :]]


def logits_to_frame(logits: torch.Tensor, geometry: FrameGeometry) -> torch.Tensor:
    """Mask logits ``(N, C, h, w)`` on the model grid -> ``(N, C, H, W)`` on the frame grid.

    Bilinear resize to the padded square, then crop ``[:H, :W]`` (exact inverse of
    :func:`frames_to_model`'s padding).
    """
    import torch.nn.functional as F

    up = F.interpolate(
        logits, size=(geometry.side, geometry.side), mode="bilinear", align_corners=False
    )
    return up[..., : geometry.height, : geometry.width]


@dataclass
class FrameEmbeddings:
    """Cached SAM2 image features of T frames (float16 on CPU; cast to float32 to decode).

    ``image_embed``: ``(T, C, S/16, S/16)``; ``feat_s1``: ``(T, C/4, S/8, S/8)``;
    ``feat_s0``: ``(T, C/8, S/4, S/4)``, C the model width (256; 64 for the small config; the
    two high-resolution levels, already projected by the decoder's conv_s1/conv_s0).
    ``frame_hashes``: per-frame cache keys.
    """

    image_embed: torch.Tensor
    feat_s0: torch.Tensor
    feat_s1: torch.Tensor
    frame_hashes: list[str]
    n_computed: int = 0
    n_cached: int = 0

    def get(self, idx, device: torch.device | str = "cpu") -> tuple:
        """Features of frame index/indices ``idx`` as float32 on ``device``:
        ``(image_embed, [feat_s0, feat_s1])``, each with a leading batch axis."""
        import torch

        sel = idx if isinstance(idx, (list, np.ndarray, torch.Tensor)) else [idx]
        emb = self.image_embed[sel].to(device=device, dtype=torch.float32)
        s0 = self.feat_s0[sel].to(device=device, dtype=torch.float32)
        s1 = self.feat_s1[sel].to(device=device, dtype=torch.float32)
        return emb, [s0, s1]


def _frame_hash(x: torch.Tensor) -> str:
    arr = x.numpy().astype(np.float16)  # model input, quantised to fp16 to be dtype-stable
    return hashlib.sha256(arr.tobytes()).hexdigest()[:32]


PRUNE_TO_FRACTION = 0.8
""":meth:`EmbeddingCache.prune` removes entries down to this fraction of its limit, so a cache
at its limit is not pruned again after every job (hysteresis)."""


STALE_TMP_S = 3600.0
"""Age (s) from which :meth:`EmbeddingCache.prune` removes a temporary file of a cache write:
a write of one frame's tensors takes well under a second."""


@dataclass
class PruneResult:
    """What :meth:`EmbeddingCache.prune` did: entries and bytes removed, bytes left."""

    n_removed: int
    bytes_removed: int
    bytes_left: int


USER_PREFIX = "user-"
"""Folders of the cache root that hold one user's cache (``user-<id>/<model_key>/...``, the
service's jobs: :attr:`calseg.service.context.JobContext.embedding_cache_dir`); pruned with
the rest."""


class EmbeddingCache:
    """Directory of ``<model_key>/<frame_hash>.pt`` files (each a dict of float16 tensors).

    ``model_key`` combines config name, image size and the encoder weights hash, so entries
    of different models or image sizes never mix. Writes are atomic (temp file + rename), so
    concurrent workers sharing one cache directory do not read half-written files. A hit
    touches its file's modification time, so :meth:`prune` removes the least recently used
    entries first; an entry pruned while another job runs is recomputed by that job (a missing
    entry is a miss).
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @staticmethod
    def model_key(config: str, image_size: int, encoder_hash: str) -> str:
        """Directory name for one (config, image size, encoder weights) combination."""
        safe = config.replace("/", "_").replace(".yaml", "")
        return f"{safe}__s{image_size}__{encoder_hash[:16]}"

    def _path(self, model_key: str, frame_hash: str) -> Path:
        return self.root / model_key / f"{frame_hash}.pt"

    def load(self, model_key: str, frame_hash: str) -> dict | None:
        """Cached tensors or ``None`` (missing or unreadable entries count as missing)."""
        import torch

        p = self._path(model_key, frame_hash)
        if not p.exists():
            return None
        try:
            tensors = torch.load(p, map_location="cpu", weights_only=True)
        except FileNotFoundError:  # pruned between the check and the read: a miss
            return None
        except Exception as exc:  # corrupt entry: recompute
            log.warning("ignoring unreadable embedding cache entry %s: %s", p, exc)
            return None
        try:
            os.utime(p)  # recently used: pruned last
        except OSError:
            pass
        return tensors

    def save(self, model_key: str, frame_hash: str, tensors: dict) -> None:
        """Store one frame's tensors atomically."""
        import torch

        p = self._path(model_key, frame_hash)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(tensors, tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def prune(self, max_bytes: int, now: float | None = None) -> PruneResult:
        """Keep the cache within ``max_bytes``: when its entries (``*.pt`` files, in the
        model folders of the root and of its :data:`USER_PREFIX` folders) hold more,
        remove the least recently used (oldest modification time: written or last hit) until
        at most :data:`PRUNE_TO_FRACTION` x ``max_bytes`` remain. ``max_bytes`` 0: no limit.

        Only regular files in real folders directly under the root (or under a user folder)
        are entries: symbolic links (to a file or a folder) and anything else are neither
        counted nor removed, so nothing outside the cache is ever touched. Temporary files of
        a write (``*.tmp``) older than :data:`STALE_TMP_S` (left by a job process that was
        killed mid-write) are removed
        whatever the limit; younger ones may be being written. An entry that vanishes
        meanwhile (another worker pruning) is skipped. ``now``: the time to age files against
        (default: the current time, ``time.time()``)."""
        import stat
        import time

        now = time.time() if now is None else now
        entries: list[tuple[float, int, Path]] = []
        n = removed = 0
        folders = (
            [d for d in self.root.iterdir() if not d.is_symlink()] if self.root.is_dir() else []
        )
        for user in [d for d in folders if d.name.startswith(USER_PREFIX) and d.is_dir()]:
            folders += [d for d in user.iterdir() if not d.is_symlink()]  # user-*/<model_key>
        for folder in folders:
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if p.suffix == ".pt":
                    entries.append((st.st_mtime, st.st_size, p))
                elif p.suffix == ".tmp" and now - st.st_mtime > STALE_TMP_S:
                    try:
                        p.unlink()
                        n, removed = n + 1, removed + st.st_size
                    except OSError:
                        pass
        total = sum(size for _, size, _ in entries)
        if max_bytes > 0 and total > max_bytes:
            target = int(PRUNE_TO_FRACTION * max_bytes)
            for _, size, p in sorted(entries, key=lambda e: e[0]):
                if total <= target:
                    break
                try:
                    p.unlink()
                except OSError:
                    continue
                total -= size
                n, removed = n + 1, removed + size
        if n:
            log.info("embedding cache %s: removed %d files (%d bytes) to stay under %d bytes",
                     self.root, n, removed, max_bytes)  # fmt: skip
        return PruneResult(n, removed, total)


def encoder_features(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """SAM2 image features of model-grid frames, differentiable (no ``no_grad`` here).

    As ``SAM2ImagePredictor.set_image``: ImageNet normalisation of the grey value replicated
    to 3 channels, ``model.forward_image``, ``model._prepare_backbone_features``, plus
    ``no_mem_embed``; feature sizes from the actual side ``S``.

    Args:
        model: SAM2Base.
        x: ``(B, 1, S, S)`` float32 in [0, 1] on the model's device.

    Returns:
        ``[feat_s0 (B, 32, S/4, S/4), feat_s1 (B, 64, S/8, S/8), image_embed (B, 256, S/16,
        S/16)]`` float32. Used under ``no_grad`` by :func:`encode_frames` and with gradients
        by fine-tuning modes that train the encoder (LoRA, full).
    """
    import torch

    s = int(x.shape[-1])
    b = int(x.shape[0])
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    img = (x.float().expand(-1, 3, -1, -1) - mean) / std
    backbone_out = model.forward_image(img)
    _, vision_feats, _, _ = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return [
        feat.permute(1, 2, 0).reshape(b, -1, *size)
        for feat, size in zip(vision_feats, sizes, strict=True)
    ]


def encode_frames(
    loaded: LoadedSAM2,
    x: torch.Tensor,
    *,
    cache_dir: Path | str | None = None,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
) -> FrameEmbeddings:
    """Embed model-grid frames ``x`` ``(T, 1, S, S)`` float32 in [0, 1] with the frozen encoder.

    Uses ``model.forward_image`` + ``model._prepare_backbone_features`` (+ ``no_mem_embed``)
    as ``SAM2ImagePredictor.set_image`` does, with feature sizes ``S/16, S/8, S/4`` from the
    actual image size. Frames already in ``cache_dir`` are loaded instead of recomputed.

    Returns:
        :class:`FrameEmbeddings` (float16, CPU).
    """
    import torch

    from calseg.segment.model import encoder_hash

    progress = progress or null_progress
    model = loaded.model
    s = loaded.info.image_size
    if x.shape[-1] != s or x.shape[-2] != s:
        raise RecordingError(f"model input is {tuple(x.shape)}, expected (T, 1, {s}, {s})")
    t = x.shape[0]
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    key = EmbeddingCache.model_key(loaded.info.config, s, encoder_hash(loaded)) if cache else ""
    hashes = [_frame_hash(x[i]) for i in range(t)]
    c = int(model.hidden_dim)  # 256 for Meta's configs, 64 for sam2_small_calseg
    emb = torch.empty((t, c, s // 16, s // 16), dtype=torch.float16)
    f0 = torch.empty((t, c // 8, s // 4, s // 4), dtype=torch.float16)
    f1 = torch.empty((t, c // 4, s // 8, s // 8), dtype=torch.float16)
    todo = []
    n_cached = 0
    for i, h in enumerate(hashes):
        check_cancelled()
        hit = cache.load(key, h) if cache else None
        if hit is not None and tuple(hit["image_embed"].shape) == tuple(emb.shape[1:]):
            emb[i], f0[i], f1[i] = hit["image_embed"], hit["feat_s0"], hit["feat_s1"]
            n_cached += 1
        else:
            todo.append(i)
    device = next(model.parameters()).device
    done = 0
    with torch.no_grad():
        for b0 in range(0, len(todo), batch_size):
            idx = todo[b0 : b0 + batch_size]
            feats = encoder_features(model, x[idx].to(device))
            for j, i in enumerate(idx):
                emb[i] = feats[2][j].half().cpu()
                f0[i] = feats[0][j].half().cpu()
                f1[i] = feats[1][j].half().cpu()
                if cache:
                    cache.save(
                        key,
                        hashes[i],
                        {
                            "image_embed": emb[i].clone(),
                            "feat_s0": f0[i].clone(),
                            "feat_s1": f1[i].clone(),
                        },
                    )
            done += len(idx)
            progress(  # the frames not cached yet, of this call's recording or set
                done / max(len(todo), 1), "embed", f"embedded {done}/{len(todo)} uncached frames"
            )
    if not todo:
        progress(1.0, "embed", f"all {t} frames from the embedding cache")
    return FrameEmbeddings(emb, f0, f1, hashes, n_computed=len(todo), n_cached=n_cached)
