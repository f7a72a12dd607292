"""Partial correlations between OOD shifts, with honest uncertainty.

The measured target of gradtrace is the partial correlation r(a_1, a_2 | a_ID) of two shifts' accuracies
across many fine-tuning runs (``unit="runs"``) or across the checkpoints of one run (``unit="checkpoints"``).
This module turns a runs x splits accuracy table (columns ``acc_<split>``) into that matrix, one row per shift
pair and residualisation:

- **Residualisation** of each shift's accuracy on ID accuracy (k = number of covariates, intercept not counted):
  ``linear`` least squares on the raw scale (k = 1); ``probit`` least squares after Phi^-1 of every accuracy
  (k = 1; "accuracy on the line" is linear there); ``spline`` a GAM-style cubic B-spline on the same probit
  axes (k = basis size, 5 with the default 4 knots), which relaxes the probit line to any smooth curve. Linear
  residualisation manufactures correlation when ID spans a wide range, so ``residualize="all"`` runs the three
  and flags disagreement (one the sweep cannot support — fewer than k + 4 runs, or a shift its curve fits
  exactly — is left out with a warning; alone, it is refused).
- **Uncertainty**: t-test p with dof n - k - 2; Fisher-z CI with dof n - k - 3 (pingouin's convention);
  percentile and BCa bootstrap CIs over runs (moving-block bootstrap over checkpoints); Freedman-Lane
  permutation p; Holm and Benjamini-Hochberg adjustment across pairs within each residualisation.
- **Groups**: ``within="base"`` takes every correlation within groups of runs (e.g. the base run each fine-tuned):
  group indicators join the covariates, and the bootstrap and permutations stay within groups. The result is one
  correlation of the pooled within-group covariance (a group whose shifts vary more weighs more), not an average of
  per-group correlations.
- **Reliability**: split-half (Spearman-Brown) reliability of each split's accuracy from per-item correctness,
  and the partial correlation disattenuated for the unreliability of the residuals.
- **Generalisation gap**: train vs held-out accuracy per run and split, validation vs test consistency and the
  spread across seeds.

``stats_report`` computes all of it for an experiment directory and writes CSV/JSON next to the results;
``format_table`` renders the partial-correlation table for a terminal.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.special import ndtr, ndtri

from gradtrace.files import RESULTS_DIGEST, sha256_of, write_csv, write_json

__all__ = [
    "RESIDUALIZATIONS",
    "bootstrap_indices",
    "centre_within",
    "check_accuracies",
    "check_counts",
    "check_resamples",
    "group_codes",
    "StatsReport",
    "format_table",
    "generalisation_gap",
    "partial_correlations",
    "runs_needed",
    "spearman_brown",
    "split_half_reliability",
    "stats_report",
]

RESIDUALIZATIONS = ("linear", "probit", "spline")
UNITS = ("runs", "checkpoints")
DEFAULT_N_ITEMS = 2000  # items per split assumed for the probit continuity correction when unknown
RELIABILITY_WARN = 0.9
ITEM_MATCH_TOL = 1e-3  # max |mean item correctness - acc_<split>| before rows are deemed misaligned
SEED_COLUMNS = ("seed", "init_seed", "data_seed")
_PER_RUN_COLUMNS = ("run_id", "step", "wall_time_s")  # vary per run without being configuration
_CHUNK = 256  # resamples per vectorised batch (bounds memory at _CHUNK * n * n_splits floats)

RESULT_COLUMNS = [
    "a", "b", "residualize", "unit", "n", "k", "dof", "r", "ci_low", "ci_high", "p", "p_perm",
    "p_holm", "p_bh", "boot_ci_low", "boot_ci_high", "bca_ci_low", "bca_ci_high", "disagree",
]
CHECKPOINT_NOTE = (
    "checkpoints of one run are not independent: p, p_perm, p_holm, p_bh and the Fisher CI assume "
    "independent rows and are invalid here; the block-bootstrap CIs (boot_ci_*, bca_ci_*) are approximate and "
    "too narrow for strongly autocorrelated checkpoints"
)


# ----------------------------------------------------------------------------------------------------------------
# vectorised core


def _design_basis(Z: np.ndarray) -> np.ndarray:
    """Orthonormal basis (..., n, q + 1) of the columns of [1, Z], Z (..., n, q); zero columns for the directions a
    rank-deficient design (e.g. a bootstrap resample) lacks."""
    D = np.concatenate([np.ones(Z.shape[:-1] + (1,)), Z], axis=-1)
    U, s, _ = np.linalg.svd(D, full_matrices=False)
    tol = s[..., :1] * max(D.shape[-2:]) * np.finfo(float).eps
    return U * (s > tol)[..., None, :]


def _residualize(Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Residuals of Y (..., n, m) after least squares on [1, Z] with Z (..., n, q); batch axes broadcast."""
    U = _design_basis(Z)
    return Y - U @ (np.swapaxes(U, -1, -2) @ Y)


def _corr_matrix(R: np.ndarray) -> np.ndarray:
    """Correlation matrix (..., m, m) of the columns of R (..., n, m); NaN where a column is constant."""
    R = R - R.mean(axis=-2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        Rn = R / np.linalg.norm(R, axis=-2, keepdims=True)
    return np.clip(np.swapaxes(Rn, -1, -2) @ Rn, -1.0, 1.0)


def _partial_r(x: np.ndarray, y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Partial correlation of x and y (..., n) given covariates Z (..., n, q), or one covariate (..., n); batched."""
    Z = np.asarray(Z, dtype=float)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if Z.ndim <= x.ndim and Z.shape[-1] == x.shape[-1]:  # one covariate, (..., n)
        Z = Z[..., None]
    R = _residualize(np.stack(np.broadcast_arrays(x, y), axis=-1), Z)
    return _corr_matrix(R)[..., 0, 1]


def _t_pvalue(r: np.ndarray, dof: int | np.ndarray) -> np.ndarray:
    """Two-sided t-test p of a (partial) correlation r with dof degrees of freedom."""
    r = np.asarray(r, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(dof / (1.0 - r**2))
    return np.where(r**2 >= 1.0, 0.0, 2.0 * sps.t.sf(np.abs(t), dof))


def _fisher_ci(r: np.ndarray, n: int, k: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Fisher-z confidence interval of a partial correlation with standard error 1 / sqrt(n - k - 3)."""
    z, half = np.arctanh(r), ndtri(0.5 + confidence / 2) / math.sqrt(n - k - 3)
    return np.tanh(z - half), np.tanh(z + half)


def _probit(p: np.ndarray, n_items: np.ndarray | int) -> np.ndarray:
    """Phi^-1 of accuracies clipped to [1/(2N), 1 - 1/(2N)] (N = items per split) so 0 and 1 stay finite."""
    eps = 1.0 / (2.0 * np.asarray(n_items, dtype=float))
    return ndtri(np.clip(p, eps, 1.0 - eps))


def _spline_basis(x: np.ndarray, n_knots: int) -> np.ndarray:
    """Cubic B-spline basis of x (n,) with knots at quantiles, intercept column dropped: (n, n_knots + 1)."""
    from sklearn.preprocessing import SplineTransformer

    st = SplineTransformer(n_knots=n_knots, degree=3, knots="quantile", include_bias=False)
    return st.fit_transform(np.asarray(x, dtype=float)[:, None])


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values: the i-th smallest of m times m − i + 1, kept non-decreasing, at most 1 (a
    NaN counts in m and stays NaN), as statsmodels' `multipletests` gives them (the tests check it against it), but
    without the full garbage collection it runs at every call: 0.2 s in a process holding torch and transformers."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(len(p), 0, -1)))
    return adjusted


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy's implementation)."""
    return sps.false_discovery_control(p, method="bh")


def runs_needed(r: float = 0.3, half_width: float = 0.2, k: int = 1, confidence: float = 0.95) -> int:
    """Smallest number of runs whose Fisher-z CI of a partial correlation r has at most this half-width."""
    if not (-1 < r < 1 and half_width > 0 and 0 < confidence < 1 and k >= 0):
        raise ValueError(
            f"runs_needed(r={r}, half_width={half_width}, k={k}, confidence={confidence}): expected -1 < r < 1, "
            "half_width > 0, k >= 0 and 0 < confidence < 1."
        )
    crit, z = ndtri(0.5 + confidence / 2), math.atanh(r)
    n = k + 4
    while (math.tanh(z + crit / math.sqrt(n - k - 3)) - math.tanh(z - crit / math.sqrt(n - k - 3))) / 2 > half_width:
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------------------
# resampling


def _resample_indices(n: int, n_boot: int, block_length: int | None, rng: np.random.Generator,
                      groups: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, n) row indices: iid rows (within each group, which keeps its size, when `groups` gives each row's
    group code), or a moving-block bootstrap when block_length is given."""
    if block_length is None:
        return bootstrap_indices(n, n_boot, rng, groups)
    n_blocks = -(-n // block_length)
    starts = rng.integers(0, n - block_length + 1, size=(n_boot, n_blocks))
    return (starts[..., None] + np.arange(block_length)).reshape(n_boot, n_blocks * block_length)[:, :n]


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator, groups: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, n) iid bootstrap resamples of n runs; with `groups` (each run's group code) within each group, every
    group keeping its size and its positions (so a resample's groups are the original `groups`)."""
    return _within_groups(n, groups, lambda size: rng.integers(0, size, size=(n_boot, size)))


def _permutations(n: int, n_perm: int, rng: np.random.Generator, groups: np.ndarray | None = None) -> np.ndarray:
    """(n_perm, n) random permutations of the rows (within each group when `groups` gives each row's group code)."""
    return _within_groups(n, groups,
                          lambda size: rng.permuted(np.broadcast_to(np.arange(size), (n_perm, size)), axis=1))


def _within_groups(n: int, groups: np.ndarray | None, draw: Callable[[int], np.ndarray]) -> np.ndarray:
    """Row indices (b, n) that `draw(size)` (positions 0..size-1, shape (b, size)) picks within each group, in
    place; one group of all rows when `groups` is None."""
    if groups is None:
        return draw(n)
    out = None
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        picked = members[draw(len(members))]
        out = np.empty((len(picked), n), dtype=int) if out is None else out
        out[:, members] = picked
    return out


def _pinv_psd(A: np.ndarray) -> np.ndarray:
    """Pseudo-inverses of symmetric positive semi-definite matrices (..., b, b), eigenvalues below 1e-10 taken as 0."""
    w, V = np.linalg.eigh(A)
    return (V * np.divide(1.0, w, out=np.zeros_like(w), where=w > 1e-10)[..., None, :]) @ np.swapaxes(V, -1, -2)


def _jackknife_corr(Y: np.ndarray, Z: np.ndarray, block_length: int | None) -> np.ndarray:
    """Residual correlation matrices (J, m, m) of Y (n, m) given [1, Z] with one row, or one non-overlapping block of
    `block_length` checkpoints, deleted in turn. Exact and O(n m²), from the full fit alone (the regression deletion
    formula): deleting rows B leaves the residual cross-products S - E_Bᵀ (I - H_BB)⁺ E_B, E the residuals and H the
    hat matrix; a row of leverage 1 (the one member of a group) has no residual and leaves S as it is."""
    U = _design_basis(Z)
    E = Y - U @ (U.T @ Y)
    rows = np.arange(len(Y))
    blocks = rows[:, None] if block_length is None else np.array_split(rows, -(-len(Y) // block_length))
    S_del = np.empty((len(blocks), Y.shape[1], Y.shape[1]))
    for size in {len(b) for b in blocks}:  # blocks differ in length by one at most
        which = [j for j, b in enumerate(blocks) if len(b) == size]
        idx = np.stack([blocks[j] for j in which])
        keep = _pinv_psd(np.eye(size) - U[idx] @ np.swapaxes(U[idx], -1, -2))
        S_del[which] = E.T @ E - np.swapaxes(E[idx], -1, -2) @ keep @ E[idx]
    scale = np.sqrt(np.clip(np.diagonal(S_del, axis1=-2, axis2=-1), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(S_del / (scale[:, :, None] * scale[:, None, :]), -1.0, 1.0)


def _batched(stat: Callable[[np.ndarray], np.ndarray], idx: Sequence[np.ndarray]) -> np.ndarray:
    """stat over many index sets, stacked in chunks of equal length (stat maps (b, m) indices to (b, P))."""
    out: list[np.ndarray | None] = [None] * len(idx)
    for m in sorted({len(i) for i in idx}):
        sel = [j for j, i in enumerate(idx) if len(i) == m]
        for start in range(0, len(sel), _CHUNK):
            part = sel[start : start + _CHUNK]
            for j, row in zip(part, stat(np.stack([idx[j] for j in part]))):
                out[j] = row
    return np.stack(out)


def _percentile_ci(theta_b: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI per column of theta_b (B, P), ignoring NaN replicates."""
    alpha = (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> NaN
        lo, hi = np.nanpercentile(theta_b, [100 * alpha, 100 * (1 - alpha)], axis=0)
    return lo, hi


def _bca_ci(
    theta_b: np.ndarray, theta: np.ndarray, theta_jack: np.ndarray, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """BCa bootstrap CI per column (Efron 1987; same formulas as scipy.stats.bootstrap), NaN replicates ignored."""
    alpha = (1 - confidence) / 2
    z_q = ndtri(np.array([alpha, 1 - alpha]))
    lo, hi = np.full(theta.shape, np.nan), np.full(theta.shape, np.nan)
    for j in range(theta.size):
        tb, jk = theta_b[:, j], theta_jack[:, j]
        tb, jk = tb[np.isfinite(tb)], jk[np.isfinite(jk)]
        if tb.size == 0 or jk.size < 2 or not np.isfinite(theta[j]):
            continue
        z0 = ndtri(((tb < theta[j]).mean() + (tb <= theta[j]).mean()) / 2)
        d = jk.mean() - jk
        den = 6.0 * np.sum(d**2) ** 1.5
        a = np.sum(d**3) / den if den > 0 else 0.0
        q = ndtr(z0 + (z0 + z_q) / (1 - a * (z0 + z_q)))
        if np.all(np.isfinite(q)):
            lo[j], hi[j] = np.percentile(tb, 100 * q)
    return lo, hi


def _freedman_lane(
    Y: np.ndarray, Z: np.ndarray, r_obs: np.ndarray, perms: np.ndarray, ia: np.ndarray, ib: np.ndarray
) -> np.ndarray:
    """Freedman-Lane permutation p of r(Y_a, Y_b | Z): permute Y_b's reduced-model residuals, refit, compare |r|."""
    E = _residualize(Y, Z)
    En = E / np.linalg.norm(E, axis=0)
    exceed = np.zeros(ia.size)
    for start in range(0, len(perms), _CHUNK):
        R = _residualize(E[perms[start : start + _CHUNK]], Z)  # (b, n, S): M P e, M = I - hat matrix of [1, Z]
        with np.errstate(invalid="ignore", divide="ignore"):
            r_star = np.swapaxes(En, 0, 1) @ (R / np.linalg.norm(R, axis=-2, keepdims=True))
        exceed += np.sum(np.abs(r_star[:, ia, ib]) >= np.abs(r_obs) - 1e-12, axis=0)
    return (1.0 + exceed) / (1.0 + len(perms))


# ----------------------------------------------------------------------------------------------------------------
# validation (all argument and table checks live here)


@dataclass(frozen=True)
class _Options:
    methods: tuple[str, ...]
    unit: str
    n_boot: int
    n_perm: int
    seed: int
    block_length: int | None
    spline_knots: int
    n_items: int | Mapping[str, int]
    n_splits: int
    alpha: float
    confidence: float


@dataclass(frozen=True)
class _Data:
    id_name: str
    id_acc: np.ndarray  # (n,)
    acc: np.ndarray  # (n, S) shift accuracies
    shifts: tuple[str, ...]
    n_items: dict[str, int]  # items per split (ID and shifts), for the probit clip
    items: dict[str, np.ndarray] | None  # per-item correctness, rows aligned with id_acc
    groups: np.ndarray | None = None  # (n,) group code of each row for `within` (e.g. the base run), or None


def _check_options(
    residualize: str, unit: str, n_boot: int, n_perm: int, seed: int, block_length: int | None,
    spline_knots: int, n_items: int | Mapping[str, int], n_splits: int, alpha: float, confidence: float,
) -> _Options:
    allowed = RESIDUALIZATIONS + ("all",)
    if residualize not in allowed:
        raise ValueError(f"residualize={residualize!r} is not supported: expected one of {allowed}.")
    if unit not in UNITS:
        raise ValueError(
            f"unit={unit!r} is not supported: expected 'runs' (independent runs) or 'checkpoints' "
            "(rows are checkpoints of one run, with a 'step' column)."
        )
    check_counts(n_boot=(n_boot, 0), n_perm=(n_perm, 0), spline_knots=(spline_knots, 2), n_splits=(n_splits, 1),
                 seed=(seed, 0))
    if block_length is not None and (not isinstance(block_length, (int, np.integer)) or block_length < 1):
        raise ValueError(f"block_length={block_length!r} is invalid: expected None (n^(1/3)) or an integer >= 1.")
    if unit == "runs" and block_length is not None:
        raise ValueError("block_length only applies to unit='checkpoints': leave it None for independent runs.")
    counts = n_items.values() if isinstance(n_items, Mapping) else [n_items]
    if any(not isinstance(c, (int, np.integer)) or c < 1 for c in counts):
        raise ValueError(f"n_items={n_items!r} is invalid: expected a positive integer or a dict split -> integer.")
    for name, value in (("alpha", alpha), ("confidence", confidence)):
        if not isinstance(value, (int, float, np.integer, np.floating)) or not 0 < value < 1:
            raise ValueError(f"{name}={value!r} is invalid: expected a number strictly between 0 and 1.")
    check_resamples(n_boot, confidence)
    methods = RESIDUALIZATIONS if residualize == "all" else (residualize,)
    return _Options(methods, unit, int(n_boot), int(n_perm), int(seed), block_length, int(spline_knots), n_items,
                    int(n_splits), float(alpha), float(confidence))


def check_counts(**counts: tuple[Any, int]) -> None:
    """Refuse options that must be whole numbers of at least some size: name=(value, least)."""
    for name, (value, low) in counts.items():
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {low}.")


def check_resamples(n_boot: int, confidence: float) -> None:
    """Refuse a bootstrap too small to place a percentile interval's ends (each tail needs a resample)."""
    need = math.ceil(round(2 / (1 - confidence), 6))
    if 0 < n_boot < need:
        raise ValueError(f"n_boot={n_boot} resamples cannot place the ends of a {confidence:.0%} interval (each tail "
                         f"needs one): give at least {need}, 1000 or more for stable ends, or 0 to skip it.")


def check_accuracies(table: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """Accuracy columns as a float array (n, c); refuse NaN, values outside [0, 1] and constant columns."""
    try:
        acc = table[list(columns)].to_numpy(dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"accuracy columns {list(columns)} must be numeric fractions in [0, 1]: {err}") from err
    bad = [c for j, c in enumerate(columns) if np.isnan(acc[:, j]).any()]
    if bad:
        rows = table.index[np.isnan(acc).any(axis=1)].tolist()[:10]
        raise ValueError(
            f"NaN accuracies in {bad} (rows {rows}): every run needs an accuracy for every split. "
            "Drop or re-evaluate those runs, or pass shifts=[...] without those splits."
        )
    bad = [c for j, c in enumerate(columns) if ((acc[:, j] < 0) | (acc[:, j] > 1)).any()]
    if bad:
        raise ValueError(
            f"accuracies out of range in {bad}: expected fractions in [0, 1] (not percentages). "
            "Divide percentages by 100 or fix the evaluation."
        )
    if len(acc) < 5:
        raise ValueError(
            f"too few rows: n={len(acc)}, but a partial correlation controlling for ID needs n >= k + 4 = 5 (k=1; "
            f"dof n-k-2 >= 2). A useful estimate needs far more: about {runs_needed(0.3, 0.2, 1)} runs give a 95% CI "
            "half-width of 0.2 at r = 0.3. Add runs to the sweep (sweep.runs)."
        )
    bad = [c for j, c in enumerate(columns) if np.ptp(acc[:, j]) == 0]
    if bad:
        raise ValueError(
            f"constant accuracy in {bad}: a correlation needs variation across rows. Drop those splits "
            "(shifts=[...]) or widen the sweep so their accuracy varies."
        )
    return acc


def _group_codes(table: pd.DataFrame, within: str | None, unit: str) -> np.ndarray | None:
    """Each row's group code for `within` (None: no groups); refuse a missing column, checkpoints, and groups
    of one row (a run alone in its group has no within-group variation)."""
    if within is None:
        return None
    if within not in table.columns:
        raise ValueError(f"within={within!r} is not a column of the table (columns: {list(table.columns)}).")
    if unit != "runs":
        raise ValueError("within=... applies to unit='runs' (independent runs in groups such as their base run).")
    return group_codes(table[within], f"within={within!r}")


def group_codes(labels: Sequence, name: str = "within") -> np.ndarray:
    """Codes 0..g-1 of each run's group label; refuse missing labels and groups of a single run (no variation
    within them)."""
    missing = pd.isna(pd.Series(np.asarray(labels, dtype=object)))
    if missing.any():
        raise ValueError(f"{name}: runs {np.flatnonzero(missing).tolist()[:10]} (by position) have no group label; "
                         "give every run one, or drop those runs.")
    names, codes, counts = np.unique(np.asarray(labels).astype(str), return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError(f"{name}: groups {names[counts < 2].tolist()} hold a single run; a partial "
                         "correlation within groups needs at least two runs in each. Drop those runs.")
    return codes


def _group_dummies(groups: np.ndarray) -> np.ndarray:
    """Indicator columns (n, g - 1) of all groups but the first: group fixed effects beside the intercept."""
    return (groups[:, None] == np.arange(1, groups.max() + 1)).astype(float)


def _names(names: Sequence[str] | str) -> list[str]:
    """Names as a list, one given alone as text too (`shifts="length"` is one shift, not six letters)."""
    return [names] if isinstance(names, str) else list(names)


def _split_not_column(name: str, available: Sequence[str]) -> str:
    """A hint where a split was named by its column (`acc_ID` for `ID`)."""
    split = name[4:] if isinstance(name, str) and name.startswith("acc_") else None
    return f" Name splits, not columns: {split!r}, not {name!r}." if split in available else ""


def _prepare(
    table: pd.DataFrame, id: str, shifts: Sequence[str] | None, unit: str,
    items: Mapping[str, np.ndarray] | None, n_items: int | Mapping[str, int], within: str | None = None,
) -> _Data:
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"table must be a pandas DataFrame or an experiment directory, got {type(table).__name__}.")
    available = [c[4:] for c in table.columns if isinstance(c, str) and c.startswith("acc_")]
    repeated = sorted({f"acc_{s}" for s in available if available.count(s) > 1})
    if repeated:
        raise ValueError(f"the table has several columns named {repeated} (after a merge or concat?): keep one each.")
    if id not in available:
        raise ValueError(
            f"no ID accuracy column 'acc_{id}': expected columns acc_<split> with the ID split among them "
            f"(found splits {available}). Pass id=<name of the ID split>, or name its column acc_ID (as "
            f"`gradtrace stats` and `predict` read it).{_split_not_column(id, available)}"
        )
    shifts = [s for s in available if s != id] if shifts is None else _names(shifts)
    missing = [s for s in shifts if s not in available]
    if missing:
        raise ValueError(f"shifts {missing} have no acc_<shift> column: available splits are {available}."
                         f"{_split_not_column(missing[0], available)}")
    if id in shifts or len(set(shifts)) != len(shifts):
        raise ValueError(f"shifts={shifts} must be distinct and must not include the ID split {id!r}.")
    if len(shifts) < 2:
        raise ValueError(f"need at least two shifts to form a pair, got {shifts}: list at least two shifts that vary "
                         "across runs in task.shifts (each an acc_<shift> column).")

    order = np.arange(len(table))
    if unit == "runs":
        if "run_id" in table.columns and table["run_id"].duplicated().any():
            dup = table.loc[table["run_id"].duplicated(keep=False), "run_id"].unique().tolist()[:10]
            raise ValueError(
                f"duplicate run ids {dup}: unit='runs' expects one row per independent run. Deduplicate the "
                "table, or use unit='checkpoints' for the checkpoints of a single run."
            )
    else:
        if "step" not in table.columns:
            raise ValueError("unit='checkpoints' needs a 'step' column ordering the checkpoints of one run.")
        if "run_id" in table.columns and table["run_id"].nunique() > 1:
            raise ValueError(
                f"unit='checkpoints' expects the checkpoints of one run, got {table['run_id'].nunique()} run ids: "
                "select one run (table[table.run_id == ...]) first."
            )
        if table["step"].isna().any():
            raise ValueError("a checkpoint table's 'step' holds a missing value: every checkpoint needs its step.")
        if table["step"].duplicated().any():
            raise ValueError("duplicate steps in a checkpoint table: expected one row per checkpoint step.")
        order = np.argsort(table["step"].to_numpy(), kind="stable")
    table = table.iloc[order]
    acc = check_accuracies(table, [f"acc_{s}" for s in [id, *shifts]])
    groups = _group_codes(table, within, unit)

    counts = {s: (n_items.get(s, DEFAULT_N_ITEMS) if isinstance(n_items, Mapping) else n_items) for s in [id, *shifts]}
    aligned = None
    if items:
        aligned = {}
        for split, arr in items.items():
            if split not in counts:
                continue
            arr = np.asarray(arr)
            if arr.ndim != 2 or arr.shape[0] != len(order):
                raise ValueError(
                    f"items[{split!r}] has shape {arr.shape}: expected (runs, items) with {len(order)} rows, in "
                    "the table's row order."
                )
            if not np.isin(arr, (0, 1)).all():
                raise ValueError(f"items[{split!r}] must hold 0/1 (or bool) correctness, found other values (NaN?).")
            arr = arr[order].astype(float)
            gap = np.max(np.abs(arr.mean(axis=1) - table[f"acc_{split}"].to_numpy(dtype=float)))
            if gap > ITEM_MATCH_TOL:
                raise ValueError(
                    f"items[{split!r}] disagree with acc_{split} (max |mean correctness - accuracy| = {gap:.3g}): "
                    "item rows must be the table's runs in the same order. Reload both from the same experiment."
                )
            aligned[split], counts[split] = arr, arr.shape[1]
    return _Data(id, acc[:, 0], acc[:, 1:], tuple(shifts), counts, aligned, groups)


# ----------------------------------------------------------------------------------------------------------------
# partial correlations


def _design(method: str, data: _Data, spline_knots: int) -> tuple[np.ndarray, np.ndarray, Callable]:
    """(transformed shift accuracies (n, S), covariates Z (n, k), per-shift transform) for a residualisation;
    with groups, Z also holds their indicators (fixed effects: the correlation within groups)."""
    if method == "linear":
        Y, Z, transform = data.acc, data.id_acc[:, None], lambda p, n_items: p
    else:
        n_sh = np.array([data.n_items[s] for s in data.shifts])
        id_probit = _probit(data.id_acc, data.n_items[data.id_name])
        Z = id_probit[:, None] if method == "probit" else _spline_basis(id_probit, spline_knots)
        Y, transform = _probit(data.acc, n_sh), _probit
    if data.groups is not None:
        Z = np.column_stack([Z, _group_dummies(data.groups)])
    return Y, Z, transform


def _residual_reliability(
    items: np.ndarray, Z: np.ndarray, transform: Callable, n_splits: int, seed: int
) -> float:
    """Spearman-Brown split-half reliability of one split's accuracy after residualising it on Z."""
    h1, h2, m1, m2 = _half_accuracies(items, n_splits, seed)
    r1, r2 = _residualize(transform(h1, m1), Z), _residualize(transform(h2, m2), Z)
    corr = _column_corr(r1, r2)  # NaN for every split-half where a half is constant (an accuracy of 0 in each run)
    return float(spearman_brown(np.nanmean(corr))) if np.isfinite(corr).any() else np.nan


def _check_designs(
    designs: Mapping[str, tuple[np.ndarray, np.ndarray, Callable]], shifts: Sequence[str], confidence: float
) -> dict[str, int]:
    """Number of covariates k (rank of [1, Z] minus 1) per residualisation that can be computed: n ≥ k + 4 and no
    zero residuals. One that cannot is refused when alone, and left out with a warning beside others that can
    (`residualize="all"` on a small sweep: the spline's k + 4 rows, or a shift its curve fits exactly)."""
    ks, refused = {}, {}
    for m, (Y, Z, _) in designs.items():
        n = len(Y)
        k = int(np.linalg.matrix_rank(np.column_stack([np.ones(n), Z]))) - 1
        if n < k + 4:
            k = max(k, Z.shape[1])  # the covariates the design has once enough rows give them full rank
            need = runs_needed(0.3, 0.2, k, confidence)
            refused[m] = (
                f"too few rows for residualize={m!r}: n={n}, but a partial correlation with k={k} covariate(s) needs "
                f"n >= k + 4 = {k + 4} (t-test dof n-k-2 >= 2, Fisher-z CI dof n-k-3 >= 1). A useful estimate needs "
                f"far more: about {need} runs give a {confidence:.0%} CI half-width of 0.2 at r = 0.3. Add runs to "
                "the sweep" + (" or lower spline_knots." if m == "spline" else ".")
            )
            continue
        flat = np.linalg.norm(_residualize(Y, Z), axis=0) <= 1e-10 * np.linalg.norm(Y - Y.mean(axis=0), axis=0)
        if flat.any():
            refused[m] = (
                f"shifts {[s for s, f in zip(shifts, flat) if f]} are exactly determined by the covariates (ID "
                f"accuracy under residualize={m!r}, and the group of each row where within= is given: a shift "
                "constant within every base) — zero residual variance, so their partial correlation is undefined. "
                "Expected accuracies that vary beyond them; leave those shifts out (shifts=[...]; `gradtrace stats "
                "--shifts`)."
            )
            continue
        ks[m] = k
    if not ks:
        raise ValueError(next(iter(refused.values())))
    for m, why in refused.items():
        warnings.warn(f"residualize={m!r} left out, the others computed: {why}", UserWarning, stacklevel=3)
    return ks


def partial_correlations(
    table: pd.DataFrame | str | PathLike,
    id: str = "ID",
    shifts: Sequence[str] | None = None,
    residualize: str = "probit",
    unit: str = "runs",
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
    items: Mapping[str, np.ndarray] | None = None,
    *,
    block_length: int | None = None,
    spline_knots: int = 4,
    n_items: int | Mapping[str, int] = DEFAULT_N_ITEMS,
    n_splits: int = 100,
    alpha: float = 0.05,
    confidence: float = 0.95,
    within: str | None = None,
) -> pd.DataFrame:
    """Partial correlation of every pair of shifts given ID accuracy, with CIs and p-values per residualisation.

    Parameters
    ----------
    table : DataFrame with columns ``acc_<split>`` (fractions in [0, 1]) and optionally ``run_id``,
        hyper-parameters and (for ``unit="checkpoints"``) ``step``; or an experiment directory, loaded with
        ``gradtrace.results.load_results`` and ``load_item_correctness`` (runs of several bases then taken within
        base unless ``within`` names another column).
    id : name of the ID split (column ``acc_<id>``); shifts are the other splits, or those named in ``shifts``.
    residualize : ``"linear"`` (raw scale, k = 1), ``"probit"`` (k = 1), ``"spline"`` (k = spline_knots + 1)
        or ``"all"``.
        *probit* applies Phi^-1 to every accuracy after clipping to [1/(2N), 1 - 1/(2N)], N the number of items
        of that split (the second axis of ``items`` when given, else ``n_items``, default 2000); the clip keeps
        0 and 1 finite at about half an item from the boundary.
        *spline* regresses probit shift accuracy on a cubic B-spline basis of probit ID accuracy
        (``sklearn.preprocessing.SplineTransformer``, ``spline_knots`` knots at ID quantiles, intercept column
        dropped), i.e. k = spline_knots + 1 covariates besides the intercept (fewer where tied ID accuracies
        leave the basis rank-deficient: the ``k`` column gives the rank used); it contains the probit line and
        bends where the data do. Every basis column counts as a covariate: dof = n - k - 2 for p and n - k - 3
        for the Fisher-z CI. (Probit axes rather than raw ones: on the raw scale, noise that is homoscedastic in
        probit space has a variance that moves with ID in the same way for every shift, which alone inflates
        the false-positive rate of a raw-scale spline to 10-15% in simulations.)
    unit : ``"runs"`` (independent runs: iid bootstrap) or ``"checkpoints"`` (checkpoints of one run ordered by
        ``step``: moving-block bootstrap with ``block_length`` rows, default round(n^(1/3)), and a block
        jackknife for BCa). Parametric and permutation p-values assume independent rows and are invalid for
        checkpoints: a warning is raised and ``note`` says so. The block-bootstrap CIs are approximate: for
        checkpoints of lag-1 autocorrelation 0.8, simulated 95% CIs covered 82–89% of the time (86–91% at
        0.5), longer blocks helping little; read them as a lower bound on the uncertainty.
    n_boot, n_perm : bootstrap resamples and Freedman-Lane permutations (0 skips them: NaN columns).
        Bootstrap and permutation resamples are shared by all pairs and residualisations. The spline basis is
        built once from all rows and its rows are resampled with the data.
    items : dict split -> (runs, items) 0/1 correctness, rows in the table's order. Adds ``rel_a``, ``rel_b``
        and ``r_disattenuated`` = r / sqrt(rel_a * rel_b), where rel is the Spearman-Brown split-half
        reliability of each shift's *residual* (half-accuracies transformed and residualised on the same
        covariates, averaged over ``n_splits`` random item halves). Approximations: ID accuracy is treated as
        error-free, halves as parallel forms, and the two shifts' item errors as independent; sampling error
        can push |r_disattenuated| above 1 (not clipped); where a reliability is 0 (`spearman_brown`) it is NaN.

    within : a column naming each run's group (e.g. ``"base"``, the base run it fine-tuned): the partial correlation
        within groups. Every residualisation adds the groups' indicators to its covariates (fixed effects, so k
        grows by groups - 1), the bootstrap resamples runs within each group and the permutations permute
        within groups. Each group needs at least two runs.

    Returns a DataFrame, one row per (residualisation, pair a < b in shift order), columns ``a, b, residualize,
    unit, n, k, dof, r, ci_low, ci_high, p, p_perm, p_holm, p_bh, boot_ci_low, boot_ci_high, bca_ci_low,
    bca_ci_high, disagree`` (+ ``rel_a, rel_b, r_disattenuated`` with items) and ``note``. Holm and BH adjust
    ``p`` across pairs within each residualisation. ``disagree`` (only with several residualisations, else NA)
    is True where the residualisations differ in the sign of r or in whether p < alpha. Over independent runs
    (normal data, partial r 0.3, 1,000 simulated studies each) the 95% Fisher-z CI covered 95.0%, 95.1% and 94.8%
    of the time at 50, 100 and 300 runs, the percentile bootstrap 92.5%, 94.1% and 94.8%, BCa 93.1%, 93.5% and
    94.3%: at a few dozen runs the bootstrap intervals are a little too narrow.

    Raises ValueError for n < k + 4 rows (saying how many runs a useful CI needs), NaN or out-of-range
    accuracies, constant columns and duplicate run ids.
    """
    if isinstance(table, (str, PathLike)):
        from gradtrace.results import base_groups

        path = Path(table)
        if path.is_file() and not (path.name == "results.csv" and (path.parent / "store.zarr").is_dir()):
            table = pd.read_csv(path)  # a table of your own
        else:  # an experiment directory, or its results.csv
            table, loaded = _load_experiment(path.parent if path.is_file() else path)
            items = loaded if items is None else items
        within = within or base_groups(table)  # as `gradtrace stats`: the runs of several bases within base
    opts = _check_options(residualize, unit, n_boot, n_perm, seed, block_length, spline_knots, n_items,
                          n_splits, alpha, confidence)
    data = _prepare(table, id, shifts, unit, items, n_items, within)
    n, n_shifts = data.acc.shape
    designs = {m: _design(m, data, opts.spline_knots) for m in opts.methods}
    ks = _check_designs(designs, data.shifts, opts.confidence)

    block = None
    if opts.unit == "checkpoints":
        block = opts.block_length or max(1, round(n ** (1 / 3)))
        if block >= n:
            raise ValueError(f"block_length={block} leaves nothing to resample among the {n} checkpoints: expected "
                             "1 <= block_length < n.")
        warnings.warn(
            "unit='checkpoints': naive p-values (p, p_perm, p_holm, p_bh) and the Fisher-z CI are invalid for "
            "autocorrelated checkpoints of one run; the block-bootstrap CIs are approximate, too narrow where "
            "checkpoints are strongly autocorrelated.", UserWarning, stacklevel=2,
        )
    rng = np.random.default_rng(opts.seed)
    boot_idx = _resample_indices(n, opts.n_boot, block, rng, data.groups)
    perms = _permutations(n, opts.n_perm, rng, data.groups)
    ia, ib = np.triu_indices(n_shifts, k=1)

    frames = []
    for m in ks:
        Y, Z, transform = designs[m]
        k = ks[m]
        r = _corr_matrix(_residualize(Y, Z))[ia, ib]
        lo, hi = _fisher_ci(r, n, k, opts.confidence)
        p = _t_pvalue(r, n - k - 2)
        frame = pd.DataFrame({
            "a": [data.shifts[i] for i in ia], "b": [data.shifts[j] for j in ib], "residualize": m,
            "unit": opts.unit, "n": n, "k": k, "dof": n - k - 2, "r": r, "ci_low": lo, "ci_high": hi, "p": p,
            "p_perm": np.nan, "p_holm": _holm(p), "p_bh": _bh(p),
            "boot_ci_low": np.nan, "boot_ci_high": np.nan, "bca_ci_low": np.nan, "bca_ci_high": np.nan,
        })

        def stat(idx: np.ndarray, Y: np.ndarray = Y, Z: np.ndarray = Z) -> np.ndarray:
            return _corr_matrix(_residualize(Y[idx], Z[idx]))[:, ia, ib]

        if opts.n_boot:
            theta_b = _batched(stat, list(boot_idx))
            frame["boot_ci_low"], frame["boot_ci_high"] = _percentile_ci(theta_b, opts.confidence)
            frame["bca_ci_low"], frame["bca_ci_high"] = _bca_ci(theta_b, r, _jackknife_corr(Y, Z, block)[:, ia, ib],
                                                                opts.confidence)
        if opts.n_perm:
            frame["p_perm"] = _freedman_lane(Y, Z, r, perms, ia, ib)
        if data.items is not None:
            rel = np.array([
                _residual_reliability(data.items[s], Z, transform, opts.n_splits, opts.seed)
                if s in data.items else np.nan for s in data.shifts
            ])
            frame["rel_a"], frame["rel_b"] = rel[ia], rel[ib]
            with np.errstate(invalid="ignore", divide="ignore"):  # a reliability of 0 leaves nothing to correct
                frame["r_disattenuated"] = np.where((rel[ia] > 0) & (rel[ib] > 0), r / np.sqrt(rel[ia] * rel[ib]),
                                                    np.nan)
        frames.append(frame)

    out = pd.concat(frames, ignore_index=True)
    out["disagree"] = _disagreement(out, opts.alpha) if len(ks) > 1 else pd.NA
    out["disagree"] = out["disagree"].astype("boolean")
    out["note"] = CHECKPOINT_NOTE if opts.unit == "checkpoints" else ""
    extra = [c for c in ("rel_a", "rel_b", "r_disattenuated") if c in out.columns]
    return out[RESULT_COLUMNS + extra + ["note"]]


def _disagreement(out: pd.DataFrame, alpha: float) -> pd.Series:
    """Per row: do the pair's residualisations differ in sign of r or in significance at alpha?"""
    key = out["a"] + "\x00" + out["b"]
    sign = np.sign(out["r"]).groupby(key).transform("nunique") > 1
    sig = (out["p"] < alpha).groupby(key).transform("nunique") > 1
    return sign | sig


# ----------------------------------------------------------------------------------------------------------------
# reliability


def _half_accuracies(
    items: np.ndarray, n_splits: int, seed: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Accuracy of each run on two random halves of the items, for n_splits splits: (runs, n_splits) twice."""
    m = items.shape[1]
    rng = np.random.default_rng(seed)
    first = rng.permuted(np.broadcast_to(np.arange(m) < m // 2, (n_splits, m)), axis=1).T.astype(float)
    m1, m2 = m // 2, m - m // 2
    x = np.asarray(items, dtype=float)
    return x @ first / m1, x @ (1 - first) / m2, m1, m2


def _column_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns of a and b (n, c); NaN where a column is constant."""
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(a * b, axis=0) / np.sqrt(np.sum(a * a, axis=0) * np.sum(b * b, axis=0))


def centre_within(x: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Columns of x (..., n, c) minus their mean over the n rows, or minus their group's mean with `groups` (each
    row's group label, (n,)); batch axes broadcast."""
    x = np.asarray(x, dtype=float)
    if groups is None:
        return x - x.mean(axis=-2, keepdims=True)
    if pd.isna(groups).any():
        raise ValueError("groups hold a missing label (NaN): every row needs its group; see group_codes")
    member = (np.asarray(groups)[:, None] == np.unique(groups)).astype(float)  # (n, g) indicators
    return x - member @ ((member.T @ x) / member.sum(axis=0)[:, None])


def spearman_brown(rho: Any, length: float = 2.0) -> np.ndarray:
    """Reliability of a measure `length` times as long as one whose parallel forms correlate rho: L·rho / (1 +
    (L − 1)·rho). A rho ≤ 0 (halves that agree no better than chance: no between-run signal) gives 0, not the
    formula's negative value (−6 at rho = −0.75), which reads as no reliability and would feed a disattenuation's
    square root; NaN stays NaN."""
    rho = np.asarray(rho, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rho > 0, length * rho / (1 + (length - 1) * rho), np.where(np.isnan(rho), np.nan, 0.0))


def split_half_reliability(items: Mapping[str, np.ndarray], n_splits: int = 100, seed: int = 0,
                           groups: np.ndarray | None = None) -> pd.DataFrame:
    """Spearman-Brown split-half reliability of each split's across-run accuracy from per-item correctness.

    For each of ``n_splits`` random halvings of a split's items, correlate the runs' accuracies on the two halves
    (rho); reliability = 2 rho / (1 + rho) with rho averaged over halvings, 0 where that is ≤ 0. With ``groups``
    (each run's group code, e.g. its base run) the half accuracies are centred within groups first: the reliability
    of the differences between runs of one group, which is what a correlation within groups sees. Columns: ``split,
    n_runs, n_items, reliability, reliability_sd`` (sd of the Spearman-Brown value over halvings: the halving noise,
    not a sampling error). Warns for every split whose reliability is below 0.9.
    """
    check_counts(n_splits=(n_splits, 1))
    rows = []
    for split, arr in items.items():
        arr = np.asarray(arr)
        if arr.ndim != 2 or arr.shape[0] < 3 or arr.shape[1] < 2:
            raise ValueError(
                f"items[{split!r}] has shape {arr.shape}: expected (runs, items) 0/1 correctness with >= 3 runs "
                "and >= 2 items."
            )
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"items[{split!r}] must hold 0/1 (or bool) correctness, found other values.")
        h1, h2, _, _ = _half_accuracies(arr, n_splits, seed)
        rho = _column_corr(centre_within(h1, groups), centre_within(h2, groups))
        sb = spearman_brown(rho)
        rows.append({"split": split, "n_runs": arr.shape[0], "n_items": arr.shape[1],
                     "reliability": float(spearman_brown(np.nanmean(rho))) if np.isfinite(rho).any() else np.nan,
                     "reliability_sd": np.nanstd(sb) if np.isfinite(sb).any() else np.nan})
    out = pd.DataFrame(rows, columns=["split", "n_runs", "n_items", "reliability", "reliability_sd"])
    low = out[~(out["reliability"] >= RELIABILITY_WARN)]
    if len(low):
        desc = ", ".join(f"{s} ({v:.2f})" for s, v in zip(low["split"], low["reliability"]))
        warnings.warn(
            f"split-half reliability below {RELIABILITY_WARN} for {desc}: their accuracy is noisy across runs and "
            "attenuates correlations. Use more items per split (>= 2000) or report r_disattenuated.",
            UserWarning, stacklevel=2,
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# generalisation gap


def _band(gap_pts: np.ndarray) -> np.ndarray:
    """'healthy' below 5 points, 'watch' from 5 to 10, 'warning' above 10; NA where the gap is missing."""
    band = np.select([gap_pts < 5, gap_pts <= 10, gap_pts > 10], ["healthy", "watch", "warning"], default="")
    return np.where(np.isnan(gap_pts), None, band)


def generalisation_gap(table: pd.DataFrame, config_columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Train vs held-out accuracy gap per run and split, validation vs test consistency and spread across seeds.

    One row per (run, split with an ``acc_<split>`` column): ``run_id`` (row index if absent), ``step`` if
    present, ``split``, ``test_acc``; with ``train_acc_<split>``: ``train_acc``, ``gap_pts`` = 100 (train - test)
    and ``band`` (< 5 "healthy", 5-10 "watch", > 10 "warning"); with ``val_acc_<split>``: ``val_acc``,
    ``val_test_diff_pts`` = 100 (val - test) and ``val_test_r`` (correlation of val and test across runs); with
    seed columns (``seed``, ``init_seed``, ``data_seed``): ``seed_sd_pts``, the across-seed standard deviation
    (points) of test accuracy among runs sharing ``config_columns`` (default: every column that is not an
    accuracy, a seed, run_id, step or wall_time_s), and ``n_seeds``. Absent columns skip their part.
    """
    splits = [c[4:] for c in table.columns if isinstance(c, str) and c.startswith("acc_")]
    if not splits:
        raise ValueError("generalisation_gap needs accuracy columns acc_<split>: none found in the table.")
    metrics = ("acc_", "train_acc_", "val_acc_")
    columns = [c for c in table.columns if isinstance(c, str) and c.startswith(metrics)]
    values = table[columns].to_numpy(dtype=float)  # NaN is allowed here: a run without that accuracy
    outside = [c for c, bad in zip(columns, ((values < 0) | (values > 1)).any(axis=0)) if bad]
    if outside:
        raise ValueError(f"accuracies out of range in {outside}: expected fractions in [0, 1] (not percentages).")
    run_id = table["run_id"].to_numpy() if "run_id" in table.columns else table.index.to_numpy()
    seeded = any(c in table.columns for c in SEED_COLUMNS)
    if seeded:
        if config_columns is None:
            config_columns = [c for c in table.columns if not (isinstance(c, str) and c.startswith(metrics))
                              and c not in SEED_COLUMNS + _PER_RUN_COLUMNS]
        config_columns = _names(config_columns)
        missing = [c for c in config_columns if c not in table.columns]
        if missing:
            raise ValueError(f"config_columns {missing} are not columns of the table.")
        groups = (table.groupby(list(config_columns), dropna=False, sort=False).ngroup().to_numpy()
                  if config_columns else np.zeros(len(table), dtype=int))
    frames = []
    for s in splits:
        test = table[f"acc_{s}"].to_numpy(dtype=float)
        f = pd.DataFrame({"run_id": run_id})
        if "step" in table.columns:
            f["step"] = table["step"].to_numpy()
        f["split"], f["test_acc"] = s, test
        if f"train_acc_{s}" in table.columns:
            f["train_acc"] = table[f"train_acc_{s}"].to_numpy(dtype=float)
            f["gap_pts"] = 100 * (f["train_acc"] - test)
            f["band"] = _band(f["gap_pts"].to_numpy())
        if f"val_acc_{s}" in table.columns:
            val = table[f"val_acc_{s}"].to_numpy(dtype=float)
            ok = np.isfinite(val) & np.isfinite(test)
            f["val_acc"], f["val_test_diff_pts"] = val, 100 * (val - test)
            f["val_test_r"] = (float(_column_corr(val[ok, None], test[ok, None])[0])
                               if ok.sum() >= 3 else np.nan)
        if seeded:
            by = pd.Series(100 * test).groupby(groups)
            f["seed_sd_pts"] = by.transform("std").to_numpy()
            f["n_seeds"] = by.transform("count").to_numpy()
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
# report


@dataclass
class StatsReport:
    """Everything ``stats_report`` computed for an experiment, and where it was written."""

    stats: pd.DataFrame
    reliability: pd.DataFrame | None
    gap: pd.DataFrame
    summary: dict
    paths: dict[str, Path]


def _load_experiment(exp_dir: str | PathLike) -> tuple[pd.DataFrame, dict[str, np.ndarray] | None]:
    """Results table and per-item correctness (None when the experiment has none) of an experiment directory;
    refused where a table of your own (no sweep's plan.json beside it) has rows but none of a sweep run: its roles
    mistaken. A sweep's directory without complete sweep runs is left to the count check, which says to add runs."""
    from gradtrace.results import load_item_correctness, load_results, run_groups_of

    groups = run_groups_of(exp_dir)  # listed once for both (~2 s at 3,000 runs)
    table = load_results(exp_dir, groups=groups)  # once: its warnings (an unfinished sweep, …) said once
    if table.empty and not (Path(exp_dir) / "plan.json").exists():
        from gradtrace.results import read_results

        if not (every := read_results(exp_dir)).empty:
            raise ValueError(f"none of the {len(every)} rows of {Path(exp_dir) / 'results.csv'} has role `sweep` "
                             f"(roles there: {', '.join(sorted(every['role'].astype(str).unique()))}): the statistics "
                             "correlate the sweep runs; in a table of your own, give the runs to correlate role "
                             "`sweep`")
    items = load_item_correctness(exp_dir, table=table, groups=groups)
    return table, (dict(items) if items else None)


def varying_shifts(table: pd.DataFrame, id: str, shifts: Sequence[str] | None = None,
                   within: str | None = None) -> list[str]:
    """The shifts (default: every `acc_` column but ID's) whose accuracy varies across runs (within some group of
    the `within` column, where correlations are taken within groups); warns about and drops constant ones, which
    have no correlation (with fewer than 5 runs none are dropped: too few for any)."""
    shifts = ([c[4:] for c in table.columns if isinstance(c, str) and c.startswith("acc_") and c[4:] != id]
              if shifts is None else _names(shifts))
    groups = table.groupby(within, sort=False) if within else table.groupby(np.zeros(len(table)))
    constant = [s for s in shifts if groups[f"acc_{s}"].nunique().max() <= 1]
    if constant and len(table) >= 5:
        where = f" of each {within}" if within else ""
        warnings.warn(f"dropping shifts with the same accuracy in every run{where} ({', '.join(constant)}): a partial "
                      "correlation needs variation. Train longer or recalibrate the task (gradtrace calibrate).")
        return [s for s in shifts if s not in constant]
    return list(shifts)


def _least_reliable(reliability: pd.DataFrame | None) -> dict | None:
    """The split of least reliability and its value; None without per-item correctness, or where no split's
    reliability is defined (two items a split, one of them right in every run: each halving's halves correlate
    with a constant)."""
    if reliability is None or not reliability["reliability"].notna().any():
        return None
    least = reliability.loc[reliability["reliability"].idxmin()]
    return {"split": str(least["split"]), "reliability": float(least["reliability"])}


def stats_report(exp_dir: str | PathLike, residualize: str = "all", out: str | PathLike | None = None,
                 **kw) -> StatsReport:
    """Partial correlations, reliability and generalisation gap of an experiment, written next to its results.

    Writes ``stats.csv``, ``stats.json`` (``{"records": [...], "summary": {...}}``, the summary holding the sha256 of
    the results.csv they were computed from), ``reliability.csv`` (when per-item correctness exists) and ``gap.csv``
    into ``out`` (default: ``exp_dir``; another directory for a study one cannot write to); ``kw`` goes to
    ``partial_correlations``.
    Runs that fine-tuned several base runs are correlated within base unless ``within`` says otherwise.
    Warnings raised on the way are re-issued and listed in the summary.
    """
    from gradtrace.results import base_groups

    exp_dir = Path(exp_dir)
    out = exp_dir if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)  # as `--out` is made (a missing one failed once the statistics were done)
    results_csv = exp_dir / "results.csv"  # hashed before it is read: a table rewritten since reads as changed
    results_digest = sha256_of(results_csv) if results_csv.exists() else None  # none: refused next, in words
    table, items = _load_experiment(exp_dir)
    paths = {"gap_csv": out / "gap.csv", "stats_csv": out / "stats.csv", "stats_json": out / "stats.json"}
    caught: list[warnings.WarningMessage] = []
    try:  # re-issued also when a stage fails: the warning may say why (shifts dropped as constant, say)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kw.setdefault("within", base_groups(table))
            gap = generalisation_gap(table)  # first: it needs no pair of shifts
            write_csv(gap, paths["gap_csv"])
            kw.setdefault("shifts", varying_shifts(table, kw.get("id", "ID"), within=kw["within"]))
            stats = partial_correlations(table, residualize=residualize, items=items, **kw)
            groups = group_codes(table[kw["within"]], f"within={kw['within']!r}") if kw["within"] else None
            reliability = (split_half_reliability(items, n_splits=kw.get("n_splits", 100), seed=kw.get("seed", 0),
                                                  groups=groups) if items else None)
            if reliability is not None:
                paths["reliability_csv"] = out / "reliability.csv"
                write_csv(reliability, paths["reliability_csv"])
    finally:
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    alpha = kw.get("alpha", 0.05)
    summary = {
        "exp_dir": str(exp_dir),
        "unit": str(stats["unit"].iloc[0]),
        "n": int(stats["n"].iloc[0]),
        "shifts": sorted(set(stats["a"]) | set(stats["b"])),
        "within": kw["within"],
        "runs_for_ci_half_width_0.2_at_r_0.3": runs_needed(0.3, 0.2, int(stats["k"].min())),  # given ID (and bases)
        "residualizations": {
            m: {"k": int(g["k"].iloc[0]), "pairs": len(g), "significant_p": int((g["p"] < alpha).sum()),
                "significant_bh": int((g["p_bh"] < alpha).sum()), "median_r": float(g["r"].median())}
            for m, g in stats.groupby("residualize", sort=False)
        },
        "pairs_disagreeing": int(stats.loc[stats["disagree"].fillna(False), ["a", "b"]].drop_duplicates().shape[0]),
        "min_reliability": _least_reliable(reliability),
        "warnings": [str(w.message) for w in caught],
        RESULTS_DIGEST: results_digest,
    }
    write_csv(stats, paths["stats_csv"])
    records = json.loads(stats.to_json(orient="records", double_precision=15))  # pandas' 10 decimals made p = 1e-12 0
    write_json({"records": records, "summary": summary}, paths["stats_json"])  # last: its digest vouches for the rest
    return StatsReport(stats, reliability, gap, summary, paths)


def _stars(p: float) -> str:
    return "" if not p < 0.05 else "*" if p >= 0.01 else "**" if p >= 0.001 else "***"


def format_table(df: pd.DataFrame) -> str:
    """A fixed-width terminal table of ``partial_correlations`` output: pair, r [CI], p and BH p with stars."""
    width = max([32, *(len(f"{a} ~ {b}") for a, b in zip(df["a"], df["b"]))])  # whole names: two cut alike
    header = f"{'residualize':<11}  {'pair':<{width}} {'n':>4}  {'r':>6}  {'CI':<16}  {'p':>9}      {'p_BH':>9}"
    has_dis = "r_disattenuated" in df.columns
    if has_dis:
        header += f"     {'r_dis':>6}"
    lines = [header, "-" * len(header)]
    for row in df.itertuples(index=False):
        pair = f"{row.a} ~ {row.b}"
        line = (f"{row.residualize:<11}  {pair:<{width}} {row.n:>4}  {row.r:>6.3f}  "
                f"[{row.ci_low:>6.3f}, {row.ci_high:>6.3f}]  {row.p:>9.2g} {_stars(row.p):<3}  "
                f"{row.p_bh:>9.2g} {_stars(row.p_bh):<3}")
        if has_dis:
            line += f"  {row.r_disattenuated:>6.3f}" + ("†" if abs(row.r_disattenuated) > 1 else "")
        if "disagree" in df.columns and not pd.isna(row.disagree) and row.disagree:
            line += "  !"
        lines.append(line)
    lines.append("stars: * p<.05  ** p<.01  *** p<.001 (p: t-test; p_BH: Benjamini-Hochberg within residualisation)"
                 + ("; ! residualisations disagree" if "disagree" in df.columns and df["disagree"].fillna(False).any()
                    else ""))
    if has_dis and (df["r_disattenuated"].abs() > 1).any():
        lines.append("† |r_dis| > 1: the pair's split-half reliabilities (rel_a, rel_b in stats.csv) are too low or "
                     "too noisy to disattenuate r; read r")
    if has_dis and (df["r_disattenuated"].isna() & ((df["rel_a"] == 0) | (df["rel_b"] == 0))).any():
        lines.append("r_dis nan: a reliability of 0 (the halves of a shift's items agree no better than chance across "
                     "runs), nothing to disattenuate")
    if "note" in df.columns and df["note"].astype(bool).any():
        lines.append("note: " + str(df.loc[df["note"].astype(bool), "note"].iloc[0]))
    return "\n".join(lines)
