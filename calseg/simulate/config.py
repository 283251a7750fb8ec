"""Validated configuration of a simulated dataset (`SimulationConfig`).

Every field has bounds, so the API can answer an invalid request with a clear 422.
The whole config is stored in the dataset manifest; the same config regenerates the dataset
bit-identically (:func:`calseg.simulate.dataset.simulate_dataset`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from calseg.fmt import first_of
from calseg.simulate.geometry import MAX_CELLS, MIN_CELLS, estimate_n_cells
from calseg.simulate.model import ModelParameters
from calseg.simulate.render import DEFECTS

PatternClassName = Literal["spikes", "transients", "waves", "fluttering"]
IndicatorName = Literal["GCaMP6s", "GCaMP6f", "GCaMP6m"]


class ImagingOverrides(BaseModel):
    """Imaging parameters pinned to given values instead of drawn at random per video.

    Every field is optional; ``None`` keeps the renderer's random draw
    (:func:`calseg.simulate.render.render_video`). :func:`calseg.simulate.fit.fit_recording`
    fills these from a real recording ("simulate like this recording"). The renderer still
    makes every random draw it would make otherwise and then replaces the value, so a config
    without overrides renders exactly as before.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    gain_adu_per_e: float | None = Field(
        None, gt=0, le=1000, description="camera gain (ADU per photo-electron)"
    )
    offset_adu: float | None = Field(None, ge=0, le=65535, description="camera offset (ADU)")
    read_noise_e: float | None = Field(
        None, ge=0, le=1000, description="Gaussian read noise (photo-electrons rms)"
    )
    adc_bits: Literal[12, 16] | None = Field(None, description="ADC range for 16-bit output")
    photon_scale_e: float | None = Field(
        None, gt=0, le=1e7, description="photo-electrons per px of an indicator at Fmax"
    )
    background: float | None = Field(
        None, ge=0, le=10, description="uniform background light (fraction of photon_scale_e)"
    )
    autofluorescence: float | None = Field(
        None, ge=0, le=10, description="tissue autofluorescence (fraction of photon_scale_e)"
    )
    vignetting: float | None = Field(
        None, ge=0, le=0.9, description="relative light fall-off at the frame corners"
    )
    psf_sigma_px: float | None = Field(None, gt=0, le=50, description="Gaussian PSF sigma (px)")
    bleach_tau_s: float | None = Field(
        None, gt=0, le=1e12, description="photobleaching time constant (s); 1e12 = none"
    )
    fmin_over_fmax: float | None = Field(
        None, gt=0, lt=1, description="indicator Fmin / Fmax (1 / dynamic range)"
    )


class DefectSetting(BaseModel):
    """How one defect family is drawn (:func:`calseg.simulate.render.draw_severity`).

    Without a setting, the source's families are present in a video with probability
    ``defect_severity`` and then have severity ``defect_severity * U(0.5, 1)``; the global
    intensity changes (``illumination_flicker``, ``auto_gain``, ``contrast_normalisation``) are
    off. ``enabled: true`` draws a defect like the others; ``severity`` fixes it in every video;
    ``enabled: false`` removes it. Each defect's parameters and their sources are documented on
    its stage class in :mod:`calseg.simulate.render`.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool | None = Field(
        None, description="true: drawn like the others; false: never; null: the default"
    )
    severity: float | None = Field(
        None, ge=0, le=1, description="fixed severity in every video (null: drawn)"
    )

    @model_validator(mode="after")
    def _check(self) -> DefectSetting:
        if self.enabled is False and self.severity:
            raise ValueError("a disabled defect cannot have a severity > 0")
        return self


MAX_FRAMES = 5000
"""Most frames per simulated recording."""
MAX_SIDE_PX = 4096
"""Largest simulated frame side (px)."""
MAX_MODEL_TIME_S = 200000.0
"""Most model time per recording, ``n_frames * frame_interval_s`` (s; about 2.3 days)."""


class SimulationConfig(BaseModel):
    """Everything that defines a simulated dataset of GCaMP recordings of epithelial tissue."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_videos: int = Field(4, ge=1, le=1000, description="number of recordings (videos)")
    n_frames: int = Field(64, ge=2, le=MAX_FRAMES, description="frames per recording")
    height: int = Field(256, ge=32, le=MAX_SIDE_PX, description="frame height (px)")
    width: int = Field(256, ge=32, le=MAX_SIDE_PX, description="frame width (px)")
    pattern_classes: list[PatternClassName] = Field(
        default_factory=lambda: ["waves", "transients"],
        min_length=1,
        description="Ca2+ pattern classes (Vplc presets), cycled across videos",
    )
    indicator: IndicatorName = Field("GCaMP6s", description="genetically encoded Ca2+ indicator")
    frame_interval_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="time between frames (s); rounded to a multiple of dt_s by the integrator",
    )
    warmup_s: float = Field(
        300.0,
        ge=0,
        le=36000,
        description="model time (s) before the earliest allowed first frame (skips the start-up "
        "transient from c = p = 0)",
    )
    search_horizon_s: float = Field(
        3600.0,
        ge=0,
        le=36000,
        description="model time simulated (s, at least warm-up + recording); the recording "
        "window is placed inside it according to acquisition_window",
    )
    acquisition_window: Literal["activity", "fixed"] = Field(
        "activity",
        description="'activity': start the recording where the simulated tissue is most active "
        "(as an experimenter starts acquiring when activity is seen); 'fixed': start at "
        "warmup_s",
    )
    dt_s: float = Field(0.2, gt=0, le=2.0, description="integrator time step (s); published 0.2")
    integrator: Literal["euler", "imex"] = Field(
        "euler", description="'euler' (published) or 'imex' (semi-implicit, larger dt)"
    )
    defect_severity: float = Field(
        0.3, ge=0, le=1, description="global defect severity (0 = clean physics, 1 = all defects)"
    )
    bit_depth: Literal[8, 16] = Field(16, description="output bit depth (uint16 or uint8)")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="master random seed")
    n_val_videos: int = Field(1, ge=0, le=1000, description="videos in the validation split")
    n_test_videos: int = Field(1, ge=0, le=1000, description="videos in the test split")
    model_overrides: dict[str, float] = Field(
        default_factory=dict,
        description="overrides of calcium-model parameters (names of ModelParameters)",
    )
    mean_cell_area_px: float = Field(
        100.0, ge=10, le=10000, description="target mean cell area (px)"
    )
    tissue_shape: Literal["pouch", "rectangle"] = Field(
        "pouch", description="oval pouch (aspect 1.43) or the whole rectangular field"
    )
    outline_irregularity: float = Field(
        0.3, ge=0, le=1, description="0 = straight Voronoi edges, 1 = wavy star-convex outlines"
    )
    pixel_size_um: float = Field(0.5, gt=0, le=100, description="pixel size in the sample (um)")
    activity_threshold_uM: float = Field(
        0.1, gt=0, le=10, description="a cell is active when c > this (uM); source 0.1"
    )
    hysteresis_low_uM: float | None = Field(
        None, gt=0, le=10, description="optional hysteresis: active until c <= this (uM)"
    )
    defects: dict[str, DefectSetting] = Field(
        default_factory=dict,
        description='per-defect settings by name (e.g. {"auto_gain": {"enabled": true}} or '
        '{"drift": {"severity": 0}}); names: those of calseg.simulate.render.DEFECTS',
    )
    imaging: ImagingOverrides | None = Field(
        None,
        description="imaging parameters pinned instead of drawn per video (e.g. fitted to a "
        "real recording by calseg.simulate.fit); None = all drawn at random",
    )

    @model_validator(mode="after")
    def _check(self) -> SimulationConfig:
        if self.n_val_videos + self.n_test_videos >= self.n_videos:
            raise ValueError(
                f"n_val_videos ({self.n_val_videos}) + n_test_videos ({self.n_test_videos}) "
                f"must leave at least one training video out of n_videos ({self.n_videos})"
            )
        unknown = sorted(set(self.defects) - set(DEFECTS))
        if unknown:
            raise ValueError(
                f"unknown defect(s) {first_of([repr(u) for u in unknown])}; use names from "
                f"{list(DEFECTS)}"
            )
        try:
            self.model_parameters()
        except ValidationError as exc:  # one line per problem, not pydantic's dump with a URL
            problems = first_of(
                [
                    f"{'.'.join(map(str, e['loc']))}: "
                    + ("not a model parameter" if e["type"] == "extra_forbidden" else e["msg"])
                    for e in exc.errors(include_url=False)
                ],
                sep="; ",
            )
            raise ValueError(
                f"invalid model_overrides ({problems}); allowed keys: "
                f"{', '.join(sorted(ModelParameters.model_fields))}"
            ) from None
        except ValueError as exc:
            raise ValueError(
                f"invalid model_overrides: {exc}; allowed keys: "
                f"{', '.join(sorted(ModelParameters.model_fields))}"
            ) from exc
        n = estimate_n_cells(self.height, self.width, self.tissue_shape, self.mean_cell_area_px)
        if not MIN_CELLS <= n <= MAX_CELLS:
            raise ValueError(
                f"a {self.height}x{self.width} {self.tissue_shape} with mean_cell_area_px "
                f"{self.mean_cell_area_px:g} holds about {n} cells; it must hold "
                f"{MIN_CELLS}-{MAX_CELLS}: change height/width or mean_cell_area_px"
            )
        if self.hysteresis_low_uM is not None and (
            self.hysteresis_low_uM >= self.activity_threshold_uM
        ):
            raise ValueError("hysteresis_low_uM must be below activity_threshold_uM")
        if self.frame_interval_s < self.dt_s:
            raise ValueError(f"frame_interval_s must be >= dt_s ({self.dt_s} s)")
        if self.n_frames * self.frame_interval_s > MAX_MODEL_TIME_S:
            raise ValueError(
                f"n_frames * frame_interval_s must be at most {MAX_MODEL_TIME_S:.0f} s of "
                "model time"
            )
        return self

    def model_parameters(self) -> ModelParameters:
        """The calcium-model parameters with ``model_overrides`` applied."""
        return ModelParameters(**self.model_overrides)

    def pattern_class_of(self, video_index: int) -> str:
        """Pattern class of video ``video_index`` (classes cycle across videos)."""
        return self.pattern_classes[video_index % len(self.pattern_classes)]

    def split_of(self, video_index: int) -> str:
        """Split by video: the last ``n_test_videos`` are test, the ``n_val_videos`` before them
        val, the rest train."""
        n_test_start = self.n_videos - self.n_test_videos
        if video_index >= n_test_start:
            return "test"
        if video_index >= n_test_start - self.n_val_videos:
            return "val"
        return "train"
