"""Tissue calcium model of Soundararajan et al. 2021 (PLoS Comput Biol 17:e1009543).

Per cell ``i`` with ``L`` the edge-length-weighted graph Laplacian (``L_ii = -sum_j L_ij``)::

    dc/dt = Dc (L c)_i + [k1 (r c p / ((ka + c)(kp + p)))^3 + k2] (s - c)
            - Vserca c^2 / (c^2 + Kserca^2)
    dp/dt = Dp (L p)_i + Vplc_i c^2 / (c^2 + Kplc^2) - K5 p
    s     = (ctot - c) / beta
    dr/dt = ((ktau^4 + c^4) / (taumax ktau^4)) (1 - r (ki + c) / ki)

``c`` cytosolic Ca2+ (uM), ``p`` IP3 (uM), ``s`` ER Ca2+ (uM), ``r`` fraction of available
IP3 receptors. Parameter values: DESIGN.md section 2 (the source's Table 1).

Integrators (all vectorised over every cell of every tissue in a batch, keeping only the sampled
frames, so memory is O(cells x frames)):

* ``"euler"``: the published forward Euler scheme, ``dt = 0.2 s``.
* ``"imex"``: a faster semi-implicit scheme for larger steps (default ``dt = 0.5 s``): the
  Ca2+ exchange term is linear in ``c`` given the gating factor, so ``c`` is advanced with that
  linear part implicit (``c_new = (c + dt (rate*ctot/beta - pump + D L c)) / (1 + dt rate
  (1 + 1/beta))``), ``r`` with the exact exponential of its linear ODE (Rush-Larsen), ``p`` with
  forward Euler. Forward Euler is only stable for ``dt`` below about 0.28 s at the Ca2+ peaks
  (the stiffest rate is ``(1 + 1/beta) k1 ~ 7.1 /s``); the semi-implicit step is stable at
  ``dt = 0.5-1 s``. The SERCA pump is also semi-implicit (``pump = c * [Vserca c / (c^2 +
  Kserca^2)]`` with the bracket frozen). It is first order: single-cell periods (DESIGN.md
  section 2 protocol) are longer than the published Euler's by 1.7 / 1.7 / 3.8 / 5.6 % at
  Vplc 0.78 / 0.80 / 1.2 / 1.6 with ``dt = 0.5 s`` (bound checked in
  ``tests/test_simulate_model.py``: < 6 %), and by up to 10 % at ``dt = 1 s``; the onset
  between Vplc 0.77 and 0.78 is kept at 0.5 s. Use ``"euler"`` where published behaviour
  matters; ``"imex"`` halves the wall time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from calseg.progress import ProgressFn, check_cancelled

PatternClass = Literal["spikes", "transients", "waves", "fluttering"]
IntegratorName = Literal["euler", "imex"]
Backend = Literal["numpy", "torch"]

# Standby-cell Vplc ranges (uM/s) per pattern class: DESIGN.md section 2 / source Fig. 2.
PATTERN_CLASS_VPLC: dict[str, tuple[float, float]] = {
    "spikes": (0.10, 0.50),
    "transients": (0.25, 0.60),
    "waves": (0.40, 0.80),
    "fluttering": (1.40, 1.50),
}
INITIATOR_FRACTION = 0.00768  # 25 of 3255 cells in the source
INITIATOR_VPLC = (1.3, 1.5)  # uM/s


class ModelParameters(BaseModel):
    """Parameters of the tissue calcium model (DESIGN.md section 2). Every one is overridable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    Kplc: float = Field(0.2, gt=0, description="PLC half-activation by Ca2+ (uM)")
    K5: float = Field(0.66, gt=0, description="IP3 degradation rate (1/s)")
    k1: float = Field(1.11, ge=0, description="maximal IP3R Ca2+ release rate (1/s)")
    ka: float = Field(0.08, gt=0, description="IP3R Ca2+ activation constant (uM)")
    kp: float = Field(0.13, gt=0, description="IP3R IP3 activation constant (uM)")
    k2: float = Field(0.0203, ge=0, description="ER Ca2+ leak rate (1/s)")
    Vserca: float = Field(0.9, ge=0, description="maximal SERCA pump rate (uM/s)")
    Kserca: float = Field(0.1, gt=0, description="SERCA half-activation (uM)")
    ctot: float = Field(2.0, gt=0, description="total Ca2+ per cell volume (uM)")
    beta: float = Field(0.185, gt=0, description="ER/cytosol effective volume ratio (-)")
    ki: float = Field(0.4, gt=0, description="IP3R Ca2+ inactivation constant (uM)")
    taumax: float = Field(800.0, gt=0, description="maximal IP3R recovery time (s)")
    ktau: float = Field(1.5, gt=0, description="Ca2+ for IP3R recovery speed-up (uM)")
    Dp: float = Field(
        0.005, ge=0, description="IP3 gap-junction coupling (1/s per unit edge length)"
    )
    Dc_ratio: float = Field(0.1, ge=0, description="Dc / Dp (-)")
    initiator_fraction: float = Field(
        INITIATOR_FRACTION, ge=0, le=1, description="fraction of initiator cells (at least 1)"
    )
    initiator_vplc_low: float = Field(INITIATOR_VPLC[0], ge=0, description="initiator Vplc min")
    initiator_vplc_high: float = Field(INITIATOR_VPLC[1], ge=0, description="initiator Vplc max")
    r0_low: float = Field(0.5, ge=0, le=1, description="initial r ~ U(r0_low, r0_high)")
    r0_high: float = Field(0.7, ge=0, le=1, description="initial r ~ U(r0_low, r0_high)")

    @property
    def Dc(self) -> float:  # noqa: N802 (field name of the source)
        """Ca2+ gap-junction coupling (1/s per unit edge length) = Dc_ratio * Dp."""
        return self.Dc_ratio * self.Dp


@dataclass
class TissueState:
    """Model state of one or more tissues, flattened over cells (all arrays float64, (N,))."""

    c: np.ndarray
    p: np.ndarray
    r: np.ndarray

    def copy(self) -> TissueState:
        return TissueState(self.c.copy(), self.p.copy(), self.r.copy())


@dataclass
class TissueSetup:
    """Per-cell parameters and initial state of one tissue.

    Attributes:
        vplc: (N,) float64 PLC rate per cell (uM/s).
        initiators: (N,) bool, True for initiator cells.
        state0: initial state (c, p, r), each (N,).
        pattern_class: the preset used, or ``"custom"``.
    """

    vplc: np.ndarray
    initiators: np.ndarray
    state0: TissueState
    pattern_class: str = "custom"
    info: dict = field(default_factory=dict)


def setup_tissue(
    n_cells: int,
    pattern_class: str,
    params: ModelParameters,
    param_rng: np.random.Generator,
    state_rng: np.random.Generator,
    vplc_range: tuple[float, float] | None = None,
) -> TissueSetup:
    """Draw Vplc per cell (standby cells from the class preset, initiators U(1.3, 1.5)) and the
    initial state (c = p = 0, r ~ U(0.5, 0.7)) from two independent random streams.

    Args:
        n_cells: number of cells N.
        pattern_class: one of :data:`PATTERN_CLASS_VPLC` (ignored when ``vplc_range`` is given).
        params: model parameters (initiator fraction and Vplc range, r0 range).
        param_rng: stream for Vplc and the choice of initiators.
        state_rng: stream for the initial state.
        vplc_range: explicit (lower, upper) standby Vplc in uM/s, overriding the preset.

    Returns:
        A :class:`TissueSetup`; ``n_initiators = max(1, round(fraction * N))`` (0 if fraction 0).
    """
    if vplc_range is None:
        if pattern_class not in PATTERN_CLASS_VPLC:
            raise ValueError(
                f"unknown pattern class {pattern_class!r}; use one of {sorted(PATTERN_CLASS_VPLC)}"
            )
        vplc_range = PATTERN_CLASS_VPLC[pattern_class]
    lo, hi = vplc_range
    vplc = param_rng.uniform(lo, hi, n_cells)
    n_init = (
        0 if params.initiator_fraction == 0 else max(1, round(params.initiator_fraction * n_cells))
    )
    init_idx = param_rng.choice(n_cells, size=n_init, replace=False)
    initiators = np.zeros(n_cells, bool)
    initiators[init_idx] = True
    vplc[init_idx] = param_rng.uniform(
        params.initiator_vplc_low, params.initiator_vplc_high, n_init
    )
    r0 = state_rng.uniform(params.r0_low, params.r0_high, n_cells)
    state0 = TissueState(np.zeros(n_cells), np.zeros(n_cells), r0)
    return TissueSetup(
        vplc=vplc,
        initiators=initiators,
        state0=state0,
        pattern_class=pattern_class,
        info={"vplc_range": [float(lo), float(hi)], "n_initiators": int(n_init)},
    )


def _rhs_parts(c, p, r, params: ModelParameters):
    """Shared reaction terms. Returns (gating rate k1 g^3 + k2, SERCA pump flux)."""
    c2 = c * c
    g = r * c * p / ((params.ka + c) * (params.kp + p))
    rate = params.k1 * g * g * g + params.k2
    pump = params.Vserca * c2 / (c2 + params.Kserca**2)
    return rate, pump, c2


def integrate(
    laplacian: sp.spmatrix | sp.sparray | None,
    vplc: np.ndarray,
    state0: TissueState,
    sample_times_s: Sequence[float] | np.ndarray,
    params: ModelParameters | None = None,
    dt: float = 0.2,
    method: IntegratorName = "euler",
    record: Sequence[str] = ("c",),
    progress: ProgressFn | None = None,
    backend: Backend = "numpy",
    device: str = "auto",
) -> dict[str, np.ndarray]:
    """Integrate the tissue model and return the state at the sample times only.

    Several tissues are integrated at once by passing a block-diagonal Laplacian
    (``scipy.sparse.block_diag``) and concatenated per-cell arrays (the batch axis is folded
    into the cell axis; :func:`integrate_batch` does this for you).

    Args:
        laplacian: (N, N) sparse graph Laplacian weighted by shared edge length (rows sum to 0,
            off-diagonals >= 0), or ``None`` for uncoupled cells.
        vplc: (N,) PLC rate per cell (uM/s).
        state0: initial state at t = 0.
        sample_times_s: (T,) increasing times (s) >= 0 at which to record; each is rounded to
            the nearest step (``round(t / dt)``).
        params: model parameters (defaults: DESIGN.md section 2).
        dt: time step (s). Published: 0.2 s with ``"euler"``.
        method: ``"euler"`` (published forward Euler) or ``"imex"`` (semi-implicit, see module
            docstring).
        record: which of ``"c"``, ``"p"``, ``"r"`` to return.
        progress: optional callback, reported about 100 times.
        backend: ``"numpy"`` (CPU, scipy.sparse) or ``"torch"`` (float64 tensors and a sparse
            COO Laplacian; runs on a GPU when ``device`` selects one). Both run the same
            arithmetic, so they agree to rounding (tested). On a CPU numpy is much faster
            (torch pays a per-operation overhead every step); torch is for large batches on
            a GPU.
        device: torch device for ``backend="torch"``: ``"auto"`` (CUDA when available, else
            CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    Returns:
        dict mapping each recorded name to a (N, T) float32 array (c, p in uM; r unitless).

    Raises:
        ValueError: bad ``dt``, sample times, shapes, integrator or backend names.
        ModelDiverged: the state became non-finite (unstable step or parameters).
    """
    params = params or ModelParameters()
    if dt <= 0:
        raise ValueError(f"dt must be > 0 s, got {dt}")
    times = np.asarray(sample_times_s, dtype=float)
    if times.ndim != 1 or (times.size and (times.min() < 0 or np.any(np.diff(times) < 0))):
        raise ValueError("sample_times_s must be a 1-D non-decreasing array of times >= 0 s")
    steps = np.rint(times / dt).astype(np.int64)
    vplc = np.asarray(vplc, dtype=float)
    n = vplc.shape[0]
    c, p, r = (np.array(a, dtype=float, copy=True) for a in (state0.c, state0.p, state0.r))
    for name, a in (("c", c), ("p", p), ("r", r)):
        if a.shape != (n,):
            raise ValueError(f"state0.{name} has shape {a.shape}, expected ({n},)")
    if method not in ("euler", "imex"):
        raise ValueError(f"unknown integrator {method!r}; use 'euler' or 'imex'")
    L = None
    if laplacian is not None:
        L = sp.csr_matrix(laplacian, dtype=float)
        if L.shape != (n, n):
            raise ValueError(f"laplacian has shape {L.shape}, expected ({n}, {n})")
        if L.nnz == 0:
            L = None
    ops = _Ops(backend, device)
    c, p, r, vplc = (ops.array(a) for a in (c, p, r, vplc))
    L = ops.sparse(L)
    exp, maximum = ops.exp, ops.maximum
    out = {k: ops.empty((n, times.size)) for k in record}
    Dc, Dp = params.Dc, params.Dp
    ctot_b = params.ctot / params.beta
    inv_b1 = 1.0 + 1.0 / params.beta
    Kplc2 = params.Kplc**2
    ktau4 = params.ktau**4
    r_pref = 1.0 / (params.taumax * ktau4)
    K5 = params.K5
    ki = params.ki

    def put(j: int) -> None:
        for k in record:
            out[k][:, j] = {"c": c, "p": p, "r": r}[k]

    n_steps = int(steps[-1]) if steps.size else 0
    j = 0
    while j < steps.size and steps[j] == 0:
        put(j)
        j += 1
    report_every = max(1, n_steps // 100)
    for step in range(1, n_steps + 1):
        check_cancelled()
        rate, pump, c2 = _rhs_parts(c, p, r, params)
        prod = vplc * c2 / (c2 + Kplc2) - K5 * p
        c4 = c2 * c2
        if L is not None:
            prod += Dp * (L @ p)
        if method == "euler":
            dc = rate * (ctot_b - inv_b1 * c) - pump
            if L is not None:
                dc += Dc * (L @ c)
            dr = (ktau4 + c4) * r_pref * (1.0 - r * (ki + c) / ki)
            c = c + dt * dc
            r = r + dt * dr
        elif method == "imex":
            # pump = Vserca c^2/(c^2+K^2) = c * [Vserca c/(c^2+K^2)]: the bracket is frozen
            rhs = c + dt * rate * ctot_b
            if L is not None:
                rhs += dt * Dc * (L @ c)
            c_new = rhs / (1.0 + dt * (rate * inv_b1 + pump / maximum(c, 1e-12)))
            # r' = a (1 - r b)  ->  r(t+dt) = 1/b + (r - 1/b) exp(-a b dt)  (exact for fixed c)
            a = (ktau4 + c4) * r_pref
            b = (ki + c) / ki
            r = 1.0 / b + (r - 1.0 / b) * exp(-a * b * dt)
            c = maximum(c_new, 0.0)
        p = p + dt * prod
        if (step % report_every == 0 or step == n_steps) and not ops.all_finite(c, p, r):
            raise ModelDiverged(
                f"the calcium model diverged by t = {step * dt:g} s (non-finite Ca2+, IP3 or "
                f"h): the time step dt = {dt:g} s is too large for these model parameters "
                "(method 'imex' or a smaller dt_s), or the parameters are outside the model's "
                "range (model_overrides)"
            )
        while j < steps.size and steps[j] == step:
            put(j)
            j += 1
        if progress is not None and step % report_every == 0:
            progress(step / n_steps, "integrate", f"t = {step * dt:.0f} s")
    return {k: ops.to_numpy(v) for k, v in out.items()}


class ModelDiverged(ValueError):
    """:func:`integrate` met a non-finite state (checked about 100 times per run and at the
    end): the explicit step is unstable for the parameters, or they are out of range. Before,
    ``model_overrides`` of ``Dp = k1 = 1e6`` with ``dt_s = 2`` gave NaN calcium, and the job
    rendered NaN videos and succeeded (an 8th attack run)."""


class _Ops:
    """The few array operations :func:`integrate` needs, for numpy or torch."""

    def __init__(self, backend: Backend, device: str) -> None:
        if backend not in ("numpy", "torch"):
            raise ValueError(f"unknown backend {backend!r}; use 'numpy' or 'torch'")
        self.backend = backend
        if backend == "numpy":
            self.exp, self.maximum = np.exp, np.maximum
            return
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch, self.device = torch, torch.device(device)
        self.exp = torch.exp
        self.maximum = lambda x, v: torch.clamp(x, min=v)

    def array(self, a: np.ndarray):
        if self.backend == "numpy":
            return a
        return self.torch.as_tensor(a, dtype=self.torch.float64, device=self.device)

    def sparse(self, m: sp.csr_matrix | None):
        if m is None or self.backend == "numpy":
            return m
        t = self.torch
        coo = m.tocoo()  # COO: torch's CPU matvec on CSR is ~100x slower (measured)
        index = np.vstack([coo.row, coo.col]).astype(np.int64)
        return t.sparse_coo_tensor(
            t.as_tensor(index),
            t.as_tensor(coo.data, dtype=t.float64),
            size=m.shape,
            device=self.device,
            check_invariants=True,
        ).coalesce()

    def empty(self, shape: tuple[int, int]):
        if self.backend == "numpy":
            return np.empty(shape, np.float32)
        return self.torch.empty(shape, dtype=self.torch.float32, device=self.device)

    def to_numpy(self, a) -> np.ndarray:
        return a if self.backend == "numpy" else a.cpu().numpy()

    def all_finite(self, *arrays) -> bool:
        if self.backend == "numpy":
            return all(bool(np.isfinite(a).all()) for a in arrays)
        return all(bool(self.torch.isfinite(a).all()) for a in arrays)


def integrate_batch(
    laplacians: Sequence[sp.spmatrix | sp.sparray | None],
    setups: Sequence[TissueSetup],
    sample_times_s: Sequence[float] | np.ndarray,
    params: ModelParameters | None = None,
    dt: float = 0.2,
    method: IntegratorName = "euler",
    progress: ProgressFn | None = None,
    backend: Backend = "numpy",
    device: str = "auto",
) -> list[np.ndarray]:
    """Integrate a batch of tissues together (one vectorised loop, block-diagonal Laplacian).

    Args:
        laplacians: per tissue (N_b, N_b) sparse Laplacian (or ``None`` for uncoupled cells).
        setups: per tissue Vplc and initial state (from :func:`setup_tissue`).
        sample_times_s: (T,) sample times shared by all tissues (s).
        params, dt, method, progress, backend, device: as in :func:`integrate`.

    Returns:
        list of (N_b, T) float32 cytosolic Ca2+ (uM), one per tissue.
    """
    if len(laplacians) != len(setups):
        raise ValueError("need one Laplacian per tissue setup")
    sizes = [s.vplc.shape[0] for s in setups]
    blocks = [
        sp.csr_matrix((n, n)) if lap is None else sp.csr_matrix(lap)
        for lap, n in zip(laplacians, sizes, strict=True)
    ]
    big = sp.block_diag(blocks, format="csr")
    state0 = TissueState(
        np.concatenate([s.state0.c for s in setups]),
        np.concatenate([s.state0.p for s in setups]),
        np.concatenate([s.state0.r for s in setups]),
    )
    vplc = np.concatenate([s.vplc for s in setups])
    c = integrate(
        big, vplc, state0, sample_times_s, params, dt, method, ("c",), progress, backend, device
    )["c"]
    return np.split(c, np.cumsum(sizes)[:-1], axis=0)


def oscillation_period(trace: np.ndarray, dt: float, threshold: float | None = None) -> float:
    """Mean period (s) of a 1-D oscillating trace from its upward threshold crossings.

    Args:
        trace: (T,) signal sampled every ``dt`` seconds.
        dt: sampling interval (s).
        threshold: crossing level; default the midpoint of the trace's min and max.

    Returns:
        Mean interval between upward crossings (s), or ``nan`` with fewer than two crossings.
    """
    x = np.asarray(trace, float)
    if threshold is None:
        threshold = 0.5 * (x.min() + x.max())
    up = np.flatnonzero((x[:-1] < threshold) & (x[1:] >= threshold))
    if up.size < 2:
        return float("nan")
    return float(np.mean(np.diff(up)) * dt)
