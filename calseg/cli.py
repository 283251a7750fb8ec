"""The calseg command: the science without the service.

calseg simulate, finetune, segment and evaluate call the same library functions as the
service's jobs; calseg bench prints benchmark numbers (BENCHMARKS.md).

Service commands: ``calseg users`` and ``calseg tokens`` manage who may use a service (they
write its database, CALSEG_DATABASE_URL, directly: run them on the server); ``calseg submit``,
``watch`` and ``download`` talk to a running service over HTTP (CALSEG_URL, CALSEG_TOKEN).
"""

from __future__ import annotations

import functools
import json
import math
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from calseg.fmt import fmt_mapping, fmt_num, plural
from calseg.progress import ProgressFn


class _Console(Console):
    """The CLI's console: text is printed as it is (``markup=False`` unless a call asks for
    it), so paths, file metadata and error messages holding ``[...]`` are never read as rich
    markup (a path ``x[/y]`` raised ``MarkupError``, ``calseg[bioio]`` lost its ``[bioio]``).
    The styled prefixes go through :func:`_styled`. Into a pipe or a file, lines are not
    wrapped (``soft_wrap``): rich wrapped at 80 columns there and broke output paths in two,
    which logs and scripts then could not use; paths are never wrapped."""

    def print(self, *objects: object, **kwargs: object) -> None:  # noqa: D102
        kwargs.setdefault("markup", False)
        kwargs.setdefault("soft_wrap", not self.is_terminal)
        super().print(*objects, **kwargs)


console = _Console()


def _styled(prefix_markup: str, text: str = "", **kwargs: object) -> None:
    """Print a rich-markup ``prefix_markup`` (a literal of this module) then ``text`` as it
    is, on one line."""
    console.print(prefix_markup, end="", markup=True)
    console.print(text, **kwargs)


_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a mistake of the user (bad path, file, parameter, token, service
    answer) rather than a bug: an exception class defined by CalSeg (``calseg.*``, ``api.*``:
    DatasetError, RecordingError, ParamsError, ModelSpecError, AuthError, CalSegError, ...),
    pydantic's ValidationError, a JSON decoding error or a missing/unreadable path.
    Builtin errors such as a bare ValueError, TypeError or KeyError stay tracebacks."""
    from pydantic import ValidationError

    if isinstance(exc, _PATH_ERRORS + (ValidationError, json.JSONDecodeError)):
        return True
    return any(c.__module__.split(".")[0] in ("calseg", "api") for c in type(exc).__mro__)


def _user_message(exc: BaseException) -> str:
    """One line for a user error (pydantic's multi-line report joined with '; ')."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
    if isinstance(exc, _PATH_ERRORS) and exc.filename is not None:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _user_errors(command: Callable) -> Callable:
    """Wrap a command: CalSeg's user-facing errors become ``error: <message>`` and exit
    code 2 (the one place that does so for every command); other exceptions propagate."""

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            if not _is_user_error(exc):
                raise
            raise _fail(_user_message(exc)) from None

    return run


class _App(typer.Typer):
    """A Typer app whose commands all go through :func:`_user_errors`.

    Help texts are read as Markdown (``rich_markup_mode="markdown"``): single line breaks of
    a docstring are joined into one paragraph, code in backticks shows without them, and
    square brackets stay text (in Rich markup ``calseg[nwb]`` lost its ``[nwb]``)."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("rich_markup_mode", "markdown")
        super().__init__(**kwargs)

    def command(self, *args: object, **kwargs: object) -> Callable[[Callable], Callable]:
        register = super().command(*args, **kwargs)

        def decorator(f: Callable) -> Callable:
            register(_user_errors(f))
            return f

        return decorator


app = _App(add_completion=False, help=__doc__, no_args_is_help=True)


class _Bar:
    """A rich progress bar exposed as a :data:`calseg.progress.ProgressFn`."""

    def __init__(self, title: str) -> None:
        self._progress = Progress(
            TextColumn(f"[bold]{title}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[stage]}"),
            console=console,
        )
        self._task = self._progress.add_task(title, total=1.0, stage="")

    def __enter__(self) -> ProgressFn:
        self._started = False

        def report(fraction: float, stage: str, message: str | None = None) -> None:
            if not self._started:  # on the first report: an early error prints alone
                self._progress.start()
                self._started = True
            text = f"{stage}: {message}" if message else stage  # cut at a word, as the demo's
            text = textwrap.shorten(text, 60, placeholder=" …")
            self._progress.update(self._task, completed=fraction, stage=text)

        return report

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._started:
            return
        if exc_type is not None:  # the error alone, not a bar frozen at the failure
            self._progress.live.transient = True
        self._progress.stop()


def _fail(message: str) -> typer.Exit:
    _styled("[bold red]error:[/] ", message, soft_wrap=True)
    return typer.Exit(code=2)


_SIMULATE_FLAGS = {
    "n_videos": "--videos",
    "n_val_videos": "--val-videos",
    "n_test_videos": "--test-videos",
    "n_frames": "--frames",
    "pattern_classes": "--classes",
    "defect_severity": "--severity",
    "mean_cell_area_px": "--cell-area",
    "height/width": "--size",
}
"""SimulationConfig fields that ``calseg simulate`` sets from a flag of another name."""


def _simulation_problems(exc: Exception) -> str:
    """One line per problem of a SimulationConfig ``ValidationError``, fields named by the
    ``calseg simulate`` flag that sets them (:data:`_SIMULATE_FLAGS`), without pydantic's input
    dump and documentation URL."""
    lines = []
    for e in exc.errors(include_url=False, include_context=False):
        where = ".".join(map(str, e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        for field, flag in _SIMULATE_FLAGS.items():
            msg = re.sub(rf"\b{re.escape(field)}\b", flag, msg)
        lines.append(f"{_SIMULATE_FLAGS.get(where, where)}: {msg}" if where else msg)
    return "; ".join(lines)


@app.command()
def simulate(
    out_dir: Annotated[Path, typer.Argument(help="folder to write the dataset into")],
    videos: int = typer.Option(
        4, help="videos in all: training + --val-videos + --test-videos (at least one training)"
    ),
    val_videos: int = typer.Option(1, "--val-videos", min=0, help="videos in the validation split"),
    test_videos: int = typer.Option(1, "--test-videos", min=0, help="videos in the test split"),
    frames: int = typer.Option(64, help="frames per video"),
    size: int = typer.Option(256, help="frame height and width (px)"),
    cell_area: float = typer.Option(100.0, "--cell-area", help="mean cell area (px)"),
    classes: str = typer.Option(
        "waves,transients", help="pattern classes, comma-separated, cycled over the videos"
    ),
    indicator: str = typer.Option("GCaMP6s", help="GCaMP6s, GCaMP6f or GCaMP6m"),
    severity: float = typer.Option(0.3, help="defect severity in [0, 1]"),
    seed: int = typer.Option(0),
    config: Path | None = typer.Option(
        None, help="a JSON SimulationConfig; its fields override the options above"
    ),
    preview: bool = typer.Option(False, "--preview", help="write a PNG contact sheet per video"),
    like: Path | None = typer.Option(
        None,
        "--like",
        help="a real recording: fit the simulator to it (calseg fit-sim) and take its frame "
        "size, frame count, interval and imaging (camera, background, PSF, bleaching, cell "
        "size); --config still overrides",
    ),
) -> None:
    """Simulate a calseg-dataset v1 (recordings + instance ground truth + manifest)."""
    from pydantic import ValidationError

    from calseg.io.dataset import load_dataset
    from calseg.simulate.config import SimulationConfig
    from calseg.simulate.dataset import simulate_dataset

    fields: dict = {
        "n_videos": videos,
        "n_val_videos": val_videos,
        "n_test_videos": test_videos,
        "n_frames": frames,
        "height": size,
        "width": size,
        "mean_cell_area_px": cell_area,
        "pattern_classes": [c.strip() for c in classes.split(",") if c.strip()],
        "indicator": indicator,
        "defect_severity": severity,
        "seed": seed,
    }
    from_file = json.loads(config.read_text()) if config is not None else {}
    fields.update(from_file)
    try:
        if like is not None:
            fit = _fit_recording_or_fail(like)
            cfg = fit.to_config(SimulationConfig(**fields), **from_file)
            imaging = cfg.imaging.model_dump(exclude_none=True) if cfg.imaging else {}
            console.print(f"fitted to {like}: {fmt_mapping(imaging)}")
        else:
            cfg = SimulationConfig(**fields)
    except ValidationError as exc:
        raise _fail(f"invalid simulation settings: {_simulation_problems(exc)}") from None
    with _Bar("simulate") as progress:
        manifest = simulate_dataset(cfg, out_dir, progress=progress)
    console.print(f"dataset written: {manifest}")
    if preview:
        from calseg.io.overlays import contact_sheet

        for v in load_dataset(manifest).videos:
            sheet = contact_sheet(
                v.load_image(),
                v.load_labels(),
                out_dir / v.id / "preview.png",
                title=f"simulated {v.id}: {v.pattern_class} ({v.split} split)",
                subtitle="ground-truth active cells (coloured); their calcium below",
                traces=v.load_calcium(),
                trace_unit="cytosolic Ca2+ (µM)",
                frame_interval_s=v.frame_interval_s,
                pixel_size_um=v.pixel_size_um,
            )
            console.print(f"  preview {v.id} ({v.pattern_class}): {sheet}")


@app.command()
def finetune(
    dataset: Annotated[Path, typer.Argument(help="calseg-dataset folder or manifest.json")],
    out_dir: Annotated[Path, typer.Argument(help="folder for the checkpoint and history")],
    steps: int = typer.Option(150, help="optimiser steps"),
    image_size: int = typer.Option(512, help="SAM2 input side (multiple of 32)"),
    checkpoint: Path | None = typer.Option(
        None, help="pretrained SAM2 checkpoint (default: $CALSEG_SAM2_CHECKPOINT or random)"
    ),
    seed: int = typer.Option(0),
    train_mode: str = typer.Option(
        "decoder", help="decoder (cached embeddings), lora (LoRA on the encoder) or full (GPU)"
    ),
    lora_rank: int = typer.Option(4, help="LoRA rank (train-mode lora)"),
    batch_size: int = typer.Option(8, help="prompts per micro-batch"),
    grad_accum: int = typer.Option(1, help="micro-batches per optimiser step"),
    prompts: str = typer.Option("point=1", help="prompt mixture, e.g. 'point=2,box=1,box+point=1'"),
) -> None:
    """Fine-tune SAM2's prompt encoder + mask decoder on cached image embeddings (or, with
    --train-mode lora/full, the image encoder too, re-encoding frames every step)."""
    from pydantic import ValidationError

    from calseg.segment.finetune import FinetuneConfig
    from calseg.segment.finetune import finetune as run

    try:
        mix = {k.strip(): float(v) for k, v in (kv.split("=") for kv in prompts.split(","))}
        cfg = FinetuneConfig(
            steps=steps,
            image_size=image_size,
            seed=seed,
            train_mode=train_mode,
            lora_rank=lora_rank,
            batch_size=batch_size,
            grad_accum=grad_accum,
            prompt_mix=mix,
        )
    except (ValueError, ValidationError) as exc:
        raise _fail(f"bad fine-tuning option: {exc}") from None
    with _Bar("finetune") as progress:
        base = checkpoint or _configured_checkpoint()
        result = run(dataset, out_dir, cfg, base_checkpoint=base, progress=progress)
    for w in result.warnings:
        _styled("[bold red]WARNING:[/] ", w)
    console.print(
        f"checkpoint: {result.checkpoint}  best validation IoU: {fmt_num(result.best_val_iou)}"
    )


@app.command()
def pretrain(
    out_dir: Annotated[Path, typer.Argument(help="working folder (dataset, training, checkpoint)")],
    steps: int = typer.Option(2000, help="optimiser steps"),
    time_limit_s: float | None = typer.Option(None, help="stop training after this long (s)"),
    data_seed: int = typer.Option(1400, help="simulation seed"),
    seed: int = typer.Option(0, help="training seed"),
) -> None:
    """Train the small SAM2 (sam2_small_calseg) from random weights on simulated videos and
    score it on held-out ones: the recipe of the checkpoint shipped in calseg/segment/weights
    (a small SAM2 trained here, not Meta's weights)."""
    import os
    import shlex
    import sys

    from calseg.pipelines.pretrain import PretrainConfig, pretrain_small, small_finetune_config

    cfg = PretrainConfig(
        data_seed=data_seed,
        finetune=small_finetune_config(steps=steps, time_limit_s=time_limit_s, seed=seed),
    )
    command = "calseg pretrain " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    # the "untuned" row is the random-weight small SAM2, not a configured checkpoint
    os.environ.pop("CALSEG_SAM2_CHECKPOINT", None)
    with _Bar("pretrain") as progress:
        meta = pretrain_small(out_dir, cfg, progress=progress, command=command)
    for name, d in meta["heldout"]["per_model"].items():
        console.print(
            f"{name}: held-out F1 {fmt_num(d.get('f1'))} IoU {fmt_num(d.get('iou'))} "
            f"({d.get('n_videos')} videos)"
        )
    console.print(f"checkpoint: {Path(out_dir) / 'sam2_small_calseg.pt'}")


# Options shared by segment and analyze: one name per parameter, the infer job's (the CLI flag
# is the parameter name with dashes); the older flag names still work, hidden from the help.
_FRAME_INTERVAL_HELP = (
    "seconds between frames (default: from the file's metadata, else 1 s); also sets over how "
    "long the cell-size estimate measures changes (3 s; 2 frames when not known)"
)
_PIXEL_SIZE_HELP = "µm per pixel, for scale bars and wave speeds (default: from the file)"
_Z_PROJECTION_HELP = "how a Z axis (besides T) is collapsed: max, mean or median"
_AXES_HELP = "override the stored axes, one letter of TZCYXS per dimension, e.g. TZCYX"
_CHANNEL_HELP = "channel to read (0-based) when the file has several"
_INTERLEAVED_HELP = (
    "the file's images alternate between this many channels (c0, c1, c0, ...): split them and "
    "read --channel"
)
_REGISTER_HELP = "remove rigid drift (phase correlation)"
_BACKGROUND_HELP = "subtract a static background: opening, rolling_ball or gaussian"
_RADIUS_HELP = "background radius (px), larger than a cell's radius"
_BLEACH_HELP = "photobleaching correction: exp or biexp"
_NWB_HELP = "also write calseg.nwb (needs `pip install 'calseg[nwb]'`)"

OPTION_ALIASES = {
    "--frame-interval": "--frame-interval-s",
    "--pixel-size": "--pixel-size-um",
    "--register": "--register-drift",
    "--background-radius": "--background-radius-px",
    "--bleach": "--bleach-correction",
}
"""Old CLI flag -> its one name (the infer job parameter with dashes); still accepted."""


_ALIASED = ("--frame-interval-s", "--pixel-size-um", "--register-drift",
            "--background-radius-px", "--bleach-correction")  # fmt: skip
_ALIAS_DEFAULTS = (None, None, False, 50.0, None)


def _with_aliases(*pairs: tuple[object, object]) -> list[object]:
    """The values of the options in :data:`_ALIASED` (in that order), each given as
    ``(value under its name, value under its old name)``; an error when both are given and
    differ."""
    old_names = {v: k for k, v in OPTION_ALIASES.items()}
    out = []
    for name, default, (value, old) in zip(_ALIASED, _ALIAS_DEFAULTS, pairs, strict=True):
        if old is None or old == default or old is False:
            out.append(value)
        elif value not in (None, default) and value != old:
            raise _fail(f"{old_names[name]} is the old name of {name}: give one of them")
        else:
            out.append(old)
    return out


def _configured_checkpoint() -> str | Path | None:
    """The SAM2 base of the CLI, as for ``make demo`` and ``make serve``: the checkpoint in
    ``$CALSEG_SAM2_CHECKPOINT`` (as given: a relative path is relative to the current folder),
    else the small SAM2 trained here (:func:`calseg.segment.model.default_base_checkpoint`),
    else ``None`` (random weights). The CLI reads the environment and passes the path on; the
    library never reads it (docs/ARCHITECTURE.md, Layers)."""
    import os

    from calseg.segment.model import default_base_checkpoint

    return default_base_checkpoint(os.environ.get("CALSEG_SAM2_CHECKPOINT") or None)


def _print_lines(lines: list[tuple[str, str]]) -> None:
    style = {"warning": "[bold red]WARNING:[/] ", "note": "[yellow]check:[/] ", "info": ""}
    for level, text in lines:
        console.print(style[level], end="", markup=True)
        console.print(text, markup=False, highlight=False, soft_wrap=True)


def _check_units(frame_interval_s: float | None, pixel_size_um: float | None) -> None:
    """``--frame-interval-s`` / ``--pixel-size-um`` outside their ranges (or NaN, 0,
    negative) are a usage error (exit 2) before the recording is read
    (:func:`calseg.pipelines.segment.check_recording_units`)."""
    from calseg.pipelines.segment import SegmentOptionError, check_recording_units

    try:
        check_recording_units(
            frame_interval_s, pixel_size_um, names=("--frame-interval-s", "--pixel-size-um")
        )
    except SegmentOptionError as exc:
        raise _fail(str(exc)) from None


def _check_segment_options(config: dict, out_dir: Path) -> None:
    """Refuse bad ``calseg segment`` options before the recording is read: each
    :class:`calseg.segment.infer.InferenceConfig` error names its flag and the value given
    (``--cell-diameter-px -5.0: Input should be greater than 1``), and an output folder that
    is an existing file is named as such."""
    from pydantic import ValidationError

    from calseg.segment.infer import InferenceConfig

    if out_dir.exists() and not out_dir.is_dir():
        raise _fail(f"the output folder {out_dir} is an existing file; give a folder")
    method = config["method"]
    try:  # the method itself is checked by the pipeline's rule (auto, classical, sam2)
        InferenceConfig(**{**config, "method": "sam2" if method == "sam2" else "classical"})
    except ValidationError as exc:
        raise _fail(
            "; ".join(
                f"--{str(e['loc'][0]).replace('_', '-')} {e.get('input')!r}: {e['msg']}"
                if e["loc"]
                else e["msg"]
                for e in exc.errors()
            )
        ) from None


MEMORY_HEADROOM = 0.9
"""``calseg segment`` plans within this fraction of the available memory: the estimate is an
upper bound at the sizes it was measured at, and other processes' use changes while it runs."""


def _check_memory(
    recording: Path, read_options: dict, fields: dict, max_frames: int | None
) -> None:
    """Refuse, before any pixel is decoded, a recording whose segmentation would need more
    memory than this machine has available: the infer job's cost estimate
    (:func:`calseg.service.costs.estimate_infer`, measured to lie at or above real peaks by the
    costs bench) against :data:`MEMORY_HEADROOM` of
    :func:`calseg.machine.available_memory_bytes`. The message says how many leading frames fit
    (``--max-frames``). No check where the available memory is unknown."""
    from calseg.io.recordings import RecordingError, probe_recording
    from calseg.machine import available_memory_bytes
    from calseg.service.costs import (
        GIB,
        JobInputs,
        VideoShape,
        estimate_infer,
        frames_within_memory,
    )
    from calseg.service.schemas import infer_params

    available = available_memory_bytes()
    if available is None:
        return
    try:
        info = probe_recording(recording, **read_options)
    except RecordingError as exc:
        raise _fail(str(exc)) from None
    n = info.n_frames if max_frames is None else min(info.n_frames, max_frames)
    shape = VideoShape(n, info.height, info.width)
    params = infer_params().model_construct(**fields)  # priced as the same infer job
    need = estimate_infer(params, JobInputs(recording=shape)).memory_bytes
    budget = MEMORY_HEADROOM * available
    if need <= budget:
        return
    fit = frames_within_memory(params, shape, budget)
    hint = (
        f"segment the first {fit:,} frames with --max-frames {fit}, or crop, bin or split the "
        "recording"
        if fit >= 1
        else "crop or bin the frames: not even one frame of this size fits"
    )
    raise _fail(
        f"{recording}: segmenting {n:,} frames of {info.height} x {info.width} px needs "
        f"about {need / GIB:.1f} GiB of memory (CalSeg's cost estimate of an infer job with "
        f"these options), more than {100 * MEMORY_HEADROOM:.0f} % of the {available / GIB:.1f} "
        f"GiB this machine has available. Nothing was decoded; {hint}."
    )


@app.command()
def segment(
    recording: Annotated[
        Path, typer.Argument(help="a recording (TIFF, PNG, HDF5 as FILE.h5:/dataset, ...)")
    ],
    out_dir: Annotated[Path, typer.Argument(help="folder for labels, overlays and tables")],
    method: str = typer.Option(
        "auto",
        help="auto (the best method available here: classical unless a SAM2 with real or "
        "trained weights is configured and measured better; with --checkpoint: SAM2), "
        "classical or sam2",
    ),
    mode: str = typer.Option("image", help="SAM2: image (per frame) or video (propagation)"),
    target: str = typer.Option(
        "active", help="active (cells active per frame) or cells (all cells on a projection)"
    ),
    projection: str = typer.Option("mean", help="target cells: mean, max or std projection"),
    threshold_k: float = typer.Option(
        5.0, help="activity threshold: z-score (noise SDs above F0) a pixel must exceed"
    ),
    min_region_px: int = typer.Option(15, help="smallest active region kept (px)"),
    cell_diameter_px: float | None = typer.Option(
        None,
        help="typical cell diameter (px), over 1 and at most 1000 (default: estimated from "
        "the recording, 11 px where it cannot be)",
    ),
    image_size: int = typer.Option(512, help="SAM2 input side (multiple of 32)"),
    checkpoint: Path | None = typer.Option(None, help="SAM2 or CalSeg fine-tuned checkpoint"),
    max_frames: int | None = typer.Option(
        None, min=1, help="segment only the first N frames (e.g. when the whole does not fit)"
    ),
    frame_interval_s: float | None = typer.Option(None, help=_FRAME_INTERVAL_HELP),
    pixel_size_um: float | None = typer.Option(None, help=_PIXEL_SIZE_HELP),
    axes: str | None = typer.Option(None, help=_AXES_HELP),
    channel: int = typer.Option(0, help=_CHANNEL_HELP),
    interleaved_channels: int | None = typer.Option(None, help=_INTERLEAVED_HELP),
    z_projection: str = typer.Option("max", help=_Z_PROJECTION_HELP),
    register_drift: bool = typer.Option(False, "--register-drift", help=_REGISTER_HELP),
    background: str | None = typer.Option(None, help=_BACKGROUND_HELP),
    background_radius_px: float = typer.Option(50.0, help=_RADIUS_HELP),
    bleach_correction: str | None = typer.Option(None, help=_BLEACH_HELP),
    nwb: bool = typer.Option(False, "--nwb", help=_NWB_HELP),
    old_frame_interval: float | None = typer.Option(None, "--frame-interval", hidden=True),
    old_pixel_size: float | None = typer.Option(None, "--pixel-size", hidden=True),
    old_register: bool = typer.Option(False, "--register", hidden=True),
    old_background_radius: float | None = typer.Option(None, "--background-radius", hidden=True),
    old_bleach: str | None = typer.Option(None, "--bleach", hidden=True),
) -> None:
    """Segment the cells of a recording: label stack, contact sheet, GIF, activity map, and the
    per-cell traces (F, F0, dF/F), events, pattern class, waves and ImageJ ROIs. When nothing
    is found it says why and what to try. Flags have the infer job's parameter names."""

    from calseg.io.recordings import NO_FINITE_VALUE, RecordingError, read_recording
    from calseg.pipelines.segment import SegmentOptionError, segment_and_export
    from calseg.preprocess import PreprocessError

    frame_interval_s, pixel_size_um, register_drift, background_radius_px, bleach_correction = (
        _with_aliases(
            (frame_interval_s, old_frame_interval),
            (pixel_size_um, old_pixel_size),
            (register_drift, old_register),
            (background_radius_px, old_background_radius),
            (bleach_correction, old_bleach),
        )
    )
    config = {"method": method, "mode": mode, "image_size": image_size, "target": target}
    config.update(projection=projection, threshold_k=threshold_k, min_region_px=min_region_px)
    if cell_diameter_px is not None:
        config["cell_diameter_px"] = cell_diameter_px
    _check_segment_options(config, out_dir)  # before minutes of reading
    _check_units(frame_interval_s, pixel_size_um)
    read_options = {
        "axes": axes,
        "channel": channel,
        "interleaved_channels": interleaved_channels,
        "z_projection": z_projection,
    }
    _check_memory(
        recording,
        read_options,
        {
            **config,
            "register_drift": register_drift,
            "background": background,
            "background_radius_px": background_radius_px,
            "bleach_correction": bleach_correction,
        },
        max_frames,
    )
    try:
        rec = read_recording(recording, **read_options, max_frames=max_frames)
    except RecordingError as exc:
        raise _fail(str(exc)) from None
    if NO_FINITE_VALUE in rec.info.warnings:  # said once, as the error it leads to
        raise _fail(f"{recording}: {NO_FINITE_VALUE}")
    for w in rec.info.warnings:
        _styled("[yellow]note:[/] ", w)
    options = _preprocess_options(
        register_drift, background, background_radius_px, bleach_correction
    )
    try:
        with _Bar("segment") as progress:
            run = segment_and_export(
                rec.frames,
                out_dir,
                config,
                name=recording.name,
                frame_interval_s=frame_interval_s or rec.info.frame_interval_s,
                pixel_size_um=pixel_size_um or rec.info.pixel_size_um,
                preprocess=options,
                model=checkpoint,
                model_reason="SAM2: --checkpoint given",
                configured_checkpoint=_configured_checkpoint(),
                nwb=nwb,
                report=_report,
                progress=progress,
            )
    except SegmentOptionError as exc:
        raise _fail(f"bad segmentation option: {exc}") from None
    except PreprocessError as exc:
        raise _fail(str(exc)) from None
    out = run.outputs
    _print_lines(out.lines(str(recording), str(out_dir)))
    shown = ("labels.tif", "overlay.png", "overlay.gif", "activity.png", "activity.tif")
    for name in (*shown, "diagnosis.json", "calseg.nwb"):
        if name in out.paths:
            console.print(f"{name}: {out.paths[name]}", highlight=False, soft_wrap=True)
    tables = [
        n for n in ("traces.csv", "events.csv", "patterns.json", "rois.zip") if n in out.paths
    ]
    if tables:
        console.print(
            f"tables in {out_dir}: {', '.join(tables)} (+ .parquet, waves.json)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def evaluate(
    dataset: Annotated[Path, typer.Argument(help="calseg-dataset folder or manifest.json")],
    model: Path | None = typer.Option(None, help="fine-tuned checkpoint to compare"),
    split: str = typer.Option("test", help="split to score (split by video)"),
    out: Path | None = typer.Option(None, help="write the report as JSON here"),
    base_checkpoint: Path | None = typer.Option(
        None,
        help="base SAM2 checkpoint (default: $CALSEG_SAM2_CHECKPOINT, else the small SAM2 "
        "trained here, else random weights)",
    ),
    mode: str = typer.Option("image", help="SAM2: image (per frame) or video (propagation)"),
    image_size: int = typer.Option(512, help="SAM2 input side (multiple of 32)"),
) -> None:
    """Score SAM2 fine-tuned vs SAM2 untuned vs classical on held-out videos: one table (means
    over videos, bootstrap 95 % CIs), then per pattern class and defect family. With --out
    CKPT.evaluation.json next to a checkpoint, the report is the evidence the default rule
    reads (calseg.segment.choice)."""

    from pydantic import ValidationError

    from calseg.segment.evaluate import evaluate_dataset
    from calseg.segment.infer import InferenceConfig

    try:
        cfg = InferenceConfig(mode=mode, image_size=image_size)
    except ValidationError as exc:
        raise _fail(f"bad evaluation option: {exc}") from None
    from calseg.segment.choice import evaluation_models

    base = base_checkpoint or _configured_checkpoint()
    models = evaluation_models(model, base)
    with _Bar("evaluate") as progress:
        report = evaluate_dataset(
            dataset, models, split=split, config=cfg, progress=progress, base_checkpoint=base
        )
    console.print(report.to_table(), markup=False, soft_wrap=True)  # no wrap when piped
    if out is not None:
        out.write_text(json.dumps(report.to_dict(), indent=2))
        console.print(f"report: {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    suite: str | None = typer.Argument(
        None,
        help="'accuracy': the held-out accuracy suite (calseg/bench_accuracy.py); 'peers': "
        "Suite2p and CalSeg on it (needs calseg[peers]); their options follow (python -m "
        "calseg.bench accuracy --help)",
    ),
    quick: bool = typer.Option(
        False, "--quick", help="smaller runs; the dataset build is extrapolated"
    ),
    only: str | None = typer.Option(None, help="one section: sim, render, dataset or sam2"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the results as JSON"),
) -> None:
    """Benchmark the simulator, renderer, dataset build and SAM2 (prints a table);
    `calseg bench accuracy` runs the held-out accuracy suite."""
    from calseg.bench import main

    argv = [suite] if suite else []
    argv += (["--quick"] if quick else []) + (["--only", only] if only else [])
    argv += ["--json", str(json_out)] if json_out is not None else []
    raise typer.Exit(code=main(argv + list(ctx.args)))


def _preprocess_options(register, background, radius, bleach):  # noqa: ANN001, ANN202
    """calseg.preprocess.PreprocessOptions from the CLI's flags (checked here)."""
    from calseg.preprocess import PreprocessOptions

    if background not in (None, "opening", "rolling_ball", "gaussian"):
        raise _fail(f"--background must be opening, rolling_ball or gaussian, not {background!r}")
    if bleach not in (None, "exp", "biexp"):
        raise _fail(f"--bleach-correction must be exp or biexp, not {bleach!r}")
    return PreprocessOptions(
        register_drift=register,
        background=background,
        background_radius_px=radius,
        bleach_correction=bleach,
    )


def _report(level: str, text: str) -> None:
    """``report(level, text)`` of the pipelines on the console (warnings as notes)."""
    if level == "warning":
        console.print("[yellow]note:[/] ", end="", markup=True)
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _preprocess_cli(frames, dt, register, background, radius, bleach):  # noqa: ANN001, ANN202
    """Run calseg.preprocess with the CLI's flags (frames unchanged when all are off)."""
    from calseg.preprocess import PreprocessError, preprocess

    opts = _preprocess_options(register, background, radius, bleach)
    try:
        out, rep = preprocess(frames, dt, opts)
    except PreprocessError as exc:
        raise _fail(str(exc)) from None
    for step in rep.steps:
        console.print(f"preprocess: {step}")
    return out


def _exports_cli(out_dir, frames, labels, dt, pixel_size, nwb, traces=None):  # noqa: ANN001, ANN202
    """write_trace_exports and a summary on the console."""
    from calseg.io.tables import TableError
    from calseg.pipelines.segment import export_lines
    from calseg.pipelines.traces import write_trace_exports

    try:
        tables = write_trace_exports(
            out_dir, frames, labels, dt, pixel_size_um=pixel_size, nwb=nwb, traces=traces
        )
    except TableError as exc:
        raise _fail(str(exc)) from None
    for name, path in tables["paths"].items():
        console.print(f"{name}: {path}", markup=False, highlight=False)
    _print_lines(export_lines(tables))
    return tables


@app.command()
def analyze(
    recording: Annotated[Path, typer.Argument(help="a recording (TIFF, PNG, HDF5, video...)")],
    labels: Annotated[Path, typer.Argument(help="its label stack/image TIFF (e.g. labels.tif)")],
    out_dir: Annotated[Path, typer.Argument(help="folder for traces, events, patterns...")],
    frame_interval_s: float | None = typer.Option(None, help=_FRAME_INTERVAL_HELP),
    pixel_size_um: float | None = typer.Option(None, help=_PIXEL_SIZE_HELP),
    axes: str | None = typer.Option(None, help=_AXES_HELP),
    channel: int = typer.Option(0, help=_CHANNEL_HELP),
    interleaved_channels: int | None = typer.Option(None, help=_INTERLEAVED_HELP),
    z_projection: str = typer.Option("max", help=_Z_PROJECTION_HELP),
    register_drift: bool = typer.Option(False, "--register-drift", help=_REGISTER_HELP),
    background: str | None = typer.Option(None, help=_BACKGROUND_HELP),
    background_radius_px: float = typer.Option(50.0, help=_RADIUS_HELP),
    bleach_correction: str | None = typer.Option(None, help=_BLEACH_HELP),
    nwb: bool = typer.Option(False, "--nwb", help=_NWB_HELP),
    old_frame_interval: float | None = typer.Option(None, "--frame-interval", hidden=True),
    old_pixel_size: float | None = typer.Option(None, "--pixel-size", hidden=True),
    old_register: bool = typer.Option(False, "--register", hidden=True),
    old_background_radius: float | None = typer.Option(None, "--background-radius", hidden=True),
    old_bleach: str | None = typer.Option(None, "--bleach", hidden=True),
) -> None:
    """Traces (F, F0, dF/F), events, pattern class and waves of a recording whose cells are
    already labelled (by calseg segment, or by hand: a label TIFF)."""
    from calseg.analysis.traces import cell_traces_chunked, footprint_image
    from calseg.io.labels import LabelStackError, read_label_stack

    frame_interval, pixel_size, register, background_radius, bleach = _with_aliases(
        (frame_interval_s, old_frame_interval),
        (pixel_size_um, old_pixel_size),
        (register_drift, old_register),
        (background_radius_px, old_background_radius),
        (bleach_correction, old_bleach),
    )
    _check_units(frame_interval, pixel_size)
    _preprocess_options(register, background, background_radius, bleach)  # before any read
    from calseg.io.recordings import (
        RecordingError,
        iter_recording,
        probe_recording,
        read_recording,
    )

    try:
        plain = (
            axes is None and channel == 0 and interleaved_channels is None and z_projection == "max"
        )
        info = probe_recording(
            recording,
            axes=axes,
            channel=channel,
            interleaved_channels=interleaved_channels,
            z_projection=z_projection,
        )
        lab = read_label_stack(labels, fits=(info.n_frames, info.height, info.width))
    except (RecordingError, LabelStackError) as exc:
        raise _fail(str(exc)) from None
    if lab.shape[0] == 1:
        lab = lab[0]
    preprocessing = register or background or bleach
    try:
        if not plain or preprocessing or lab.ndim == 3:
            rec = read_recording(
                recording,
                axes=axes,
                channel=channel,
                interleaved_channels=interleaved_channels,
                z_projection=z_projection,
            )
            info, frames = rec.info, rec.frames
        else:  # traces from chunks: the recording is never whole in memory
            frames = None
    except RecordingError as exc:
        raise _fail(str(exc)) from None
    for w in info.warnings:
        _styled("[yellow]note:[/] ", w)
    shape = (info.n_frames, info.height, info.width)
    if lab.shape[-2:] != shape[1:] or (lab.ndim == 3 and lab.shape != shape):
        raise _fail(
            f"labels {tuple(lab.shape)} do not fit the recording {shape}: give "
            "the label stack made for this recording, or one (H, W) label image"
        )
    dt = frame_interval or info.frame_interval_s
    if dt is None:
        dt = 1.0
        _styled("[yellow]note:[/] ", "no frame interval in the file: 1 s assumed for traces")
    traces = None
    if frames is None:
        try:
            fp = footprint_image(lab)
            traces = cell_traces_chunked(iter_recording(recording), fp, info.n_frames)
        except RecordingError as exc:
            raise _fail(str(exc)) from None
    else:
        frames = _preprocess_cli(frames, dt, register, background, background_radius, bleach)
    _exports_cli(out_dir, frames, lab, dt, pixel_size or info.pixel_size_um, nwb, traces)


def _seed_list(text: str) -> list[int]:
    """ "100-109" or "1,2,5" -> seeds."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


@app.command("validate-patterns")
def validate_patterns_cmd(
    seeds: str = typer.Option("100-109", help="simulation seeds, e.g. 100-109 or 1,2,3"),
    frames: int = typer.Option(240, help="frames per simulated recording (5 s each)"),
    features: bool = typer.Option(False, "--features", help="print every recording's features"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the report as JSON"),
) -> None:
    """Confusion matrix of the pattern-class rules on simulated tissue of known class
    (one recording per seed and class; numbers in BENCHMARKS.md)."""
    import time

    from calseg.pipelines.validate_patterns import format_confusion, validate_patterns

    try:
        seed_list = _seed_list(seeds)
    except ValueError:
        raise _fail(f"--seeds must look like 100-109 or 1,2,3, not {seeds!r}") from None
    t0 = time.perf_counter()
    report = validate_patterns(seed_list, video={"n_frames": frames})
    if features:
        for row in report["rows"]:
            f = row["features"]
            console.print(
                f"seed {row['seed']} {row['true']:>10} -> {row['predicted']:<10} "
                f"largest cluster {plural(f['largest_cluster_cells'], 'cell')} / "
                f"{f['largest_cluster_area_fraction']:.3f} of field, "
                f"{f['event_rate_per_1000s']:.2f} events/cell/1000 s, "
                f"{f['n_active_cells']} active cells"
            )
    console.print(format_confusion(report), markup=False, soft_wrap=True)
    console.print(
        f"seeds {seeds}; {frames} frames of 5 s, 192 x 192 px pouch; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1))
        console.print(f"report: {json_out}")


# ------------------------------------------------------------------------------ service admin

users_app = _App(help="Users of the service (writes CALSEG_DATABASE_URL directly).")
tokens_app = _App(help="API tokens of the service's users (only their sha256 is stored).")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")


def _db_session():  # noqa: ANN202 - a context manager of a Session
    from sqlalchemy.engine import make_url

    from calseg.service.db import session_scope, upgrade_database
    from calseg.service.settings import get_settings

    url = get_settings().database_url
    # said on stderr (stdout of `tokens create` is the token alone): a shell without the
    # server's CALSEG_DATABASE_URL wrote users into the embedded SQLite file and said only
    # "created", and their tokens got 401 from the PostgreSQL server (a lab admin's check)
    import os

    shown = make_url(url).render_as_string(hide_password=True)
    source = (
        "CALSEG_DATABASE_URL"
        if os.environ.get("CALSEG_DATABASE_URL")
        else "the default: set CALSEG_DATABASE_URL to the server's database"
    )
    typer.echo(f"database: {shown} ({source})", err=True)
    from sqlalchemy.exc import OperationalError

    try:
        upgrade_database(url)  # idempotent: a fresh database gets its tables
    except OperationalError as exc:  # it was a 60-line traceback
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise _fail(f"cannot open the database {shown}: {reason}") from None
    return session_scope(url)


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(help="user name (letters, digits, ._@-)")],
    admin: bool = typer.Option(False, "--admin", help="sees and manages everyone's data"),
) -> None:
    """Create a user (then give them a token with `calseg tokens create NAME`)."""
    from calseg.service.auth import AuthError, create_user

    with _db_session() as session:
        try:
            user = create_user(session, name, is_admin=admin)
        except AuthError as exc:
            raise _fail(str(exc)) from None
        console.print(f"user {user.name} created (id {user.id}{', admin' if admin else ''})")


@users_app.command("list")
def users_list() -> None:
    """List the users."""
    from sqlalchemy import select

    from calseg.service.models import User

    with _db_session() as session:
        for user in session.scalars(select(User).order_by(User.created_at)):
            console.print(f"{user.id}  {user.name}{'  (admin)' if user.is_admin else ''}")


_LIMIT_OPTIONS = {
    # CLI option -> (users column, factor from the CLI unit to the column's unit)
    "max_job_memory_gib": ("max_job_memory_bytes", 1024**3),
    "max_job_disk_gib": ("max_job_disk_bytes", 1024**3),
    "max_job_hours": ("max_job_time_s", 3600.0),
    "max_queued_jobs": ("max_queued_jobs", 1),
    "max_running_jobs": ("max_running_jobs", 1),
    "max_storage_gib": ("max_storage_bytes", 1024**3),
}


def _limit_value(option: str, text: str) -> float | None:
    if text.strip().lower() in ("default", "server", "none"):
        return None
    try:
        value = _json_value(text, f"--{option.replace('_', '-')}")
    except json.JSONDecodeError:
        value = None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"--{option.replace('_', '-')}: give a number or 'default', got {text!r}")
    column, factor = _LIMIT_OPTIONS[option]
    scaled = value * factor
    return int(round(scaled)) if column != "max_job_time_s" else float(scaled)


@users_app.command("limits")
def users_limits(
    name: Annotated[str, typer.Argument(help="the user")],
    max_job_memory_gib: str | None = typer.Option(
        None, help="largest estimated peak memory of one job (GiB), or 'default'"
    ),
    max_job_disk_gib: str | None = typer.Option(
        None, help="largest estimated disk one job writes (GiB), or 'default'"
    ),
    max_job_hours: str | None = typer.Option(
        None, help="largest estimated worker time of one job (hours), or 'default'"
    ),
    max_queued_jobs: str | None = typer.Option(
        None, help="jobs queued or running at once (quota), or 'default'"
    ),
    max_running_jobs: str | None = typer.Option(None, help="jobs running at once, or 'default'"),
    max_storage_gib: str | None = typer.Option(
        None, help="storage quota: recordings and job files (GiB), or 'default'"
    ),
) -> None:
    """Show a user's job limits; with options, set them first ('default': the server's
    setting applies again). Limits are checked when a job is submitted
    (calseg.service.costs); PUT /api/users/NAME/limits does the same over HTTP."""
    from calseg.service.auth import get_user
    from calseg.service.costs import USER_LIMIT_FIELDS, effective_limits
    from calseg.service.schemas import LimitsIn
    from calseg.service.settings import get_settings

    given = {
        "max_job_memory_gib": max_job_memory_gib,
        "max_job_disk_gib": max_job_disk_gib,
        "max_job_hours": max_job_hours,
        "max_queued_jobs": max_queued_jobs,
        "max_running_jobs": max_running_jobs,
        "max_storage_gib": max_storage_gib,
    }
    with _db_session() as session:
        user = get_user(session, name)
        changes = {
            _LIMIT_OPTIONS[opt][0]: _limit_value(opt, text)
            for opt, text in given.items()
            if text is not None
        }
        if changes:
            current = {f: getattr(user, f) for f in USER_LIMIT_FIELDS}
            checked = LimitsIn(**{**current, **changes})  # bounds: ValidationError -> error:
            for field in USER_LIMIT_FIELDS:
                setattr(user, field, getattr(checked, field))
            session.commit()
        limits = effective_limits(user, get_settings(), session)
        for field in USER_LIMIT_FIELDS:
            value = getattr(limits, field)
            if value is None:
                shown = "no limit"
            elif field.endswith("_bytes"):
                shown = f"{fmt_num(value / 1024**3)} GiB"
            elif field.endswith("_s"):
                shown = f"{fmt_num(value / 3600)} h"
            else:
                shown = fmt_num(value)
            console.print(f"{field:22} {shown:>12}  ({limits.sources[field]})")


@tokens_app.command("create")
def tokens_create(
    user: Annotated[str, typer.Argument(help="the user who gets the token")],
    name: str = typer.Option("default", "--name", help="a label for the token, e.g. laptop"),
) -> None:
    """Issue an API token and print it, once: it is not stored anywhere (only its sha256)."""
    from calseg.service.auth import AuthError, create_token, get_user

    with _db_session() as session:
        try:
            row, token = create_token(session, get_user(session, user), name)
        except AuthError as exc:
            raise _fail(str(exc)) from None
        typer.echo(token)  # plain stdout, so `TOKEN=$(calseg tokens create alice)` works
        typer.echo(
            f"token {row.id} ({name}) of {user}; shown only now. Use it as "
            "CALSEG_TOKEN or 'Authorization: Bearer <token>'",
            err=True,
        )


@tokens_app.command("list")
def tokens_list(
    user: Annotated[str | None, typer.Argument(help="only this user's tokens")] = None,
) -> None:
    """List tokens (id, user, label, created, last used, revoked); never the tokens."""
    from sqlalchemy import select

    from calseg.service.models import ApiToken, User

    with _db_session() as session:
        query = select(ApiToken, User.name).join(User).order_by(ApiToken.created_at)
        if user:
            query = query.where(User.name == user)
        for tok, owner in session.execute(query):
            state = f"revoked {tok.revoked_at:%Y-%m-%d %H:%M}" if tok.revoked_at else "active"
            used = f"{tok.last_used_at:%Y-%m-%d %H:%M}" if tok.last_used_at else "never"
            console.print(f"{tok.id}  {owner}  {tok.name}  used {used}  {state}")


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(help="token id (or its first 6+ characters)")],
) -> None:
    """Revoke a token: requests with it are refused (401) within 5 s (a running api caches
    a verified token that long: calseg.service.auth.TOKEN_CACHE_S)."""
    from calseg.service.auth import AuthError, revoke_token

    with _db_session() as session:
        try:
            row = revoke_token(session, token_id)
        except AuthError as exc:
            raise _fail(str(exc)) from None
        console.print(f"token {row.id} ({row.name}) revoked")


# ------------------------------------------------------------------------------ service client


def _client():  # noqa: ANN202 - calseg.client.CalSegClient
    from calseg.client import CalSegClient

    client = CalSegClient()
    if not client.token:
        raise _fail(
            "no API token: set CALSEG_TOKEN (ask the server's admin: `calseg tokens create "
            "<you>`); with `make serve` on this machine it is in var/token"
        )
    return client


def _json_value(text: str, where: str) -> object:
    """``text`` parsed as JSON for a job parameter, refusing what JSON cannot send: numbers
    that overflow to infinity (``1e400``), ``NaN``/``Infinity``, integers too long for Python
    (more than 4300 digits) and nesting too deep. Raises ``typer.Exit`` (``error: ...``, 2)."""

    def finite(value: str) -> float:
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{value} is not a finite number (it overflows a double)")
        return number

    def constant(name: str) -> object:
        raise ValueError(f"{name} is not a number JSON can carry")

    try:
        return json.loads(text, parse_float=finite, parse_constant=constant)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        raise _fail(f"{where}: {exc}") from None


def _parse_param(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise _fail(f"--param {item!r}: write it as name=value, e.g. --param n_videos=4")
    try:
        return key.strip(), _json_value(value, f"--param {key.strip()}")
    except json.JSONDecodeError:
        return key.strip(), value  # a bare string, e.g. --param method=baseline


def _watch(client, job_id: str) -> dict:  # noqa: ANN001 - CalSegClient
    from calseg.client import CalSegError, JobFailed

    try:  # an unknown id or a service that does not answer: the error first and alone
        first = client.get(job_id)
    except CalSegError as exc:
        raise _fail(str(exc)) from None
    with Progress(
        TextColumn("[bold]{task.fields[kind]}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stage]}"),
        console=console,
    ) as bar:
        task = bar.add_task("job", total=1.0, kind=first["kind"], stage="")

        def show(job: dict) -> None:
            stage = job.get("stage") or job["state"]
            if job.get("eta_s") is not None and job["state"] == "running":
                stage += f" (ETA {job['eta_s']:.0f} s)"
            bar.update(
                task, completed=float(job.get("progress") or 0), kind=job["kind"], stage=stage[:60]
            )

        try:
            return client.wait(job_id, on_progress=show)
        except JobFailed as exc:
            log = exc.job.get("log_tail") or ""
            raise _fail(f"{exc}\n{log[-2000:]}") from None
        except CalSegError as exc:
            raise _fail(str(exc)) from None


@app.command()
def submit(
    kind: Annotated[str, typer.Argument(help="simulate, finetune, infer or evaluate")],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="name=value (value read as JSON when it parses)"),
    ] = None,
    params_file: Path | None = typer.Option(None, "--params", help="a JSON file of parameters"),
    watch_it: bool = typer.Option(False, "--watch", help="show a progress bar until it ends"),
) -> None:
    """Submit a job to the service at CALSEG_URL (token CALSEG_TOKEN); prints its id."""
    from calseg.client import CalSegError

    params = _json_value(params_file.read_text(), str(params_file)) if params_file else {}
    if not isinstance(params, dict):
        raise _fail(f'{params_file}: the parameters must be a JSON object, {{"name": value}}')
    params.update(dict(_parse_param(p) for p in param or []))
    with _client() as client:
        try:
            job = client.submit(kind, params)
        except CalSegError as exc:
            raise _fail(str(exc)) from None
        typer.echo(job["id"])
        if watch_it:
            _print_ended(_watch(client, job["id"]))


@app.command()
def watch(job_id: Annotated[str, typer.Argument(help="the job's id")]) -> None:
    """Show a job's progress until it ends (exit code 2 when it fails)."""
    with _client() as client:
        _print_ended(_watch(client, job_id))


def _print_ended(job: dict) -> None:
    """What an ended job found, as the page says it: an infer job's cells, pattern class,
    notes, and why nothing was found with what to try; an evaluate job's table; then the final
    metrics. (It printed only "foreground_fraction (classical, -): 0" for an infer job that
    found no cell, with no word why: a lab admin's check.)"""
    console.print(f"{job['kind']} job {job['id']} {job['state']}", markup=False)
    res = job.get("result") or {}
    if job["kind"] == "infer" and "n_cells" in res:
        unit = "region" if res.get("target") == "cells" else "cell"
        cov = res.get("coverage")
        console.print(
            f"  {res.get('model_label') or res.get('method')}: {plural(res['n_cells'], unit)}"
            + (f", {100 * cov:.1f} % of the field" if isinstance(cov, int | float) else "")
            + (f"; pattern {res['pattern_class']}" if res.get("pattern_class") else ""),
            markup=False,
        )
        for note in res.get("notes") or []:
            console.print(f"  check: {note}", markup=False)
        diagnosis = res.get("diagnosis") or {}
        if diagnosis.get("reason"):
            console.print(f"  why no {unit}: {diagnosis['reason']}", markup=False)
        for tip in diagnosis.get("suggestions") or []:
            params = " ".join(f"-p {k}={json.dumps(v)}" for k, v in tip.get("params", {}).items())
            console.print(f"  try: {tip.get('text')} ({params})", markup=False)
    elif job["kind"] == "evaluate" and res.get("table"):
        console.print(res["table"], markup=False, soft_wrap=True)
    for m in job.get("metrics", []):
        if m.get("step") is None:
            console.print(
                f"  {m['name']} ({m.get('model') or '-'}, {m.get('subset') or '-'})"
                f": {fmt_num(m['value'])}",
                markup=False,
            )


@app.command()
def download(
    job_id: Annotated[str, typer.Argument(help="the job's id")],
    out: Path = typer.Option(Path("."), "--out", help="folder to write the artifacts into"),
    name: Annotated[
        list[str] | None, typer.Option("--name", help="only this artifact (repeatable)")
    ] = None,
) -> None:
    """Download a job's artifacts (sha256 of each checked)."""
    from calseg.client import CalSegError

    with _client() as client:
        try:
            paths = client.download(job_id, out, names=name or None)
        except CalSegError as exc:
            raise _fail(str(exc)) from None
    for p in paths:
        typer.echo(str(p))


@app.command()
def reconcile() -> None:
    """One reconciler pass: re-queue (or fail, at the attempt limit) running jobs whose worker
    stopped sending heartbeats, and dispatch again queued jobs the broker lost (the api runs
    this every CALSEG_RECONCILE_INTERVAL_S seconds by itself)."""
    from calseg.service.reconcile import main_once

    report = main_once()
    typer.echo(
        f"re-queued {len(report.requeued)}, failed {len(report.failed)}, dispatched again "
        f"{len(report.redispatched)}"
        + (f"; broker not inspected: {report.broker_error}" if report.broker_error else "")
    )
    for label, ids in (
        ("re-queued", report.requeued),
        ("failed", report.failed),
        ("dispatched again", report.redispatched),
    ):
        for job_id in ids:
            typer.echo(f"  {label}: {job_id}")


def _fit_recording_or_fail(path: Path):  # noqa: ANN202 - calseg.simulate.fit.RecordingFit
    """Read a recording and fit the simulator's imaging parameters to it (CLI errors)."""
    from calseg.io.recordings import RecordingError, read_recording
    from calseg.simulate.fit import fit_recording

    try:
        rec = read_recording(path)
        return fit_recording(rec.frames, rec.info.frame_interval_s, rec.info.pixel_size_um)
    except RecordingError as exc:  # FitError is a RecordingError
        raise _fail(str(exc)) from None


@app.command("fit-sim")
def fit_sim(
    recording: Annotated[Path, typer.Argument(help="a real recording (TIFF, HDF5, ...)")],
    out: Path | None = typer.Option(None, help="write {fit, config} as JSON here"),
) -> None:
    """Fit the simulator to a recording: noise model (gain, read noise, offset), background,
    PSF width, photobleaching, cell size, dynamic range; print the SimulationConfig that
    renders recordings like it (use it with calseg simulate --config, or simulate --like)."""
    fit = _fit_recording_or_fail(recording)
    cfg = fit.to_config()
    d = fit.to_dict()
    console.print(
        f"gain {d['gain_adu_per_e']:.4g} ADU/e-, offset {d['offset_adu']:.1f} ADU, read noise "
        f"{d['read_noise_e']:.3g} e-, background {d['background_e']:.3g} e-, PSF sigma "
        f"{d['psf_sigma_px']:.2f} px, "
        f"bleaching tau {fmt_num(d['bleach_tau_frames'] or 'none')} frames, "
        f"cell radius {d['cell_radius_px']:.1f} px, peak F/F0 {d['peak_f_over_f0']:.2f}"
    )
    for n in fit.notes:
        _styled("[yellow]note:[/] ", n)
    payload = {"fit": d, "config": cfg.model_dump(mode="json")}
    if out is not None:
        out.write_text(json.dumps(payload, indent=1))
        console.print(f"written: {out}")
    else:
        typer.echo(json.dumps(payload["config"], indent=1))


@app.command()
def gap(
    real: Annotated[list[Path], typer.Argument(help="real recording(s)")],
    sim: Path = typer.Option(..., help="a calseg-dataset folder (or a recording) to compare"),
    split: str = typer.Option("train", help="dataset split whose videos are compared"),
    sam2: bool = typer.Option(False, "--sam2", help="also the Fréchet distance on SAM2 embeddings"),
    image_size: int = typer.Option(128, help="SAM2 input side for --sam2"),
) -> None:
    """Domain-gap score between real recordings and a simulated dataset (lower = closer)."""
    import numpy as np

    from calseg.io.dataset import DatasetError, load_dataset
    from calseg.io.recordings import RecordingError, read_recording
    from calseg.pipelines.domain_gap import GapError, domain_gap, frechet_distance, sam2_features

    try:
        reals = [read_recording(p).frames for p in real]
        if sim.is_dir() or sim.name == "manifest.json":
            sims = [np.asarray(v.load_image()) for v in load_dataset(sim).split(split)]
        else:
            sims = [read_recording(sim).frames]
        g = domain_gap(reals, sims)
    except (RecordingError, DatasetError, GapError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"domain-gap score {g.score:.3f}")
    for k, v in g.components.items():
        console.print(f"  {k:<10} {v:.4f} (/ reference = {g.scaled.get(k, float('nan')):.3f})")
    if sam2:
        from calseg.segment.model import load_sam2

        loaded = load_sam2("sam2.1_hiera_t", _configured_checkpoint(), image_size=image_size)
        fd = frechet_distance(sam2_features(reals, loaded), sam2_features(sims, loaded))
        console.print(f"Fréchet distance (SAM2 image embeddings): {fd:.3f}")


@app.command("report-gap")
def report_gap(
    out_dir: Annotated[Path, typer.Argument(help="folder for report.md/.png/.json")],
    real_dir: Path | None = typer.Option(None, help="folder of the real recordings"),
    steps: int = typer.Option(30, help="fine-tuning steps per model"),
    image_size: int = typer.Option(128, help="SAM2 input side"),
    augment_variants: int = typer.Option(2, help="K augmented variants for model (b)"),
) -> None:
    """The sim-to-real report (BENCHMARKS.md): models trained on default, augmented and
    fitted simulations vs the untuned model and the classical baseline."""
    from calseg.report import main

    argv = ["gap", str(out_dir), "--steps", str(steps), "--image-size", str(image_size)]
    argv += ["--augment-variants", str(augment_variants)]
    argv += ["--real-dir", str(real_dir)] if real_dir is not None else []
    raise typer.Exit(code=main(argv))


if __name__ == "__main__":
    app()
