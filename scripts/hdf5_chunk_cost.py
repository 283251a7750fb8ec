"""What HDF5 spends per chunk a read touches: time and peak memory of one read call.

The numbers behind :data:`calseg.io.file_safety.MAX_HDF5_CHUNKS` and
``MAX_HDF5_CHUNKS_PER_READ``. Each case runs in a process of its own (its peak RSS,
``ru_maxrss``, is that case's): a 20 x 256 x 256 uint8 dataset chunked (1, c, c), never written
(HDF5 reads the fill value) or written, and frames 0..4 read in one call (5 x (256 / c)^2
chunks touched).

    .venv/bin/python scripts/hdf5_chunk_cost.py   # c = 1, 2, 4, 8, 16 unwritten; 1, 4, 16 written

Prints one line per case: chunks touched, seconds, microseconds per chunk, peak RSS (MB).
Run here (2-core AMD EPYC, h5py 3, another job running): 4.8-12 us per chunk; 327,680 1-px
chunks peaked at 2.1 GB unwritten (6.4 KB per chunk) and 8.3 GB written.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_case(side: int, written: bool, folder: Path) -> str:
    """Write the file, read frames 0..4 once, return the line (run in a child process)."""
    import h5py
    import numpy as np

    path = folder / f"c{side}_{int(written)}.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("data", shape=(20, 256, 256), dtype="uint8", chunks=(1, side, side))
        if written:
            d[:] = np.random.default_rng(0).integers(0, 255, (20, 256, 256), dtype=np.uint8)
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        f["data"][0:5]
    dt = time.perf_counter() - t0
    n = 5 * (256 // side) ** 2
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state = "written" if written else "unwritten"
    return (
        f"chunks {side}x{side} {state}: {n} chunks read in {dt:.3f} s = {dt / n * 1e6:.2f} us "
        f"per chunk, peak RSS {peak_mb:.0f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", nargs=2, metavar=("SIDE", "WRITTEN"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        with tempfile.TemporaryDirectory() as tmp:
            print(one_case(int(args.case[0]), args.case[1] == "1", Path(tmp)))
        return 0
    cases = [(s, False) for s in (1, 2, 4, 8, 16)] + [(s, True) for s in (1, 4, 16)]
    for side, written in cases:  # a process each: ru_maxrss is the case's own peak
        cmd = [sys.executable, __file__, "--case", str(side), str(int(written))]
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
