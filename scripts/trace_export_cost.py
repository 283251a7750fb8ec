"""What the traces, events and ROIs of a segmented recording cost per cell and frame: the
``trace_*`` constants of :data:`calseg.service.costs.CONSTANTS`.

``python scripts/trace_export_cost.py`` writes the exports
(:func:`calseg.pipelines.traces.write_trace_exports`) of square cells tiling a 128 x 128 px
flickering recording (1024 and 4096 cells, 64 and 128 frames) and prints the seconds and bytes
written per cell-frame. Their cost grows with the cells, which an estimate per recorded pixel
does not see (a 9th attack run made every pixel a cell).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from calseg.pipelines.traces import write_trace_exports


def main() -> None:
    rng = np.random.default_rng(0)
    side = 128
    for per_side, n_frames in ((32, 64), (64, 64), (64, 128)):
        cell = side // per_side
        ids = (np.arange(side)[:, None] // cell) * per_side + np.arange(side)[None, :] // cell + 1
        labels = np.broadcast_to(ids.astype(np.uint32), (n_frames, side, side)).copy()
        shape = (n_frames, side, side)
        frames = rng.poisson(200, shape) + (rng.random(shape) < 0.1) * 800.0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_trace_exports(Path(tmp), frames.astype(np.float32), labels, 1.0)
            secs = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        cell_frames = per_side * per_side * n_frames
        print(
            f"{per_side * per_side} cells x {n_frames} frames: {secs:.1f} s, {size / 1e6:.1f} MB"
            f": {1e6 * secs / cell_frames:.1f} us and {size / cell_frames:.1f} B per cell-frame",
            flush=True,
        )


if __name__ == "__main__":
    main()
