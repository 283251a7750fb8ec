"""Why a segmentation came out empty, and what to try next, with the numbers.

When the default target (the cells *active* in each frame) finds no cell, the user gets three
things instead of a bare "0 cells":

* the **activity map** (:func:`activity_map`): the maximum over time of each pixel's z-score
  ``z = (F - F0) / sigma`` (:mod:`calseg.segment.prompts`: F0 the per-pixel baseline, sigma
  the camera-noise model), the image the classical method thresholds at ``threshold_k``;
* the **reason** (:func:`explain_empty`): how far the strongest pixel stayed below the
  threshold, or that the pixels above it formed no region of ``min_region_px``;
* **next steps** (:class:`Suggestion`), each with its command and the counts it would change
  on this very recording: ``target=cells`` (all cells on the mean projection, found without
  activity: how many regions and how much of the field) and a lower ``threshold_k`` (how many
  regions would pass at 4 and 3, and how many pure-noise pixels such a threshold lets through,
  for Gaussian noise: ``P(z > k)``).

Parameter names in suggestions are the infer job's; the CLI flag is the same name with dashes
(``threshold_k`` -> ``--threshold-k``), see :func:`cli_flags`.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from calseg.fmt import fmt_num, plural

MAX_REMEASURE_VOXELS = 20_000_000
"""Recordings up to this many voxels (e.g. 300 frames of 256 x 256) get their empty-result
steps measured in cells by re-running the classical method; larger ones in regions."""
LOWER_THRESHOLDS = (4.0, 3.0)
"""``threshold_k`` values whose outcome the empty-result note reports."""


@dataclass
class Suggestion:
    """A next step: ``text`` (for people), ``params`` (infer job parameters that differ from
    what was run), ``expected`` (what it would change on this recording, measured)."""

    text: str
    params: dict[str, Any]
    expected: str

    def command(self, recording: str = "REC", out_dir: str = "OUT") -> str:
        """The ``calseg segment`` command line of this step."""
        rec, out = shlex.quote(str(recording)), shlex.quote(str(out_dir))
        return f"calseg segment {rec} {out} {cli_flags(self.params)}".strip()


@dataclass
class Diagnosis:
    """An empty result explained: ``reason``, the numbers behind it (``None`` where they do
    not apply), :class:`Suggestion` s."""

    reason: str
    max_z: float | None
    max_dff: float | None
    threshold_k: float | None
    min_region_px: int | None
    n_frames: int | None
    suggestions: list[Suggestion] = field(default_factory=list)

    def to_dict(self, recording: str = "REC", out_dir: str = "OUT") -> dict[str, Any]:
        """JSON-able dict; each suggestion also carries its ``command``."""
        d = asdict(self)
        for s, sd in zip(self.suggestions, d["suggestions"], strict=True):
            sd["command"] = s.command(recording, out_dir)
        return d

    def lines(self, recording: str = "REC", out_dir: str = "OUT") -> list[str]:
        """The explanation as lines for a terminal or a log."""
        out = [f"why: {self.reason}"]
        for s in self.suggestions:
            out.append(f"try: {s.text}: {s.command(recording, out_dir)}")
            out.append(f"     {s.expected}")
        return out


def cli_flags(params: dict[str, Any]) -> str:
    """``{"threshold_k": 3, "target": "cells"}`` -> ``"--threshold-k 3 --target cells"``."""
    parts = []
    for k, v in params.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif v is not False and v is not None:
            parts.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    return " ".join(parts)


def activity_map(z: np.ndarray) -> np.ndarray:
    """Maximum over time of each pixel's z-score.

    Args:
        z: ``(T, H, W)`` float z-scores (:attr:`calseg.segment.prompts.Activity.z`).

    Returns:
        ``(H, W)`` float32 (NaN treated as -inf; an all-NaN pixel gives 0).
    """
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 3:
        raise ValueError(f"z must be (T, H, W), got shape {z.shape}")
    m = np.nanmax(np.where(np.isfinite(z), z, -np.inf), axis=0)
    return np.where(np.isfinite(m), m, 0.0).astype(np.float32)


def regions_above(z: np.ndarray, k: float, min_region_px: int) -> tuple[int, int, int, int]:
    """Connected supra-threshold regions as the classical method counts them.

    Args:
        z: ``(T, H, W)`` z-scores; k: threshold; min_region_px: smallest region kept.

    Returns:
        ``(regions, frames with a region, pixels above k, largest region in px)``, regions
        summed over frames (a cell active in 3 frames counts 3 times); 4-connected regions.
    """
    n_regions = n_frames = largest = 0
    above = np.asarray(z) > k
    for t in range(above.shape[0]):
        if not above[t].any():
            continue
        lab, n = ndi.label(above[t])
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        big = int((sizes >= min_region_px).sum())
        largest = max(largest, int(sizes.max()))
        n_regions += big
        n_frames += big > 0
    return n_regions, n_frames, int(above.sum()), largest


MIN_SUGGESTED_REGION_PX = 4
"""Smallest ``min_region_px`` ever suggested: below it single noisy pixels pass."""


def noise_pass_fraction(k: float) -> float:
    """``P(z > k)`` for standard Gaussian noise (one-sided): the share of pure-noise pixels a
    threshold of ``k`` SDs lets through in each frame."""
    return 0.5 * math.erfc(k / math.sqrt(2.0))


def explain_empty(
    frames: np.ndarray,
    z: np.ndarray,
    dff: np.ndarray,
    threshold_k: float,
    min_region_px: int,
    projection: str = "mean",
    params: Any = None,
) -> Diagnosis:
    """Why the active target found no cell, and what would change (module docstring).

    Args:
        frames: ``(T, H, W)`` recording (for the ``target=cells`` count).
        z, dff: ``(T, H, W)`` z-scores and dF/F of :func:`calseg.segment.prompts.compute_activity`.
        threshold_k: the z threshold that was used; min_region_px: smallest region kept.
        projection: the projection ``target=cells`` would use.
        params: the :class:`calseg.segment.prompts.ActivityParams` that were run. Given, each
            lower-threshold or smaller-region step is measured in *cells* (the classical method
            re-run with that one change, same cell diameter) and offered only when it labels
            some (a new-user check followed "5 regions would pass" to 0 cells, twice); without
            it, steps are measured in regions above the threshold.

    Returns:
        :class:`Diagnosis`.
    """
    from calseg.segment.projection import segment_projection

    t_count = int(np.asarray(z).shape[0])
    finite_z = np.asarray(z)[np.isfinite(z)]
    finite_d = np.asarray(dff)[np.isfinite(dff)]
    max_z = float(finite_z.max()) if finite_z.size else 0.0
    max_d = float(finite_d.max()) if finite_d.size else 0.0
    z_text, d_text = fmt_num(max_z, 3), fmt_num(max_d, 3)
    n_reg0, n_fr0, n_above, largest = regions_above(z, threshold_k, min_region_px)
    if n_reg0:
        reason = (
            f"{plural(n_reg0, 'region')} of >= {min_region_px} px rose above the activity "
            f"threshold (z = {threshold_k:g} noise SDs) in {plural(n_fr0, 'frame')} (the "
            f"largest {largest} px, strongest z = {z_text}), but none became a cell: the "
            "cell-territory step (calseg.segment.cells) found no cell-shaped support around "
            "them (its cell size: --cell-diameter-px; the infer job's cell_support_fraction and "
            "cell_active_fraction)"
        )
    elif n_above == 0:
        reason = (
            f"no pixel rose above the activity threshold in any of the {t_count} frames: the "
            f"strongest pixel reached z = {z_text} (threshold_k = {threshold_k:g} noise "
            f"SDs above its baseline F0), its dF/F {d_text} at most"
        )
    else:
        reason = (
            f"{plural(n_above, 'pixel')} rose above the activity threshold (z = "
            f"{threshold_k:g} noise SDs above their baseline F0; strongest z = {z_text}), but "
            f"they formed regions of at most {plural(largest, 'pixel')}, "
            f"fewer than min_region_px = {min_region_px}: scattered noise, or cells smaller "
            "than that"
        )
    if t_count < 30:
        reason += (
            f"; with {plural(t_count, 'frame')} the baseline and noise estimates are rough, "
            "so weak transients stay below the threshold"
        )
    suggestions = []
    n_cells: int | None = None
    try:
        pc = segment_projection(np.asarray(frames), kind=projection)
        n_cells = int(len(np.unique(pc.labels[pc.labels > 0])))
        cover = float(np.count_nonzero(pc.labels) / pc.labels.size)
        expected = (
            f"on this recording: {plural(n_cells, 'region')} on the {projection} projection, "
            f"{100 * cover:.0f} % of the field; they are shapes, not proof of activity: the "
            "output says how many show a calcium event"
        )
    except Exception as exc:  # noqa: BLE001 - the suggestion stays, its count is unknown
        expected = f"could not be measured here ({exc})"
    if n_cells == 0:  # a step measured to find nothing is no next step (fissa A01)
        reason += f"; the cells target finds no region on the {projection} projection either"
    else:
        suggestions.append(
            Suggestion(
                "segment every cell visible on the mean projection instead of the active ones",
                {"target": "cells"},
                expected,
            )
        )

    def cells_with(**change: Any) -> int | None:
        """Cells the classical method labels with one parameter changed (None: unmeasured,
        also for recordings over :data:`MAX_REMEASURE_VOXELS`: a second activity map beside
        the first would double the job's peak memory)."""
        if params is None or np.asarray(frames).size > MAX_REMEASURE_VOXELS:
            return None
        from dataclasses import replace

        from calseg.segment.baseline import baseline_labels
        from calseg.segment.prompts import compute_activity

        p = replace(params, **change)
        lab = baseline_labels(compute_activity(np.asarray(frames), p), p.min_region_px)
        return int(len(np.unique(lab[lab > 0])))

    dead_ends: list[str] = []
    if n_reg0 == 0 and MIN_SUGGESTED_REGION_PX <= largest < min_region_px:
        n_reg, n_fr, _, _ = regions_above(z, threshold_k, largest)
        n_c = cells_with(min_region_px=largest)
        if n_c == 0:
            dead_ends.append(f"min_region_px {largest}")
        else:
            cells = "" if n_c is None else f"{plural(n_c, 'cell')} labelled; "
            suggestions.append(
                Suggestion(
                    f"accept smaller active regions (min_region_px {min_region_px} -> "
                    f"{largest}), for cells that small",
                    {"min_region_px": largest},
                    f"on this recording: {cells}{plural(n_reg, 'region')} in "
                    f"{plural(n_fr, 'frame')} would pass (now none); a cell of diameter d covers "
                    "about 0.8 d^2 px",
                )
            )
    tried: list[float] = []
    for k in LOWER_THRESHOLDS:
        if k >= threshold_k:
            continue
        n_reg, n_fr, _, _ = regions_above(z, k, min_region_px)
        n_c = cells_with(threshold_k=k) if n_reg else 0
        if not n_reg or n_c == 0:  # a threshold that labels nothing is no next step
            tried.append(k)
            continue
        noise = noise_pass_fraction(k)
        cells = "" if n_c is None else f"{plural(n_c, 'cell')} labelled; "
        suggestions.append(
            Suggestion(
                f"lower the activity threshold from {threshold_k:g} to {k:g} noise SDs",
                {"threshold_k": k},
                f"on this recording: {cells}{plural(n_reg, 'region')} of >= {min_region_px} px "
                f"in {plural(n_fr, 'frame')} would pass (now {n_reg0 or 'none'}); pure noise "
                f"passes a {k:g}-SD threshold in {100 * noise:.2g} % of pixels per frame, so check "
                "them",
            )
        )
        break
    else:
        if tried:
            dead_ends.append(f"a threshold of {min(tried):g} noise SDs")
    if dead_ends:
        what = "label a cell" if params is not None else f"pass a region of {min_region_px} px"
        reason += f"; {' or '.join(dead_ends)} would not {what} either"
    return Diagnosis(reason, max_z, max_d, float(threshold_k), int(min_region_px), t_count,
                     suggestions)  # fmt: skip


def explain_masks_rejected(
    records: list[dict], n_cells_classical: int, model_label: str
) -> Diagnosis:
    """Why SAM2 labelled nothing although the activity found cells to prompt.

    Args:
        records: per-prompt dicts of :func:`calseg.segment.infer.segment_recording` (``kept``,
            ``reason``: empty, point-outside-mask, too-small, too-large, no-object, duplicate).
        n_cells_classical: cells the classical method labels from the same activity.
        model_label: the SAM2 model's one name.

    Returns:
        :class:`Diagnosis` whose suggestion is the classical method, with its count.
    """
    from collections import Counter

    why = Counter(str(r.get("reason")) for r in records if not r.get("kept"))
    parts = ", ".join(f"{k} {v}" for k, v in why.most_common())
    reason = (
        f"the activity found cells to prompt, but {model_label} kept none of its "
        f"{plural(len(records), 'mask')} (rejected as: {parts or 'none made'})"
    )
    if model_label.endswith("(random weights)"):
        reason += "; with random weights SAM2's masks carry no information about cells"
    return Diagnosis(
        reason,
        None,
        None,
        None,
        None,
        None,
        [
            Suggestion(
                "use the classical method (no weights needed)",
                {"method": "classical"},
                f"on this recording: {plural(n_cells_classical, 'cell')} from the same activity",
            )
        ],
    )


def explain_empty_projection(
    frames: np.ndarray,
    stats: dict[str, Any],
    cell_diameter_px: float | None = None,
) -> Diagnosis:
    """Why the cells target found no cell on its projection, and what the other projections
    give on this recording (each measured with :func:`calseg.segment.projection.segment_projection`
    at the same cell diameter).

    Args:
        frames: ``(T, H, W)`` recording (or one ``(H, W)`` image), input units.
        stats: the ``stats`` of the projection that was run (``projection``,
            ``cell_diameter_px``, ``support_px``, ``n_seeds`` kept and
            ``n_seeds_rejected_by_noise``).
        cell_diameter_px: the diameter that was asked for (``None``: estimated), so each
            suggestion differs from the run in its projection only.

    Returns:
        :class:`Diagnosis` (``max_z`` and the other activity numbers ``None``).
    """
    from calseg.segment.projection import segment_projection

    kind = str(stats.get("projection", "mean"))
    d = float(stats.get("cell_diameter_px") or 0.0)
    n_seeds = int(stats.get("n_seeds", 0))
    n_noise = int(stats.get("n_seeds_rejected_by_noise", 0))
    if not stats.get("support_px"):
        reason = f"the {kind} projection has no bright structure at all (it is flat)"
    elif n_noise and not n_seeds:
        reason = (
            f"{plural(n_noise, 'candidate cell centre')} on the {kind} projection, but none "
            "stood out from the recording's own noise (the same filter on noise alone gives "
            "as strong a response), so none was labelled"
        )
    elif n_seeds:
        reason = (
            f"{plural(n_seeds, 'cell centre')} on the {kind} projection, but every region "
            "grown from them was too small to keep"
        )
    else:
        reason = f"no cell-sized ({d:.0f} px) bright or dark-nucleus blob on the {kind} projection"
    suggestions = []
    none_either = []
    stack = np.asarray(frames)
    if stack.ndim == 3 and stack.shape[0] > 1:
        for other in ("std", "max", "mean"):
            if other == kind:
                continue
            n = int(
                segment_projection(
                    stack, kind=other, cell_diameter_px=cell_diameter_px or d or None
                ).labels.max()
            )
            if n == 0:  # measured to find nothing: no next step
                none_either.append(other)
                continue
            suggestions.append(
                Suggestion(
                    f"the {other} projection"
                    + (" (cells seen by how much they change)" if other == "std" else ""),
                    {"target": "cells", "projection": other},
                    f"on this recording: {plural(n, 'cell')} on the {other} projection",
                )
            )
    if none_either:
        reason += f"; the {' and '.join(none_either)} projections find none either"
    return Diagnosis(reason, None, None, None, None, int(stack.shape[0]) if stack.ndim == 3
                     else 1, suggestions)  # fmt: skip
