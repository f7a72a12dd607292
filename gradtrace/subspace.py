"""Subspaces of gradient trajectories: spans, their energy spectra, projection energy, principal angles.

A trajectory is a (T, d) matrix whose rows are sketched vectors of one quantity (updates, gradients, Adam's
first moment) over steps. Its **span** is the top-`rank` right-singular subspace: the directions that carry most
of the trajectory's energy (squared Frobenius norm). In memory the span comes from LAPACK's exact SVD where that
is cheap and from scikit-learn's randomised SVD otherwise; trajectories larger than memory stream through Frequent
Directions (one pass, bounded memory) or dask's compressed randomised SVD (a few passes). Gradients concentrate in a
small dominant subspace while learning may happen in the bulk (Gur-Ari et al. 2018; Song, Ahn & Yun 2024), so
energies are reported for both.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import scipy.linalg
import zarr
from sklearn.utils.extmath import randomized_svd

from gradtrace import store

QUANTITIES = ("update", "grad", "adam_m", "adam_update")
STREAMING_METHODS = ("frequent_directions", "svd_compressed")
IN_MEMORY_BYTES = 2 * 1024**3  # run_span reads trajectories up to this size into memory, streams larger ones
# run_span's exact SVD up to this many flops (min(T, d)² · max(T, d): 1000 × 4096 rows take ~1.3 s on one core);
# randomised SVD beyond: on a flat spectrum its weaker directions were 12° off at 150 × 512
EXACT_SVD_FLOPS = 1e10
ORTHONORMAL_TOL = 1e-4  # max |B Bᵀ − I| of a basis taken as orthonormal (float32 bases round to ~1e-6)


@dataclass(frozen=True)
class Span:
    """The top-`rank` right-singular subspace of a (T, d) matrix and its energy spectrum (fewer directions where the
    rows span fewer: directions of no energy are left out)."""

    basis: np.ndarray  # (rank, d), orthonormal rows, strongest direction first
    singular_values: np.ndarray  # (rank,), descending
    energy_ratio: np.ndarray  # (rank,), s_i^2 / total_energy: the share of the energy each direction explains
    total_energy: float  # squared Frobenius norm of the (centred, if asked) matrix
    sketch: dict | None = None  # the sketch of the vectors spanned (a run's `sketch` attribute); None where unknown

    @property
    def rank(self) -> int:
        """Number of directions kept."""
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        """Ambient dimension d (the sketch dimension)."""
        return int(self.basis.shape[1])

    @property
    def explained(self) -> float:
        """Share of the total energy inside the span."""
        return float(self.energy_ratio.sum())


@dataclass(frozen=True)
class EffectiveDimension:
    """How many directions a spectrum effectively uses."""

    participation_ratio: float  # (sum s^2)^2 / sum s^4 over the known spectrum: d for a flat one, 1 for rank one
    dims_for_energy: int | None  # fewest top directions reaching `energy` of the total; None if the span falls short
    energy: float  # the threshold used for dims_for_energy (default 0.9)
    captured: float  # share of the total energy the known spectrum holds (1 for a full spectrum)


@dataclass(frozen=True)
class ProjectionEnergy:
    """Share of each vector's energy inside a span ("dominant") and outside it ("bulk"); NaN for zero vectors."""

    dominant: np.ndarray  # (...,) in [0, 1]
    bulk: np.ndarray  # (...,) 1 - dominant
    norm_sq: np.ndarray  # (...,) squared norm of each vector


def _check_matrix(X: Any, name: str = "X") -> None:
    if len(getattr(X, "shape", ())) != 2:
        raise ValueError(f"{name} must be a 2-D (steps, dim) matrix, got shape {getattr(X, 'shape', None)}")
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"{name} is empty (shape {X.shape}); select a window of steps that holds rows")


def _check_finite(block: np.ndarray, first_row: int = 0) -> np.ndarray:
    """`block` (rows from `first_row` on), refused with the rows named when any holds NaN or Inf."""
    _refuse_nonfinite(first_row + np.flatnonzero(~np.isfinite(block).all(axis=1)))
    return block


def _refuse_nonfinite(rows: np.ndarray) -> None:
    """Refuse a matrix whose `rows` (indices) hold NaN or Inf, naming them; nothing when there are none."""
    if rows.size:
        raise ValueError(f"rows {rows[:5].tolist()}{' …' if rows.size > 5 else ''} hold NaN or Inf (steps whose "
                         "gradient was not finite: the run's `nonfinite` flags them); select rows without them")


def _check_rank(rank: int, shape: tuple[int, ...], center: bool = False) -> int:
    """`rank`, refused beyond the directions the rows span (one fewer once centred: the last would be arbitrary)."""
    limit = min(shape[0] - center, shape[1])
    if not 1 <= rank <= limit:
        centred = ", centred" if center else ""
        raise ValueError(f"rank={rank} is out of range for a {shape[0]}×{shape[1]} matrix{centred}: expected "
                         f"1 ≤ rank ≤ {limit}")
    return int(rank)


def _span(Vt: np.ndarray, s: np.ndarray, total: float, shape: tuple[int, int], dtype: Any = np.float32) -> Span:
    """The Span of directions `Vt` with singular values `s` of a `shape` matrix of `dtype`, less directions of no
    energy: those below numpy's rank tolerance (largest s · max(shape) · eps) are rounding noise, arbitrary
    directions that would count a vector's energy in them (rows spanning fewer than the rank asked give fewer)."""
    s = np.asarray(s, dtype=np.float64)
    if not total > 0 or not s.size or not s[0] > 0:
        raise ValueError(f"the {shape[0]} rows hold no energy (all zero): there is no span; select steps that moved "
                         "(updates are zero while the learning rate is 0)")
    keep = s > s[0] * max(shape) * np.finfo(dtype).eps
    return Span(np.ascontiguousarray(Vt[keep], dtype=np.float32), s[keep], s[keep] ** 2 / total, float(total))


def top_span(X: np.ndarray, rank: int, method: str = "randomized", seed: int = 0, center: bool = False,
             n_iter: int | str = "auto") -> Span:
    """The top-`rank` span of the rows of X (randomised SVD, or method="full" for the exact one, `_exact_top`); rows
    spanning fewer than `rank` directions give a smaller span, and rows of no energy are refused."""
    _check_matrix(X)
    rank = _check_rank(rank, X.shape, center)
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float32)
    _check_finite(X)
    if center:
        X = X - X.mean(axis=0, dtype=np.float64).astype(X.dtype)
    total = float(np.einsum("ij,ij->", X, X, dtype=np.float64))
    if method == "randomized":
        # oversampled by `rank` (sklearn's 10 left the weaker directions 6–7° off on real trajectories, whose
        # spectrum is flat at the cut: s_32/s_33 ≈ 1.02)
        _, s, Vt = randomized_svd(X, rank, n_oversamples=rank, n_iter=n_iter, random_state=seed)
    elif method == "full":
        s, Vt = _exact_top(X, rank)
    else:
        raise ValueError(f"unknown method {method!r}: choose 'randomized' (fast) or 'full' (exact, small matrices); "
                         "for trajectories larger than memory use top_span_streaming")
    return _span(Vt, s, total, X.shape, X.dtype)


def _exact_top(X: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-`rank` singular values and right singular vectors of X, exactly: from the top eigenpairs of its
    smaller Gram matrix in float64 (LAPACK's subset solver). A full SVD computed every direction to keep 32: 28 s
    for a tail of 8,192 updates of k = 4,096 on 2 threads, against 4 s (benchmarks/README.md); the eigenvectors'
    error, eps₆₄·s₁²/gap, is far below float32's. Eigenvalues within rounding of 0 are 0, so `_span` leaves their
    directions out."""
    X64 = X.astype(np.float64)
    n, d = X.shape
    small = min(n, d)
    gram = X64 @ X64.T if n <= d else X64.T @ X64
    w, V = scipy.linalg.eigh(gram, subset_by_index=[small - rank, small - 1])
    w, V = w[::-1], V[:, ::-1]  # descending
    w[w <= w[0] * max(n, d) * np.finfo(np.float64).eps] = 0.0
    s = np.sqrt(w)
    if n > d:
        return s, V.T
    return s, (V.T @ X64) / np.where(s > 0, s, 1.0)[:, None]  # right vectors from left ones: Xᵀu / s


def _row_blocks(X: Any, rows: int) -> Iterator[np.ndarray]:
    """Consecutive row blocks of a numpy, zarr or dask matrix as numpy, one block in memory at a time."""
    if hasattr(X, "dask"):  # a slice's graph is culled faster than a rechunked array's block
        for start in range(0, X.shape[0], rows):
            yield _check_finite(np.asarray(X[start: start + rows].compute()), start)
        return
    if isinstance(X, zarr.Array):  # a chunk that cannot be decoded refused named
        storage = X.attrs.get("storage_dtype")
        for start in range(0, X.shape[0], rows):
            yield _check_finite(store.decode(store.stored(X, slice(start, start + rows)), storage), start)
        return
    for start in range(0, X.shape[0], rows):
        yield _check_finite(np.asarray(X[start: start + rows]), start)


def _frequent_directions(X: Any, sketch_size: int, block_rows: int) -> tuple[np.ndarray, float]:
    """Frequent Directions (Ghashami et al. 2016): an ℓ×d sketch B with 0 ≼ XᵀX − BᵀB ≼ ‖X − X_r‖²_F/(ℓ−r) I.

    Also returns ‖X‖²_F. Rows arrive in sub-blocks of ℓ (the cheapest size: (2ℓ)²d flops per ℓ rows); the SVD of
    the stacked [B; rows] goes through its 2ℓ×2ℓ Gram matrix, in float32 like the data.
    """
    B = np.zeros((0, X.shape[1]), dtype=np.float32)
    total = 0.0
    for block in _row_blocks(X, block_rows):
        block = block.astype(np.float32, copy=False)
        total += float(np.einsum("ij,ij->", block, block, dtype=np.float64))
        for start in range(0, block.shape[0], sketch_size):
            M = np.vstack([B, block[start: start + sketch_size]])
            w, U = np.linalg.eigh((M @ M.T).astype(np.float64))
            w, U = np.clip(w[::-1], 0.0, None), U[:, ::-1]  # descending
            shrink = w[sketch_size] if M.shape[0] > sketch_size else 0.0
            keep = w[:sketch_size] > max(shrink, w[0] * 1e-12)
            Vt = (U[:, :sketch_size][:, keep].T.astype(np.float32) @ M) / np.sqrt(w[:sketch_size][keep])[:, None]
            B = (np.sqrt(w[:sketch_size][keep] - shrink)[:, None] * Vt).astype(np.float32)
    return B, total


def _rayleigh_ritz(X: Any, basis: np.ndarray, rank: int, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-`rank` span of X inside the row space of `basis` (orthonormal rows), from one pass: (s, Vt)."""
    K = np.zeros((basis.shape[0], basis.shape[0]))
    for block in _row_blocks(X, block_rows):
        Z = (block.astype(np.float32, copy=False) @ basis.T).astype(np.float64)
        K += Z.T @ Z
    w, Q = np.linalg.eigh(K)
    w, Q = np.clip(w[::-1][:rank], 0.0, None), Q[:, ::-1][:, :rank]
    return np.sqrt(w), Q.T.astype(np.float32) @ basis


def top_span_streaming(X: Any, rank: int, method: str = "frequent_directions", sketch_size: int | None = None,
                       block_rows: int = 1024, refine: bool = True, n_power_iter: int = 2, seed: int = 0) -> Span:
    """The top-`rank` span of a (T, d) zarr/dask/numpy matrix too large for memory, reading row blocks.

    `frequent_directions`: one pass with memory ~ (sketch_size + block_rows) × d (sketch_size defaults to
    4·rank: at 2·rank, spans of real trajectories, flat at the cut, were 8–15° off the exact one); with
    refine=True a second, cheaper pass (sketch_size·d flops per row) replaces FD's shrunken singular values by
    exact ones and picks the best rank-`rank` span inside the sketch (Rayleigh–Ritz);
    refine=False keeps one pass, with singular values shrunk by at most ‖X − X_rank‖_F / √(sketch_size − rank).
    `svd_compressed`: dask's randomised SVD, 2·n_power_iter + 2 passes over the data, re-orthogonalised (QR)
    between power iterations: without it, float32 rounding turned the weaker of 16 directions 40–88° away;
    oversampled by 2·rank (dask's 10 left real trajectories' spans 37–58° off).
    As with top_span, rows spanning fewer than `rank` directions give a smaller span.
    """
    _check_matrix(X)
    rank = _check_rank(rank, X.shape)
    if method == "frequent_directions":
        size = sketch_size or 4 * rank
        if size <= rank:
            raise ValueError(f"sketch_size={size} must exceed rank={rank} (Frequent Directions' error falls as "
                             "1/(sketch_size − rank)); try 2·rank or more")
        B, total = _frequent_directions(X, size, block_rows)
        _, s, Vt = np.linalg.svd(B, full_matrices=False)
        if refine:
            s, Vt = _rayleigh_ritz(X, Vt, rank, block_rows)
        return _span(Vt[:rank], s[:rank], total, X.shape)
    if method == "svd_compressed":
        import dask.array as da

        if isinstance(X, zarr.Array):
            X = store.as_dask(X)
        elif not hasattr(X, "dask"):
            X = da.from_array(X)
        X = X.astype(np.float32).rechunk({0: block_rows, 1: -1})
        _refuse_nonfinite(da.flatnonzero(~da.isfinite(X).all(axis=1)).compute())  # LAPACK: "did not converge"
        _, s, Vt = da.linalg.svd_compressed(X, rank, n_power_iter=n_power_iter, n_oversamples=2 * rank, iterator="QR",
                                            seed=seed, compute=True)  # plain power iterations lose the weak directions
        total = (X.astype(np.float64) ** 2).sum()
        s, Vt, total = da.compute(s, Vt, total)
        return _span(Vt, s, float(total), X.shape)
    raise ValueError(f"unknown streaming method {method!r}: choose one of {', '.join(STREAMING_METHODS)}")


def effective_dimension(spectrum: Span | np.ndarray, energy: float = 0.9) -> EffectiveDimension:
    """Participation ratio and the number of directions holding `energy` of the total, from a span or singular values.

    Given bare singular values the spectrum is taken as complete. Given a Span only its top `rank` values are
    known: the participation ratio covers those, and dims_for_energy is None when they hold less than `energy`.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy} must be a fraction in (0, 1], e.g. 0.9")
    if isinstance(spectrum, Span):
        s2, total = spectrum.singular_values**2, spectrum.total_energy
    else:
        s2 = np.sort(np.asarray(spectrum, dtype=np.float64).ravel())[::-1] ** 2
        total = float(s2.sum())
    if total <= 0 or s2.size == 0:
        raise ValueError("the spectrum has no energy (all singular values are zero)")
    participation = float(s2.sum() ** 2 / np.sum(s2**2))
    cumulative = np.cumsum(s2) / total
    reached = np.flatnonzero(cumulative >= energy - 1e-12)
    dims = int(reached[0]) + 1 if reached.size else None
    return EffectiveDimension(participation, dims, energy, float(min(cumulative[-1], 1.0)))


def _basis(span: Span | np.ndarray) -> np.ndarray:
    basis = span.basis if isinstance(span, Span) else np.asarray(span)
    if basis.ndim != 2:
        raise ValueError(f"a span basis must be (rank, d) with orthonormal rows, got shape {basis.shape}")
    return basis


def _check_same_sketch(sketch: dict | None, span: Span | np.ndarray) -> None:
    """Refuse vectors of one sketch against a span of another where both are known (the same k says nothing: two
    sketch seeds of one trajectory gave spans 84–89° apart)."""
    if sketch is not None and isinstance(span, Span) and span.sketch is not None:
        store.check_compatible(sketch, span.sketch)


def projection_energy(vectors: np.ndarray, span: Span | np.ndarray, sketch: dict | None = None) -> ProjectionEnergy:
    """Share of the energy of each vector (..., d) inside the span (dominant) and outside it (bulk). Given the
    vectors' sketch (their run's `sketch` attribute), a span from `run_span` of another sketch is refused."""
    _check_same_sketch(sketch, span)
    basis = _basis(span)
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.shape[-1] != basis.shape[1]:
        raise ValueError(f"vectors have dimension {vectors.shape[-1]} but the span lives in dimension "
                         f"{basis.shape[1]}; both must come from the same sketch")
    gram = basis.astype(np.float64) @ basis.T.astype(np.float64)
    if not np.allclose(gram, np.eye(len(basis)), atol=ORTHONORMAL_TOL):
        raise ValueError("the span's basis rows are not orthonormal (max |B Bᵀ − I| = "
                         f"{np.abs(gram - np.eye(len(basis))).max():.2g}): pass a Span, or orthonormalise the rows "
                         "first (e.g. np.linalg.qr(B.T)[0].T)")
    norm_sq = np.einsum("...d,...d->...", vectors, vectors)
    coords = vectors @ basis.T.astype(np.float64)
    inside = np.einsum("...r,...r->...", coords, coords)
    with np.errstate(invalid="ignore", divide="ignore"):
        dominant = np.where(norm_sq > 0, np.clip(inside / norm_sq, 0.0, 1.0), np.nan)
    return ProjectionEnergy(dominant, 1.0 - dominant, norm_sq)


def energy_over_training(probe_grads: np.ndarray, span: Span | np.ndarray, sketch: dict | None = None
                         ) -> ProjectionEnergy:
    """Dominant/bulk energy shares (R, S) of probe gradients (R probes, S splits, k) in a span; `sketch` as in
    `projection_energy`."""
    probe_grads = np.asarray(probe_grads)
    if probe_grads.ndim != 3:
        raise ValueError(f"probe_grads must be (probes, splits, k), got shape {probe_grads.shape}; "
                         "select one probe loss from probe/grad (R, S, Lp, k) first, e.g. grads[:, :, 0]")
    return projection_energy(probe_grads, span, sketch)


def principal_angles(span_a: Span | np.ndarray, span_b: Span | np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between two spans (bases as rows), via scipy.linalg.subspace_angles;
    spans from `run_span` of different sketches are refused."""
    if isinstance(span_a, Span):
        _check_same_sketch(span_a.sketch, span_b)
    a, b = _basis(span_a), _basis(span_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"spans live in different dimensions ({a.shape[1]} vs {b.shape[1]}); "
                         "compare spans of the same sketch")
    return np.sort(scipy.linalg.subspace_angles(a.T.astype(np.float64), b.T.astype(np.float64)))


def per_layer_energy(x: np.ndarray | Span, layout: list[dict], sketch: dict) -> pd.DataFrame:
    """Per-parameter-tensor share of a vector's energy (or of a span's energy): identity sketches only.

    For vectors (d,) or (n, d): one column `energy_<i>` per vector. For a Span: `basis_share` (each direction
    weighted equally, sums to 1) and `energy_share` (directions weighted by s², sums to 1). Rows follow `layout`.
    """
    if sketch.get("kind") != "identity":
        raise ValueError(f"per-layer energy needs coordinates that are parameters (an identity sketch); this store "
                         f"uses a {sketch.get('kind')!r} sketch, which mixes tensors in every coordinate. Re-capture "
                         "with capture.sketch=identity (small models) to attribute energy to layers.")
    sizes = [math.prod(entry["shape"]) for entry in layout]
    offsets = [entry["offset"] for entry in layout]
    d = sum(sizes)
    frame = pd.DataFrame({"name": [e["name"] for e in layout], "shape": [tuple(e["shape"]) for e in layout],
                          "numel": sizes}).set_index("name")

    def shares(rows: np.ndarray) -> np.ndarray:  # (n, d) -> (n, L) energy share per tensor
        sq = np.asarray(rows, dtype=np.float64) ** 2
        per = np.stack([sq[:, o: o + n].sum(axis=1) for o, n in zip(offsets, sizes)], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return per / per.sum(axis=1, keepdims=True)

    if isinstance(x, Span):
        if x.dim != d:
            raise ValueError(f"span dimension {x.dim} ≠ the layout's {d} parameters")
        per_direction = shares(x.basis)
        weights = x.singular_values**2 / np.sum(x.singular_values**2)
        frame["basis_share"] = per_direction.mean(axis=0)
        frame["energy_share"] = weights @ per_direction
        return frame
    rows = np.atleast_2d(np.asarray(x))
    if rows.ndim != 2 or rows.shape[1] != d:
        raise ValueError(f"vectors must be (d,) or (n, d) with d = {d} parameters, got shape {np.shape(x)}")
    for i, share in enumerate(shares(rows)):
        frame[f"energy_{i}"] = share
    return frame


def moving_learning_rates(lr: np.ndarray, layer_lr: np.ndarray | None) -> np.ndarray:
    """Per recorded step, the learning rate every tensor that moved stepped with, from `layer_lr` (each tensor's;
    a tensor at 0 moves nothing, one at NaN was held by no group): 0 where none moved, NaN where the moving tensors'
    param groups stepped with different ones (layer-wise decay, LoRA+, Muon's beside AdamW's), and `lr` (the first
    group's) where `layer_lr` is absent or unrecorded (rows recorded before it was added, then resumed)."""
    if layer_lr is None:
        return lr.astype(np.float64)
    per_tensor = layer_lr.astype(np.float64)
    moving = per_tensor > 0
    low = np.where(moving, per_tensor, np.inf).min(axis=1, initial=np.inf)
    high = np.where(moving, per_tensor, 0.0).max(axis=1, initial=0.0)  # 0: nothing moved
    rates = np.where(high - low > 1e-6 * high, np.nan, high)
    return np.where(np.isnan(per_tensor).all(axis=1), lr, rates)


def _step_learning_rates(group: zarr.Group, rows: np.ndarray) -> np.ndarray:
    """The learning rate each selected step's update is divided by for `adam_update` (`moving_learning_rates`),
    refused where the moving tensors' differ: their update, sketched as one vector, cannot be divided by each's."""
    layer_lr = store.read(group, "layer_lr")[rows] if "layer_lr" in group else None
    rates = moving_learning_rates(store.read(group, "lr")[rows], layer_lr)
    mixed = np.flatnonzero(np.isnan(rates))
    if mixed.size:
        first = mixed[0]
        step = int(store.read(group, "step")[rows[first]])
        seen = ", ".join(f"{r:.3g}" for r in np.unique(layer_lr[first][layer_lr[first] > 0]))
        raise ValueError(f"adam_update divides each step's update by its learning rate, but the parameter groups of "
                         f"run {group.basename!r} stepped with different ones ({seen} at step {step}, and so in "
                         f"{mixed.size} of the selected steps): the update, sketched as one vector, cannot be divided "
                         "by each; take quantity='update'")
    return rates


def _select_rows(steps: np.ndarray, window: slice | None) -> np.ndarray:
    """Row indices whose optimizer step t satisfies window.start ≤ t < window.stop."""
    if steps.size == 0:
        raise ValueError("the run holds no recorded step yet (rows are written a chunk at a time and at each "
                         "checkpoint: `gradtrace info` gives its status)")
    if window is None:
        return np.arange(len(steps))
    if not isinstance(window, slice):
        raise TypeError(f"steps={window!r}: pass slice(start, stop) in optimizer steps, stop exclusive")
    if window.step is not None:
        raise ValueError(f"steps={window} has a stride; pass slice(start, stop) in optimizer steps "
                         "(rows recorded every capture.every steps are all used)")
    lo = -np.inf if window.start is None else window.start
    hi = np.inf if window.stop is None else window.stop
    rows = np.flatnonzero((steps >= lo) & (steps < hi))
    if rows.size == 0:
        raise ValueError(f"no recorded step lies in {window} (recorded steps {steps.min()}–{steps.max()})")
    return rows


@dataclass(frozen=True)
class _StoredRows:
    """Rows `rows` (ascending) of a stored (T, d) array, decoded to float32, as −row/lr where `lr` (per row) is
    given, minus `shift` where given: the matrix run_span analyses, read from zarr a block at a time (through a dask
    graph each block cost time that grew with the store's number of chunks: 41 ms a block at 40k chunks, not 2)."""

    array: zarr.Array
    rows: np.ndarray
    lr: np.ndarray | None = None  # float32, one per row
    shift: np.ndarray | None = None  # float32, (d,)
    dtype = np.dtype(np.float32)
    ndim = 2

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.array.shape[1]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def __getitem__(self, key: slice | tuple[slice, ...]) -> np.ndarray:
        rows, cols = (key, slice(None)) if isinstance(key, slice) else (key + (slice(None),))[:2]
        start, stop, _ = rows.indices(self.shape[0])
        idx = self.rows[start:stop]
        if idx.size == 0:
            return np.zeros((0, self.shape[1]), self.dtype)[:, cols]
        x = store.decode(store.stored(self.array, slice(idx[0], idx[-1] + 1)),
                         self.array.attrs.get("storage_dtype"))[idx - idx[0]]
        if self.lr is not None:
            x = -x / self.lr[start:stop, None]
        if self.shift is not None:
            x = x - self.shift
        return x[:, cols]

    def mean(self, block_rows: int = 1024) -> np.ndarray:
        """The mean row (float64 sums of float32 rows), one block in memory at a time."""
        total = sum(self[a: a + block_rows].sum(axis=0, dtype=np.float64) for a in range(0, self.shape[0], block_rows))
        return (total / self.shape[0]).astype(np.float32)


def run_span(group: zarr.Group | str | Path, quantity: str = "update", rank: int = 32, steps: slice | None = None,
             center: bool = False, method: str = "auto", seed: int = 0) -> Span:
    """The top-`rank` span of one captured quantity of a run group (or its folder's path) over a window of optimizer
    steps, carrying the run's sketch (analyses refuse to mix it with another).

    quantity: `update` (Δθ_t), `grad` (g_t), `adam_m` (m_t) or `adam_update` = −Δθ_t / lr_t, Adam's
    preconditioned step direction m̂/(√v̂+ε) plus the decoupled weight-decay term wd·θ_t (exactly Adam's direction
    when weight decay is 0); unlike `update` it is not weighted by the learning-rate schedule (steps with lr = 0
    are skipped; lr_t is the rate the moving tensors stepped with, refused where their param groups' differ).
    steps: slice(start, stop) in optimizer steps (the `step` array), stop exclusive. method: `auto` takes the exact
    SVD where it is cheap (`EXACT_SVD_FLOPS`), else reads the window into memory when it fits in 2 GiB (randomised
    SVD) and streams it (Frequent Directions) otherwise; or name `randomized`, `full`, `frequent_directions` or
    `svd_compressed`.
    """
    group = store.run_group(group)
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}: choose one of {', '.join(QUANTITIES)}")
    source = "update" if quantity == "adam_update" else quantity
    if source not in group:
        raise KeyError(f"run {group.name!r} did not capture {source!r}; add it to capture.quantities and re-run")
    rows = _select_rows(store.read(group, "step"), steps)
    matrix = _StoredRows(group[source], rows)
    if quantity == "adam_update":
        lr = _step_learning_rates(group, rows)
        if np.any(lr < 0) or not np.any(lr > 0):
            raise ValueError("adam_update divides updates by the learning rate, which is negative or zero throughout "
                             "the selected steps; check the recorded `lr` or choose another window")
        taken = lr > 0  # steps with lr = 0 (e.g. the first warm-up step) moved nothing
        matrix = _StoredRows(group[source], rows[taken], lr[taken].astype(np.float32))
    if method == "auto":  # exact where cheap, randomised in memory, else streamed
        exact = min(matrix.shape) ** 2 * max(matrix.shape) <= EXACT_SVD_FLOPS
        method = ("full" if exact else "randomized") if matrix.nbytes <= IN_MEMORY_BYTES else "frequent_directions"
    if method in STREAMING_METHODS:
        _check_rank(rank, matrix.shape, center)
        if center:  # one pass for the mean, then stream the centred rows
            matrix = dataclasses.replace(matrix, shift=matrix.mean())
        span = top_span_streaming(matrix, rank, method=method, seed=seed)
    else:
        span = top_span(matrix[:], rank, method=method, seed=seed, center=center)
    return dataclasses.replace(span, sketch=group.attrs.get("sketch"))
