"""Print the per-group table of RELIABILITY.md from pytest JUnit XML files.

Usage: ``python tests/reliability/report.py RESULTS.xml [MORE.xml ...]``

Each test case is put into the first group whose (file, name) patterns match it; cases of no
group are counted under "other service tests". The numbers in RELIABILITY.md come from this
script (the command that produces the XML is given there).
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import OrderedDict

_HOLES = "zero_cell|recording_in_use|forwarded|cli_bad"
"""Tests of test_service_limits.py that belong to issue 13's "smaller holes" (item 7)."""

GROUPS: list[tuple[str, str, str]] = [
    # (group, file pattern, test name pattern)
    ("files", r"test_file_corpus", r"test_(reader|upload)"),
    ("files", r"test_service_api", r"test_upload_limit_probe_and_duplicates"),
    ("files", r"test_file_corpus", r"test_4gb_sparse_bigtiff_upload"),
    ("long recordings", r"test_file_corpus", r"test_long_recording"),
    # issue 13: hostile files (attack_files.py) through reader, upload, preview, infer
    (
        "file references",
        r"test_file_attacks",
        r"\[(hdf5-(external|virtual|lzf|scaleoffset|unknown)|ome-|hls-|ffconcat-|sdp-|"
        r"mp4-magic|avi-magic|mov-data)|bare_library|confined_handle",
    ),
    ("file references", r"test_io_formats", r"bioio_reader"),
    ("decompression bombs and decode cost", r"test_file_attacks", r"."),
    ("decompression bombs and decode cost", r"test_io_recordings", r"read_limits|gzip_shuffle"),
    (
        "decompression bombs and decode cost",
        r"test_api_recordings",
        r"lowered_budget|preview_|max_frame_pixels|decimated|frame_slot",
    ),
    (
        "frames read wrong",
        r"test_io_recordings",
        r"series_per_frame|interleave|one_channel|reading_options",
    ),
    ("frames read wrong", r"test_api_recordings", r"."),
    ("prompts", r"test_service_api", r"test_cell_at_pixel"),
    ("training data", r"test_training_data|test_segment_finetune", r"test_training_edge|empty"),
    ("cancellation", r"test_cancel", r"."),
    ("supervisor", r"test_supervisor", r"."),
    ("supervisor", r"test_service_embedded", r"sigterm|sigkill|second_stack|port_is_free"),
    ("queue and workers", r"test_queue_workers|test_database_outage", r"."),
    ("queue and workers", r"test_service_jobs", r"lost|heartbeat|reconcil|retry|idempot"),
    ("queue and workers", r"test_service_embedded", r"."),
    ("storage", r"test_store", r"."),
    # issue 13 items 3, 6, 7
    ("job cost limits", r"test_service_limits", r"^test_(?!" + _HOLES + ")"),
    ("job cost limits", r"test_service_migrations", r"0003"),
    ("fairness", r"test_service_fairness|test_fair_queue", r"."),
    ("small holes", r"test_service_limits", r"^test_(" + _HOLES + ")"),
    ("small holes", r"test_frontend_accounts", r"."),
    ("small holes", r"test_service_auth", r"rate_limited"),
    ("API", r"test_api_fuzz", r"."),
    ("API", r"test_service_api", r"bad_numbers|bad_params|unknown_ids"),
    ("API", r"test_service_auth", r"every_route|rate_limited|size_limited|references"),
    ("load", r"test_load", r"."),
    ("pattern rules", r"test_pattern_rules", r"."),
    ("deployment", r"test_service_deploy", r"."),
]


def group_of(classname: str, name: str) -> str:
    """The group of a test case (``classname`` is pytest's dotted module path)."""
    for group, file_re, name_re in GROUPS:
        if re.search(file_re, classname) and re.search(name_re, name):
            return group
    return "other service tests"


def tally(paths: list[str]) -> OrderedDict[str, dict[str, int]]:
    """``{group: {"tried", "passed", "failed", "skipped"}}`` over the XML files' test cases."""
    order = list(OrderedDict.fromkeys(g for g, _, _ in GROUPS)) + ["other service tests"]
    table: OrderedDict[str, dict[str, int]] = OrderedDict(
        (g, {"tried": 0, "passed": 0, "failed": 0, "skipped": 0}) for g in order
    )
    cases: dict[tuple[str, str], ET.Element] = {}  # a case in several files: the last counts
    for path in paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            cases[(case.get("classname", ""), case.get("name", ""))] = case
    for (classname, name), case in cases.items():
        row = table[group_of(classname, name)]
        if case.find("skipped") is not None:
            row["skipped"] += 1
            continue
        row["tried"] += 1
        bad = case.find("failure") is not None or case.find("error") is not None
        row["failed" if bad else "passed"] += 1
    return table


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    table = tally(argv)
    print("| group | cases tried | passed | failed | skipped |")
    print("| --- | ---: | ---: | ---: | ---: |")
    total = {"tried": 0, "passed": 0, "failed": 0, "skipped": 0}
    for group, row in table.items():
        if not any(row.values()):
            continue
        cells = " | ".join(str(row[k]) for k in ("tried", "passed", "failed", "skipped"))
        print(f"| {group} | {cells} |")
        for k in total:
            total[k] += row[k]
    print(
        f"| **all** | {total['tried']} | {total['passed']} | {total['failed']} | "
        f"{total['skipped']} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
