"""Every figure of a study, drawn from stored tables and run groups alone.

Each public function takes tables (pandas) or arrays read from a store and returns a `matplotlib.figure.Figure`
built without pyplot (no global state, Agg canvas), in one house style: 8-pt type sized for a paper column
(3.4 in) or page (7 in), the Okabe-Ito colour-blind-safe palette (grey for its yellow), a diverging map centred at 0
for correlations. `save(fig, path)` writes `path.pdf` and `path.png`.
"""
from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import zarr
from matplotlib import cycler, ticker  # matplotlib's cycler: the package is matplotlib's dependency, not ours
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats as sps
from scipy.special import ndtri

from gradtrace import store
from gradtrace.files import written_whole
from gradtrace.results import base_groups
from gradtrace.stats import centre_within

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
LINE_COLOURS = [*OKABE_ITO[:-1], "#999999"]  # its yellow is too light for lines on white: grey instead
MARKERS = "os^Dv<>p"
COLUMN_WIDTH = 3.4  # inches: one column of a two-column paper
PAGE_WIDTH = 7.0  # inches: the full text width
DPI = 150
N_ITEMS = 2000  # items per split: probit clipping to [1/(2N), 1 - 1/(2N)]
RESIDUALIZATIONS = ("linear", "probit", "spline")
HEATMAP_TEXT_CELL = 0.175  # inches: the smallest heatmap cell whose number ("0.26*", 5 pt) stays clear of the next
GAP_BANDS = ((-math.inf, 5.0, "healthy", "#009E73"), (5.0, 10.0, "watch", "#E69F00"),
             (10.0, math.inf, "warning", "#D55E00"))
BENCHMARK_FILES = ("capture_overhead", "sweep_throughput")
_VALUE_KEYS = ("ratio", "value", "overhead", "throughput", "runs_per_hour", "steps_per_s", "runs_per_s")
_NAME_KEYS = ("name", "label", "variant", "config")
BENCHMARK_AXES = {  # what each benchmark's ratio is (benchmarks/README.md)
    "capture_overhead": "step time with capture ÷ without (1 = no overhead)",
    "sweep_throughput": "runs per hour ÷ the naive loop's (above 1: faster)",
}

STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans", "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "axes.linewidth": 0.6,
    "axes.prop_cycle": cycler(color=OKABE_ITO), "lines.linewidth": 1.2, "lines.markersize": 3,
    "xtick.major.width": 0.6, "ytick.major.width": 0.6, "pdf.fonttype": 42, "ps.fonttype": 42,
    "figure.dpi": DPI, "savefig.dpi": DPI,
}


def _styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw under the house style (rcParams are read when artists are created)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _color(i: int) -> str:
    return LINE_COLOURS[i % len(LINE_COLOURS)]


def _split_style(j: int) -> dict[str, str]:
    """The j-th split's line: a colour of its own for the first 8 splits, then the colours again, each round with
    another line style and marker."""
    again = j // len(LINE_COLOURS)
    return {"color": _color(j), "ls": ("-", "--", ":", "-.")[again % 4], "marker": MARKERS[again % len(MARKERS)]}


def _grid(fig: Figure, n: int, ncols: int) -> list:
    """n axes in a grid of ncols columns, unused cells removed."""
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()
    return list(axes[:n])


def _require_columns(df: Any, columns: Sequence[str], what: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{what} is empty: nothing to plot")
    return df


def save(fig: Figure, path_without_suffix: str | Path) -> tuple[Path, Path]:
    """Write `fig` as PDF and PNG (150 dpi) next to each other; returns both paths."""
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    pdf, png = base.with_name(base.name + ".pdf"), base.with_name(base.name + ".png")
    with matplotlib.rc_context(STYLE):
        tight = {"bbox_inches": "tight", "pad_inches": 0.03}  # never clip a long tick label
        # drawn in memory, then written: matplotlib's PDF writer, cut off mid-file (a full disk), raised an
        # AttributeError from its own clean-up instead; no timestamp: rebuilt PDFs stay identical
        drawn = io.BytesIO()
        fig.savefig(drawn, format="pdf", metadata={"CreationDate": None}, **tight)
        with written_whole(pdf) as tmp:
            tmp.write_bytes(drawn.getvalue())
        with written_whole(png) as tmp:
            fig.savefig(tmp, dpi=DPI, **tight)
    return pdf, png


# ------------------------------------------------------------------------------------------------ correlations


def _pair_matrix(rows: pd.DataFrame, shifts: list[str], column: str) -> np.ndarray:
    m = np.full((len(shifts), len(shifts)), np.nan)
    index = {s: i for i, s in enumerate(shifts)}
    for a, b, v in zip(rows["a"], rows["b"], rows[column]):
        m[index[a], index[b]] = m[index[b], index[a]] = v
    return m


def _significant(rows: pd.DataFrame, alpha: float) -> pd.Series:
    """Holm-adjusted p below alpha where p_holm exists, else a CI that excludes 0."""
    if "p_holm" in rows:
        return rows["p_holm"] < alpha
    if {"ci_low", "ci_high"} <= set(rows.columns):
        return (rows["ci_low"] > 0) | (rows["ci_high"] < 0)
    return pd.Series(False, index=rows.index)


TITLE_CHARS = 26  # characters of an 8-pt title that a panel, four to a row, holds
TICK_CHAR = 0.053  # inches a character of a 7-pt tick label takes (DejaVu Sans, on average)
LONG_LABEL = 0.9  # inches of tick label (17 characters) past which a heatmap's panels may stand one to a row


def _heatmap_cell(n_shifts: int, ncols: int, label: float) -> float:
    """Side of a heatmap cell (inches) with ncols panels of n_shifts × n_shifts side by side on a page, their
    longest tick label `label` inches long: the rows' labels left of the first panel, each panel's 45° column
    labels reaching left of it (`_column_label_reach`)."""
    return min(0.34, (PAGE_WIDTH - 0.8 - label - ncols * _column_label_reach(label)) / (n_shifts * ncols))


def _column_label_reach(label: float) -> float:
    """How far (inches) a heatmap's 45° column labels, the longest `label` inches long, reach left of and below its
    panel."""
    return max(0.3, 0.71 * label)


@_styled
def partial_correlation_heatmap(stats_df: pd.DataFrame, residualize: str = "probit", alpha: float = 0.05) -> Figure:
    """Shifts × shifts matrix of partial r (given ID), one panel per residualisation; * marks significance.

    A cell is starred when its Holm-adjusted p is below `alpha` (or, without `p_holm`, when its CI excludes 0).
    `residualize="all"` draws every residualisation present in the table. Panels sit in one row while their cells
    hold a number, else two to a row (the figure grows taller); cells too small for a number show only the star.
    """
    _require_columns(stats_df, ["a", "b", "r"], "stats table")
    if "residualize" in stats_df:
        present = list(dict.fromkeys(stats_df["residualize"]))
        methods = ([m for m in RESIDUALIZATIONS if m in present] + [m for m in present if m not in RESIDUALIZATIONS]
                   if residualize == "all" else [residualize])
        if residualize != "all" and residualize not in present:
            raise ValueError(f"no rows with residualize={residualize!r} in the stats table; it has {present} "
                             "(or pass residualize='all')")
    else:
        methods = [None]
    r = stats_df["r"].to_numpy(dtype=float)
    if np.any(np.abs(r[np.isfinite(r)]) > 1 + 1e-9):
        raise ValueError("stats table column r holds values outside [-1, 1]: is it a correlation?")
    shifts = list(dict.fromkeys([*stats_df["a"], *stats_df["b"]]))
    n = len(shifts)
    label = TICK_CHAR * max(map(len, map(str, shifts)))
    ncols = len(methods)
    if _heatmap_cell(n, ncols, label) < HEATMAP_TEXT_CELL:
        ncols = min(2, ncols)
    if _heatmap_cell(n, ncols, label) < HEATMAP_TEXT_CELL and label > LONG_LABEL:
        ncols = 1  # long names: one panel to a row
    cell = max(_heatmap_cell(n, ncols, label), 0.05)
    nrows = math.ceil(len(methods) / ncols)
    reach = _column_label_reach(label)
    fig = _figure(min(PAGE_WIDTH, ncols * (n * cell + reach) + label + 0.8), nrows * (n * cell + 0.45 + reach))
    axes = _grid(fig, len(methods), ncols)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#eeeeee")
    panels = []
    for ax, method in zip(axes, methods):
        rows = stats_df if method is None else stats_df[stats_df["residualize"] == method]
        m = _pair_matrix(rows, shifts, "r")
        star = _pair_matrix(rows.assign(_sig=_significant(rows, alpha).astype(float)), shifts, "_sig")
        panels.append((ax, m, star, ax.imshow(m, cmap=cmap, vmin=-1, vmax=1)))
        ax.set_xticks(range(n), shifts, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), shifts if ax in axes[::ncols] else [])
        ax.tick_params(length=0)
        ax.spines[:].set_visible(False)
        size = f" (n={int(rows['n'].iloc[0])})" if "n" in rows and len(rows) else ""
        ax.set_title(f"{method} residualisation{size}" if method else f"partial r{size}")
    fig.colorbar(panels[-1][3], ax=axes, shrink=0.8, label="partial r given ID", ticks=[-1, -0.5, 0, 0.5, 1])
    fig.draw_without_rendering()  # laid out: the cells' size once the labels have their room
    drawn = min(ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0] for ax in axes) / fig.dpi
    fontsize = 6 if drawn >= 0.3 else 5
    numbers = drawn >= HEATMAP_TEXT_CELL  # else only the stars: the numbers would overprint
    for ax, m, star, _ in panels:
        for i in range(n):
            for j in range(n):
                text = (f"{m[i, j]:.2f}".replace("-", "−") if numbers else "") + ("*" if star[i, j] == 1 else "")
                if np.isfinite(m[i, j]) and text:
                    ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                            color="white" if abs(m[i, j]) > 0.6 else "black")
    return fig


# -------------------------------------------------------------------------------------------------- accuracies


def probit(acc: np.ndarray, n_items: int = N_ITEMS) -> np.ndarray:
    """Φ⁻¹ of accuracies clipped to [1/(2N), 1 − 1/(2N)]."""
    eps = 1.0 / (2 * n_items)
    return ndtri(np.clip(np.asarray(acc, dtype=float), eps, 1 - eps))


def _probit_ticks(ax, axis: str, lo: float, hi: float) -> None:
    marks = np.array([0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99, 0.999])
    pos = probit(marks)
    keep = (pos >= lo) & (pos <= hi)
    labels = [f"{100 * m:g}" for m in marks[keep]]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(pos[keep], labels)


def _marker_style(n_points: int) -> tuple[float, float]:
    """Marker area (pt²) and alpha of a scatter of n points: smaller and fainter past 150, so a cloud stays legible."""
    crowding = min(1.0, math.sqrt(150 / n_points))
    return 9 * crowding, 0.8 * crowding


def _within_fit(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float] | None:
    """Least-squares slope and Pearson r of y on x within groups (each group its own intercept): those of the
    group-centred points, as the study's statistics take them; None where x does not vary within groups."""
    if len(x) < 2:
        return None
    xc, yc = centre_within(np.column_stack([x, y]), groups).T
    sxx, syy, sxy = xc @ xc, yc @ yc, xc @ yc
    if sxx < 1e-12:  # not 0: centring leaves rounding residue
        return None
    return sxy / sxx, sxy / math.sqrt(sxx * syy) if syy >= 1e-12 else math.nan


@_styled
def accuracy_on_the_line(results_df: pd.DataFrame, id: str = "ID", n_items: int = N_ITEMS) -> Figure:
    """Per shift, accuracy vs ID accuracy over runs on probit axes, with the least-squares probit line.

    Uses the rows with role == "sweep" when the table has a role column (base and reference runs are not the
    sweep's); axes are labelled in percent. Runs that fine-tuned different base runs (a `base` column with several
    values) get one colour and marker per base, and the fit is within base as the study's statistics are: one slope
    (and r) for all bases, one line per base through its runs' mean.
    """
    id_col = f"acc_{id}"
    _require_columns(results_df, [id_col], "results table")
    table = results_df
    if "role" in table:
        table = table[table["role"] == "sweep"]
        if table.empty:
            raise ValueError(f"the results hold no sweep runs yet (roles: {sorted(set(results_df['role']))})")
    shifts = [c[4:] for c in table.columns if c.startswith("acc_") and c != id_col]
    if not shifts:
        raise ValueError(f"results table has no shift accuracy columns acc_<split> besides {id_col}")
    if len(table) < 2:
        raise ValueError(f"accuracy_on_the_line needs at least 2 runs, got {len(table)}")
    ncols = min(4, len(shifts))
    fig = _figure(PAGE_WIDTH if len(shifts) > 2 else COLUMN_WIDTH * len(shifts) / 2 + 0.4,
                  1.75 * math.ceil(len(shifts) / ncols) + 0.2)
    axes = _grid(fig, len(shifts), ncols)
    x_all = probit(table[id_col].to_numpy(), n_items)
    bases_all = table["base"].astype(str).to_numpy() if base_groups(table) else np.full(len(table), "")
    names = np.unique(bases_all)
    several = len(names) > 1
    size, alpha = _marker_style(len(table))
    for i, (ax, shift) in enumerate(zip(axes, shifts)):
        y_all = probit(table[f"acc_{shift}"].to_numpy(), n_items)
        ok = np.isfinite(x_all) & np.isfinite(y_all)
        x, y, bases = x_all[ok], y_all[ok], bases_all[ok]
        for j, base in enumerate(names):
            mine = bases == base
            ax.scatter(x[mine], y[mine], s=size, color=_color(j if several else i), alpha=alpha, linewidths=0,
                       marker=MARKERS[j % len(MARKERS)], label=base)
        if several and i == 0:
            for handle in ax.legend(fontsize=5, loc="upper left", frameon=False, handletextpad=0.1).legend_handles:
                handle.set_alpha(1)  # however faint the crowded points
        lo, hi = min(x.min(initial=0), y.min(initial=0)) - 0.3, max(x.max(initial=0), y.max(initial=0)) + 0.3
        ax.plot([lo, hi], [lo, hi], color="0.7", lw=0.6, ls=":", zorder=0)
        title = shift
        fit = _within_fit(x, y, bases)
        if fit is not None:
            slope, r = fit
            for j, base in enumerate(names):  # one line per base: the common slope through the base's means
                mine = bases == base
                if mine.any():
                    grid = np.array([x[mine].min(), x[mine].max()])
                    ax.plot(grid, y[mine].mean() + slope * (grid - x[mine].mean()), lw=1,
                            color=_color(j) if several else "black")
            title += f"\n(slope {slope:.2f}, r {r:.2f})" if np.isfinite(r) else ""
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        _probit_ticks(ax, "x", lo, hi)
        _probit_ticks(ax, "y", lo, hi)
        ax.set_title(title, fontsize=min(8.0, 8.0 * TITLE_CHARS / len(shift)))  # a long name: shrunk to fit
        ax.set_aspect("equal", adjustable="box")
    for ax in axes[-ncols:]:
        ax.set_xlabel(f"{id} accuracy (%)")
    for ax in axes[::ncols]:
        ax.set_ylabel("shift accuracy (%)")
    if several:
        fig.suptitle(f"slope and r within base: {len(names)} bases, each its own intercept, one common slope")
    return fig


# ------------------------------------------------------------------------------------------------ trajectories


def _labels(group: zarr.Group, name: str, count: int) -> list[str]:
    for attrs in (group[name].attrs, group.attrs):
        labels = attrs.get("splits")
        if labels is not None and len(labels) == count:
            return [str(s) for s in labels]
    return [f"split {i}" for i in range(count)]


def _minor_log_label(value: float, _pos: int) -> str:
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6 else ""


def _smooth(y: np.ndarray) -> np.ndarray:
    window = max(1, len(y) // 50)
    if window == 1:
        return y
    kernel = np.ones(window) / window
    return np.convolve(np.pad(y, (window // 2, window - 1 - window // 2), mode="edge"), kernel, mode="valid")


def _a_run(run_group: zarr.Group | str | Path) -> zarr.Group:
    """The run group `training_curves` is given, or the one at the folder's path it is given."""
    if not isinstance(run_group, (zarr.Group, str, PathLike)):
        raise TypeError("training_curves needs a run's zarr.Group or its folder's path (store.zarr/<run_id>), got "
                        f"{type(run_group).__name__}")
    return store.run_group(run_group)


def training_panels(run_group: zarr.Group | str | Path) -> list[str]:
    """What `training_curves` draws of a run (its group or its folder's path), in order: its per-step scalars
    (`grad_norm_unclipped`, which says more where clipped, in place of `grad_norm` where recorded), then `evals` and
    `probe` accuracy where present."""
    run_group = _a_run(run_group)
    scalars = [name for name in ("loss", "lr", "grad_norm") if name in run_group]
    if "step" not in run_group or not scalars:
        raise ValueError(f"run {run_group.name!r} has no per-step scalars (needs `step` and loss/lr/grad_norm); "
                         "was it recorded with capture enabled?")
    if "grad_norm_unclipped" in run_group and np.isfinite(store.read(run_group, "grad_norm_unclipped")).any():
        scalars = [name.replace("grad_norm", "grad_norm_unclipped") for name in scalars]
    return scalars + [prefix for prefix in ("evals", "probe")
                      if f"{prefix}/step" in run_group and f"{prefix}/accuracy" in run_group]


def clip_threshold(run_group: zarr.Group) -> float | None:
    """The gradient-norm clip a run trained with, as its config says (gradtrace's own runs); None where unknown."""
    return ((run_group.attrs.get("config") or {}).get("train") or {}).get("clip")


def _group_learning_rates(run_group: zarr.Group) -> np.ndarray:
    """A run's distinct learning-rate schedules (steps × schedules) among its tensors' (`layer_lr`), one per set of
    parameter groups stepping alike; (steps, 0) where the run recorded none."""
    if "layer_lr" not in run_group:
        return np.empty((0, 0))
    per_tensor = store.read(run_group, "layer_lr").astype(float)
    held = per_tensor[:, ~np.isnan(per_tensor).all(axis=0)]  # a tensor no group held reads NaN throughout
    _, first = np.unique(np.nan_to_num(held, nan=-1.0), axis=1, return_index=True)  # rows a resume left unrecorded
    return held[:, np.sort(first)]


def _draw_group_learning_rates(ax, steps: np.ndarray, lrs: np.ndarray) -> None:
    """The learning rate of each group of tensors stepping alike (layer-wise decay, LoRA+, Muon beside AdamW)."""
    for j in range(lrs.shape[1]):
        ax.plot(steps, lrs[:, j], color=LINE_COLOURS[j % len(LINE_COLOURS)], lw=0.9)
    positive = lrs[np.isfinite(lrs) & (lrs > 0)]
    if positive.size and np.log10(positive.max() / positive.min()) >= 1 - 1e-6:  # a decade or more apart: log axes
        ax.set_yscale("log")
    ax.set_ylabel("learning rate (per group)")


@_styled
def training_curves(run_group: zarr.Group | str | Path) -> Figure:
    """Loss, learning rate and gradient norm over steps of one run (its group or its folder's path); eval and probe
    accuracy when recorded."""
    run_group = _a_run(run_group)
    drawn = training_panels(run_group)
    scalars = [name for name in drawn if name not in ("evals", "probe")]
    steps = store.read(run_group, "step")
    clip = clip_threshold(run_group)
    panels: list[tuple[str, Callable]] = []
    labels = {"loss": "training loss", "lr": "learning rate", "grad_norm": "gradient norm (after clip)",
              "grad_norm_unclipped": "gradient norm (before clip)"}
    group_lrs = _group_learning_rates(run_group)
    for name in scalars:
        if name == "lr" and group_lrs.shape[1] > 1:
            panels.append((name, functools.partial(_draw_group_learning_rates, steps=steps, lrs=group_lrs)))
            continue
        values = store.read(run_group, name).astype(float)

        def draw(ax, values=values, name=name):
            ax.plot(steps, values, color="0.75", lw=0.6)
            ax.plot(steps, _smooth(values), color=OKABE_ITO[0])
            finite = values[np.isfinite(values)]
            decades = np.log10(finite.max() / finite.min()) if finite.size and np.all(finite > 0) else 0.0
            if name == "loss" and decades >= 1:  # a loss falling by 10x or more reads best on log axes
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                if decades < 2:  # few decades: label the 2s and 5s too
                    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_minor_log_label))
            if finite.size and np.ptp(finite) <= 1e-4 * np.abs(finite).max():  # constant but for float rounding
                centre = float(np.median(finite))  # (a gradient norm clipped at every step): a flat line at it,
                margin = 0.01 * abs(centre) or 1.0  # not ticks of ±1e-7 around an offset
                ax.set_ylim(centre - margin, centre + margin)
                ax.ticklabel_format(axis="y", useOffset=False)
            if name == "grad_norm_unclipped" and clip:
                ax.axhline(clip, color="0.3", lw=0.6, ls="--", label=f"clip at {clip:g}")
                ax.legend(loc="upper right")
            ax.set_ylabel(labels[name])
        panels.append((name, draw))
    for prefix, title in (("evals", "accuracy (test sets)"), ("probe", "accuracy (probe batch)")):
        if prefix in drawn:
            x, acc = store.read(run_group, f"{prefix}/step"), store.read(run_group, f"{prefix}/accuracy")
            names = _labels(run_group, f"{prefix}/accuracy", acc.shape[1])

            def draw(ax, x=x, acc=acc, names=names, title=title):
                for j, split in enumerate(names):
                    ax.plot(x, acc[:, j], label=split, **_split_style(j))
                ax.set_ylim(-0.02, 1.02)
                ax.set_ylabel(title)
            panels.append((prefix, draw))
    ncols = 3 if len(panels) > 4 or len(panels) == 3 else 2
    fig = _figure(PAGE_WIDTH, 1.7 * math.ceil(len(panels) / ncols) + 0.3)
    axes = _grid(fig, len(panels), ncols)
    for ax, (_, draw) in zip(axes, panels):
        draw(ax)
        ax.set_xlabel("optimizer step")
    accuracy_axes = [ax for ax, (name, _) in zip(axes, panels) if name in ("evals", "probe")]
    if accuracy_axes:
        fig.legend(*accuracy_axes[-1].get_legend_handles_labels(), loc="outside right center")
    role = run_group.attrs.get("role")
    fig.suptitle(f"run {run_group.basename}" + (f" ({role})" if role else ""), fontsize=8)
    return fig


@_styled
def span_energy_spectrum(span: Any, total_energy: float | None = None) -> Figure:
    """Share of a trajectory's energy in each direction of its span (bars) and cumulatively (line).

    `span` is a 1-D array of singular values or an object with `.singular_values`; `total_energy` (the squared
    Frobenius norm of the whole trajectory) makes the shares relative to all of it, not only to the span.
    """
    values = getattr(span, "singular_values", span)
    s = np.asarray(values, dtype=float)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("span_energy_spectrum needs a non-empty 1-D array of finite, non-negative singular values")
    energy = s**2
    total = float(energy.sum()) if total_energy is None else float(total_energy)
    if not total > 0 or total < energy.sum() * (1 - 1e-6):
        raise ValueError(f"total_energy={total_energy} must be positive and at least the span's energy "
                         f"{energy.sum():.4g}")
    share, cumulative = energy / total, np.cumsum(energy) / total
    rank = np.arange(1, s.size + 1)
    fig = _figure(COLUMN_WIDTH, 2.2)
    ax = fig.subplots()
    ax.bar(rank, share, color=OKABE_ITO[5], width=0.8, label="per direction")
    ax.plot(rank, cumulative, color=OKABE_ITO[0], marker="o", label="cumulative")
    ax.axhline(0.9, color="0.6", lw=0.6, ls="--")
    reached = np.flatnonzero(cumulative >= 0.9)
    note = f"90% at rank {reached[0] + 1}" if reached.size else f"top {s.size}: {100 * cumulative[-1]:.0f}% of energy"
    ax.text(0.98, 0.05, note, transform=ax.transAxes, ha="right", va="bottom")
    ax.set_xlabel("span direction (by singular value)")
    ax.set_ylabel("share of trajectory energy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="center right")
    return fig


@_styled
def dominant_bulk_energy(steps: Sequence[int], dominant: np.ndarray, splits: Sequence[str],
                         rank: int | None = None) -> Figure:
    """Share of each split's probe-gradient energy inside the dominant span (left) and in the bulk (right).

    `dominant` is (R probes, S splits) in [0, 1]; the bulk share is its complement (the projections are
    orthogonal). `rank` names the dominant span's dimension in the titles.
    """
    x = np.asarray(steps)
    d = np.asarray(dominant, dtype=float)
    if d.ndim != 2 or d.shape != (x.size, len(splits)):
        raise ValueError(f"dominant must be (len(steps), len(splits)) = ({x.size}, {len(splits)}), got {d.shape}")
    if np.any((d < -1e-6) | (d > 1 + 1e-6)):
        raise ValueError("dominant holds energy shares outside [0, 1]")
    fig = _figure(PAGE_WIDTH, 2.2)
    axes = fig.subplots(1, 2, sharey=True)
    span = f"top-{rank} span" if rank else "dominant span"
    for ax, values, title in ((axes[0], d, f"dominant: inside the {span}"),
                              (axes[1], 1 - d, f"bulk: outside the {span}")):
        for j, split in enumerate(splits):
            ax.plot(x, values[:, j], label=split, **_split_style(j))
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("share of probe-gradient energy")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside right center")
    return fig


@_styled
def principal_angle_matrix(angles: pd.DataFrame | np.ndarray, labels: Sequence[str] | None = None) -> Figure:
    """Matrix of principal angles (degrees, 0 = same subspace, 90 = orthogonal) between labelled subspaces.

    `angles` is a square array or DataFrame (labels from its index), or a long table with columns `a`, `b`
    and `angle_deg` (or `angle`).
    """
    if isinstance(angles, pd.DataFrame) and {"a", "b"} <= set(angles.columns):
        column = next((c for c in ("angle_deg", "angle") if c in angles), None)
        if column is None:
            raise ValueError("a long angle table needs an angle_deg (or angle) column")
        labels = list(labels or dict.fromkeys([*angles["a"], *angles["b"]]))
        m = _pair_matrix(angles.rename(columns={column: "_angle"}), labels, "_angle")
        np.fill_diagonal(m, 0.0)
    elif isinstance(angles, pd.DataFrame):
        labels = list(labels or angles.index.astype(str))
        m = angles.to_numpy(dtype=float)
    else:
        m = np.asarray(angles, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"principal angles must form a non-empty square matrix, got shape {m.shape}")
    labels = list(labels) if labels is not None else [str(i) for i in range(m.shape[0])]
    if len(labels) != m.shape[0]:
        raise ValueError(f"{len(labels)} labels for a {m.shape[0]}×{m.shape[0]} angle matrix")
    finite = m[np.isfinite(m)]
    if np.any((finite < -1e-6) | (finite > 90 + 1e-6)):
        raise ValueError("principal angles must be in degrees within [0, 90]")
    n = len(labels)
    fig = _figure(min(PAGE_WIDTH, 0.34 * n + 1.6), 0.34 * n + 0.9)
    ax = fig.subplots()
    image = ax.imshow(m, cmap=matplotlib.colormaps["cividis"].with_extremes(bad="#eeeeee"), vmin=0, vmax=90)
    for i in range(n):
        for j in range(n):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] < 45 else "black")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    fig.colorbar(image, ax=ax, shrink=0.8, label="principal angle (°)", ticks=[0, 30, 60, 90])
    return fig


# ------------------------------------------------------------------------------------------------- predictions


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    return float(sps.spearmanr(x[ok], y[ok]).statistic)


@_styled
def predicted_vs_observed(predictions_df: pd.DataFrame, scores_df: pd.DataFrame | None = None) -> Figure:
    """One panel per predictor: predicted vs observed partial r over shift pairs, Spearman ρ in the title.

    ρ (and the noise ceiling) come from `scores_df` when it has them, else ρ is computed from the pairs;
    observed CIs are drawn when `observed_ci_low/high` exist.
    """
    _require_columns(predictions_df, ["predictor", "predicted", "observed"], "predictions table")
    if scores_df is not None:
        _require_columns(scores_df, ["predictor"], "predictor scores table")
    scores = scores_df.set_index("predictor") if scores_df is not None else pd.DataFrame()
    present = list(dict.fromkeys(predictions_df["predictor"]))
    predictors = [p for p in scores.index if p in present] + [p for p in present if p not in scores.index]
    ncols = min(3, len(predictors))
    fig = _figure(PAGE_WIDTH if ncols > 1 else COLUMN_WIDTH, 2.15 * math.ceil(len(predictors) / ncols) + 0.2)
    axes = _grid(fig, len(predictors), ncols)
    has_ci = {"observed_ci_low", "observed_ci_high"} <= set(predictions_df.columns)
    for i, (ax, name) in enumerate(zip(axes, predictors)):
        rows = predictions_df[predictions_df["predictor"] == name]
        x, y = rows["predicted"].to_numpy(dtype=float), rows["observed"].to_numpy(dtype=float)
        if has_ci:
            err = np.abs(np.vstack([y - rows["observed_ci_low"].to_numpy(float),
                                    rows["observed_ci_high"].to_numpy(float) - y]))
            ax.errorbar(x, y, yerr=err, fmt="none", ecolor="0.75", elinewidth=0.6, zorder=1)
        ax.scatter(x, y, s=12, color=_color(i), zorder=2, linewidths=0)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.axvline(0, color="0.6", lw=0.5)
        ax.set_ylim(-1.05, 1.05)
        finite = x[np.isfinite(x)]
        if finite.size and np.ptp(finite) == 0:  # a constant predictor: centre it rather than zoom to 1e-6
            ax.set_xlim(finite[0] - 1, finite[0] + 1)
        ax.ticklabel_format(axis="x", useOffset=False)
        row = scores.loc[name] if name in scores.index else pd.Series(dtype=object)
        rho = float(row["spearman"]) if "spearman" in row and pd.notna(row["spearman"]) else _spearman(x, y)
        detail = (f"ρ = {rho:.2f}".replace("-", "−") if not math.isnan(rho)
                  else "ρ n/a (constant)" if finite.size else "ρ n/a (no predictions)")
        if "noise_ceiling" in row and pd.notna(row["noise_ceiling"]):
            detail += f", ceiling {float(row['noise_ceiling']):.2f}"
        prereg = row.get("preregistered")
        tag = (f" ({row['group']})" if isinstance(row.get("group"), str)
               else " (pre-registered)" if prereg is True or str(prereg).lower() == "true" else "")
        ax.set_title(f"{name}{tag}\n{detail}")
        ax.set_xlabel("predicted")
    for ax in axes[::ncols]:
        ax.set_ylabel("observed partial r")
    return fig


@_styled
def generalisation_gap_bands(gap_df: pd.DataFrame) -> Figure:
    """Train − test accuracy gap (points) per split over runs, on bands: <5 healthy, 5–10 watch, >10 warning."""
    _require_columns(gap_df, ["split"], "generalisation-gap table")
    column = "gap_pts" if "gap_pts" in gap_df else next((c for c in gap_df.columns if "gap" in str(c).lower()), None)
    if column is None:
        raise ValueError(f"generalisation-gap table has no gap column (gap_pts); it has {list(gap_df.columns)}. "
                         "The gap needs train accuracies (train_acc_<split>) in the results.")
    table = gap_df[["split", column]].dropna()
    if table.empty:
        raise ValueError(f"generalisation-gap column {column!r} holds no values")
    splits = list(dict.fromkeys(table["split"]))
    values = table[column].to_numpy(dtype=float)
    lo, hi = min(-2.0, values.min() - 1), max(12.0, values.max() + 1)
    fig = _figure(max(COLUMN_WIDTH, 0.45 * len(splits) + 1.4), 2.3)
    ax = fig.subplots()
    for low, high, name, color in GAP_BANDS:
        ax.axhspan(max(low, lo), min(high, hi), color=color, alpha=0.13, lw=0, zorder=0)
        ax.text(1.01, (max(low, lo) + min(high, hi)) / 2, name, transform=ax.get_yaxis_transform(),
                va="center", fontsize=6, color=color)
    for i, split in enumerate(splits):
        y = table.loc[table["split"] == split, column].to_numpy(dtype=float)
        jitter = np.linspace(-0.18, 0.18, y.size) if y.size > 1 else np.zeros(1)
        ax.scatter(i + jitter, y, s=8, color="0.3", linewidths=0, zorder=2)
        ax.plot([i - 0.28, i + 0.28], [np.median(y)] * 2, color="black", lw=1.5, zorder=3)
    ax.set_xticks(range(len(splits)), splits, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(splits) - 0.4)
    ax.set_ylim(lo, hi)
    ax.set_ylabel("train − test accuracy (points)")
    return fig


# -------------------------------------------------------------------------------------------------- benchmarks


def _value(record: Mapping[str, Any]) -> tuple[str, float] | None:
    for key in _VALUE_KEYS:
        if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool):
            return key, float(record[key])
    return None


def _records(obj: Any) -> list[dict[str, Any]]:
    """Benchmark records {name, value, unit} from a list of records, a {"records": [...]} or a {name: value} dict."""
    if isinstance(obj, Mapping):
        for key in ("records", "results", "rows"):
            if isinstance(obj.get(key), list):
                return _records(obj[key])
        items = [{"name": k, **(v if isinstance(v, Mapping) else {"value": v})} for k, v in obj.items()]
        return _records(items)
    out = []
    for i, item in enumerate(obj if isinstance(obj, list) else []):
        if not isinstance(item, Mapping) or (found := _value(item)) is None:
            continue
        out.append({"name": _record_name(item, i), "unit": found[0], "value": found[1]})
    return out


def _record_name(item: Mapping[str, Any], i: int) -> str:
    """A record's label: its name, or what capture_overhead's records say (`tiny k=4096: grad+update+adam_m`; the
    optimizer named where it is not AdamW: `tiny cpu muon k=4096: ...`)."""
    named = next((str(item[k]) for k in _NAME_KEYS if k in item), None)
    if named is not None:
        return named
    parts = [str(item[k]) for k in ("model", "device") if item.get(k)]
    if item.get("optimizer") not in (None, "adamw"):
        parts.append(str(item["optimizer"]))
    if item.get("k"):
        parts.append(f"k={item['k']}")
    head, what = " ".join(parts), str(item.get("what") or "")
    return f"{head}: {what}" if head and what else head or what or f"#{i}"


def load_benchmarks(source: str | Path | Mapping[str, Any] | list) -> dict[str, list[dict[str, Any]]]:
    """Benchmark records per benchmark from a directory (its capture_overhead/sweep_throughput .json), one JSON
    file, a {title: records} mapping or a list of records; missing files and unreadable entries are skipped."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        files = [path / f"{name}.json" for name in BENCHMARK_FILES] if path.is_dir() else [path]
        loaded = {}
        for file in files:
            try:
                loaded[file.stem] = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
        source = loaded
    elif isinstance(source, list):
        source = {"benchmark": source}
    elif not isinstance(source, Mapping):
        raise TypeError(f"benchmarks must come from a path, a mapping or a list, got {type(source).__name__}")
    return {title: recs for title, body in source.items() if (recs := _records(body))}


@_styled
def benchmark_bars(source: str | Path | Mapping[str, Any] | list) -> Figure:
    """Horizontal bars per benchmark (capture overhead, sweep throughput): each record's ratio or value."""
    benchmarks = load_benchmarks(source)
    if not benchmarks:
        raise ValueError(f"no benchmark records found in {source!r}: expected JSON lists of "
                         '{"name": ..., "ratio": ...} (run `make bench`)')
    height = sum(0.3 * len(r) + 0.6 for r in benchmarks.values())
    fig = _figure(COLUMN_WIDTH, height + 0.2)
    axes = fig.subplots(len(benchmarks), 1, squeeze=False,
                        height_ratios=[len(r) + 2 for r in benchmarks.values()]).ravel()
    for i, (ax, (title, records)) in enumerate(zip(axes, benchmarks.items())):
        values = np.array([r["value"] for r in records])
        units = {r["unit"] for r in records}
        ax.barh(range(len(values)), values, color=_color(i), height=0.45)
        ax.set_yticks([])  # each bar's name above it, not as a tick label: long names would squeeze the axes
        ax.set_ylim(len(values) - 0.5, -0.9)  # top to bottom in record order, room for the first name
        ratio = units == {"ratio"}
        if ratio:
            ax.axvline(1.0, color="0.3", lw=0.6, ls="--")
        for j, (record, v) in enumerate(zip(records, values)):
            ax.text(0, j - 0.27, record["name"], fontsize=6, va="bottom")
            ax.text(v, j, f" {v:.2f}×" if ratio else f" {v:.3g}", va="center", fontsize=6)
        ax.set_xlim(0, values.max() * 1.2 if values.max() > 0 else 1)
        ax.set_title(title.replace("_", " "))
        ax.set_xlabel(BENCHMARK_AXES.get(title) if ratio and title in BENCHMARK_AXES
                      else " / ".join(sorted(units)).replace("_", " "))
    return fig
