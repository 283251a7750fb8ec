"""`make demo`: the main job, end to end, through the real HTTP API of the running service.

Starts the embedded service (SQLite file, a Redis of its own when none is configured, one
Celery worker, a local artifact folder), then submits and watches four jobs:

1. **simulate** a small dataset of the tissue calcium model (two pattern classes; 128 px
   frames, 3 held-out test videos);
2. **finetune** the SAM2 base's prompt encoder + mask decoder on cached embeddings, briefly;
3. **infer** on a held-out simulated video, or on ``--recording PATH`` (uploaded first), with
   the fine-tuned SAM2 and with the classical method;
4. **evaluate** SAM2 fine-tuned vs SAM2 untuned vs classical on the held-out videos;

and prints a summary table (means over the test videos with 95 % bootstrap CIs), the overlay
paths and the page URL.

The SAM2 base is the checkpoint configured with ``CALSEG_SAM2_CHECKPOINT`` (e.g. Meta's
``sam2.1_hiera_tiny.pt``) or, when none is, the small SAM2 trained here from random weights on
simulated videos (``calseg/segment/weights/sam2_small_calseg.pt``, made by ``calseg
pretrain``; not Meta's weights).

A step whose job already ran with the same parameters on the same code is not run again: the
earlier job is reused (:func:`reusable_job`; matched by the validated parameters and the code
version, never when the working tree has uncommitted changes). So ``make demo
RECORDING=...`` after ``make demo`` only uploads and segments the recording. ``--fresh`` runs
every step anew.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from calseg.segment.choice import LABEL_KEPT as KEPT_BASE

# no terminal (logs, CI): a wide console, so tables and paths are not wrapped mid-name
console = Console(width=None if sys.stdout.isatty() else 200)

TERMINAL = {"succeeded", "failed", "cancelled"}
CHROMIUM_ARGS = (  # Debian's chromium, headless, on a machine with no internet (DESIGN.md 7)
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class DemoError(RuntimeError):
    """A demo step failed; the message names the job and its error."""


def reusable_job(
    client: httpx.Client, kind: str, params: dict[str, Any], version: str | None = None
) -> tuple[dict[str, Any] | None, str]:
    """An earlier succeeded job identical to the one ``params`` would start, if any.

    Identical means: the caller's own job (``GET /api/me``: an admin lists everyone's jobs,
    and reused another user's), of the same kind, with the same parameters after validation
    (:func:`calseg.service.schemas.validate_params`, so defaults count and references to
    reused jobs match), and the same code version (:func:`calseg.service.context.code_version`)
    as this code. A working tree with uncommitted changes (``+dirty``) never reuses: its
    version does not identify the code.

    Returns:
        ``(job or None, one sentence saying what was found and why)``; the job is the full
        record (``GET /api/jobs/{id}``).
    """
    from calseg.service.context import code_version
    from calseg.service.schemas import params_to_json, validate_params

    version = version or code_version()
    if version.endswith("+dirty"):
        return None, f"not reusing earlier {kind} jobs: the code has uncommitted changes"
    want = params_to_json(validate_params(kind, params))
    me = client.get("/api/me")
    me.raise_for_status()
    my_id = me.json()["id"]
    offset = 0
    while True:
        r = client.get(
            "/api/jobs",
            params={"kind": kind, "state": "succeeded", "limit": 500, "offset": offset},
        )
        r.raise_for_status()
        page = r.json()
        for job in page["items"]:
            if (
                job.get("owner_id") == my_id
                and job.get("code_version") == version
                and job.get("params") == want
            ):
                full = client.get(f"/api/jobs/{job['id']}")
                full.raise_for_status()
                when = (job.get("finished_at") or job.get("created_at") or "")[:19]
                return full.json(), (
                    f"reusing {kind} job {job['id']} of {when} (same parameters, code {version})"
                )
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return None, f"no earlier {kind} job with these parameters on code {version}"


def run_or_reuse(
    client: httpx.Client,
    kind: str,
    params: dict[str, Any],
    fresh: bool = False,
    version: str | None = None,
) -> dict[str, Any]:
    """:func:`reusable_job` unless ``fresh``; otherwise submit and :func:`watch` a new job.
    A reused job's record carries ``_reused = True`` and ``_wall_s = 0``."""
    if not fresh:
        job, why = reusable_job(client, kind, params, version)
        console.print(why)
        if job is not None:
            job["_wall_s"], job["_reused"] = 0.0, True
            return job
    return watch(client, submit(client, kind, params))


def stage_text(job: dict, width: int = 100) -> str:
    """One progress line of a job (``GET /api/jobs/ID``): its stage and message, cut at a word
    with "…" to at most ``width`` characters (``textwrap.shorten``), and the job's ETA unless
    the message gives one."""
    stage = job.get("stage") or job["state"]
    message = job.get("message") or ""
    if message:
        stage = textwrap.shorten(f"{stage}: {message}", width, placeholder=" …")
    eta = job.get("eta_s")
    if eta is not None and job["state"] == "running" and "ETA" not in message:
        stage += f" (ETA {eta:.0f} s)"
    return stage


def submit(client: httpx.Client, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """Submit a job over HTTP and return its JSON record.

    Raises:
        DemoError: the API refused the job (the message carries its answer).
    """
    r = client.post("/api/jobs", json={"kind": kind, "params": params})
    if r.status_code != 201:
        raise DemoError(f"{kind} job refused ({r.status_code}): {r.text}")
    return r.json()


def watch(client: httpx.Client, job: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """Poll a job until it ends, showing a progress bar; return its final record.

    Raises:
        DemoError: the job failed, was cancelled, or did not end within ``timeout_s``.
    """
    job_id = job["id"]
    t0 = time.monotonic()
    with Progress(
        TextColumn("[bold]{task.fields[kind]:<9}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stage]}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(job["kind"], total=1.0, kind=job["kind"], stage="queued")
        last_mark: tuple = ()
        while True:
            r = client.get(f"/api/jobs/{job_id}")
            r.raise_for_status()
            job = r.json()
            stage = stage_text(job)
            bar.update(task, completed=float(job.get("progress") or 0.0), stage=stage)
            # logs and CI have no live bar: one line per stage and per 10 % of progress
            mark = (job.get("stage"), int(10 * float(job.get("progress") or 0.0)))
            if not console.is_terminal and mark != last_mark:
                pct = 100 * float(job.get("progress") or 0.0)
                console.print(f"  {job['kind']} {pct:5.1f}% {stage}", markup=False)
                last_mark = mark
            if job["state"] in TERMINAL:
                break
            if time.monotonic() - t0 > timeout_s:
                raise DemoError(f"{job['kind']} job {job_id} did not end within {timeout_s:.0f} s")
            time.sleep(1.0)
    if job["state"] != "succeeded":
        raise DemoError(
            f"{job['kind']} job {job_id} {job['state']}: {job.get('error') or 'no reason given'}"
            f"\nlog tail:\n{job.get('log_tail') or ''}"
        )
    job["_wall_s"] = time.monotonic() - t0
    return job


def artifact_paths(job: dict[str, Any], artifact_dir: Path) -> dict[str, Path]:
    """Map artifact names of a job record to absolute paths in the artifact folder."""
    return {a["name"]: (artifact_dir / a["relpath"]).resolve() for a in job.get("artifacts", [])}


def upload(client: httpx.Client, path: Path) -> dict[str, Any]:
    """Upload a recording (streamed multipart) and return its record.

    Raises:
        DemoError: the file is missing or the API rejected it (its reason is shown).
    """
    if not path.is_file():
        raise DemoError(f"recording {path} does not exist; pass an existing TIFF path")
    with path.open("rb") as fh:
        r = client.post("/api/recordings", files={"file": (path.name, fh, "image/tiff")})
    if r.status_code not in (200, 201):
        raise DemoError(f"upload of {path} refused ({r.status_code}): {r.text}")
    return r.json()


def simulate_params(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's simulate-job parameters from its command-line options."""
    return {
        "n_videos": args.videos,
        "n_frames": args.frames,
        "height": args.size,
        "width": args.size,
        "pattern_classes": ["waves", "transients"],
        "seed": args.seed,
        "mean_cell_area_px": args.cell_area,
        "n_val_videos": 1,
        "n_test_videos": args.test_videos,
    }


def run_demo(
    base_url: str, artifact_dir: Path, args: argparse.Namespace, token: str | None = None
) -> dict[str, Any]:
    """Drive the four jobs over HTTP against a running service with API token ``token``
    (sent as ``Authorization: Bearer``); return the job records."""
    jobs: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=base_url, timeout=120, headers=headers) as client:
        sim_params = simulate_params(args)
        fresh = getattr(args, "fresh", False)
        console.rule("1/4 simulate")
        jobs["simulate"] = run_or_reuse(client, "simulate", sim_params, fresh)

        console.rule("2/4 fine-tune SAM2")
        ft_params = {
            "dataset_job_id": jobs["simulate"]["id"],
            "steps": args.steps,
            "val_every": max(1, args.steps // 3),
            # the decoder learns a correction of a disc of the training cells' mean radius at
            # each prompt; the evaluation then shows that disc alone as the row to beat
            "mask_prior": args.mask_prior,
        }
        jobs["finetune"] = run_or_reuse(client, "finetune", ft_params, fresh)
        for w in (jobs["finetune"].get("result") or {}).get("warnings", []):
            console.print(f"[bold red]WARNING:[/] {escape(str(w))}")

        ft_result = jobs["finetune"].get("result") or {}
        console.rule("3/4 infer")  # a long rule title is cut at the terminal's width
        console.print(f"{shown_label('SAM2 fine-tuned', ft_result)}, then classical", markup=False)
        if ft_result.get("improved") is False:
            console.print(
                f"No fine-tuning step improved on the base: '{KEPT_BASE}' below is the base as "
                "it was (see the fine-tune warning above)."
            )
        if args.recording:
            rec = upload(client, Path(args.recording))
            n = rec.get("n_frames") or 0
            console.print(
                f"uploaded {args.recording}: {n} frame{'' if n == 1 else 's'}", markup=False
            )
            infer_params: dict[str, Any] = {"recording_id": rec["id"]}
        else:
            videos = (jobs["simulate"].get("result") or {}).get("videos", [])
            test = [v for v in videos if v.get("split") == "test"] or videos
            if not test:
                raise DemoError("the simulate job listed no videos in its result")
            infer_params = {"dataset_job_id": jobs["simulate"]["id"], "video_id": test[0]["id"]}
        jobs["infer"] = run_or_reuse(
            client, "infer", {**infer_params, "model_job_id": jobs["finetune"]["id"]}, fresh
        )
        # the classical method needs no weights: the floor every user gets
        jobs["infer-classical"] = run_or_reuse(
            client, "infer", {**infer_params, "method": "classical"}, fresh
        )

        console.rule("4/4 evaluate")
        ev_params = {
            "dataset_job_id": jobs["simulate"]["id"],
            "model_job_id": jobs["finetune"]["id"],
        }
        jobs["evaluate"] = run_or_reuse(client, "evaluate", ev_params, fresh)
    return jobs


def summarise(jobs: dict[str, Any], artifact_dir: Path, page_url: str) -> None:
    """Print the jobs table, the evaluation table, overlay paths and the page URL."""
    t = Table(title="CalSeg demo: jobs")
    for col in ("job", "id", "state", "wall (s)"):
        t.add_column(col)
    for kind, job in jobs.items():
        wall = "reused" if job.get("_reused") else f"{job['_wall_s']:.1f}"
        t.add_row(kind, job["id"], job["state"], wall)
    console.print(t)

    print_suite_headline()
    report = _evaluation_report(jobs["evaluate"], artifact_dir)
    if report:
        for line in heldout_table(report, jobs["finetune"].get("result")):
            console.print(line, markup=False, highlight=False, soft_wrap=True)

    from calseg.fmt import plural

    for kind in ("infer", "infer-classical"):
        result = jobs[kind].get("result") or {}
        model = result.get("model_label") or ("SAM2 fine-tuned" if kind == "infer" else "classical")
        model = shown_label(model, jobs["finetune"].get("result"))
        n_cells = result.get("n_cells") or 0
        console.print(f"[bold]Overlays ({escape(model)}: {plural(n_cells, 'cell')} found)[/]")
        if result.get("random_weights"):
            console.print(
                f"[bold red]WARNING:[/] {escape(model)}: random weights, masks not meaningful"
            )
        diag = result.get("diagnosis")
        if diag:  # nothing found: why, and the first thing to try
            console.print(f"  why: {diag['reason']}", markup=False, highlight=False)
            for sg in diag.get("suggestions", [])[:2]:
                console.print(f"  try: {sg['text']} ({sg['expected']})", markup=False)
        for name, p in sorted(artifact_paths(jobs[kind], artifact_dir).items()):
            if p.suffix.lower() in (".png", ".gif", ".mp4", ".tif", ".tiff"):
                console.print(f"  {name}: {p}", markup=False)
    console.print(
        f"[bold]Page:[/] {page_url} (up while the demo runs; `--keep-serving` keeps it, "
        "`make serve` serves these jobs again later)"
    )


def _evaluation_report(job: dict[str, Any], artifact_dir: Path) -> dict | None:
    """The evaluate job's ``report.json`` (``EvaluationReport.to_dict()``), if present."""
    import json

    path = artifact_paths(job, artifact_dir).get("report.json")
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def _ci(s: dict, key: str) -> str:
    m, ci = s.get(f"{key}_mean"), s.get(f"{key}_ci95")
    if m is None:
        return "-"
    return f"{m:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def shown_label(label: str, finetune: dict | None) -> str:
    """``label`` as the demo shows it: ``"SAM2 fine-tuned..."`` becomes
    ``"SAM2 base, kept..."`` when the fine-tune job's result says no step improved on the
    initial model (``improved`` False); otherwise unchanged."""
    from calseg.segment.choice import LABEL_FINETUNED

    if (finetune or {}).get("improved") is False and label.startswith(LABEL_FINETUNED):
        return KEPT_BASE + label[len(LABEL_FINETUNED) :]
    return label


def heldout_table(report: dict, finetune: dict | None = None) -> list[str]:
    """The demo's held-out table and its verdict lines, from an evaluation report dict.

    One row per model (classical, SAM2 untuned, SAM2 fine-tuned, and the disc prior when the
    fine-tune used one): instance F1, foreground IoU and AP50 as means over the test videos
    with 95 % bootstrap CIs (:func:`calseg.segment.evaluate.summarise`); then whether the
    fine-tuned model beats the untuned one and the disc prior (no image) (mean F1) and, when it
    does not clearly beat the classical method (mean F1 above, and the lower end of its CI
    too, as the default-method rule asks), one line saying so. Under the table, one line per
    model says why its unmatched ROIs and cells are unmatched
    (:func:`calseg.segment.evaluate.error_breakdown`: on no cell, spanning cells, split,
    missed, partial), when the report counts them. ``finetune``: the fine-tune
    job's result; when it says no step improved on the initial model (``improved`` False),
    the fine-tuned row is shown as :data:`KEPT_BASE` and a line before the table says it is
    the initial model, not one fine-tuned here.
    """
    from calseg.fmt import fmt_num

    summary = report.get("summary") or []
    n = max((s.get("n_videos") or 0 for s in summary), default=0)
    cols = (("f1", "instance F1"), ("iou", "foreground IoU"), ("ap50", "AP50"))
    head = f"{'model':<34}" + "".join(f"{title + ' [95% CI]':>26}" for _, title in cols)
    lines = [
        f"This demo's own held-out test videos ({n}, split by video; few videos: the CIs are "
        "wide, the suite above is the accuracy claim):"
    ]
    if (finetune or {}).get("improved") is False:
        lines.append(
            f"No fine-tuning step improved on the initial model (validation "
            f"{finetune.get('select_by') or 'score'} {fmt_num(finetune.get('best_score'))} at step "
            f"0), so the fine-tune kept the base as it was, its disc prior (if any) re-fitted to "
            f"this demo's training cells: '{KEPT_BASE}' below is not a model fine-tuned by this "
            "demo."
        )
    lines += [head, "-" * len(head)]
    by_name = {}
    for s in summary:
        name = shown_label(s["model"], finetune)
        by_name[name] = s
        lines.append(f"{name[:34]:<34}" + "".join(f"{_ci(s, k):>26}" for k, _ in cols))
    if any(s.get("errors") for s in summary):
        from calseg.segment.evaluate import ERRORS_NOTE, error_breakdown

        lines.append(f"Why ROIs and cells went unmatched ({ERRORS_NOTE}):")
        lines += [
            f"  {shown_label(s['model'], finetune)}: {error_breakdown(s['errors'])}"
            for s in summary
            if s.get("errors")
        ]

    def f1(prefix: str) -> tuple[str, float] | None:
        hit = [(k, v.get("f1_mean")) for k, v in by_name.items() if k.startswith(prefix)]
        return hit[0] if hit and hit[0][1] is not None else None

    from calseg.segment.choice import LABEL_DISC

    tuned = f1(shown_label("SAM2 fine-tuned", finetune))
    untuned, classical = f1("SAM2 untuned"), f1("classical")
    disc = f1(LABEL_DISC)

    def verdict(other: tuple[str, float], the: str = "") -> tuple[str, bool]:
        """The line comparing the fine-tuned row's mean F1 with ``other`` and whether it clearly
        beats it: "beats" only when the lower end of its CI is above the other's mean (the
        default-method rule's test; a new-user check read "beats" over overlapping CIs as a
        claim). ``the``: article before the other row's name."""
        ci = by_name[tuned[0]].get("f1_ci95")
        nums = f"F1 {tuned[1]:.3f} vs {other[1]:.3f}"
        if tuned[1] <= other[1]:
            return f"{tuned[0]} does NOT beat {the}{other[0]} ({nums})", False
        if ci is None or float(ci[0]) > other[1]:
            return f"{tuned[0]} beats {the}{other[0]} ({nums})", True
        return (
            f"{tuned[0]} is above {the}{other[0]} on mean F1, but not clearly (F1 "
            f"{tuned[1]:.3f} [{float(ci[0]):.2f}, {float(ci[1]):.2f}] vs {other[1]:.3f}: its CI "
            "reaches it)",
            False,
        )

    if tuned and untuned and (finetune or {}).get("improved") is False:
        lines.append(
            f"{tuned[0]} and {untuned[0]} have the same weights (F1 {tuned[1]:.3f} vs "
            f"{untuned[1]:.3f}): any difference is the disc prior's radius, re-fitted to this "
            "demo's training cells."
        )
    elif tuned and untuned:
        lines.append(verdict(untuned)[0] + ".")
    if tuned and disc:
        text, clear = verdict(disc, "the ")
        if clear:
            lines.append(f"{text}: the model adds something the image shows to the disc at each "
                         "prompt.")  # fmt: skip
        elif tuned[1] > disc[1]:
            lines.append(f"{text}: on these few videos that is no evidence of more than the disc "
                         "at each prompt.")  # fmt: skip
        else:
            lines.append(f"{text}: its cells come from the disc prior at the prompts, not from "
                         "what training learned from the images.")  # fmt: skip
    if tuned and classical:
        ci = by_name[tuned[0]].get("f1_ci95")
        clearly = tuned[1] > classical[1] and (ci is None or float(ci[0]) > classical[1])
        if not clearly:  # the default-method rule's test (calseg.segment.choice)
            how = "not better than" if tuned[1] <= classical[1] else "not clearly better than"
            shown = f" [{float(ci[0]):.2f}, {float(ci[1]):.2f}]" if ci is not None else ""
            lines.append(
                f"{tuned[0]} is {how} the classical method here (F1 {tuned[1]:.3f}{shown} vs "
                f"{classical[1]:.3f}): use the classical method on recordings like these."
            )
    return lines


def print_suite_headline() -> None:
    """The accuracy headline: the held-out suite's last full run (``python -m calseg.bench
    --only accuracy --write-docs``, :func:`calseg.bench_accuracy.suite_result`), never the demo's
    own few videos."""
    from calseg.bench_accuracy import suite_result

    res = suite_result()
    if res is None:
        console.print(
            "Accuracy: no held-out suite result in this checkout (run `python -m calseg.bench "
            "--only accuracy --write-docs`)"
        )
        return
    console.print("[bold]Accuracy (held-out suite):[/]")
    console.print(f"  {res['headline']}", markup=False, highlight=False)
    console.print(f"  from {res['provenance']}", markup=False, highlight=False)


def busiest_frame(labels: np.ndarray) -> int:
    """Index of the frame with the most labelled (non-zero) pixels of a label stack.

    Args:
        labels: (T, H, W) integer label stack (0 = background), or one (H, W) label image.

    Returns:
        The frame index in ``[0, T)``; the first such frame on ties, 0 for an all-background
        stack or a single (H, W) image.

    Raises:
        ValueError: ``labels`` is neither 2-D nor 3-D.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return 0
    if labels.ndim != 3:
        raise ValueError(f"labels must be (T, H, W) or (H, W), got shape {labels.shape}")
    return int(np.argmax((labels.reshape(labels.shape[0], -1) != 0).sum(axis=1)))


def busiest_frame_of_job(job: dict[str, Any], artifact_dir: Path) -> int | None:
    """:func:`busiest_frame` of an infer job's ``labels.tif`` artifact in ``artifact_dir``;
    ``None`` when the job has no such artifact or the file is missing."""
    import tifffile

    path = artifact_paths(job, artifact_dir).get("labels.tif")
    if path is None or not path.is_file():
        return None
    return busiest_frame(tifffile.imread(path))


def screenshot_page(url: str, path: Path, frame: int | None = None) -> Path | None:
    """Save a PNG of the page (viewer open on ``url``'s job) with headless Chromium.

    The viewer's slider is moved to ``frame`` (default: the middle frame) before the shot;
    :func:`busiest_frame_of_job` gives the frame that shows the most cells.

    Uses Playwright driving Debian's ``/usr/bin/chromium`` (DESIGN.md section 7); returns
    ``None`` (and says why) when either is missing, since the screenshot is a convenience.
    """
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        console.print("no screenshot: playwright is not installed")
        return None
    if not chromium.exists():
        console.print("no screenshot: /usr/bin/chromium is missing (scripts/system-deps.sh)")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#view-canvas[data-frame]", timeout=30_000)
            slider = page.locator("#frame-slider")
            last = int(slider.get_attribute("max") or 0)
            t = last // 2 if frame is None else min(max(int(frame), 0), last)
            slider.fill(str(t))
            page.wait_for_function(
                f"document.querySelector('#view-canvas').dataset.frame === '{t}'",
                timeout=30_000,
            )
            page.wait_for_timeout(500)
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()
    return path


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help, the description's paragraphs kept."""


def _plain(doc: str) -> str:
    """The module docstring for a terminal: no reST markup (``**``, double backticks,
    ``:func:`` roles)."""
    import re

    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc)
    return text.replace("``", "").replace("**", "").replace("`", "")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make demo``; returns the process exit code."""
    p = argparse.ArgumentParser(
        prog="python -m calseg.demo",
        description=_plain(__doc__ or ""),
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--recording",
        help="a real recording (any format calseg reads) to segment instead of a held-out "
        "simulated video; none: the held-out video",
    )
    p.add_argument("--videos", type=int, default=8, help="simulated videos (train + 1 val + test)")
    p.add_argument("--test-videos", type=int, default=3, help="held-out test videos (>= 3: CI)")
    p.add_argument("--frames", type=int, default=48, help="frames per simulated video")
    p.add_argument(
        "--size",
        type=int,
        default=128,
        help="frame height and width (px); the small SAM2 base works at 128 px",
    )
    p.add_argument(
        "--cell-area",
        type=float,
        default=100.0,
        help="mean cell area of the simulated tissue (px); the small SAM2 base was trained on "
        "100 px cells",
    )
    p.add_argument("--steps", type=int, default=150, help="fine-tuning optimiser steps")
    p.add_argument(
        "--mask-prior",
        default="residual",
        choices=["none", "residual", "prompt"],
        help="disc prior of the fine-tune (FinetuneConfig.mask_prior); 'none': the plain decoder",
    )
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="run every step anew instead of reusing identical earlier jobs",
    )
    p.add_argument("--keep-serving", action="store_true", help="keep the service up afterwards")
    args = p.parse_args(argv)

    from calseg.service.auth import read_token_file
    from calseg.service.embedded import EmbeddedService
    from calseg.service.schemas import ParamsError, validate_params
    from calseg.service.settings import get_settings

    if args.recording and not Path(args.recording).is_file():  # fail before minutes of work
        console.print(
            f"[bold red]demo failed:[/] recording {escape(str(args.recording))} is not a file"
        )
        return 2
    try:  # a bad option fails here, before the service starts (the API would say 422)
        validate_params("simulate", simulate_params(args))
    except ParamsError as exc:
        console.print(f"[bold red]demo failed:[/] {escape(str(exc))}")
        return 2
    from calseg.segment.model import default_base_checkpoint

    settings = get_settings()
    # the SAM2 base: the configured checkpoint, else the small SAM2 trained here
    base = default_base_checkpoint(settings.sam2_checkpoint)
    settings = settings.model_copy(update={"sam2_checkpoint": base})
    if base is None:
        console.print("SAM2 base: none configured and no small SAM2 shipped: RANDOM weights")
    elif settings.sam2_checkpoint == default_base_checkpoint(None):
        console.print(
            f"SAM2 base: {base} (small SAM2 trained here, not Meta's weights)", markup=False
        )
    else:
        console.print(f"SAM2 base: {base} (CALSEG_SAM2_CHECKPOINT)", markup=False)
    t0 = time.monotonic()
    try:
        with EmbeddedService(settings) as service:
            console.print(f"service up at {service.url} (database {settings.database_url})")
            # the embedded service wrote the token of its user "local" to var/token
            token = os.environ.get("CALSEG_TOKEN") or read_token_file(settings.token_file)
            if token is None:
                raise DemoError(
                    f"no API token: {service.token_message}; or set CALSEG_TOKEN to a token"
                )
            jobs = run_demo(service.url, Path(settings.artifact_dir), args, token)
            page = service.url + "/"
            summarise(jobs, Path(settings.artifact_dir), f"{page}#token={token}")
            # the viewer on the job with the most cells found (random-weight SAM2 finds none)
            shown = max(
                ("infer", "infer-classical"),
                # ties (e.g. none found anywhere): the classical job, whose page explains why
                key=lambda k: ((jobs[k].get("result") or {}).get("n_cells") or 0, k != "infer"),
            )
            # on the frame with the most labelled pixels (cells are active on few frames)
            frame = busiest_frame_of_job(jobs[shown], Path(settings.artifact_dir))
            shot = screenshot_page(
                f"{page}#token={token}&job={jobs[shown]['id']}",
                Path(settings.artifact_dir).parent / "demo-page.png",
                frame=frame,
            )
            if shot:
                console.print(f"[bold]Screenshot of the page ({shown} job, frame {frame}):[/]")
                console.print(f"  {shot}", markup=False)
            if args.keep_serving:
                console.print(f"serving at {page} until Ctrl-C")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    except (DemoError, ParamsError) as exc:  # ParamsError: a bad option, checked for reuse
        console.print(f"[bold red]demo failed:[/] {escape(str(exc))}")
        return 1
    console.print(f"demo finished in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
