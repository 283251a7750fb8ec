"""Cell ROIs (calseg.segment.cells): separating neighbouring active cells, size prior,
per-frame activity, prompts at ROI anchors, and the composition of SAM2 masks."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from calseg.analysis.metrics import match_instances, match_instances_stack
from calseg.segment.baseline import segment_baseline
from calseg.segment.cells import (
    CellParams,
    CellParamsError,
    apply_size_prior,
    territory_activity,
    territory_anchors,
)
from calseg.segment.infer import InferenceConfig, assemble_frame
from calseg.segment.prompts import FramePrompt, compute_activity, frame_prompts


def textured_tissue(
    onsets: dict[int, tuple[int, int]],
    *,
    t: int = 16,
    side: int = 12,
    grid: tuple[int, int] = (3, 4),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Square epithelial cells of ``side`` px in a brick layout (odd rows shifted by half a
    cell, so membranes meet in three-way junctions as in a real epithelium), each with a dim
    nucleus (radius 2.5 px, x0.55) and a dim 1-px membrane (x0.7), blurred (PSF sigma 0.8 px),
    Poisson noise.

    ``onsets``: cell id -> (first active frame, last active frame); active cells are 8x
    brighter (GCaMP-like). Returns ``(image (T, H, W) uint16, labels (T, H, W) uint32)``.
    """
    rng = np.random.default_rng(seed)
    gy, gx = grid
    h, w = gy * side + 8, gx * side + 8 + side // 2
    cells = np.zeros((h, w), np.uint32)
    tex = np.zeros((h, w), np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(gy):
        for j in range(gx):
            cid = i * gx + j + 1
            r0, c0 = 4 + i * side, 4 + j * side + (side // 2) * (i % 2)
            cells[r0 : r0 + side, c0 : c0 + side] = cid
            cy = r0 + side / 2 - 0.5 + rng.normal(0, 0.5)
            cx = c0 + side / 2 - 0.5 + rng.normal(0, 0.5)
            nuc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 2.5**2
            block = np.zeros((h, w), bool)
            block[r0 : r0 + side, c0 : c0 + side] = True
            tex[block] = 1.0
            tex[block & nuc] = 0.55
    edge = np.zeros((h, w), bool)
    edge[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    edge[:, 1:] |= cells[:, :-1] != cells[:, 1:]
    edge[:-1] |= cells[:-1] != cells[1:]
    edge[1:] |= cells[:-1] != cells[1:]
    tex[edge & (cells > 0)] *= 0.7
    img = np.zeros((t, h, w))
    labels = np.zeros((t, h, w), np.uint32)
    for k in range(t):
        gain = np.ones(int(cells.max()) + 1)
        gain[0] = 0.0
        for cid, (a, b) in onsets.items():
            if a <= k <= b:
                gain[cid] = 8.0
                labels[k][cells == cid] = cid
        img[k] = ndi.gaussian_filter(300.0 * gain[cells] * tex, 0.8) + 100.0
    return rng.poisson(img).astype(np.uint16), labels


# three neighbouring cells in a row + one below, with activation shifted by 1-2 frames
ONSETS = {2: (3, 9), 3: (4, 10), 6: (5, 11), 7: (3, 12)}


def test_adjacent_time_shifted_cells_are_separated():
    img, gt = textured_tissue(ONSETS)
    labels, act = segment_baseline(img)
    assert labels.shape == gt.shape
    # frame 6: all four cells active together, touching; each must be its own instance
    # (at most one extra ROI: a three-cell junction is dark like a nucleus)
    m = match_instances(labels[6], gt[6], 0.5)
    assert m["tp"] == 4 and m["fp"] <= 1, m
    assert m["mean_matched_iou"] > 0.75
    inst = match_instances_stack(labels, gt, 0.5)
    assert inst["recall"] == 1.0 and inst["f1"] > 0.85, inst
    # about one ROI per active cell; cell 1 (top left, never active) is never painted
    assert 4 <= act.stats["n_cells"] <= 5
    assert labels[:, 6:14, 6:14].max() == 0
    # frame 3: only cells 2 and 7 active -> exactly two instances
    assert match_instances(labels[3], gt[3], 0.5)["tp"] == 2
    assert len(np.unique(labels[3])) == 3


def test_merged_support_without_separation_is_what_the_old_baseline_did():
    """Sanity check of the test itself: the four active cells form ONE connected region of
    supra-threshold pixels in frame 6, so connected components alone cannot separate them."""
    img, _ = textured_tissue(ONSETS)
    act = compute_activity(img)
    _, n = ndi.label(act.active[6])
    assert n == 1


def test_size_prior_splits_and_merges():
    terr = np.zeros((40, 60), np.uint32)
    terr[5:15, 5:27] = 1  # 220 px = 2.2 x expected 100 px -> split in 2
    terr[20:30, 5:15] = 2  # 100 px, kept
    terr[20:24, 15:18] = 3  # 12 px < 0.35 x 100 -> merged into 2
    out = apply_size_prior(terr, 100.0, 1.7, 0.35)
    assert out.max() == 3
    left, right = out[10, 8], out[10, 24]
    assert left != right and left > 0 and right > 0
    assert out[22, 16] == out[25, 10]  # the small ROI joined its neighbour
    sizes = np.bincount(out.ravel())[1:]
    assert sorted(sizes.tolist()) == [110, 110, 112]


def test_territory_activity_fraction_and_anchors_inside():
    terr = np.zeros((10, 20), np.uint32)
    terr[:, :10] = 1
    terr[:, 10:] = 2
    active = np.zeros((2, 10, 20), bool)
    active[0, :6, :10] = True  # 60 % of cell 1
    active[1, :4, 10:] = True  # 40 % of cell 2
    on = territory_activity(terr, active, 0.5)
    assert on.shape == (2, 3)
    assert on[0].tolist() == [False, True, False]
    assert on[1].tolist() == [False, False, False]
    anchors = territory_anchors(terr)
    assert terr[anchors[0, 0], anchors[0, 1]] == 1 and terr[anchors[1, 0], anchors[1, 1]] == 2
    assert 3 <= anchors[0, 1] <= 6 and 4 <= anchors[0, 0] <= 5


def test_prompts_are_anchors_of_active_cells_with_neighbour_negatives():
    img, gt = textured_tissue(ONSETS)
    act = compute_activity(img)
    prompts = frame_prompts(act, 6, n_negative=2)
    assert len(prompts) == act.cell_active[6].sum() and 4 <= len(prompts) <= 5
    hit_ids = {int(gt[6, p.y, p.x]) for p in prompts}
    assert set(ONSETS) <= hit_ids  # a positive point inside each active cell
    assert [p.z for p in prompts] == sorted((p.z for p in prompts), reverse=True)
    for p in prompts:
        assert len(p.negatives) == 2
        for x, y in p.negatives:
            assert act.territories[y, x] not in (0, p.seed_id)
    assert frame_prompts(act, 0) == []


def test_cell_params_are_checked():
    with pytest.raises(CellParamsError, match="cell_diameter_px"):
        CellParams(cell_diameter_px=0)
    with pytest.raises(CellParamsError, match="split_area_factor"):
        CellParams(split_area_factor=0.2, merge_area_factor=0.35)


def test_overlapping_masks_go_to_the_highest_logit():
    logits = np.full((2, 8, 8), -5.0, np.float32)
    logits[0, :, :5] = 2.0  # mask 0 covers columns 0-4
    logits[1, :, 3:] = 1.0  # mask 1 covers columns 3-7
    logits[1, :, 3] = 3.0  # ...and is more confident in column 3
    prompts = [FramePrompt(0, 7, 1, 4, 9.0), FramePrompt(0, 9, 6, 4, 8.0)]
    cfg = InferenceConfig(max_mask_area_fraction=1.0, use_object_score=False, nms_iou=0.9)
    out, recs = assemble_frame(logits, np.array([0.9, 0.5]), np.zeros(2), prompts, cfg)
    assert all(r["kept"] for r in recs)
    assert out[0].tolist() == [7, 7, 7, 9, 7, 9, 9, 9]


def test_a_mask_keeps_only_the_region_of_its_prompt():
    """Found on astrocast with SAM2 (a fresh-user test): one label made of up to 18 islands
    spread over the field, so one "cell" averaged unrelated regions. Each mask keeps the
    8-connected part holding its prompt point (its largest part when the point is outside)."""
    logits = np.full((2, 12, 12), -5.0, np.float32)
    logits[0, 1:4, 1:4] = 2.0  # island holding prompt 0
    logits[0, 8:11, 8:11] = 2.0  # a far island of the same mask
    logits[0, 4, 4] = 2.0  # touches the first island diagonally: the same region
    logits[1, 6:9, 0:2] = 1.0  # mask 1: prompt outside; two parts, the larger kept
    logits[1, 0, 10] = 1.0
    prompts = [FramePrompt(0, 7, 2, 2, 9.0), FramePrompt(0, 9, 5, 5, 8.0)]
    cfg = InferenceConfig(
        max_mask_area_fraction=1.0, use_object_score=False, require_point_in_mask=False
    )
    out, recs = assemble_frame(logits, np.array([0.9, 0.5]), np.zeros(2), prompts, cfg)
    assert np.count_nonzero(out == 7) == 10 and out[9, 9] == 0 and out[4, 4] == 7
    assert np.count_nonzero(out == 9) == 6 and out[0, 10] == 0
    assert [r["area_px"] for r in recs] == [10, 6]
    whole, _ = assemble_frame(
        logits,
        np.array([0.9, 0.5]),
        np.zeros(2),
        prompts,
        cfg.model_copy(update={"single_region": False}),
    )
    assert np.count_nonzero(whole == 7) == 19  # the old behaviour, on request


def test_a_wave_over_a_pouch_of_half_the_field_does_not_light_the_background():
    """make demo's waves videos (v000, v006 of seed 0): the pouch covers about half of the
    field and a wave brightens all of it, so the median of the frame's values jumped from dim
    tissue to bright background values; detrending by it lowered the background in wave frames,
    F0 came from those, and in quiet frames the background read as 'active': 44-50 cell ROIs
    outside the tissue, prompted in 438-1800 ROI-frames. The offset per frame is now the
    median of its difference from the recording's median image."""
    rng = np.random.default_rng(0)
    t_len, h, w = 40, 96, 96
    yy, xx = np.mgrid[:h, :w]
    pouch = ((yy - 48) / 35.0) ** 2 + ((xx - 48) / 43.0) ** 2 < 1  # 51 % of the field
    assert 0.5 < pouch.mean() < 0.53
    tissue = np.where(pouch, 800.0, 500.0) + 60 * rng.random((h, w)) * pouch
    wave = np.zeros(t_len)
    wave[10:24] = 1.0  # a third of the frames: the whole pouch up by 60 %
    movie = tissue[None] * (1 + 0.6 * wave[:, None, None] * pouch[None])
    frames = rng.poisson(movie).astype(np.uint16)
    act = compute_activity(frames)
    outside = act.active[:, ~pouch].mean()
    assert outside < 1e-3, f"{outside:.3f} of background pixel-frames active"
    assert act.active[12:22][:, pouch].mean() > 0.5  # the wave itself is found
    ids = np.unique(act.territories[~ndi.binary_dilation(pouch, iterations=2)])
    assert set(ids.tolist()) <= {0}, ids


def test_frame_offsets_follow_a_drift_and_ignore_padding():
    """A global additive drift is found whatever the activity of the tissue (brighter than the
    background around it), and zero padding (a registration's border, 40 % of the field here)
    does not pin it to 0."""
    from calseg.segment.prompts import frame_offsets

    rng = np.random.default_rng(1)
    t_len = 30
    drift = np.linspace(0, 50, t_len)
    scene = np.where(np.arange(64)[None, :] < 40, 300.0, 900.0) + rng.uniform(0, 50, (64, 64))
    f = scene[None] + drift[:, None, None] + rng.normal(0, 5, (t_len, 64, 64))
    f[:, :, :26] = 0.0  # padding
    f[5:15, 10:64, 40:64] += 400  # activity of most of the tissue
    off = frame_offsets(f.astype(np.float32))
    np.testing.assert_allclose(off - off[0], drift - drift[0], atol=3)


def _assemble_dense_reference(logits, scores, objs, prompts, cfg):
    """The composition as it was before masks were kept as crops (frame-sized arrays per
    prompt), as the reference of :func:`assemble_frame`."""
    from calseg.segment.decode import _prompt_region

    masks = logits > cfg.mask_threshold
    if cfg.single_region:
        masks = np.stack([_prompt_region(m, q.y, q.x) for m, q in zip(masks, prompts, strict=True)])
    h, w = masks.shape[1:]
    areas = masks.reshape(len(masks), -1).sum(1)
    cands = []
    for i, q in enumerate(prompts):
        ok = areas[i] > 0 and (not cfg.require_point_in_mask or masks[i, q.y, q.x])
        ok = ok and cfg.min_mask_area_px <= areas[i] <= cfg.max_mask_area_fraction * h * w
        if ok and not (cfg.use_object_score and objs[i] < 0):
            cands.append(i)
    kept, flat = [], masks.reshape(len(masks), -1)
    for i in sorted(cands, key=lambda j: -scores[j]):
        inter = [np.count_nonzero(flat[i] & flat[k]) for k in kept]
        if any(
            n and n / (areas[i] + areas[k] - n) >= cfg.nms_iou
            for n, k in zip(inter, kept, strict=True)
        ):
            continue
        kept.append(i)
    out = np.zeros((h, w), np.uint32)
    if kept:
        winner = np.argmax(np.where(masks[kept], logits[kept], -np.inf), axis=0)
        covered = masks[kept].any(axis=0)
        out[covered] = np.array([prompts[i].seed_id for i in kept], np.uint32)[winner[covered]]
    return out, kept


@pytest.mark.parametrize("seed", range(6))
def test_masks_kept_as_crops_compose_as_frame_sized_ones_did(seed):
    """A sixth attack run: 5,000 prompts on 512 px frames took over 7.9 GB as frame-sized
    logits and masks per prompt. Masks are now kept as crops (:class:`PromptMask`); the label
    image and which masks are kept are those of the frame-sized composition, on random
    overlapping blobs, ties, islands and masks too large for the field."""
    from scipy import ndimage as ndi

    from calseg.segment.decode import PromptMask, prompt_mask

    rng = np.random.default_rng(seed)
    h, w, b = 40, 56, 30
    logits = ndi.gaussian_filter(rng.normal(0, 1, (b, h, w)), (0, 3, 3)) * 8 - 0.3
    logits = np.round(logits, 1).astype(np.float16)  # ties between masks
    peaks = [np.unravel_index(int(np.argmax(lg)), lg.shape) for lg in logits]
    # prompts at each blob's peak (every fifth in another column: outside, or an island)
    prompts = [FramePrompt(0, 100 + i, int(x) if i % 5 else int(rng.integers(w)), int(y), 1.0)
               for i, (y, x) in enumerate(peaks)]  # fmt: skip
    scores, objs = rng.random(b), rng.normal(0.5, 1, b)
    cfg = InferenceConfig(max_mask_area_fraction=0.2, nms_iou=0.3)
    whole = {"single_region": False, "use_object_score": False, "max_mask_area_fraction": 0.5}
    for c in (cfg, cfg.model_copy(update=whole)):
        ref, kept = _assemble_dense_reference(logits, scores, objs, prompts, c)
        assert len(kept) >= (5 if c is cfg else 1)
        crops = [prompt_mask(lg, q, c) for lg, q in zip(logits, prompts, strict=True)]
        assert all(isinstance(pm, PromptMask) for pm in crops)
        assert sum(pm.mask.size for pm in crops) < b * h * w
        for got, recs in (
            assemble_frame(crops, scores, objs, prompts, c, shape=(h, w)),
            assemble_frame(logits, scores, objs, prompts, c),
        ):
            np.testing.assert_array_equal(got, ref)
            assert [i for i, r in enumerate(recs) if r["kept"]] == sorted(kept)
            if c is cfg:  # every way a mask goes, duplicates too (17 over the 6 seeds)
                assert {None, "too-large", "point-outside-mask"} <= {r["reason"] for r in recs}
    with pytest.raises(ValueError, match="shape"):
        assemble_frame(crops, scores, objs, prompts, cfg)


def test_decoder_calls_are_bounded_by_the_frame_size():
    """At most DECODE_CHUNK_BYTES of full-frame float32 logits per decoder call."""
    from calseg.segment.decode import DECODE_CHUNK_BYTES, decode_chunk_size
    from calseg.segment.embeddings import FrameGeometry

    cfg = InferenceConfig()
    assert decode_chunk_size(cfg, FrameGeometry(128, 128, 512)) == cfg.decoder_batch_size
    for side in (2048, 8192):
        n = decode_chunk_size(cfg, FrameGeometry(side, side, 1024))
        assert n >= 1 and (n == 1 or n * 4 * side * side <= DECODE_CHUNK_BYTES)
    big = cfg.model_copy(update={"decoder_batch_size": 100_000})
    assert (
        decode_chunk_size(big, FrameGeometry(512, 512, 1024)) * 4 * 512 * 512 <= DECODE_CHUNK_BYTES
    )


def test_thousands_of_prompts_decode_within_the_memory_of_their_masks():
    """The attack's shape at a test's size: 2,000 prompts on one 256 x 256 frame. As
    frame-sized float16 logits plus two bool stacks they took 2000 x 65536 x 4 bytes = 524 MB
    of NumPy arrays; kept as crops, decoded a chunk at a time, under 64 MB."""
    import tracemalloc

    from calseg.segment.decode import decode_frame_prompts, embed_recording
    from calseg.segment.embeddings import FrameGeometry, compute_normalisation
    from calseg.segment.model import SMALL_CONFIG, load_sam2

    loaded = load_sam2(SMALL_CONFIG, None, image_size=64, device="cpu")
    rng = np.random.default_rng(8)
    frame = rng.normal(100, 10, (1, 256, 256)).astype(np.float32)
    geom = FrameGeometry(256, 256, 64)
    emb = embed_recording(loaded, frame, compute_normalisation(frame), geom)
    prompts = [FramePrompt(0, i + 1, int(x), int(y), 1.0)
               for i, (y, x) in enumerate(rng.integers(0, 256, (2000, 2)))]  # fmt: skip
    cfg = InferenceConfig(use_object_score=False, max_mask_area_fraction=0.01)
    tracemalloc.start()
    try:
        crops, scores, objs = decode_frame_prompts(
            loaded, emb, 0, geom, prompts, cfg, as_crops=True
        )
        out, recs = assemble_frame(crops, scores, objs, prompts, cfg, shape=(256, 256))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(recs) == 2000 and out.shape == (256, 256)
    assert peak < 64 * 2**20, peak >> 20


def _apply_size_prior_reference(territories, expected, split, merge):
    """:func:`apply_size_prior` as it was (whole-frame masks per merged region), the reference."""
    from scipy import ndimage as ndi
    from scipy.cluster.vq import kmeans2

    out = np.zeros(territories.shape, np.uint32)
    nid = 0
    for i, sl in enumerate(ndi.find_objects(territories), start=1):
        if sl is None:
            continue
        m = territories[sl] == i
        area = int(m.sum())
        k = int(round(area / expected)) if area > split * expected else 1
        sub = out[sl]
        if k <= 1:
            nid += 1
            sub[m] = nid
            continue
        yy, xx = np.nonzero(m)
        pts = np.stack([yy, xx], 1).astype(np.float64)
        init = pts[np.linspace(0, len(pts) - 1, k).round().astype(int)]
        _, lab = kmeans2(pts, init, minit="matrix", seed=0)
        for j in range(k):
            sel = lab == j
            if sel.any():
                nid += 1
                sub[yy[sel], xx[sel]] = nid
    areas = np.bincount(out.ravel(), minlength=nid + 1)
    for i in np.flatnonzero((areas > 0) & (areas < merge * expected)):
        if i == 0:
            continue
        m = out == i
        nb = out[ndi.binary_dilation(m) & ~m]
        nb = nb[(nb > 0) & (nb != i)]
        if nb.size:
            out[m] = np.bincount(nb).argmax()
    ids = np.unique(out)
    ids = ids[ids > 0]
    lut = np.zeros(int(out.max()) + 1, np.uint32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    return lut[out]


@pytest.mark.parametrize("seed", range(4))
def test_the_size_prior_splits_and_merges_as_before(seed):
    """Merging small regions within their (growing) bounding boxes, not whole-frame masks,
    gives the label image the whole-frame version gave, on random territories of mixed
    sizes (splits, chains of merges, regions at the frame's edges)."""
    from scipy.spatial import cKDTree

    from calseg.segment.cells import apply_size_prior

    rng = np.random.default_rng(seed)
    h, w = 70, 90
    seeds = rng.uniform(0, [h, w], (60, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    terr = cKDTree(seeds).query(np.stack([yy.ravel(), xx.ravel()], 1))[1].reshape(h, w) + 1
    terr[rng.random((h, w)) < 0.05] = 0  # holes
    terr = terr.astype(np.uint32)
    for expected in (40.0, 90.0, 200.0):
        got = apply_size_prior(terr, expected, 1.6, 0.35)
        np.testing.assert_array_equal(got, _apply_size_prior_reference(terr, expected, 1.6, 0.35))


def test_a_tiny_cell_diameter_splits_a_large_region_in_linear_time(monkeypatch):
    """A sixth attack run: a 220 x 220 px active square at ``cell_diameter_px`` 1.01 (cells of
    0.8 px) asked the split for 60,000 clusters of 48,400 points, every point measured against
    every cluster per iteration, and the merge then scanned the whole frame per region: a job
    of 157 s estimated at 6.6 s, hours at 1 Mpx. Now a k-d tree finds the nearest clusters and
    a merged region is looked for in its bounding box: seconds. The tree's clusters are those
    of scipy's k-means where both can run."""
    import time

    from calseg.segment import cells
    from calseg.segment.cells import apply_size_prior

    terr = np.zeros((260, 260), np.uint32)
    terr[20:240, 20:240] = 1
    t0 = time.perf_counter()
    out = apply_size_prior(terr, 0.8, 1.6, 0.35)
    assert time.perf_counter() - t0 < 30
    assert out.max() > 10_000 and (out[20:240, 20:240] > 0).all() and out[:20].max() == 0
    small = np.zeros((40, 40), np.uint32)
    small[5:35, 5:35] = 1
    direct = apply_size_prior(small, 30.0, 1.6, 0.35)
    monkeypatch.setattr(cells, "KMEANS_DIRECT_MAX", 0)
    np.testing.assert_array_equal(apply_size_prior(small, 30.0, 1.6, 0.35), direct)
