"""`make demo`: the main job, end to end, through the real HTTP API of the running service.

Starts the embedded service (SQLite file, a Redis of its own when none is configured, one
Celery worker, a local artifact folder), then submits and watches four jobs:

1. **simulate** a small dataset of the tissue calcium model (two pattern classes);
2. **finetune** SAM2 (``sam2.1_hiera_t``) prompt encoder + mask decoder on cached embeddings;
3. **infer** on a held-out simulated video, or on ``--recording PATH`` (uploaded first);
4. **evaluate** fine-tuned vs untuned vs classical baseline on the held-out videos;

and prints a summary table, the overlay paths and the page URL.

Run ``python -m calseg.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
SUMMARY_COLUMNS = ("iou", "dice", "pixel_accuracy", "precision", "recall", "f1", "ap50")


class DemoError(RuntimeError):
    """A demo step failed; the message names the job and its error."""


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
            stage = job.get("stage") or job["state"]
            if job.get("message"):
                stage = f"{stage}: {job['message']}"[:70]
            eta = job.get("eta_s")
            if eta is not None and job["state"] == "running":
                stage += f" (ETA {eta:.0f} s)"
            bar.update(task, completed=float(job.get("progress") or 0.0), stage=stage)
            # logs and CI have no live bar: one line per stage and per 10 % of progress
            mark = (job.get("stage"), int(10 * float(job.get("progress") or 0.0)))
            if not console.is_terminal and mark != last_mark:
                pct = 100 * float(job.get("progress") or 0.0)
                console.print(f"  {job['kind']} {pct:5.1f}% {stage}")
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


def run_demo(
    base_url: str, artifact_dir: Path, args: argparse.Namespace, token: str | None = None
) -> dict[str, Any]:
    """Drive the four jobs over HTTP against a running service with API token ``token``
    (sent as ``Authorization: Bearer``); return the job records."""
    jobs: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=base_url, timeout=120, headers=headers) as client:
        sim_params = {
            "n_videos": args.videos,
            "n_frames": args.frames,
            "height": args.size,
            "width": args.size,
            "pattern_classes": ["waves", "transients"],
            "seed": args.seed,
        }
        console.rule("1/4 simulate")
        jobs["simulate"] = watch(client, submit(client, "simulate", sim_params))

        console.rule("2/4 fine-tune SAM2")
        ft_params = {"dataset_job_id": jobs["simulate"]["id"], "steps": args.steps}
        jobs["finetune"] = watch(client, submit(client, "finetune", ft_params))
        for w in (jobs["finetune"].get("result") or {}).get("warnings", []):
            console.print(f"[bold red]WARNING:[/] {w}")

        console.rule("3/4 infer (fine-tuned SAM2, then the classical baseline)")
        if args.recording:
            rec = upload(client, Path(args.recording))
            console.print(f"uploaded {args.recording}: {rec.get('n_frames')} frames")
            infer_params: dict[str, Any] = {"recording_id": rec["id"]}
        else:
            videos = (jobs["simulate"].get("result") or {}).get("videos", [])
            test = [v for v in videos if v.get("split") == "test"] or videos
            if not test:
                raise DemoError("the simulate job listed no videos in its result")
            infer_params = {"dataset_job_id": jobs["simulate"]["id"], "video_id": test[0]["id"]}
        jobs["infer"] = watch(
            client,
            submit(client, "infer", {**infer_params, "model_job_id": jobs["finetune"]["id"]}),
        )
        # the classical baseline needs no weights: the floor every user gets
        jobs["infer-baseline"] = watch(
            client, submit(client, "infer", {**infer_params, "method": "baseline"})
        )

        console.rule("4/4 evaluate")
        ev_params = {
            "dataset_job_id": jobs["simulate"]["id"],
            "model_job_id": jobs["finetune"]["id"],
        }
        jobs["evaluate"] = watch(client, submit(client, "evaluate", ev_params))
    return jobs


def summarise(jobs: dict[str, Any], artifact_dir: Path, page_url: str) -> None:
    """Print the jobs table, the evaluation table, overlay paths and the page URL."""
    t = Table(title="CalSeg demo: jobs")
    for col in ("job", "id", "state", "wall (s)"):
        t.add_column(col)
    for kind, job in jobs.items():
        t.add_row(kind, job["id"], job["state"], f"{job['_wall_s']:.1f}")
    console.print(t)

    metrics = jobs["evaluate"].get("metrics", [])
    if metrics:
        models = sorted({m.get("model") or "" for m in metrics})
        names = [n for n in SUMMARY_COLUMNS if any(m["name"] == n for m in metrics)]
        mt = Table(title="Held-out simulated videos (split by video)")
        mt.add_column("model")
        for n in names:
            mt.add_column(n)
        for model in models:
            vals = {m["name"]: m["value"] for m in metrics if (m.get("model") or "") == model}
            mt.add_row(model, *[f"{vals[n]:.3f}" if n in vals else "-" for n in names])
        console.print(mt)

    for kind in ("infer", "infer-baseline"):
        model = "fine-tuned SAM2" if kind == "infer" else "classical baseline"
        n_cells = (jobs[kind].get("result") or {}).get("n_cells")
        console.print(f"[bold]Overlays ({model}: {n_cells} cells found)[/]")
        for name, p in sorted(artifact_paths(jobs[kind], artifact_dir).items()):
            if p.suffix.lower() in (".png", ".gif", ".mp4", ".tif", ".tiff"):
                console.print(f"  {name}: {p}")
    console.print(
        f"[bold]Page:[/] {page_url} (up while the demo runs; `--keep-serving` keeps it, "
        "`make serve` serves these jobs again later)"
    )


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make demo``; returns the process exit code."""
    p = argparse.ArgumentParser(prog="python -m calseg.demo", description=__doc__.split("\n")[0])
    p.add_argument("--recording", help="a real TIFF to segment instead of a held-out video")
    p.add_argument("--videos", type=int, default=4, help="simulated videos (>= 4)")
    p.add_argument("--frames", type=int, default=64, help="frames per simulated video")
    p.add_argument("--size", type=int, default=256, help="frame height and width (px)")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning optimiser steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-serving", action="store_true", help="keep the service up afterwards")
    args = p.parse_args(argv)

    from calseg.service.auth import read_token_file
    from calseg.service.embedded import EmbeddedService
    from calseg.service.settings import get_settings

    if args.recording and not Path(args.recording).is_file():  # fail before minutes of work
        console.print(f"[bold red]demo failed:[/] recording {args.recording} is not a file")
        return 2
    settings = get_settings()
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
                ("infer", "infer-baseline"),
                key=lambda k: (jobs[k].get("result") or {}).get("n_cells") or 0,
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
                console.print(f"  {shot}")
            if args.keep_serving:
                console.print(f"serving at {page} until Ctrl-C")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    except DemoError as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1
    console.print(f"demo finished in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
