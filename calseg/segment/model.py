"""Loading SAM2 (Ravi et al. 2024, "SAM 2: Segment Anything in Images and Videos") for CalSeg.

:func:`load_sam2` builds a model from one of the configs packaged with ``sam2`` (Hydra,
``configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml``), with ``++model.image_size`` overridden
(multiple of 32), and loads weights from

* a full SAM2 checkpoint (``{"model": state_dict}``, as published by Meta), or
* a CalSeg fine-tuned checkpoint (:data:`FINETUNE_FORMAT`: prompt-encoder + mask-decoder state
  dicts and metadata naming the base config, image size, base checkpoint and the hash of the
  frozen image encoder it was trained on), or
* a Hugging Face hub id ``hf:facebook/sam2.1-hiera-tiny`` (the ids of
  ``sam2.build_sam.HF_MODEL_ID_TO_FILENAMES``) where the machine is online and
  ``huggingface_hub`` is installed: downloaded once into the hub cache, then loaded like a
  local full checkpoint (its SHA-256 recorded, and checked when ``expected_sha256`` is given);
  on an offline machine this raises :class:`ModelLoadError` saying what to do instead, or
* nothing: the model keeps RANDOM weights (seeded, so reproducible), with a loud warning and
  ``info.random_weights = True``. No weights are ever downloaded.

The library never reads the environment: the CLI and the service read the configured
checkpoint (``CALSEG_SAM2_CHECKPOINT``, :data:`CHECKPOINT_ENV`) at their edge and pass it
as ``checkpoint`` (and as ``base_checkpoint``, where a fine-tuned model's base is looked for
when the path recorded in it is not on this machine).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

CHECKPOINT_ENV = "CALSEG_SAM2_CHECKPOINT"
FINETUNE_FORMAT = "calseg-sam2-finetune"
RANDOM_INIT_SEED = 0
KNOWN_CONFIGS = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_t": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_s": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_b+": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_l": "configs/sam2/sam2_hiera_l.yaml",
    "sam2_small_calseg": "configs/sam2.1/sam2.1_hiera_t.yaml",  # + _SMALL_OVERRIDES
}
# CalSeg's own reduced configs: a packaged Hydra config plus overrides, so every module is the
# sam2 package's own (Hiera trunk, FPN neck, SAM prompt encoder / mask decoder, memory
# attention and encoder), only narrower and shallower. ``sam2_small_calseg``: Hiera with
# embed_dim 16 (stages 16/32/64/128 channels, 1-1-2-1 blocks, global attention in block 3),
# neck and decoder width 64 instead of 256 (the decoder's design -- two-way transformer of
# depth 2, 4 mask tokens, IoU and object-score heads, conv_s0/conv_s1 high-resolution skips
# -- is unchanged; SAM2Base fixes its MLP width 2048), memory attention of 1 layer
# (feed-forward 128) and a 16-channel memory encoder, so the whole model is ~1.2 M parameters
# (sam2.1_hiera_t: 39 M) and its checkpoint fits in a few MB.
_SMALL_OVERRIDES = [
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[8,4,8,4]",
    "++model.image_encoder.neck.d_model=64",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=64",
    "++model.memory_attention.d_model=64",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=64",
    "++model.memory_attention.layer.dim_feedforward=128",
    "++model.memory_attention.layer.self_attention.embedding_dim=64",
    "++model.memory_attention.layer.cross_attention.embedding_dim=64",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.in_dim=64",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.mask_downsampler.embed_dim=64",
    "++model.memory_encoder.fuser.layer.dim=64",
    "++model.memory_encoder.fuser.num_layers=1",
    "++model.num_maskmem=3",
]
SMALL_CONFIG = "sam2_small_calseg"
# the input side it was trained at: 128 px simulated frames upsampled 4x, so a cell (~11 px)
# spans ~3 encoder tokens of 16 px and ~11 cells of the S/4 mask grid (at 128, scale 1, a
# cell fell inside one 16 px token and training stalled: validation IoU 0.06 after 400 steps;
# at 256 the decoder did not beat a disc prior, scripts/decoder_vs_disc.py)
SMALL_IMAGE_SIZE = 512
BUNDLED_SMALL_CHECKPOINT = Path(__file__).resolve().parent / "weights" / f"{SMALL_CONFIG}.pt"
"""The small SAM2 trained here from random weights on simulated videos (``calseg pretrain``;
provenance and held-out scores in its ``metadata["pretrain"]``). Not Meta's weights."""
DERIVED_CONFIGS: dict[str, tuple[str, list[str]]] = {
    SMALL_CONFIG: ("sam2.1_hiera_t", _SMALL_OVERRIDES),
}
# Same post-processing overrides as sam2.build_sam.build_sam2(apply_postprocessing=True).
_POSTPROCESS_OVERRIDES = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
]


class ModelLoadError(ValueError):
    """Raised when a SAM2 model or checkpoint cannot be loaded as asked."""


class ChecksumMismatchError(ModelLoadError):
    """Raised when a checkpoint's SHA-256 differs from the expected one."""


@dataclass
class ModelInfo:
    """Provenance of a loaded model (stored with every result that used it)."""

    config: str
    image_size: int
    checkpoint: str | None
    checkpoint_sha256: str | None
    random_weights: bool
    device: str
    n_parameters: int
    finetuned_from: str | None = None
    encoder_sha256: str | None = None
    hub_id: str | None = None
    train_mode: str | None = None  # fine-tuned checkpoints: "decoder", "lora" or "full"
    multimask_output: bool | None = None  # how a fine-tuned decoder was trained (None: base)
    # fine-tuned with a disc prior (run_decoder's prior_radius): its radius in model px
    prior_radius: float | None = None
    prior_mode: str | None = None  # "residual", "prompt" or "disc" (the disc alone)
    # the same radius in the training recordings' frame px (None: not recorded, older files)
    prior_radius_frame_px: float | None = None
    # fine-tuned checkpoints: the training step the weights are from; 0 = no step improved on
    # the initial model, so these are the base's weights (calseg.segment.choice.LABEL_KEPT)
    finetune_step: int | None = None

    def to_dict(self) -> dict:
        """JSON-able dict of all fields."""
        return asdict(self)


@dataclass
class LoadedSAM2:
    """A SAM2 model (``sam2.modeling.sam2_base.SAM2Base``, eval mode) and its provenance."""

    model: torch.nn.Module
    info: ModelInfo


def default_base_checkpoint(configured: str | Path | None) -> str | Path | None:
    """The SAM2 base a server or the demo uses: the ``configured`` checkpoint (e.g. Meta's
    ``sam2.1_hiera_tiny.pt`` via ``$CALSEG_SAM2_CHECKPOINT``) when there is one, else the
    small SAM2 trained here (:data:`BUNDLED_SMALL_CHECKPOINT`) when the file is present, else
    ``None`` (random weights)."""
    if configured is not None and str(configured) != "":
        return configured
    return BUNDLED_SMALL_CHECKPOINT if BUNDLED_SMALL_CHECKPOINT.is_file() else None


def resolve_config(config: str) -> tuple[str, str]:
    """Config name -> ``(short_name, hydra_config_path)``.

    Accepts ``"sam2.1_hiera_t"``, ``"sam2.1_hiera_t.yaml"`` or
    ``"configs/sam2.1/sam2.1_hiera_t.yaml"``, and CalSeg's derived configs
    (:data:`DERIVED_CONFIGS`, e.g. ``"sam2_small_calseg"``), whose path is their packaged
    parent's (the overrides are applied by :func:`build_sam2_model`).

    Raises:
        ModelLoadError: for unknown names (the message lists the known ones).
    """
    name = Path(str(config)).name
    if name.endswith(".yaml"):
        name = name[: -len(".yaml")]
    if name in DERIVED_CONFIGS:
        return name, KNOWN_CONFIGS[DERIVED_CONFIGS[name][0]]
    if name not in KNOWN_CONFIGS:
        raise ModelLoadError(
            f"unknown SAM2 config {config!r}; choose one of "
            f"{sorted([*KNOWN_CONFIGS, *DERIVED_CONFIGS])}"
        )
    return name, KNOWN_CONFIGS[name]


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; other values are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available here")
    return device


def file_sha256(path: Path | str, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def set_torch_threads() -> int:
    """Use all CPU cores this process may run on (``os.sched_getaffinity``) for torch ops.

    Returns the thread count set.
    """
    import torch

    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    n = max(1, n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def build_sam2_model(config: str, image_size: int) -> torch.nn.Module:
    """Instantiate a SAM2 model from a packaged config with deterministic random weights.

    Random initialisation is seeded (:data:`RANDOM_INIT_SEED`) inside a forked RNG, so two
    random-weight models are identical: a fine-tuned checkpoint made on a random-weight base
    can be re-attached to the same frozen encoder later.
    """
    import torch
    from hydra.utils import instantiate

    if image_size % 32 or image_size < 64:
        raise ModelLoadError(f"image_size must be a multiple of 32 and >= 64, got {image_size}")
    cfg = compose_sam2_config(config, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = instantiate(cfg.model, _recursive_=True)
    return model


def compose_sam2_config(config: str, image_size: int, extra: Sequence[str] = ()) -> Any:
    """The resolved Hydra config of a packaged or derived SAM2 ``config`` at ``image_size``:
    SAM2's post-processing settings, a derived config's own overrides
    (:data:`DERIVED_CONFIGS`) and ``extra`` overrides last. The one place a model's
    architecture is composed, for the image model and the video predictor alike (the video
    predictor composed the packaged config without the derived overrides, so CalSeg's small
    SAM2 never loaded into it: a tenth attack run)."""
    import sam2  # noqa: F401  (initialises Hydra with the sam2 config module)
    from hydra import compose
    from omegaconf import OmegaConf

    short, cfg_path = resolve_config(config)
    derived = DERIVED_CONFIGS.get(short, ("", []))[1]
    overrides = [
        f"++model.image_size={int(image_size)}",
        *_POSTPROCESS_OVERRIDES,
        *derived,
        *extra,
    ]
    cfg = compose(config_name=cfg_path, overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def encoder_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the state-dict entries that define the cached image features (frozen).

    The image encoder, ``no_mem_embed`` and the mask decoder's ``conv_s0``/``conv_s1``
    (applied inside ``forward_image``; see :mod:`calseg.segment.embeddings`).
    """
    names = []
    for k in model.state_dict():
        if (
            k.startswith("image_encoder.")
            or k == "no_mem_embed"
            or k.startswith("sam_mask_decoder.conv_s0.")
            or k.startswith("sam_mask_decoder.conv_s1.")
        ):
            names.append(k)
    return sorted(names)


def compute_encoder_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the frozen encoder's weights (names, shapes and float32 bytes)."""
    sd = model.state_dict()
    h = hashlib.sha256()
    for k in encoder_parameter_names(model):
        t = sd[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()


def encoder_hash(loaded: LoadedSAM2) -> str:
    """The loaded model's encoder hash (computed once, stored in ``info.encoder_sha256``)."""
    if loaded.info.encoder_sha256 is None:
        loaded.info.encoder_sha256 = compute_encoder_hash(loaded.model)
    return loaded.info.encoder_sha256


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Prompt-encoder and mask-decoder parameters that fine-tuning trains (not conv_s0/s1)."""
    frozen = set(encoder_parameter_names(model))
    return [
        n
        for n, _ in model.named_parameters()
        if (n.startswith("sam_prompt_encoder.") or n.startswith("sam_mask_decoder."))
        and n not in frozen
    ]


HUB_PREFIX = "hf:"


def resolve_hub_checkpoint(hub_id: str) -> tuple[str, Path]:
    """``"hf:<repo id>"`` -> ``(config short name, local checkpoint path)`` via the hub cache.

    Raises:
        ModelLoadError: unknown id, ``huggingface_hub`` missing, or the download failed
            (offline machine); the message says how to load a local file instead.
    """
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    repo = hub_id[len(HUB_PREFIX) :] if hub_id.startswith(HUB_PREFIX) else hub_id
    if repo not in HF_MODEL_ID_TO_FILENAMES:
        raise ModelLoadError(
            f"unknown SAM2 hub id {repo!r}; known: {sorted(HF_MODEL_ID_TO_FILENAMES)}"
        )
    cfg_path, filename = HF_MODEL_ID_TO_FILENAMES[repo]
    offline_hint = (
        f"download {filename} from https://huggingface.co/{repo} on a machine with internet, "
        f"copy it here and pass its path (or set ${CHECKPOINT_ENV})"
    )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelLoadError(
            f"loading hub id {repo!r} needs the huggingface_hub package and internet access, "
            f"neither of which this machine has; {offline_hint}"
        ) from None
    try:
        local = hf_hub_download(repo_id=repo, filename=filename)
    except Exception as exc:  # offline, proxy, missing file: all end the same way
        raise ModelLoadError(
            f"could not fetch {filename} of {repo!r} from the hub ({type(exc).__name__}: "
            f"{exc}); {offline_hint}"
        ) from exc
    return resolve_config(cfg_path)[0], Path(local)


def _load_full_state_dict(model: torch.nn.Module, sd: dict, path: Path) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {path} does not fit this SAM2 config: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); "
            "pass the config the checkpoint was trained with"
        )


def checkpoint_run_shape(checkpoint: str | Path | None) -> tuple[str, int] | None:
    """``(config, image size)`` a CalSeg checkpoint (fine-tuned or trained here, e.g. the
    bundled small SAM2) runs at whatever model and size are asked (it runs as trained:
    :func:`load_sam2`); ``None`` for Meta's checkpoints (they run at the size asked), for none,
    or for a file that cannot be read. Read from the file's metadata with its tensors mapped,
    not loaded; cached by path and modification time."""
    if checkpoint is None or str(checkpoint) == "":
        return None
    path = Path(checkpoint).expanduser()
    try:
        return _run_shape(str(path), path.stat().st_mtime_ns)
    except (OSError, ModelLoadError):
        return None


@functools.lru_cache(maxsize=16)
def _run_shape(path: str, _mtime_ns: int) -> tuple[str, int] | None:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != FINETUNE_FORMAT:
        return None
    meta = obj.get("metadata")
    try:
        return resolve_config(str(meta["config"]))[0], int(meta["image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"checkpoint {path} has no usable metadata: {exc}") from exc


def _unpickling_detail(exc: BaseException) -> str:
    """What torch's refusal of a checkpoint says about the file, without its advice to load
    it again with ``weights_only=False`` (which runs the code a hostile file holds) or to
    allow-list what it refused: the line after "WeightsUnpickler error:", else the lines
    that give no such advice."""
    import pickle
    import re

    text = str(exc)
    if isinstance(exc, EOFError) or not text:
        return "the file is empty or cut short"
    if not isinstance(exc, pickle.UnpicklingError) or "weights_only" not in text:
        return text
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    if "WeightsUnpickler error:" in text:
        tail = text.split("WeightsUnpickler error:", 1)[1]
        keep = [ln.strip() for ln in tail.splitlines() if ln.strip()][:1]
        keep = [k.split(" Please use", 1)[0] for k in keep]  # its advice to allow-list
    else:
        keep = [
            ln.strip()
            for ln in text.splitlines()[1:]
            if ln.strip()
            and not any(
                w in ln for w in ("weights_only", "Please file", "Check the documentation", "trust")
            )
        ]
    detail = "; ".join(keep) or "not a PyTorch checkpoint"
    return (
        f"{detail} (CalSeg loads only tensors and plain data from a checkpoint, never code; "
        "this file holds something else or is not a PyTorch file)"
    )


def _torch_load(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read checkpoint {path}: {_unpickling_detail(exc)}") from exc
    if not isinstance(obj, dict):
        raise ModelLoadError(f"checkpoint {path} is not a dict (got {type(obj).__name__})")
    return obj


def load_sam2(
    config: str = "sam2.1_hiera_t",
    checkpoint: str | Path | None = None,
    *,
    image_size: int = 512,
    device: str = "auto",
    expected_sha256: str | None = None,
    base_checkpoint: str | Path | None = None,
) -> LoadedSAM2:
    """Build SAM2 and load weights (see module docstring for the accepted checkpoints).

    Args:
        config: config name, e.g. ``"sam2.1_hiera_t"`` (39 M parameters).
        checkpoint: full SAM2 checkpoint, CalSeg fine-tuned checkpoint or hub id
            ``"hf:facebook/sam2.1-hiera-tiny"`` (online machines only); ``None``: random
            weights (warning). The environment is not read (the caller passes the configured
            checkpoint, here and as ``base_checkpoint``).
        image_size: model input side in px (multiple of 32). A fine-tuned checkpoint's own
            config and image size win (with a warning when they differ from the arguments).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        expected_sha256: when given, the checkpoint file's SHA-256 must match.
        base_checkpoint: for a fine-tuned ``checkpoint``, where else its base SAM2 checkpoint
            may be (the configured one) when the path recorded in it is not on this machine
            (:func:`base_candidates`); its SHA-256 must equal the recorded one.

    Returns:
        :class:`LoadedSAM2` in eval mode on ``device``.

    Raises:
        ModelLoadError / ChecksumMismatchError: missing file, bad checksum, wrong config.
    """
    set_torch_threads()
    dev = resolve_device(device)
    short, _ = resolve_config(config)
    hub_id = None
    if checkpoint is not None and str(checkpoint).startswith(HUB_PREFIX):
        hub_id = str(checkpoint)
        short, checkpoint = resolve_hub_checkpoint(hub_id)
    sha = None
    base: LoadedSAM2 | None = None
    train_mode = None
    multimask = None
    prior_radius = prior_mode = prior_radius_frame = None
    finetuned_from = None
    finetune_step = None
    random_weights = False
    if checkpoint is None:
        model = build_sam2_model(short, image_size)
        random_weights = True
        log.warning(
            "!!! SAM2 %s has RANDOM WEIGHTS: no checkpoint given (nor $%s). Masks from "
            "this model are meaningless; pass a local SAM2 checkpoint (e.g. "
            "sam2.1_hiera_tiny.pt) or a CalSeg fine-tuned checkpoint. !!!",
            short,
            CHECKPOINT_ENV,
        )
    else:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ModelLoadError(
                f"SAM2 checkpoint {path} not found; weights cannot be downloaded here, put the "
                f"file on disk and pass its path (or set ${CHECKPOINT_ENV})"
            )
        sha = file_sha256(path)
        if expected_sha256 is not None and sha.lower() != expected_sha256.lower():
            raise ChecksumMismatchError(
                f"checkpoint {path} has SHA-256 {sha}, expected {expected_sha256}; "
                "the file is corrupt or a different model"
            )
        obj = _torch_load(path)
        if obj.get("format") == FINETUNE_FORMAT:
            meta = obj["metadata"]
            ck_short, ck_size = meta["config"], int(meta["image_size"])
            if (ck_short, ck_size) != (short, image_size):
                # not a warning: the model setting (often just its default) cannot apply to a
                # checkpoint trained as another architecture (a new-user check read "instead
                # of the requested sam2.1_hiera_t" as something they had done wrong)
                log.info(
                    "fine-tuned checkpoint %s runs as it was trained: %s at image_size %d (the "
                    "model setting %s / %d applies to base checkpoints only)",
                    path.name,
                    ck_short,
                    ck_size,
                    short,
                    image_size,
                )
            short, image_size = resolve_config(ck_short)[0], ck_size
            base = _load_base_for_finetune(meta, short, image_size, base_checkpoint, path)
            model = base.model
            expected = meta.get("encoder_sha256")  # the BASE encoder it was trained from
            if expected and encoder_hash(base) != expected:
                raise ModelLoadError(
                    f"fine-tuned checkpoint {checkpoint} was trained on a different image "
                    f"encoder (hash {expected[:12]}...) than the base loaded now "
                    f"({base.info.encoder_sha256[:12]}...); point ${CHECKPOINT_ENV} at its base "
                    "checkpoint"
                )
            model.sam_prompt_encoder.load_state_dict(obj["sam_prompt_encoder"])
            model.sam_mask_decoder.load_state_dict(obj["sam_mask_decoder"])
            _apply_finetuned_encoder(model, obj, path)
            train_mode = meta.get("train_mode", "decoder")
            # a base trained in full mode (every weight image segmentation uses) has no
            # random weight left, even when its training started from random init
            random_weights = base.info.random_weights and train_mode != "full"
            finetuned_from = base.info.checkpoint or f"random-init(seed={RANDOM_INIT_SEED})"
            if meta.get("pretrain"):  # a base trained here from scratch (calseg pretrain)
                finetuned_from = None
            elif isinstance(meta.get("step"), int):
                finetune_step = int(meta["step"])
            # checkpoints written before the option existed were trained best-of-3
            multimask = bool(meta.get("finetune_config", {}).get("multimask_output", True))
            prior = meta.get("mask_prior") or {}
            prior_radius = prior.get("radius_model_px")
            prior_mode = prior.get("mode")
            if prior_radius:  # older files: the training cells' mean radius (same videos)
                prior_radius_frame = (
                    prior.get("radius_frame_px") or meta.get("disc_prior_radius_px") or None
                )
            if random_weights:
                log.warning(
                    "fine-tuned checkpoint %s was trained on a RANDOM-WEIGHT image encoder; "
                    "its masks are only as good as such an encoder allows",
                    path,
                )
        elif "model" in obj and isinstance(obj["model"], dict):
            model = build_sam2_model(short, image_size)
            _load_full_state_dict(model, obj["model"], path)
        else:
            raise ModelLoadError(
                f"{path} is neither a SAM2 checkpoint ({{'model': state_dict}}) nor a CalSeg "
                f"fine-tuned checkpoint (format {FINETUNE_FORMAT!r}); keys: {sorted(obj)[:8]}"
            )
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = ModelInfo(
        config=short,
        image_size=int(image_size),
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        checkpoint_sha256=sha,
        random_weights=random_weights,
        device=dev,
        n_parameters=int(sum(p.numel() for p in model.parameters())),
        finetuned_from=finetuned_from,
        multimask_output=multimask,
        prior_radius=prior_radius,
        prior_mode=prior_mode,
        prior_radius_frame_px=prior_radius_frame,
        finetune_step=finetune_step,
        hub_id=hub_id,
        train_mode=train_mode,
    )
    loaded = LoadedSAM2(model=model, info=info)
    if train_mode in (None, "decoder") and base is not None:
        loaded.info.encoder_sha256 = base.info.encoder_sha256  # same frozen encoder
    return loaded


def _apply_finetuned_encoder(model: torch.nn.Module, obj: dict, path: Path) -> None:
    """Apply a fine-tuned checkpoint's encoder change: LoRA factors (merged into the
    weights) or a full image-encoder state dict. Decoder-only checkpoints have none."""
    enc = obj.get("encoder")
    if not enc:
        return
    kind = enc.get("kind")
    if kind == "lora":
        from calseg.segment.lora import load_lora

        try:
            load_lora(model, enc["state"], int(enc["rank"]), float(enc["alpha"]))
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
    elif kind == "full":
        import torch

        missing, unexpected = model.image_encoder.load_state_dict(enc["state"], strict=False)
        if missing or unexpected:
            raise ModelLoadError(
                f"{path}: image-encoder weights do not fit this config ({len(missing)} missing, "
                f"{len(unexpected)} unexpected keys)"
            )
        if "no_mem_embed" in enc:  # trained with the encoder (checkpoints since issue 14)
            with torch.no_grad():
                model.no_mem_embed.copy_(enc["no_mem_embed"].to(model.no_mem_embed.dtype))
    else:
        raise ModelLoadError(f"{path}: unknown fine-tuned encoder kind {kind!r}")


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:  # noqa: ARG001 - cache key
    return file_sha256(path)


def _sha256_now(path: Path) -> str:
    """:func:`file_sha256` of ``path``, cached per path, size and modification time."""
    st = path.stat()
    return _cached_sha256(str(path.resolve()), st.st_mtime_ns, st.st_size)


def base_candidates(
    recorded: str, finetuned: Path | None, fallback: str | Path | None
) -> list[Path]:
    """Where a fine-tuned checkpoint's base may be, in order: the ``recorded`` path as given,
    relative to the repository, beside the fine-tuned file ``finetuned`` (copied together),
    in the bundled weights folder (by file name) and the caller's ``fallback`` (the
    configured base, ``$CALSEG_SAM2_CHECKPOINT`` as the CLI and the service read it). The
    service records the base without its server folder (:func:`rewrite_checkpoint_metadata`),
    so a recorded name alone must still find it: a fresh clone's ``make demo`` failed at its
    first infer job when only the recorded path and the repository were looked in (a
    new-user check)."""
    name = Path(recorded).name
    out = [Path(recorded).expanduser()]
    if not Path(recorded).is_absolute():
        out.append(Path(__file__).resolve().parents[2] / recorded)
    if finetuned is not None:
        out.append(finetuned.parent / name)
    out.append(BUNDLED_SMALL_CHECKPOINT.parent / name)
    if fallback is not None and not str(fallback).startswith(HUB_PREFIX):
        out.append(Path(fallback).expanduser())
    return list(dict.fromkeys(out))  # in order, once each


def _load_base_for_finetune(
    meta: dict,
    short: str,
    image_size: int,
    fallback: str | Path | None,
    finetuned: Path | None = None,
) -> LoadedSAM2:
    """Load the base model a fine-tuned checkpoint was trained from (encoder weights): the
    first of :func:`base_candidates` that is a file with the recorded SHA-256 (any file when
    none was recorded).

    Raises:
        ModelLoadError: no candidate is the base; says where it looked and what it found.
    """
    base = meta.get("base_checkpoint")
    base_sha = meta.get("base_checkpoint_sha256")
    if base is None:
        return _load_plain(short, None, image_size, None)
    other = []
    for cand in base_candidates(str(base), finetuned, fallback):
        if not cand.is_file():
            continue
        if base_sha is None or _sha256_now(cand).lower() == str(base_sha).lower():
            return _load_plain(short, cand, image_size, base_sha)
        other.append(cand.name)
    found = f"; found {', '.join(other)} with another SHA-256" if other else ""
    raise ModelLoadError(
        f"the base SAM2 checkpoint {Path(str(base)).name} of this fine-tuned model is not on "
        f"this machine (looked where it was recorded, beside the fine-tuned file, in CalSeg's "
        f"weights folder and at the configured checkpoint{found}); copy it beside the "
        f"fine-tuned file or set ${CHECKPOINT_ENV} to it (SHA-256 {base_sha})"
    )


def _load_plain(short: str, path: Path | None, image_size: int, sha: str | None) -> LoadedSAM2:
    """A base model (``path`` None: random weights, no env involved) on the CPU."""
    with _quiet_random_warning(path is None):
        return load_sam2(short, path, image_size=image_size, device="cpu", expected_sha256=sha)


class _quiet_random_warning:
    """Silence the random-weights warning while loading a fine-tune's random base (the
    caller warns once itself)."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __enter__(self) -> None:
        if self.active:
            self._level = log.level
            log.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            log.setLevel(self._level)


def save_finetuned_checkpoint(
    loaded: LoadedSAM2,
    path: Path | str,
    metadata: dict,
    extra: dict | None = None,
    *,
    encoder: dict | None = None,
) -> Path:
    """Write a small CalSeg fine-tuned checkpoint: prompt encoder + mask decoder weights only.

    Args:
        loaded: the model being fine-tuned (its ``info`` names the base).
        path: output ``.pt`` path (written atomically).
        metadata: extra provenance (training config, step, val IoU...); ``config``,
            ``image_size``, ``base_checkpoint``, ``base_checkpoint_sha256`` and
            ``encoder_sha256`` are filled in from ``loaded``.
        extra: optional additional top-level entries (e.g. optimiser state for resuming).
        encoder: for LoRA / full fine-tuning, ``{"kind": "lora", "state": factors, "rank",
            "alpha"}`` or ``{"kind": "full", "state": image_encoder state dict}``.
            ``metadata["encoder_sha256"]`` is then the BASE encoder's hash (the one the
            loader checks before applying the change); pass it in ``metadata``.

    Returns:
        The path written. Its SHA-256 is written next to it (``<path>.sha256``, the
        ``sha256sum`` format) so a model is identified by content.
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = loaded.info
    base_ckpt = info.finetuned_from if info.finetuned_from is not None else info.checkpoint
    base_sha = None if info.finetuned_from is not None else info.checkpoint_sha256
    if info.train_mode in ("full", "lora"):  # its encoder lives in that checkpoint: the base
        base_ckpt, base_sha = info.checkpoint, info.checkpoint_sha256
    if base_ckpt is not None and base_ckpt.startswith("random-init"):
        base_ckpt = None
    meta = dict(metadata)
    meta.update(
        config=info.config,
        image_size=info.image_size,
        base_checkpoint=base_ckpt,
        base_checkpoint_sha256=base_sha,
        base_random_weights=info.random_weights,
    )
    meta.setdefault("encoder_sha256", encoder_hash(loaded))
    obj = {
        "format": FINETUNE_FORMAT,
        "version": 1,
        "metadata": meta,
        "sam_prompt_encoder": {
            k: v.detach().cpu() for k, v in loaded.model.sam_prompt_encoder.state_dict().items()
        },
        "sam_mask_decoder": {
            k: v.detach().cpu() for k, v in loaded.model.sam_mask_decoder.state_dict().items()
        },
    }
    if encoder:
        obj["encoder"] = encoder
    if extra:
        obj.update(extra)
    return _write_checkpoint(obj, path)


def _write_checkpoint(obj: dict, path: Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, with its SHA-256 next to it
    (``<path>.sha256``, the ``sha256sum`` format)."""
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    sha_file = path.with_name(path.name + ".sha256")
    sha_tmp = sha_file.with_name(sha_file.name + ".tmp")
    sha_tmp.write_text(f"{file_sha256(path)}  {path.name}\n")
    os.replace(sha_tmp, sha_file)
    return path


def rewrite_checkpoint_metadata(path: Path | str, rewrite: Callable[[Any], Any]) -> Path:
    """Replace the ``metadata`` of a CalSeg fine-tuned checkpoint by ``rewrite(metadata)`` in
    place (atomically, its ``.sha256`` renewed); the weights are unchanged. The service
    passes :func:`calseg.service.context.public_data`, so a checkpoint its users download
    names no server folder (an 11th attack run found the dataset and base paths in
    ``checkpoint.pt``); :func:`_load_base_for_finetune` finds a base named relative to the
    repository or falls back to the configured checkpoint, checked by its SHA-256."""
    path = Path(path)
    obj = _torch_load(path)
    obj["metadata"] = rewrite(obj.get("metadata") or {})
    return _write_checkpoint(obj, path)


def run_decoder(
    model: torch.nn.Module,
    image_embed: torch.Tensor,
    high_res_feats: list[torch.Tensor],
    coords: torch.Tensor,
    labels: torch.Tensor,
    *,
    multimask_output: bool = True,
    stability_fallback: bool = False,
    prior_radius: float | None = None,
    prior_mode: str | None = "residual",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder on cached features, as ``SAM2ImagePredictor._predict``.

    Differentiable (no ``no_grad`` here), so fine-tuning and inference share it.

    With ``multimask_output=False`` the decoder returns its single-mask token (output 0).
    SAM2's post-processing option ``dynamic_multimask_via_stability`` would, in eval mode
    only, swap that output for the best of the three multimask outputs when it is unstable;
    that makes evaluation differ from training (the three multimask outputs of a model trained
    in single-output mode are untrained), so it is off unless ``stability_fallback`` is True.

    Args:
        model: SAM2Base.
        image_embed: ``(1 or B, 256, S/16, S/16)`` float32 (1 = shared by all prompts).
        high_res_feats: ``[feat_s0 (1|B, 32, S/4, S/4), feat_s1 (1|B, 64, S/8, S/8)]``.
        coords: ``(B, N, 2)`` float32 point coordinates (x, y) in model pixels.
        labels: ``(B, N)`` int (1 positive, 0 negative, -1 padding).
        multimask_output: three candidate masks per prompt (SAM's ambiguity-aware output).
        prior_radius: a disc prior of this radius (model px) at each prompt's first positive
            point (:func:`disc_prior_logits`), used as ``prior_mode`` says: ``"residual"``
            adds its logits to the decoder's (the decoder learns a correction of the disc),
            ``"prompt"`` feeds them to the prompt encoder as SAM's mask input (dense prompt,
            as micro-sam's iterative prompting feeds back the previous logits), ``"disc"``
            returns the disc alone (no image: the reference a trained decoder must beat; IoU
            predictions 1, object scores :data:`PRIOR_CLIP`). ``None``: no prior. Fine-tuned
            checkpoints record both (``loaded.info.prior_radius/mode``).

    Returns:
        ``(low_res_logits (B, C, S/4, S/4), iou_pred (B, C), object_score_logits (B, 1))``
        with C = 3 (multimask) or 1.
    """
    prior = None
    if prior_radius is not None and prior_mode in ("residual", "prompt", "disc"):
        low = 4 * model.sam_prompt_encoder.image_embedding_size[0]  # S/4
        prior = disc_prior_logits(coords, labels, low, float(prior_radius), stride=4.0)
    if prior is not None and prior_mode == "disc":  # the no-image reference: no decoder call
        import torch

        n_out = 3 if multimask_output else 1
        b = coords.shape[0]
        return (
            prior.expand(b, n_out, low, low).contiguous(),
            torch.ones(b, n_out, device=coords.device),
            torch.full((b, 1), PRIOR_CLIP, device=coords.device),
        )
    masks = prior if prior_mode == "prompt" else None
    sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=masks)
    b = coords.shape[0]
    shared = image_embed.shape[0] == 1 and b > 1
    decoder = model.sam_mask_decoder
    saved = getattr(decoder, "dynamic_multimask_via_stability", False)
    decoder.dynamic_multimask_via_stability = bool(saved and stability_fallback)
    try:
        low_res, iou_pred, _, obj = decoder(
            image_embeddings=image_embed,
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=shared,
            high_res_features=high_res_feats,
        )
    finally:
        decoder.dynamic_multimask_via_stability = saved
    if prior is not None and prior_mode == "residual":
        low_res = low_res + prior.to(low_res.dtype)
    return low_res, iou_pred, obj


PRIOR_GAIN = 2.0
"""Logit per low-res pixel of signed distance to the disc's edge (a 2-px-wide soft edge)."""
PRIOR_CLIP = 8.0
"""The prior's logits are clipped to +-this (sigmoid(8) = 0.9997)."""


def inference_prior_radius(
    info: ModelInfo, scale: float, cell_diameter_px: float | None = None
) -> float | None:
    """Radius (model px) of the disc prior for a recording shown to the model at ``scale``
    model px per frame px (:attr:`calseg.segment.embeddings.FrameGeometry.scale`).

    The disc stands for a cell of the recording, so its size is kept in frame px: half the
    given ``cell_diameter_px`` (the user's override), else the training cells' mean radius
    in frame px (``info.prior_radius_frame_px``), times ``scale``. A recording of the training
    size gives back ``info.prior_radius`` exactly; a 256 px recording at 512 px gets half the
    model-px disc of a 128 px one, as its cells are half as large in model px. None without a
    prior; ``info.prior_radius`` unchanged for checkpoints that record no frame-px radius.
    """
    if info.prior_radius is None:
        return None
    if cell_diameter_px is not None:
        return float(cell_diameter_px) / 2.0 * float(scale)
    if info.prior_radius_frame_px:
        return float(info.prior_radius_frame_px) * float(scale)
    return float(info.prior_radius)


def disc_prior_logits(
    coords: torch.Tensor, labels: torch.Tensor, size: int, radius: float, *, stride: float = 4.0
) -> torch.Tensor:
    """Mask logits of a disc of ``radius`` model px at each prompt's first positive point.

    Args:
        coords: ``(B, N, 2)`` float points (x, y) in model px; labels: ``(B, N)`` (1 positive).
        size: side of the logit grid (the decoder's S/4); stride: model px per grid pixel.
        radius: disc radius in model px (the training cells' mean radius).

    Returns:
        ``(B, 1, size, size)`` float32: ``PRIOR_GAIN x (radius - distance) / stride`` at the
        grid pixels' centres, clipped to ``+-PRIOR_CLIP``; a prompt without a positive point
        (a box alone) gets 0 (no prior).
    """
    import torch

    pos = labels == 1
    has = pos.any(dim=1)
    first = pos.float().argmax(dim=1)
    ar = torch.arange(coords.shape[0], device=coords.device)
    xy = coords[ar, first].float() + 0.5  # (B, 2); SAM shifts points to pixel centres
    centres = (torch.arange(size, device=coords.device, dtype=torch.float32) + 0.5) * stride
    dx = centres[None, None, :] - xy[:, 0, None, None]
    dy = centres[None, :, None] - xy[:, 1, None, None]
    dist = torch.sqrt(dx**2 + dy**2)
    logits = (PRIOR_GAIN * (radius - dist) / stride).clamp(-PRIOR_CLIP, PRIOR_CLIP)
    return (logits * has[:, None, None].float())[:, None]
