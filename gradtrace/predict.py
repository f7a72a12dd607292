"""Predict cross-shift partial correlations r(a_i, a_j | a_ID) from reference runs, and score the predictions.

Predictors take reference-run data only (`load_reference`: role == "reference" groups of the experiment store;
never the sweep's accuracies) and return an S×S matrix over the shift names. Scoring compares each predicted
matrix with the observed one (probit-residualised partial correlations across the sweep's runs) by Spearman over
pairs, sign accuracy on pairs whose CI excludes 0, a shift-relabelling permutation p (pairs share shifts, so
permuting shift names, not pairs, is the null), a bootstrap over runs, and the observed matrix's noise ceiling.

Conventions shared by the predictors:
- A first-order model a_i(θ) ≈ a_i(θ̄) + g_iᵀ(θ − θ̄) with parameter movement θ − θ̄ ~ (0, Σ) gives the
  covariance C = Gᵀ Σ G of the splits' accuracies; the partial correlation given ID is
  −P_ab/√(P_aa P_bb) with P the inverse of the 3×3 block [ID, a, b] of C, computed here in closed form as the
  correlation of residual covariances C_ab − C_a,ID C_b,ID / C_ID,ID (`partial_from_covariance`). Loss gradients
  point against accuracy gradients for every split alike, so their sign and scale per split cancel.
- Inner products of sketched vectors estimate those of the originals (the sketch is a JL map), so everything runs
  in the k-dimensional sketch space.
- Single-trajectory predictors are computed per reference run and their matrices averaged; pooled predictors
  (path, mini-sweep) pool samples across runs.
- `probe_loss` picks the probe loss whose gradients are used ("ce" by default, or "margin", closer to exact match).
"""
from __future__ import annotations

import inspect
import itertools
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import pandas as pd
import zarr
from scipy.special import ndtri
from scipy.stats import rankdata

from gradtrace import store
from gradtrace.files import RESULTS_DIGEST, sha256_of, write_csv, write_json
from gradtrace.results import first_ids, started_from
from gradtrace.stats import (bootstrap_indices, centre_within, check_accuracies, check_counts, check_resamples,
                             group_codes, partial_correlations, spearman_brown, varying_shifts)
from gradtrace.subspace import IN_MEMORY_BYTES, moving_learning_rates, top_span, top_span_streaming

CONSTANT_RTOL = 1e-20  # a variance this small relative to the largest one is a constant's rounding
ID_SPLIT = "ID"  # the in-distribution split, as results.csv's acc_ID and the statistics name it
DEFAULT_N_ITEMS = 2000  # items per split for the probit clip [1/(2N), 1 − 1/(2N)] when the config does not say
BOOT_CHUNK = 128  # bootstrap resamples per vectorised batch: memory ∝ BOOT_CHUNK · runs · splits, not n_boot · …


# ----------------------------------------------------------------------------------------------------------------
# reference-run data


@dataclass(frozen=True)
class ReferenceRun:
    """What one reference run recorded (arrays decoded to float32; trajectories numpy, or dask when lazy)."""

    run_id: str
    probe_step: np.ndarray  # (R,) optimizer steps completed when each probe was taken
    probe_grad: np.ndarray  # (R, S, Lp, k) sketched probe-loss gradients
    probe_grad_adam: np.ndarray | None  # (R, S, Lp, k) sketched g/(√v̂+ε)
    probe_loss: np.ndarray | None  # (R, S, Lp)
    step: np.ndarray  # (T,) optimizer step of each trajectory row
    update: Any | None  # (T, k) sketched Δθ_t
    grad: Any | None  # (T, k) sketched g_t
    lr: np.ndarray | None  # (T,) the rate the moving tensors stepped with (NaN where their groups' differ)
    eval_step: np.ndarray | None  # (E,) steps of evaluation checkpoints
    eval_accuracy: np.ndarray | None  # (E, S) exact match at those checkpoints
    seeds: dict
    wall_time_s: float
    nonfinite_steps: int
    start: str = ""  # the base run it fine-tuned ("" from scratch)
    spans: dict = field(default_factory=dict, repr=False, compare=False)  # computed once, for predictors sharing one


@dataclass(frozen=True)
class ReferenceData:
    """The reference runs of an experiment, checked to share one sketch, one split list and one probe-loss list."""

    runs: tuple[ReferenceRun, ...]
    splits: tuple[str, ...]  # splits[0] is the ID split
    probe_losses: tuple[str, ...]
    sketch: dict
    layout: list[dict]

    @property
    def id_split(self) -> str:
        """Name of the ID split (the first split)."""
        return self.splits[0]

    @property
    def shifts(self) -> tuple[str, ...]:
        """Names of the OOD shifts (every split but ID)."""
        return self.splits[1:]

    def loss_index(self, probe_loss: str) -> int:
        """Index of a probe loss on the probe_loss axis."""
        if probe_loss not in self.probe_losses:
            raise ValueError(f"probe loss {probe_loss!r} was not captured; the store holds {list(self.probe_losses)}. "
                             "Pass probe_loss=<one of those> or add it to capture.probe_losses.")
        return self.probe_losses.index(probe_loss)


def _open_store(exp_dir_or_store: str | Path | zarr.Group) -> zarr.Group:
    if isinstance(exp_dir_or_store, zarr.Group):
        return exp_dir_or_store
    path = Path(exp_dir_or_store)
    return store.open_experiment(path / "store.zarr" if (path / "store.zarr").exists() else path)


def _optional(group: zarr.Group, name: str, lazy: bool = False) -> Any:
    if not store.has(group, name):
        return None
    return store.read_lazy(group, name) if lazy else store.read(group, name)


def _learning_rates(group: zarr.Group) -> np.ndarray | None:
    """The learning rate of each recorded step (`subspace.moving_learning_rates`); None where none was recorded."""
    lr = _optional(group, "lr")
    return None if lr is None else moving_learning_rates(lr, _optional(group, "layer_lr"))


def _load_run(group: zarr.Group, run_id: str, lazy: bool, order: list[int]) -> ReferenceRun:
    """A reference run's arrays, their split axis taken in `order` (the ID split's first)."""
    attrs = dict(group.attrs)
    for name in ("probe/step", "probe/grad", "step"):
        if not store.has(group, name):
            raise KeyError(f"reference run {run_id!r} has no {name!r}: predictors need probe gradients "
                           "(capture.probe_every > 0) and the step axis; re-run it with full capture")

    def by_split(name: str) -> np.ndarray | None:
        values = _optional(group, name)
        return None if values is None else values[:, order]

    return ReferenceRun(
        run_id=run_id, probe_step=store.read(group, "probe/step").astype(np.int64),
        probe_grad=by_split("probe/grad"), probe_grad_adam=by_split("probe/grad_adam"),
        probe_loss=by_split("probe/loss"), step=store.read(group, "step").astype(np.int64),
        update=_optional(group, "update", lazy), grad=_optional(group, "grad", lazy=True), lr=_learning_rates(group),
        eval_step=_optional(group, "evals/step"), eval_accuracy=by_split("evals/accuracy"),
        seeds=dict(attrs.get("seeds") or {}), wall_time_s=float(attrs.get("wall_time_s", np.nan)),
        nonfinite_steps=int(attrs.get("nonfinite_steps", 0)),
        start=started_from(store.init_weights(attrs)))


def load_reference(exp_dir_or_store: str | Path | zarr.Group, run_ids: Sequence[str] | None = None,
                   lazy: bool | None = None, role: str = "reference", groups: dict | None = None) -> ReferenceData:
    """The reference runs (attribute `role`, status complete) of an experiment, or the runs named in run_ids.

    `role="base"` reads a pretraining run's store (frontier studies, `predict.reference_role`).

    Chosen by role, runs that recorded no probe gradients (a loop of your own attached without probes) are left out,
    with a warning. The ID split (`ID`, as the statistics name it) comes first in the splits whatever the order of the
    runs' probes; runs without its probe are refused, and so are runs whose sketches (kind, dim, seed, parameter
    layout), splits or probe losses differ. With lazy=True
    the (T, k) update trajectories are dask arrays read on demand (for stores larger than memory); None (default)
    does so where all the runs' updates together pass 2 GiB (one limit per run let 8 runs of 1.9 GiB fill 15 GiB).
    The gradient trajectories, which no predictor here reads, are always lazy. `groups`: the store's run groups
    (`results.run_groups_of`), where already read.
    """
    root = _open_store(exp_dir_or_store)
    groups = store.run_groups(root) if groups is None else groups
    available = list(groups)
    run_ids = [run_ids] if isinstance(run_ids, str) else run_ids  # one run, by id
    if run_ids is None:
        chosen = [r for r in available if groups[r].attrs.get("role") == role]
        if not chosen:
            raise ValueError(f"no reference runs (role == {role!r}) in {root.store}; runs there: "
                             f"{available[:10]}{' …' if len(available) > 10 else ''}. Set sweep.reference_runs ≥ 1 "
                             "(≥ 4 for the mini-sweep predictors) and run the sweep, or pass run_ids=[...]")
    else:
        missing = [r for r in run_ids if r not in available]
        if missing:
            raise KeyError(f"runs {missing} are not in the store; it holds {available[:10]}")
        chosen = list(run_ids)
    unfinished = [r for r in chosen if groups[r].attrs.get("status") != "complete"]
    if unfinished:
        warnings.warn(f"skipping reference runs that are not complete: {unfinished}", UserWarning, stacklevel=2)
        chosen = [r for r in chosen if r not in unfinished]
    if not chosen:
        raise ValueError("no complete reference run to load; finish or resume the reference runs first")
    unprobed = [r for r in chosen if not groups[r].attrs.get("splits")]
    if unprobed and (run_ids is not None or len(unprobed) == len(chosen)):
        which = (f"runs {first_ids(unprobed)} recorded no" if run_ids is not None else
                 f"no {role} run ({first_ids(unprobed)}) recorded")
        raise ValueError(f"{which} probe gradients, which predictors need: record runs with probes "
                         "(`attach(..., probes=[Probe(split, tokens, mask), ...])`, the ID split's among them; "
                         "capture.probe_every > 0 in gradtrace's own runs)")
    if unprobed:
        warnings.warn(f"left out {len(unprobed)} {role} run(s) that recorded no probe gradients "
                      f"({first_ids(unprobed)}): predictors need them", UserWarning, stacklevel=2)
        chosen = [r for r in chosen if r not in unprobed]

    first = dict(groups[chosen[0]].attrs)
    for name in ("sketch", "splits", "probe_losses"):
        if not first.get(name):
            raise KeyError(f"run {chosen[0]!r} lacks the {name!r} attribute every run gradtrace's capture records "
                           "(attach, GradtraceCallback, a sweep's reference runs): it cannot serve as a reference run")
    for rid in chosen[1:]:
        attrs = dict(groups[rid].attrs)
        try:
            store.check_compatible(first["sketch"], attrs.get("sketch") or {})
        except ValueError as err:
            raise ValueError(f"reference runs {chosen[0]!r} and {rid!r}: {err}") from None
        for name in ("splits", "probe_losses"):
            if list(attrs.get(name) or []) != list(first[name]):
                raise ValueError(f"reference runs {chosen[0]!r} and {rid!r} have different {name}: "
                                 f"{first[name]} vs {attrs.get(name)}; load runs of one experiment config")
    if lazy is None:
        lazy = sum(groups[rid]["update"].nbytes for rid in chosen if store.has(groups[rid], "update")) > IN_MEMORY_BYTES
    splits = list(first["splits"])
    if ID_SPLIT not in splits:
        raise ValueError(f"reference run {chosen[0]!r} has no probe of the ID split ({ID_SPLIT!r}; its probe splits: "
                         f"{splits}): predictors take each shift given ID, as the statistics take acc_{ID_SPLIT}; "
                         f"record a Probe({ID_SPLIT!r}, ...) too")
    order = [splits.index(ID_SPLIT), *(i for i, s in enumerate(splits) if s != ID_SPLIT)]
    runs = tuple(_load_run(groups[rid], rid, lazy, order) for rid in chosen)
    bad = [r.run_id for r in runs if r.nonfinite_steps]
    if bad:
        warnings.warn(f"reference runs {bad} recorded non-finite gradients; predictions that use their "
                      "trajectories may be NaN", UserWarning, stacklevel=2)
    return ReferenceData(runs, tuple(splits[i] for i in order), tuple(first["probe_losses"]), dict(first["sketch"]),
                         list(first.get("layout") or []))


# ----------------------------------------------------------------------------------------------------------------
# matrices


def partial_from_covariance(C: np.ndarray) -> np.ndarray:
    """Partial correlations (S×S, NaN diagonal) given variable 0 from a (1+S)×(1+S) covariance (…, 1+S, 1+S).

    Equals −P_ab/√(P_aa P_bb) with P the inverse of the 3×3 block [0, a, b]: the correlation of residual
    covariances R = C_ss − c_s c_sᵀ / C_00.
    """
    C = np.asarray(C, dtype=np.float64)
    variance = np.diagonal(C, axis1=-2, axis2=-1)
    # constant but for rounding: centring leaves ~1e-16 of a constant's value, a variance ~1e-32 of its square
    constant = variance <= CONSTANT_RTOL * variance.max(axis=-1, keepdims=True)
    c0 = C[..., 1:, :1]
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant variable gives NaN, not a warning
        explained = np.where(constant[..., :1, None], 0.0, c0 * np.swapaxes(c0, -1, -2) / C[..., :1, :1])
        R = C[..., 1:, 1:] - explained  # a constant variable 0 explains nothing: plain correlations
        d = np.sqrt(np.clip(np.diagonal(R, axis1=-2, axis2=-1), 0.0, None))
        d = np.where(constant[..., 1:], np.nan, d)
        out = np.clip(R / (d[..., :, None] * d[..., None, :]), -1.0, 1.0)
    idx = np.arange(out.shape[-1])
    out[..., idx, idx] = np.nan
    return out


def _cosine_matrix(V: np.ndarray) -> np.ndarray:
    """Cosine similarity between rows of V (S, k), NaN diagonal."""
    V = np.asarray(V, dtype=np.float64)
    norms = np.linalg.norm(V, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.clip((V @ V.T) / np.outer(norms, norms), -1.0, 1.0)
    np.fill_diagonal(out, np.nan)
    return out


def probit_partials(accuracy: np.ndarray, n_items: int = DEFAULT_N_ITEMS, groups: np.ndarray | None = None
                    ) -> np.ndarray:
    """Probit-residualised partial correlations (…, S, S) from accuracies (…, n runs, 1+S), ID in column 0.

    Accuracies are clipped to [1/(2N), 1 − 1/(2N)] and mapped through Φ⁻¹; each shift is residualised on ID by
    least squares with an intercept (with `groups`, each run's group code (n,), with one intercept per group: the
    partial correlation within groups); batch axes (bootstrap resamples, split halves) broadcast.
    """
    eps = 1.0 / (2.0 * n_items)
    z = centre_within(ndtri(np.clip(np.asarray(accuracy, dtype=np.float64), eps, 1.0 - eps)), groups)
    return partial_from_covariance(np.swapaxes(z, -1, -2) @ z)


def _partial_across_samples(Y: np.ndarray, independent: int | None = None) -> np.ndarray:
    """Partial correlations given column 0 across the rows of Y (samples × (1+S)), rows already centred; of these,
    `independent` (default: all) are free (rows centred across n runs hold n − 1)."""
    n = Y.shape[0] if independent is None else independent
    if n < 4:
        raise ValueError(f"only {n} independent samples to correlate across; a partial correlation given ID needs at "
                         "least 4 (dof = n − 3 ≥ 1). Record more probes or use more reference runs.")
    return partial_from_covariance(Y.T @ Y)


def _np(x: Any) -> np.ndarray:
    return np.asarray(x.compute() if hasattr(x, "compute") else x, dtype=np.float64)


def _tail(n: int, fraction: float) -> slice:
    """The last ceil(fraction · n) of n items (at least one)."""
    return slice(n - max(1, math.ceil(fraction * n)), n)


def _rows_for_steps(run: ReferenceRun, start: int, stop: int) -> slice:
    """Trajectory rows of every optimizer step in [start, stop), or an error if any step was not recorded."""
    lo, hi = np.searchsorted(run.step, [start, stop])
    if hi - lo != stop - start:
        raise ValueError(f"run {run.run_id!r} recorded {hi - lo} of the {stop - start} optimizer steps in "
                         f"[{start}, {stop}); summing updates into displacements needs every step "
                         "(capture.every=1, capture.schedule='every')")
    return slice(int(lo), int(hi))


def _window_sums(X: Any, rows: Sequence[slice]) -> np.ndarray:
    """Sums of the trajectory rows in each slice (W, k), computing dask sums in one pass."""
    sums = [X[r].sum(axis=0) for r in rows]
    if hasattr(X, "dask"):
        import dask

        sums = dask.compute(*sums)
    return np.stack([np.asarray(s, dtype=np.float64) for s in sums])


def _require(run: ReferenceRun, name: str, predictor: str, hint: str) -> Any:
    value = getattr(run, name)
    if value is None:
        raise ValueError(f"{predictor} needs {name!r}, which reference run {run.run_id!r} did not record; {hint}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# predictors


@dataclass(frozen=True)
class Prediction:
    """A predicted partial-correlation matrix over shift names (diagonal NaN) and what it cost."""

    predictor: str
    matrix: pd.DataFrame  # S×S, index and columns = shift names
    runs_used: tuple[str, ...]
    wall_time_s: float  # training wall time of the reference runs used (0 when none)


def _fraction(name: str, value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"{name}={value!r} must be a fraction in (0, 1]")
    return float(value)


class Predictor(ABC):
    """Fit on reference runs, predict an S×S partial-correlation matrix; options are checked in __init__."""

    name: ClassVar[str]
    baseline: ClassVar[bool] = False

    def __init__(self, probe_loss: str = "ce") -> None:
        if not isinstance(probe_loss, str) or not probe_loss:
            raise ValueError(f"probe_loss={probe_loss!r} must name a captured probe loss, e.g. 'ce' or 'margin'")
        self.probe_loss = probe_loss

    def fit(self, reference: ReferenceData) -> "Predictor":
        """Compute the predicted matrix from reference-run data."""
        matrix = self._matrix(reference)
        self.matrix_ = pd.DataFrame(matrix, index=list(reference.shifts), columns=list(reference.shifts))
        values = self.matrix_.to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            gap = np.nanmax(np.abs(values - values.T), initial=0.0)
        scale = max(1.0, np.nanmax(np.abs(values), initial=0.0))
        if gap > 1e-9 * scale or (np.isnan(values) != np.isnan(values.T)).any():
            raise ValueError(f"{self.name} gave a matrix that is not symmetric (max |M − Mᵀ| = {gap:.3g}): the partial "
                             "correlation of (a, b) is that of (b, a), so only one triangle would be scored")
        used = self._runs_used(reference)
        self.runs_used_ = tuple(r.run_id for r in used)
        self.wall_time_s_ = float(sum(r.wall_time_s for r in used))
        return self

    def predict(self) -> Prediction:
        """The fitted prediction."""
        if not hasattr(self, "matrix_"):
            raise RuntimeError(f"{self.name}: call fit(reference) before predict()")
        return Prediction(self.name, self.matrix_.copy(), self.runs_used_, self.wall_time_s_)

    def _runs_used(self, reference: ReferenceData) -> tuple[ReferenceRun, ...]:
        return reference.runs

    @abstractmethod
    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        """The S×S predicted matrix (shifts in reference.shifts order, diagonal NaN)."""


class _AtProbe(Predictor):
    """A predictor built from the probe gradients at one probe (`probe`, default the final one)."""

    def __init__(self, probe_loss: str = "ce", probe: int = -1) -> None:
        super().__init__(probe_loss)
        self.probe = int(probe)

    def _per_run_mean(self, reference: ReferenceData, one: Any) -> np.ndarray:
        """Mean over reference runs of a per-run S×S matrix."""
        return np.mean([one(run, reference) for run in reference.runs], axis=0)

    def _grads(self, run: ReferenceRun, reference: ReferenceData, adam: bool = False) -> np.ndarray:
        """Probe gradients (1+S, k) of the chosen loss at the chosen probe (ID first)."""
        source = _require(run, "probe_grad_adam", self.name, "capture Adam-preconditioned probe gradients") \
            if adam else run.probe_grad
        return source[self.probe, :, reference.loss_index(self.probe_loss), :].astype(np.float64)


def _constant(n: int, value: float) -> np.ndarray:
    out = np.full((n, n), value)
    np.fill_diagonal(out, np.nan)
    return out


class ZeroPredictor(Predictor):
    """Baseline: predicts 0 for every pair (no rank or sign information; Spearman is undefined)."""

    name, baseline = "zero", True

    def _runs_used(self, reference: ReferenceData) -> tuple[ReferenceRun, ...]:
        return ()

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        return _constant(len(reference.shifts), 0.0)


class MajoritySignPredictor(ZeroPredictor):
    """Baseline: predicts +ε for every pair, the "shifts move together" sign baseline."""

    name = "majority_sign"

    def __init__(self, probe_loss: str = "ce", epsilon: float = 1e-6) -> None:
        super().__init__(probe_loss)
        if epsilon <= 0:
            raise ValueError(f"epsilon={epsilon} must be > 0 (a positive constant prediction)")
        self.epsilon = float(epsilon)

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        return _constant(len(reference.shifts), self.epsilon)


class CosinePredictor(_AtProbe):
    """Baseline: cosine of the shifts' raw probe gradients at the final probe."""

    name, baseline = "cosine", True

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        return self._per_run_mean(reference, lambda run, ref: _cosine_matrix(self._grads(run, ref)[1:]))


class CosineIDProjectedPredictor(_AtProbe):
    """Baseline: cosine after projecting the ID gradient out (= the covariance predictor with Σ = I)."""

    name, baseline = "cosine_id_projected", True

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        def one(run: ReferenceRun, ref: ReferenceData) -> np.ndarray:
            G = self._grads(run, ref)
            return partial_from_covariance(G @ G.T)
        return self._per_run_mean(reference, one)


class AdamCosinePredictor(_AtProbe):
    """Baseline (LESS-style): cosine of the Adam-preconditioned probe gradients g/(√v̂+ε) at the final probe."""

    name, baseline = "adam_cosine", True

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        return self._per_run_mean(reference, lambda run, ref: _cosine_matrix(self._grads(run, ref, adam=True)[1:]))


class TagLookaheadPredictor(_AtProbe):
    """Baseline (TAG-style): first-order relative loss change of shift b after an ID-neutral Adam step on shift a.

    With P the Adam preconditioner at the probe, M_ij = g_iᵀ P g_j (estimated from sketch(g_i)·sketch(P g_j),
    symmetrised), the step on a is d_a = −η (P g_a − (M_ID,a / M_ID,ID) P g_ID) (first-order neutral for ID loss),
    and Z_a→b = −g_bᵀ d_a / L_b = η (M_ab − M_a,ID M_b,ID / M_ID,ID) / L_b, TAG's 1 − L_b(θ+d_a)/L_b(θ) to first
    order. The prediction is (Z_a→b + Z_b→a)/2; η is the learning rate at the probe (refused where the run's
    param groups stepped with different ones). Approximations: one linear step, the diagonal preconditioner frozen
    at the probe, JL-estimated inner products, the probe batch's loss.
    """

    name, baseline = "tag_lookahead", True

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        def one(run: ReferenceRun, ref: ReferenceData) -> np.ndarray:
            G, PG = self._grads(run, ref), self._grads(run, ref, adam=True)
            losses = _require(run, "probe_loss", self.name, "capture probe losses")
            loss = losses[self.probe, :, ref.loss_index(self.probe_loss)].astype(np.float64)[1:]
            lr = _require(run, "lr", self.name, "record the learning rate")
            row = max(0, np.searchsorted(run.step, run.probe_step[self.probe]) - 1)
            eta = float(lr[row])
            if math.isnan(eta):
                raise ValueError(f"reference run {run.run_id!r}'s parameter groups stepped with different learning "
                                 f"rates at step {int(run.step[row])}, and {self.name}'s step takes one for all")
            M = G @ PG.T
            M = (M + M.T) / 2
            neutral = M[1:, 1:] - np.outer(M[1:, 0], M[1:, 0]) / M[0, 0]
            Z = eta * neutral / loss[None, :]  # Z[a, b]: step on a, loss change of b
            out = (Z + Z.T) / 2
            np.fill_diagonal(out, np.nan)
            return out
        return self._per_run_mean(reference, one)


class CovariancePredictor(_AtProbe):
    """Baseline: first-order covariance predictor with Σ the covariance of the trajectory's updates.

    Σ is the sample covariance of the sketched updates Δθ_t over the last `tail` of recorded steps (movement
    near where G is measured); `covariance_dominant` keeps its top-`rank` span, `covariance_bulk` the rest
    (Σ = Σ_dominant + Σ_bulk exactly; `rank` applies to those two). C = Gᵀ Σ G is formed from projections
    (U G), never a k×k matrix.
    """

    name, baseline = "covariance", True
    part: ClassVar[str] = "full"

    def __init__(self, probe_loss: str = "ce", probe: int = -1, tail: float = 0.5, rank: int = 32) -> None:
        super().__init__(probe_loss, probe)
        self.tail = _fraction("tail", tail)
        if rank < 1:
            raise ValueError(f"rank={rank} must be ≥ 1")
        self.rank = int(rank)

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        return self._per_run_mean(reference, self._one)

    def _one(self, run: ReferenceRun, reference: ReferenceData) -> np.ndarray:
        updates = _require(run, "update", self.name, "add 'update' to capture.quantities")
        U = updates[_tail(updates.shape[0], self.tail)]
        G = self._grads(run, reference)
        Y = _np(U @ G.T.astype(np.float32))
        if not np.isfinite(Y).all():
            raise ValueError(f"reference run {run.run_id!r}'s tail updates or probe gradients hold NaN or Inf "
                             f"({run.nonfinite_steps} non-finite steps recorded)")
        Y -= Y.mean(axis=0)
        if self.part != "full":
            rank = min(self.rank, U.shape[0] - 1)
            if self.part == "bulk" and rank == U.shape[0] - 1:
                raise ValueError(f"the {U.shape[0]} tail updates span at most {rank} directions, all in the top-{rank} "
                                 "span: no bulk is left; lower rank or record more steps")
            mean = _np(U.mean(axis=0))
            span = run.spans.get(("update tail", self.tail, rank))
            if span is None:  # dominant and bulk share it
                span = run.spans[("update tail", self.tail, rank)] = (
                    top_span_streaming(U - mean.astype(np.float32), rank) if hasattr(U, "dask")
                    else top_span(U, rank, center=True, method="full"))  # exact: the bulk is ~1% of the energy
            coords = _np(U @ span.basis.T) - mean @ span.basis.T.astype(np.float64)
            dominant = coords @ (span.basis.astype(np.float64) @ G.T)
            Y = dominant if self.part == "dominant" else Y - dominant
        return partial_from_covariance(Y.T @ Y)


class CovarianceDominantPredictor(CovariancePredictor):
    """Baseline: the covariance predictor with Σ restricted to the top-`rank` span of the updates."""

    name, part = "covariance_dominant", "dominant"


class CovarianceBulkPredictor(CovariancePredictor):
    """Baseline: the covariance predictor with Σ restricted to the complement of the top-`rank` span."""

    name, part = "covariance_bulk", "bulk"


def _window_contributions(run: ReferenceRun, G: np.ndarray) -> np.ndarray:
    """Per window between consecutive probes, the trapezoid first-order loss change ½(g(p_w)+g(p_w+1))·ΔΘ_w (W, 1+S)."""
    updates = _require(run, "update", "path_integrated", "add 'update' to capture.quantities")
    p = run.probe_step
    rows = [_rows_for_steps(run, int(a), int(b)) for a, b in zip(p[:-1], p[1:])]
    displacement = _window_sums(updates, rows)  # (W, k): θ(p_w+1) − θ(p_w)
    mid = (G[:-1] + G[1:]) / 2  # (W, 1+S, k)
    return np.einsum("wsk,wk->ws", mid, displacement)


class PathIntegratedPredictor(Predictor):
    """Candidate: correlation across training windows of each split's first-order loss change along the path.

    Per window w between probes p_w < p_w+1, c_w,i = ½(g_i(θ_p_w) + g_i(θ_p_w+1))·(θ_p_w+1 − θ_p_w) (the
    trapezoid rule, exact for quadratic losses); Σ_w c_w,i ≈ L_i(θ_T) − L_i(θ_0), a first-order estimate the
    fitted predictor's `fidelity_` sets beside the measured change per run and split (on the default's reference
    run the sums were 1–8× the measured changes, `order`'s of the wrong sign: a rough estimate).
    The prediction is the partial correlation, across the last `tail` of windows (pooled over reference runs,
    centred per run), of c_·,a and c_·,b given c_·,ID: shifts whose losses fall in the same phases of training,
    beyond what ID does. It predicts the sweep if runs differ mainly in how much of each phase they realise
    (learning rate, length); it is blind to variation orthogonal to the path (data-order noise).
    """

    name = "path_integrated"

    def __init__(self, probe_loss: str = "ce", tail: float = 1.0) -> None:
        super().__init__(probe_loss)
        self.tail = _fraction("tail", tail)

    def _contributions(self, run: ReferenceRun, reference: ReferenceData) -> np.ndarray:
        G = run.probe_grad[:, :, reference.loss_index(self.probe_loss), :].astype(np.float64)
        return _window_contributions(run, G)

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        samples, fidelity = [], []
        li = reference.loss_index(self.probe_loss)
        for run in reference.runs:
            c = self._contributions(run, reference)
            if run.probe_loss is not None:
                measured = run.probe_loss[-1, :, li] - run.probe_loss[0, :, li]
                fidelity.append(pd.DataFrame({"run_id": run.run_id, "split": list(reference.splits),
                                              "first_order": c.sum(axis=0), "measured": measured}))
            c = c[_tail(len(c), self.tail)]
            samples.append(c - c.mean(axis=0))
        self.fidelity_ = pd.concat(fidelity, ignore_index=True) if fidelity else None
        return _partial_across_samples(np.concatenate(samples), sum(len(c) - 1 for c in samples))


class TrajectoryLossPredictor(PathIntegratedPredictor):
    """Exploratory: path_integrated with each window's measured probe-loss change instead of its first-order
    estimate."""

    name = "trajectory_loss"

    def _contributions(self, run: ReferenceRun, reference: ReferenceData) -> np.ndarray:
        losses = _require(run, "probe_loss", self.name, "capture probe losses")
        return np.diff(losses[:, :, reference.loss_index(self.probe_loss)].astype(np.float64), axis=0)


def _common_probe_steps(reference: ReferenceData, tail: float, name: str) -> np.ndarray:
    if len(reference.runs) < 2:
        raise ValueError(f"{name} compares reference runs with each other and needs ≥ 2 (4 or more recommended); "
                         f"got {len(reference.runs)}. Set sweep.reference_runs ≥ 4 with runs that differ only in "
                         "data order or by a small learning-rate step.")
    common = reference.runs[0].probe_step
    for run in reference.runs[1:]:
        common = np.intersect1d(common, run.probe_step)
    common = common[common > 0]
    if common.size == 0:
        raise ValueError(f"{name}: the reference runs share no probe step after step 0; use one probe schedule")
    return common[_tail(len(common), tail)]


def _compared_groups(reference: ReferenceData, name: str, same_init: bool) -> list[list[ReferenceRun]]:
    """The reference runs that share a start (the base run they fine-tuned; with `same_init`, their init seed
    too), in groups of two or more: runs compared with each other must differ only in data order or lr."""
    groups: dict = {}
    for run in reference.runs:
        groups.setdefault((run.start, repr(run.seeds.get("init")) if same_init else None), []).append(run)
    compared = [g for g in groups.values() if len(g) >= 2]
    if not compared:
        shared = "base run and init seed" if same_init else "base run"
        raise ValueError(f"{name} compares reference runs that share a {shared}, but no two of the "
                         f"{len(reference.runs)} do: set sweep.reference_runs ≥ 2 (per base) with runs that differ "
                         "only in data order or by a small learning-rate step")
    return compared


def _probe_index(run: ReferenceRun, steps: np.ndarray) -> np.ndarray:
    return np.searchsorted(run.probe_step, steps)


class MinisweepCovariancePredictor(Predictor):
    """Candidate: the covariance predictor with Σ from how a few reference runs' parameters differ.

    For reference runs sharing an init and a base run (differing in data order or a small lr step), the
    displacement D_r(p) = θ_r(p) − θ_0 (the sum of sketched updates, by linearity) at each common probe step p in
    the last `tail` of probes is centred across those runs; y_r,p,i = ḡ_i(p)ᵀ(D_r(p) − mean_r D_r(p)) with ḡ(p)
    their mean probe gradient, and the prediction is the partial correlation of the y pooled over groups of runs
    sharing a start (the first-order model with Σ = the runs' spread). tail → only the final probe: rank
    n_runs − 1, very noisy for few runs.
    """

    name = "minisweep_covariance"

    def __init__(self, probe_loss: str = "ce", tail: float = 0.5) -> None:
        super().__init__(probe_loss)
        self.tail = _fraction("tail", tail)

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        steps = _common_probe_steps(reference, self.tail, self.name)
        groups = _compared_groups(reference, self.name, same_init=True)
        li = reference.loss_index(self.probe_loss)
        samples = []
        for group in groups:
            D, G = [], []
            for run in group:
                updates = _require(run, "update", self.name, "add 'update' to capture.quantities")
                D.append(np.cumsum(_window_sums(updates, [_rows_for_steps(run, int(a), int(b)) for a, b in
                                                          zip(np.r_[0, steps[:-1]], steps)]), axis=0))
                G.append(run.probe_grad[_probe_index(run, steps), :, li, :].astype(np.float64))
            D, G = np.stack(D), np.stack(G)  # (n, P, k), (n, P, 1+S, k)
            Y = np.einsum("npk,psk->nps", D - D.mean(axis=0), G.mean(axis=0))
            samples.append(Y.reshape(-1, Y.shape[-1]))
        independent = sum(len(g) - 1 for g in groups) * len(steps)
        return _partial_across_samples(np.concatenate(samples), independent)


class MinisweepLossPredictor(Predictor):
    """Exploratory: partial correlation of the reference runs' measured probe losses across runs.

    At each common probe step in the last `tail` of probes, each run's probe loss minus the mean of the runs
    that fine-tuned the same base run; pooled over those steps and bases. A direct, model-free measurement of
    co-variation across runs (no linearisation, no shared init needed), on the probe batch's loss instead of
    exact match on the test set.
    """

    name = "minisweep_loss"

    def __init__(self, probe_loss: str = "ce", tail: float = 0.5) -> None:
        super().__init__(probe_loss)
        self.tail = _fraction("tail", tail)

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        steps = _common_probe_steps(reference, self.tail, self.name)
        groups = _compared_groups(reference, self.name, same_init=False)
        li = reference.loss_index(self.probe_loss)
        samples = []
        for group in groups:
            losses = [_require(run, "probe_loss", self.name, "capture probe losses") for run in group]
            L = np.stack([loss[_probe_index(run, steps), :, li] for run, loss in zip(group, losses)]).astype(
                np.float64)  # (n, P, 1+S)
            samples.append((L - L.mean(axis=0)).reshape(-1, L.shape[-1]))
        independent = sum(len(g) - 1 for g in groups) * len(steps)
        return _partial_across_samples(np.concatenate(samples), independent)


class CheckpointAccuracyPredictor(Predictor):
    """Exploratory: probit partial correlation of evaluation accuracy across checkpoints of the reference runs.

    Uses `evals/accuracy` (exact match on the test sets at train.eval_every checkpoints) over the last `tail` of
    checkpoints, probit-transformed and centred per run, pooled over runs (across-checkpoint partial correlation,
    as in Boglioni et al.).
    """

    name = "checkpoint_accuracy"

    def __init__(self, probe_loss: str = "ce", tail: float = 0.5, n_items: int = DEFAULT_N_ITEMS) -> None:
        super().__init__(probe_loss)  # accepted for a uniform interface; this predictor reads accuracies
        self.tail, self.n_items = _fraction("tail", tail), int(n_items)

    def _matrix(self, reference: ReferenceData) -> np.ndarray:
        samples = []
        eps = 1.0 / (2.0 * self.n_items)
        for run in reference.runs:
            acc = _require(run, "eval_accuracy", self.name, "set train.eval_every > 0 to evaluate during training")
            z = ndtri(np.clip(acc[_tail(len(acc), self.tail)].astype(np.float64), eps, 1 - eps))
            samples.append(z - z.mean(axis=0))
        return _partial_across_samples(np.concatenate(samples), sum(len(z) - 1 for z in samples))


PREDICTORS: dict[str, type[Predictor]] = {c.name: c for c in (
    ZeroPredictor, MajoritySignPredictor, CosinePredictor, CosineIDProjectedPredictor, AdamCosinePredictor,
    TagLookaheadPredictor, CovariancePredictor, CovarianceDominantPredictor, CovarianceBulkPredictor,
    PathIntegratedPredictor, MinisweepCovariancePredictor, TrajectoryLossPredictor, MinisweepLossPredictor,
    CheckpointAccuracyPredictor)}


BUILT_IN_PREDICTORS = tuple(PREDICTORS)


def register_predictor(cls: type[Predictor]) -> type[Predictor]:
    """Add a predictor of your own to those `run_predict` runs by name, and return it (a class decorator): a
    `Predictor` subclass with a `name` (a results column's rules: ASCII letters, digits and `_`, 40 characters at
    most) and `_matrix(reference)`, the S×S predicted matrix. Registering one of yours again replaces it; a built-in
    name is refused."""
    from gradtrace.tasks.shifts import SPLIT_NAME, registering_module, remember

    if not (isinstance(cls, type) and issubclass(cls, Predictor)):
        raise TypeError(f"register_predictor takes a subclass of gradtrace.predict.Predictor, got {cls!r}")
    name = getattr(cls, "name", None)
    if not (isinstance(name, str) and SPLIT_NAME.fullmatch(name)):
        raise ValueError(f"{cls.__name__}.name must be a name of ASCII letters, digits and _ (a letter first, 40 "
                         f"characters at most), got {name!r}")
    if name in BUILT_IN_PREDICTORS and PREDICTORS[name] is not cls:
        raise ValueError(f"predictor {name!r} is built in; give yours another name")
    if inspect.isabstract(cls):
        raise TypeError(f"{cls.__name__} defines no _matrix(reference): the S×S predicted matrix it fits")
    remember(PREDICTORS, "predictor", name, cls, registering_module())
    return cls


def baselines() -> tuple[str, ...]:
    """The registered predictors marked `baseline` (every `predict` runs them; scores group them apart), read when
    asked, so that a predictor registered after import counts too."""
    return tuple(name for name, cls in PREDICTORS.items() if cls.baseline)


# ----------------------------------------------------------------------------------------------------------------
# scoring


SCORE_COLUMNS = ["predictor", "preregistered", "group", "spearman", "pearson", "sign_acc", "majority_sign_acc",
                 "n_sig_pairs", "n_pairs", "n_runs", "reliability", "noise_ceiling", "spearman_over_ceiling",
                 "p_relabel", "n_relabel", "boot_ci_low", "boot_ci_high", "compute_ratio", "note"]


@dataclass(frozen=True)
class _Observed:
    shifts: list[str]
    ia: np.ndarray
    ib: np.ndarray
    r: np.ndarray
    significant: np.ndarray


def _observed_pairs(observed: pd.DataFrame) -> _Observed:
    if "residualize" in observed.columns:  # the ceiling and the bootstrap recompute probit partials: compare those
        if "probit" not in set(observed["residualize"]):
            raise ValueError(f"observed holds {sorted(set(observed['residualize']))} rows but no 'probit' ones: "
                             "score compares predictions with the probit partial correlations; pass those")
        observed = observed[observed["residualize"] == "probit"]
    missing = {"a", "b", "r", "ci_low", "ci_high"} - set(observed.columns)
    if missing:
        raise ValueError(f"observed pairs lack columns {sorted(missing)}; pass gradtrace.stats.partial_correlations' "
                         "output (columns a, b, r, ci_low, ci_high)")
    shifts = list(dict.fromkeys(list(observed["a"]) + list(observed["b"])))
    pos = {s: i for i, s in enumerate(shifts)}
    ia = observed["a"].map(pos).to_numpy()
    ib = observed["b"].map(pos).to_numpy()
    low, high = observed["ci_low"].to_numpy(float), observed["ci_high"].to_numpy(float)
    return _Observed(shifts, ia, ib, observed["r"].to_numpy(float), (low > 0) | (high < 0))


def _pred_values(matrix: pd.DataFrame, obs: _Observed, name: str) -> np.ndarray:
    missing = [s for s in obs.shifts if s not in matrix.index or s not in matrix.columns]
    if missing:
        raise ValueError(f"prediction {name!r} has no rows/columns for shifts {missing}; it covers "
                         f"{list(matrix.index)}. Predict and observe the same shifts.")
    M = matrix.loc[obs.shifts, obs.shifts].to_numpy(dtype=float)
    return M[obs.ia, obs.ib]


def _rowwise_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis (broadcast); NaN when either side is constant."""
    constant = (np.ptp(x, axis=-1) == 0) | (np.ptp(y, axis=-1) == 0)
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    return np.where(np.isfinite(r) & ~constant, r, np.nan)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis, NaN rows kept NaN."""
    return rankdata(x, axis=-1, nan_policy="propagate")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation of two vectors; NaN when either is constant or holds NaN."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    return float(_rowwise_corr(_ranks(x), _ranks(y)))


def sign_accuracy(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Share of pairs where the predicted sign matches the observed one (a prediction of exactly 0 scores ½).

    NaN when there are no pairs or the prediction holds NaN.
    """
    if len(observed) == 0 or np.isnan(predicted).any():
        return float("nan")
    p, o = np.sign(predicted), np.sign(observed)
    return float(np.mean(np.where(p == 0, 0.5, (p == o).astype(float))))


def relabel_pvalue(predicted: np.ndarray, observed: np.ndarray, n_perm: int = 10000, seed: int = 0,
                   max_exhaustive: int = 8) -> tuple[float, int]:
    """One-sided shift-relabelling permutation p of the Spearman between an S×S prediction and observed matrix.

    Shift names of the prediction are permuted (rows and columns together); all S! permutations when
    S ≤ max_exhaustive (exact p, identity included), else n_perm random ones (p = (1 + hits)/(1 + n_perm); NaN
    for none). Returns (p, number of permutations).
    """
    predicted, observed = np.asarray(predicted, float), np.asarray(observed, float)
    S = predicted.shape[0]
    if S > max_exhaustive and n_perm == 0:  # not tested, rather than p = 1
        return float("nan"), 0
    ia, ib = np.triu_indices(S, k=1)
    obs_ranks = _ranks(observed[ia, ib])
    if np.isnan(predicted[ia, ib]).any() or np.isnan(obs_ranks).any():
        return float("nan"), 0
    pred_ranks = np.full((S, S), np.nan)
    pred_ranks[ia, ib] = _ranks(predicted[ia, ib])
    pred_ranks[ib, ia] = pred_ranks[ia, ib]
    exhaustive = S <= max_exhaustive
    if exhaustive:
        perms = np.array(list(itertools.permutations(range(S))))
    else:
        rng = np.random.default_rng(seed)
        perms = np.argsort(rng.random((n_perm, S)), axis=1)
    base = _rowwise_corr(pred_ranks[ia, ib], obs_ranks)
    if np.isnan(base):
        return float("nan"), 0
    null = _rowwise_corr(pred_ranks[perms[:, ia], perms[:, ib]], obs_ranks)
    hits = int(np.sum(null >= base - 1e-12))
    if exhaustive:
        return hits / len(perms), len(perms)
    return (1 + hits) / (1 + n_perm), n_perm


def _pair_spearman_batch(values: np.ndarray, pred_ranks: np.ndarray) -> np.ndarray:
    """Spearman of each row of values (B, pairs) with fixed predicted ranks; NaN rows stay NaN."""
    bad = np.isnan(values).any(axis=1)
    out = _rowwise_corr(_ranks(np.where(bad[:, None], 0.0, values)), pred_ranks)
    out[bad] = np.nan
    return out


def noise_ceiling(accuracy: np.ndarray, n_splits: int = 200, seed: int = 0,
                  n_items: int = DEFAULT_N_ITEMS, groups: np.ndarray | None = None) -> tuple[float, float]:
    """(reliability, ceiling) of the observed matrix from accuracies (runs, 1+S), ID in column 0.

    reliability: mean Spearman over pairs between matrices from random halves of the runs (halves of each group
    with `groups`, the runs' group codes; a group's odd run sits out), Spearman–Brown corrected to the full number
    of runs (the agreement of two independent sweeps of this size). The correction's length ratio is that of the
    partial correlations' degrees of freedom, runs less ID, one intercept per group and 2 (a Fisher z's variance is
    1/(n − B − 3)): halves of 4 bases × 25 runs hold 12 runs per base, so 41 of the whole's 93, not half. ceiling:
    √reliability, the expected Spearman of a perfect predictor with the observed matrix (both 0 where the halves agree
    no better than chance: `stats.spearman_brown`). NaN for fewer than 8 runs, and with a warning where a half leaves
    no degree of freedom.
    """
    accuracy = np.asarray(accuracy, float)
    n, S = accuracy.shape[0], accuracy.shape[1] - 1
    if n < 8:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    halves: list[list[np.ndarray]] = [[], []]
    members_of = [np.arange(n)] if groups is None else [np.flatnonzero(groups == g) for g in np.unique(groups)]
    for members in members_of:
        order, half = members[np.argsort(rng.random((n_splits, len(members))), axis=1)], len(members) // 2
        halves[0].append(order[:, :half])
        halves[1].append(order[:, half: 2 * half])
    half_sizes = [len(members) // 2 for members in members_of]
    groups_in_half = sum(size > 0 for size in half_sizes)
    half_dof = sum(half_sizes) - groups_in_half - 3
    if half_dof < 1:
        warnings.warn(f"no noise ceiling: a half of these {n} runs holds {sum(half_sizes)} in {groups_in_half} "
                      f"group(s), no degree of freedom for a partial correlation given ID within them (that needs "
                      f"more than {groups_in_half + 3} runs a half): add runs", UserWarning, stacklevel=2)
        return float("nan"), float("nan")
    first_idx, second_idx = (np.concatenate(h, axis=1) for h in halves)
    ia, ib = np.triu_indices(S, k=1)
    first = probit_partials(accuracy[first_idx], n_items, None if groups is None else groups[first_idx[0]])[:, ia, ib]
    second = probit_partials(accuracy[second_idx], n_items,
                             None if groups is None else groups[second_idx[0]])[:, ia, ib]
    ok = ~(np.isnan(first).any(axis=1) | np.isnan(second).any(axis=1))
    rho = float(np.mean(_rowwise_corr(_ranks(first[ok]), _ranks(second[ok])))) if ok.any() else float("nan")
    length = (n - len(members_of) - 3) / half_dof
    reliability = float(spearman_brown(rho, length))
    return reliability, math.sqrt(reliability)


def score(predicted: Mapping[str, pd.DataFrame] | pd.DataFrame, observed: pd.DataFrame,
          accuracies: pd.DataFrame | None = None, *, id: str = "ID", preregistered: Sequence[str] = (),
          compute_ratio: Mapping[str, float] | None = None, n_boot: int = 1000, n_splits: int = 200,
          n_perm: int = 10000, seed: int = 0, n_items: int = DEFAULT_N_ITEMS, within: str | None = None
          ) -> pd.DataFrame:
    """One row per predictor scoring its S×S matrix against observed pairs (gradtrace.stats output).

    accuracies: the sweep's runs × `acc_<split>` table the observed matrix came from; it gives the noise ceiling
    and the bootstrap CI of the Spearman (sweep runs resampled, the observed matrix recomputed, the prediction
    held fixed; the resamples' percentile interval moved by the observed Spearman less their median, since a
    resample's matrix carries the sweep's noise twice over and its Spearman sits lower: in simulated sweeps the
    plain interval missed high nearly always, covering 83–95% (the better the predictor, the less), the moved one
    94–97%); both are NaN without it. sign_acc counts pairs whose observed CI excludes 0; majority_sign_acc is
    the best any constant sign could score there. within: the accuracies' column of each run's group (e.g. its base
    run) when the observed matrix was taken within groups: the ceiling and the bootstrap then work within them.
    Columns: SCORE_COLUMNS; `group` is preregistered / baseline / exploratory.
    """
    if isinstance(predicted, pd.DataFrame):
        predicted = {"predicted": predicted}
    check_counts(n_boot=(n_boot, 0), n_splits=(n_splits, 1), n_perm=(n_perm, 0), n_items=(n_items, 1))
    check_resamples(n_boot, 0.95)
    obs = _observed_pairs(observed)
    sig = obs.significant
    acc = None
    reliability = ceiling = float("nan")
    if accuracies is not None:
        columns = [f"acc_{s}" for s in [id, *obs.shifts]]
        missing = [c for c in columns if c not in accuracies.columns]
        if missing:
            raise ValueError(f"accuracies lack columns {missing}; expected acc_<split> for ID ({id!r}) and every shift")
        acc = check_accuracies(accuracies, columns)
        groups = None if within is None else group_codes(accuracies[within], f"within={within!r}")
        reliability, ceiling = noise_ceiling(acc, n_splits, seed, n_items, groups)
        boot_pairs = None
        if n_boot:
            idx = bootstrap_indices(len(acc), n_boot, np.random.default_rng(seed), groups)
            boot_pairs = np.concatenate([
                probit_partials(acc[idx[lo:lo + BOOT_CHUNK]], n_items, groups)[:, obs.ia, obs.ib]
                for lo in range(0, n_boot, BOOT_CHUNK)])
    majority = float(max(np.mean(obs.r[sig] > 0), np.mean(obs.r[sig] < 0))) if sig.any() else float("nan")
    few = ""
    if len(obs.r) < 3:  # 1 pair: every Spearman NaN; 2: each ±1, which says nothing
        few = (f"{len(obs.r)} pair(s) of shifts scored: a rank correlation over pairs needs at least 3 (3 shifts "
               "varying across the sweep; 4 give 6)")
        warnings.warn(f"predictor scores say little: {few}", UserWarning, stacklevel=2)
    S = len(obs.shifts)
    obs_matrix = np.full((S, S), np.nan)
    obs_matrix[obs.ia, obs.ib] = obs_matrix[obs.ib, obs.ia] = obs.r
    rows = []
    for name, matrix in predicted.items():
        values = _pred_values(matrix, obs, name)
        rho = spearman(values, obs.r)
        low = high = float("nan")
        if acc is not None and n_boot and not np.isnan(rho):
            boot = _pair_spearman_batch(boot_pairs, _ranks(values))
            if np.isfinite(boot).any():
                low, high = np.clip(np.nanpercentile(boot, [2.5, 97.5]) + rho - np.nanmedian(boot), -1.0, 1.0)
        pred_matrix = matrix.loc[obs.shifts, obs.shifts].to_numpy(float)
        p, n_rel = relabel_pvalue(pred_matrix, obs_matrix, n_perm, seed)
        group = "preregistered" if name in preregistered else "baseline" if name in baselines() else "exploratory"
        rows.append({
            "predictor": name, "preregistered": name in preregistered, "group": group, "spearman": rho,
            "pearson": float(_rowwise_corr(values, obs.r)) if not np.isnan(values).any() else float("nan"),
            "sign_acc": sign_accuracy(values[sig], obs.r[sig]), "majority_sign_acc": majority,
            "n_sig_pairs": int(sig.sum()), "n_pairs": len(values), "n_runs": len(acc) if acc is not None else np.nan,
            "reliability": reliability, "noise_ceiling": ceiling,
            "spearman_over_ceiling": rho / ceiling if ceiling and ceiling > 0 else float("nan"),
            "p_relabel": p, "n_relabel": n_rel, "boot_ci_low": low, "boot_ci_high": high,
            "compute_ratio": (compute_ratio or {}).get(name, float("nan")), "note": few,
        })
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


# ----------------------------------------------------------------------------------------------------------------
# an experiment end to end


@dataclass(frozen=True)
class PredictResult:
    """Predictions (one row per predictor and pair) and scores (one row per predictor) of an experiment."""

    predictions: pd.DataFrame  # predictor, a, b, predicted, observed, observed_ci_low, observed_ci_high
    scores: pd.DataFrame  # SCORE_COLUMNS
    errors: dict[str, str] = field(default_factory=dict)  # predictor -> why it could not run


def check_names(names: Sequence[str]) -> None:
    """Refuse names no registered predictor has (a sweep checks its config's before any run trains)."""
    unknown = [n for n in names if n not in PREDICTORS]
    if unknown:
        raise ValueError(f"unknown predictor(s) {unknown}; available: {', '.join(PREDICTORS)}")


def _planned(names: Sequence[str] | None, preregistered: Sequence[str], exploratory: Sequence[str]) -> list[str]:
    chosen = list(names) if names is not None else [*preregistered, *exploratory]
    check_names(chosen)
    return list(dict.fromkeys([*[n for n in preregistered if n in chosen], *baselines(),
                               *[n for n in chosen if n not in preregistered]]))


def _sweep_wall_time(exp_dir: Path, sweep: pd.DataFrame) -> float:
    if "wall_time_s" in sweep.columns and sweep["wall_time_s"].notna().any():
        return float(sweep["wall_time_s"].sum())
    try:
        root = _open_store(exp_dir)
    except (FileNotFoundError, ValueError):
        return float("nan")
    times = [run.attrs.get("wall_time_s") for run in store.run_groups(root).values()
             if run.attrs.get("role") == "sweep"]
    times = [t for t in times if t is not None]
    return float(sum(times)) if times else float("nan")


def _import_study_modules(modules: list[str], wanted: list[str]) -> None:
    """Import the study's task.modules where a predictor `wanted` is not built in: its module registers it (or takes it
    back from another study's module of that name in a process serving both). A module that is not there (a moved
    study) is warned of where every predictor wanted is registered in this process already."""
    from gradtrace.tasks.shifts import ModuleNotThere, import_split_modules

    if all(name in BUILT_IN_PREDICTORS for name in wanted):
        return
    try:
        import_split_modules(modules)
    except ModuleNotThere as err:
        if not all(name in PREDICTORS for name in wanted):
            raise
        warnings.warn(f"{err}: predicting with the predictors registered in this process", UserWarning, stacklevel=3)


def run_predict(exp_dir: str | Path, predictors: Sequence[str] | None = None, seed: int = 0, n_boot: int = 1000,
                n_splits: int = 200, n_perm: int = 10000, out: str | Path | None = None) -> PredictResult:
    """Fit every baseline plus the configured (or named) predictors on the reference runs, score them against the
    sweep's observed matrix, and write predictions.csv, predict_scores.csv and predict.json (the sha256 of the
    results.csv they score, and the predictors) into `out` (default: DIR itself; another directory for a study one
    cannot write to).

    Pre-registered predictors are `predict.preregistered` in DIR/config.yaml; all others are exploratory (or
    baselines). A predictor that cannot run on this experiment is reported with NaN scores and its error in `note`.
    A directory of runs of your own (results.csv beside store.zarr, no plan.json) needs no config.yaml: the default
    predict settings and `task.n_test` (2000 items per split, as stats takes) then apply.
    """
    from gradtrace import config as config_module
    from gradtrace.results import base_groups, load_results, run_groups_of, why_no_results

    exp_dir, predictors = Path(exp_dir), [predictors] if isinstance(predictors, str) else predictors  # one, by name
    sweep_dir = (exp_dir / "plan.json").exists()
    if sweep_dir and not (exp_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{exp_dir / 'config.yaml'} is missing: run_predict needs an experiment directory "
                                "written by `gradtrace sweep` (config.yaml, results.csv, store.zarr), or one of runs "
                                "of your own (results.csv beside store.zarr)")
    if not (exp_dir / "results.csv").exists():  # a sweep that has finished no run yet, runs of `gradtrace train`, …
        raise FileNotFoundError(why_no_results(exp_dir))
    cfg = config_module.load(exp_dir / "config.yaml" if (exp_dir / "config.yaml").exists() else None)
    preregistered, exploratory = list(cfg.predict.preregistered), list(cfg.predict.exploratory)
    _import_study_modules(cfg.task.modules, [*preregistered, *exploratory, *(predictors or [])])
    names = _planned(predictors, preregistered, exploratory)
    n_items = int(cfg.task.n_test)

    groups = run_groups_of(exp_dir)  # listed once for both (~2 s at 3,000 runs)
    reference = load_reference(exp_dir, role=cfg.predict.reference_role, groups=groups)
    results_digest = sha256_of(exp_dir / "results.csv")  # before it is read: a table rewritten since reads as changed
    sweep = load_results(exp_dir, role="sweep", groups=groups)  # warns where the sweep is not finished
    if sweep.empty:
        raise ValueError(f"{exp_dir / 'results.csv'} has no rows with role == 'sweep' to observe")
    within = base_groups(sweep)  # runs from several base runs: correlated within base
    shifts = varying_shifts(sweep, reference.id_split, reference.shifts, within)  # where the sweep observed a matrix
    observed = partial_correlations(sweep, id=reference.id_split, shifts=shifts,
                                    residualize="probit", n_boot=0, n_perm=0, seed=seed, n_items=n_items,
                                    within=within)
    sweep_time = _sweep_wall_time(exp_dir, sweep)

    matrices: dict[str, pd.DataFrame] = {}
    ratios: dict[str, float] = {}
    errors: dict[str, str] = {}
    nan_matrix = pd.DataFrame(np.nan, index=list(reference.shifts), columns=list(reference.shifts))
    for name in names:
        try:
            predictor = PREDICTORS[name]
            clips = "n_items" in inspect.signature(predictor).parameters  # probit of accuracies: the task's N
            prediction = (predictor(n_items=n_items) if clips else predictor()).fit(reference).predict()
        except Exception as err:  # one predictor failing, however it fails, must not cost the others their scores
            warnings.warn(f"predictor {name!r} could not run: {type(err).__name__}: {err}", UserWarning, stacklevel=2)
            errors[name], matrices[name], ratios[name] = str(err), nan_matrix, float("nan")
            continue
        matrices[name] = prediction.matrix
        ratios[name] = prediction.wall_time_s / sweep_time if sweep_time > 0 else float("nan")
        finite = np.isfinite(prediction.matrix.loc[shifts, shifts].to_numpy(dtype=float))  # the pairs scored
        pairs = [(a, b) for i, a in enumerate(shifts) for j, b in enumerate(shifts) if i < j and not finite[i, j]]
        bad = [r.run_id for r in reference.runs if r.nonfinite_steps]
        why = f": reference runs {bad} recorded non-finite gradients" if bad else ""
        if pairs and len(pairs) == len(finite) * (len(finite) - 1) // 2:
            errors[name] = "gave no finite prediction" + why
        elif pairs:
            errors[name] = f"gave no finite prediction for {len(pairs)} pair(s), e.g. {pairs[0][0]}~{pairs[0][1]}{why}"
    scores = score(matrices, observed, sweep, id=reference.id_split, preregistered=preregistered,
                   compute_ratio=ratios, n_boot=n_boot, n_splits=n_splits, n_perm=n_perm, seed=seed, n_items=n_items,
                   within=within)
    scores["note"] = [errors.get(name) or note for name, note in zip(scores["predictor"], scores["note"])]
    group_order = {"preregistered": 0, "baseline": 1, "exploratory": 2}
    scores = scores.sort_values("group", key=lambda g: g.map(group_order), kind="stable").reset_index(drop=True)

    frames = []
    for name, matrix in matrices.items():
        frames.append(pd.DataFrame({
            "predictor": name, "a": observed["a"].to_numpy(), "b": observed["b"].to_numpy(),
            "predicted": [matrix.loc[a, b] for a, b in zip(observed["a"], observed["b"])],
            "observed": observed["r"].to_numpy(), "observed_ci_low": observed["ci_low"].to_numpy(),
            "observed_ci_high": observed["ci_high"].to_numpy()}))
    predictions = pd.concat(frames, ignore_index=True)
    out = exp_dir if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)  # as `--out` is made (a missing one failed once every predictor was run)
    write_csv(predictions, out / "predictions.csv")
    write_csv(scores, out / "predict_scores.csv")
    write_json({RESULTS_DIGEST: results_digest, "predictors": names}, out / "predict.json")  # last: it vouches for both
    return PredictResult(predictions, scores, errors)


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def format_scores(scores: pd.DataFrame) -> str:
    """A terminal table of scores by group, with the noise ceiling and how to read the relabelling p."""
    if scores.empty:
        return "no predictors scored"
    first = scores.iloc[0]
    lines = [
        f"observed matrix: {_fmt(first['n_pairs'], 'd')} pairs, {_fmt(float(first['n_runs']), '.0f')} sweep runs, "
        f"{_fmt(first['n_sig_pairs'], 'd')} with CI excluding 0",
        f"noise ceiling: reliability {_fmt(first['reliability'])} (split-half Spearman, Spearman–Brown), "
        f"ceiling √rel = {_fmt(first['noise_ceiling'])} — no predictor can expect a higher Spearman",
        f"majority-sign accuracy on significant pairs: {_fmt(first['majority_sign_acc'])}",
        "p_relabel: share of shift relabellings whose Spearman ≥ the predictor's (one-sided; small = real signal)",
        "",
    ]
    header = (f"{'predictor':<22} {'spearman':>8} {'95% boot CI':>15} {'p_relabel':>9} {'/ceiling':>8} "
              f"{'sign_acc':>8} {'pearson':>7} {'compute':>7}")
    for group in ("preregistered", "baseline", "exploratory"):
        part = scores[scores["group"] == group]
        if part.empty:
            continue
        lines += [f"[{group}]", header]
        for _, row in part.iterrows():
            ci = f"[{_fmt(row['boot_ci_low'])}, {_fmt(row['boot_ci_high'])}]"
            lines.append(f"{row['predictor']:<22} {_fmt(row['spearman']):>8} {ci:>15} "
                         f"{_fmt(row['p_relabel'], '.3f'):>9} "
                         f"{_fmt(row['spearman_over_ceiling']):>8} {_fmt(row['sign_acc']):>8} "
                         f"{_fmt(row['pearson']):>7} {_fmt(row['compute_ratio'], '.2g'):>7}"
                         + (f"  ({row['note']})" if row.get("note") else ""))
        lines.append("")
    return "\n".join(lines).rstrip()
