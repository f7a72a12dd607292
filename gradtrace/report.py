"""The experiment report: one self-contained HTML page of figures, tables, the config and provenance.

`load_inputs` gathers what earlier stages wrote into an experiment directory (running the stats and predict
stages when their CSVs are missing and those modules import); `build_figures` draws every figure from those
inputs, the reference run's span analysis included; `write_report` saves the figures under
`report/figures/` (PDF + PNG) and writes `report/index.html` with the PNGs embedded as data: URIs, so the page
opens offline and travels as one file. Whatever input is missing becomes a short note, never a crash.
paper/build.py reuses `load_inputs` and `build_figures`.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import hashlib
import html
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
import zarr
from matplotlib.figure import Figure

import gradtrace
from gradtrace import figures, kernels, store, subspace
from gradtrace.config import names_a_file
from gradtrace.files import RESULTS_DIGEST, sha256_of, written_whole
from gradtrace.results import (MIXED_ADVICE, ROLES, base_groups, describe_divergence, describe_shortfall,
                               mixed_arithmetic, read_results)

SPAN_RANK = 32  # directions kept of the reference run's update trajectory
DOMINANT_RANK = 8  # of those, the "dominant" subspace for the dominant/bulk split
INPUT_FILES = ("config.yaml", "plan.json", "results.csv", "stats.csv", "stats.json", "gap.csv", "reliability.csv",
               "predictions.csv", "predict_scores.csv", "predict.json")
ANALYSIS_FILES = INPUT_FILES[3:]  # what stats and predict write: in the directory the analysis goes to (`--out`)
SECTIONS = (
    ("results", "Results across runs"),
    ("correlations", "Cross-shift partial correlations"),
    ("predictions", "Predicted vs observed partial correlations"),
    ("gap", "Generalisation gap"),
    ("training", "Training dynamics of the reference run"),
    ("benchmarks", "Benchmarks"),
    ("config", "Configuration"),
    ("provenance", "Provenance"),
)

STAGE_OUTPUTS = {"stats": ("stats.csv", "stats"), "gap": ("gap.csv", "stats"),
                 "reliability": ("reliability.csv", "stats"), "predictions": ("predictions.csv", "predict"),
                 "scores": ("predict_scores.csv", "predict")}  # each table: its file, the gradtrace command writing it
SECTION_INPUTS = {"results": ("unfinished", "mixed", "diverged", "results", "reliability"), "correlations": ("stats",),
                  "predictions": ("predictions", "scores"), "gap": ("gap",)}  # whose missing-input notes each shows


@dataclass
class Inputs:
    """What an experiment directory holds, read once; `notes` says why a part is missing, `origins` where each
    table came from; `out_dir`, where given, holds the tables of stats and predict and the report instead of it."""

    exp_dir: Path
    results: pd.DataFrame | None = None
    stats: pd.DataFrame | None = None
    gap: pd.DataFrame | None = None
    reliability: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None
    scores: pd.DataFrame | None = None
    config_text: str | None = None
    reference: zarr.Group | None = None
    benchmarks: Path | None = None
    notes: dict[str, str] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def analysis_dir(self) -> Path:
        """Where the tables of stats and predict, and the report, are read and written."""
        return self.out_dir or self.exp_dir

    def path(self, filename: str) -> Path:
        """Where one of `INPUT_FILES` is: the study's own in `exp_dir`, the tables of stats and predict in
        `analysis_dir`."""
        return (self.analysis_dir if filename in ANALYSIS_FILES else self.exp_dir) / filename

    def command(self, name: str) -> str:
        """The command line of `gradtrace NAME` (stats, predict, report) on this experiment, into `out_dir`."""
        out = f" --out {shlex.quote(str(self.out_dir))}" if self.analysis_dir != self.exp_dir else ""
        return f"gradtrace {name} {shlex.quote(str(self.exp_dir))}{out}"

    @functools.cached_property
    def run_groups(self) -> dict[str, zarr.Group]:
        """The store's run groups by id, listed once for the whole report (a listing took ~1.6 s at 3,000 runs); a
        missing or damaged store's error is raised at each use."""
        return store.run_groups(store.open_experiment(self.exp_dir / "store.zarr"))

    @property
    def config(self) -> dict:
        """The experiment's config.yaml as a dict; empty where it is missing or not a YAML mapping (the header and
        captions then go without it)."""
        try:
            config = yaml.safe_load(self.config_text or "")
        except yaml.YAMLError:
            return {}
        return config if isinstance(config, dict) else {}

    @property
    def n_items(self) -> int:
        """Test items per split (`task.n_test` of the experiment's config): where probit accuracies are clipped."""
        task = self.config.get("task")
        n_test = task.get("n_test") if isinstance(task, dict) else None
        return n_test if isinstance(n_test, int) and n_test > 0 else figures.N_ITEMS

    @property
    def sweep(self) -> pd.DataFrame | None:
        """The results rows of sweep runs."""
        if self.results is None:
            return None
        return self.results[self.results["role"] == "sweep"].reset_index(drop=True)


@dataclass
class FigureItem:
    """One figure of the report: where it goes, what it shows, and the drawn figure or why there is none."""

    name: str
    section: str
    title: str
    caption: str
    figure: Figure | None = None
    note: str | None = None


# ---------------------------------------------------------------------------------------------------- inputs


def _read_csv(inputs: Inputs, key: str, filename: str) -> pd.DataFrame | None:
    path = inputs.path(filename)
    if not path.exists():
        return None
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        inputs.notes[key] = f"{filename} could not be read ({type(err).__name__}: {err})"
        return None
    inputs.origins.setdefault(key, f"read {filename}")
    return table


def _read_results(inputs: Inputs) -> pd.DataFrame | None:
    """results.csv as the analyses take it (`results.read_results`); None where it is missing, or with the note of
    why it cannot be used (a table without role, one naming runs the store lacks)."""
    there = [(inputs.exp_dir / name).exists() for name in ("results.csv", "store.zarr")]
    try:
        table = read_results(inputs.exp_dir, inputs.run_groups if all(there) else None)
    except FileNotFoundError as err:  # no sweep there, none with a run finished yet, or runs of `gradtrace train`
        inputs.notes["results"] = f"no results across runs: {err}."
        return None
    except (OSError, ValueError) as err:
        inputs.notes["results"] = f"results.csv cannot be used: {err}"
        return None
    inputs.origins["results"] = "read results.csv"
    return table


def _run_stage(inputs: Inputs, keys: tuple[str, ...], files: tuple[str, ...], stamp: str, module: str,
               function: str, command: str) -> None:
    """Run gradtrace.<module>.<function>(exp_dir, out=out_dir) when any of `files` is missing from `out_dir` or was
    computed from another results.csv (a sweep extended since): the stage's `stamp` records the sha256 of the one it
    read; where it records none (tables of an earlier gradtrace), a results.csv modified after a table is taken for
    another. A failure becomes the note of every input (`keys`) that stage writes, but those it wrote before it failed
    (the gap of a sweep with one shift, say)."""
    recorded = _recorded_results_digest(inputs.path(stamp))
    same = recorded is not None and recorded == sha256_of(inputs.path("results.csv"))
    results_written = inputs.path("results.csv").stat().st_mtime

    def current(name: str) -> bool:
        path = inputs.path(name)
        return path.exists() and (same if recorded is not None else path.stat().st_mtime >= results_written)

    if all(current(f) for f in files):
        return
    stale = recorded is not None and all(inputs.path(f).exists() for f in files)
    why = (f"{' / '.join(files)} computed from another results.csv (by the sha256 {stamp} records)" if stale
           else f"{' / '.join(files)} missing or older than results.csv")
    before = {name: _version(inputs.path(name)) for name, _ in STAGE_OUTPUTS.values()}
    print(f"report: {why}: running `{command}` first", file=sys.stderr)  # a large study's stage takes a minute
    try:
        stage = importlib.import_module(f"gradtrace.{module}")
        getattr(stage, function)(inputs.exp_dir, out=inputs.analysis_dir)
    except ImportError as err:
        note = f"{why} and gradtrace.{module} is not available ({err}); run `{command}` where it is."
    except Exception as err:  # any failure of a later stage must not stop the report
        note = f"{why} and `{command}` failed: {type(err).__name__}: {err}"
    else:
        for key in keys:
            inputs.origins[key] = f"computed for this report by gradtrace.{module}.{function} (same as `{command}`)"
        return
    for key in keys:
        name = STAGE_OUTPUTS[key][0]
        written = _version(inputs.path(name)) not in (None, before[name])  # by the failed stage, before it failed
        if not (written or current(name)):
            inputs.notes[key] = note


def _recorded_results_digest(stamp: Path) -> str | None:
    """The sha256 of the results.csv a stage's tables were computed from, as its stamp records it (stats.json's
    summary, predict.json); None where there is none, or it cannot be read."""
    try:
        data = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    data = data.get("summary", data) if isinstance(data, dict) else None
    digest = data.get(RESULTS_DIGEST) if isinstance(data, dict) else None
    return digest if isinstance(digest, str) else None


def _version(path: Path) -> tuple[int, int] | None:
    """Which version of a file is at `path` (its inode and modification time: tables are written by renaming a new
    file onto them), None where there is none."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _reference_run(inputs: Inputs, role: str = "reference") -> zarr.Group:
    """The first complete run of `role` (the study's `predict.reference_role`: `base` in frontier studies) holding
    sketched updates, one with probe gradients where any has them (runs of your own loop attached without probes
    are reference runs too)."""
    groups = list(inputs.run_groups.values())
    drawable = [g for g in groups if g.attrs.get("role") == role and g.attrs.get("status") == "complete"
                and "update" in g]
    if drawable:
        return next((g for g in drawable if store.has(g, "probe/grad")), drawable[0])
    unfinished = [g.basename for g in groups if g.attrs.get("role") == role and "update" in g]
    if unfinished:
        hint = (f"{role} runs {unfinished[:5]} are not complete (`gradtrace info` gives their status): finish or "
                "resume them")
    elif role == "reference":
        hint = "set sweep.reference_runs >= 1 with capture enabled"
    else:
        hint = f"the study's predict.reference_role is {role!r}: its {role} run must be captured"
    raise LookupError(f"no complete {role} run with an `update` array among {len(groups)} run(s) in "
                      f"{inputs.exp_dir / 'store.zarr'}; {hint}")


def _benchmarks_dir(exp_dir: Path, given: str | Path | None) -> Path | None:
    candidates = [Path(given)] if given else [exp_dir / "benchmarks",
                                              Path(gradtrace.__file__).resolve().parents[1] / "benchmarks" / "out"]
    return next((c for c in candidates if figures.load_benchmarks(c)), None)


def load_inputs(exp_dir: str | Path, compute_missing: bool = True, benchmarks_dir: str | Path | None = None,
                out: str | Path | None = None) -> Inputs:
    """Everything the report shows, from an experiment directory, the tables of stats and predict from `out`
    (default: the experiment directory); those missing or older than the results are computed, into `out`, when
    `compute_missing` and their stage is importable."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise FileNotFoundError(f"experiment directory {exp_dir} does not exist; run "
                                f"`gradtrace sweep CONFIG --out {exp_dir}` (or `make demo`) first")
    if not any((exp_dir / name).exists() for name in ("results.csv", "store.zarr", "config.yaml")):
        raise FileNotFoundError(f"{exp_dir} holds no experiment (no results.csv, store.zarr or config.yaml): give the "
                                "directory a sweep or `gradtrace train` wrote")
    inputs = Inputs(exp_dir, out_dir=None if out is None else Path(out))
    inputs.results = _read_results(inputs)
    if (exp_dir / "store.zarr").exists():
        with contextlib.suppress(FileNotFoundError, ValueError):  # a damaged store: the reference's note says so
            groups = inputs.run_groups
            if unfinished := describe_shortfall(exp_dir, inputs.results, groups):
                inputs.notes["unfinished"] = (f"The sweep is not finished: of its planned runs, {unfinished}; every "
                                              "table and figure here covers the complete runs in results.csv only.")
            listed = [] if inputs.results is None else [rid for rid in inputs.results["run_id"] if rid in groups]
            if mixed := mixed_arithmetic(groups, listed):
                inputs.notes["mixed"] = f"The runs did not all train alike ({mixed}): {MIXED_ADVICE}."
            if listed and (diverged := describe_divergence(groups, inputs.results[inputs.results.run_id.isin(listed)])):
                inputs.notes["diverged"] = f"{diverged}."
    if inputs.results is None:  # a table no analysis takes, or none: nor one written from it
        reason = "results.csv cannot be used" if inputs.path("results.csv").exists() else "no results across runs"
        inputs.notes.update((key, f"not shown: {reason} (above).") for key in STAGE_OUTPUTS)
    elif compute_missing:
        _run_stage(inputs, ("stats", "gap", "reliability"), ("stats.csv", "gap.csv"), "stats.json", "stats",
                   "stats_report", inputs.command("stats"))
        _run_stage(inputs, ("predictions", "scores"), ("predictions.csv", "predict_scores.csv"), "predict.json",
                   "predict", "run_predict", inputs.command("predict"))
    for key, (filename, command) in STAGE_OUTPUTS.items():
        if key in inputs.notes:  # its stage failed: the file there is older than the results
            continue
        setattr(inputs, key, _read_csv(inputs, key, filename))
        if getattr(inputs, key) is None:
            inputs.origins.pop(key, None)
            written = " (with per-item correctness, which gradtrace's own runs save)" if key == "reliability" else ""
            inputs.notes.setdefault(key, f"{filename} not found: run `{inputs.command(command)}`{written}.")
    if (exp_dir / "config.yaml").exists():
        inputs.config_text = (exp_dir / "config.yaml").read_text(encoding="utf-8")
    else:
        inputs.notes["config"] = "config.yaml not found in the experiment directory."
    try:
        predict = inputs.config.get("predict")
        inputs.reference = _reference_run(inputs, (predict if isinstance(predict, dict) else {}).get(
            "reference_role", "reference"))
    except (FileNotFoundError, ValueError, LookupError) as err:
        inputs.notes["reference"] = str(err)
    inputs.benchmarks = _benchmarks_dir(exp_dir, benchmarks_dir)
    if inputs.benchmarks is None:
        inputs.notes["benchmarks"] = ("No benchmark outputs found (benchmarks/out/*.json; run `make bench` "
                                       "or benchmarks/sweep_throughput.py).")
    return inputs


# ------------------------------------------------------------------------------------------- span analysis


@dataclass
class SpanAnalysis:
    """The reference run's update span and how each split's probe gradient sits in it."""

    run_id: str
    singular_values: np.ndarray
    total_energy: float
    dominant_rank: int
    probe_steps: np.ndarray | None = None
    splits: list[str] = field(default_factory=list)
    probe_loss: str = ""
    dominant: np.ndarray | None = None  # (R, S) energy share inside the top-`dominant_rank` span
    angles: np.ndarray | None = None  # (S, S) mean principal angle (degrees) between probe-gradient subspaces


def span_analysis(run: zarr.Group, rank: int = SPAN_RANK, dominant_rank: int = DOMINANT_RANK) -> SpanAnalysis:
    """Top span of a run's sketched updates, and each split's probe-gradient dominant share and principal angles."""
    steps, dim = run["update"].shape
    if steps < 2:
        raise ValueError(f"run {run.basename} has {steps} update rows; a span needs at least 2")
    span = subspace.run_span(run, "update", rank=min(rank, steps, dim))
    out = SpanAnalysis(run.basename, span.singular_values, span.total_energy, min(dominant_rank, span.rank))
    if "probe/grad" not in run or "probe/step" not in run:
        return out
    losses = list(run.attrs.get("probe_losses") or [])
    li = losses.index("ce") if "ce" in losses else 0
    G = store.read(run, "probe/grad")[:, :, li, :].astype(np.float64)  # (R, S, k)
    out.dominant = subspace.energy_over_training(G, span.basis[:out.dominant_rank]).dominant
    spans = []
    for rows in G.transpose(1, 0, 2):  # one split's probe gradients over training
        rows = rows[np.isfinite(rows).all(axis=1) & (np.abs(rows).sum(axis=1) > 0)]
        spans.append(subspace.top_span(rows, min(rows.shape), method="full") if len(rows) else None)
    angles = np.full((len(spans), len(spans)), np.nan)
    for i, a in enumerate(spans):
        for j, b in enumerate(spans):
            if a is not None and b is not None:
                angles[i, j] = 0.0 if i == j else float(np.degrees(subspace.principal_angles(a, b)).mean())
    out.probe_steps, out.angles = store.read(run, "probe/step"), angles
    out.splits = [str(x) for x in run.attrs.get("splits") or [f"split {i}" for i in range(G.shape[1])]]
    out.probe_loss = losses[li] if losses else "probe"
    return out


# --------------------------------------------------------------------------------------------------- figures


def _item(name: str, section: str, title: str, caption: str, draw: Callable[[], Figure] | None,
          missing: str | None = None) -> FigureItem:
    """A FigureItem drawn by `draw`, or carrying `missing` / the drawing error as its note."""
    item = FigureItem(name, section, title, caption)
    if missing or draw is None:
        item.note = missing
        return item
    try:
        item.figure = draw()
    except Exception as err:  # a figure that cannot be drawn is reported, not fatal
        item.note = f"could not be drawn: {type(err).__name__}: {err}"
    return item


def _training_caption(run) -> str:
    """The training curves' caption, naming what `figures.training_curves` draws of this run."""
    try:
        drawn = figures.training_panels(run)
    except (TypeError, ValueError):
        drawn = []  # the figure's own error becomes its note
    clip = figures.clip_threshold(run)  # none in a run of your own loop
    norm = (f"the gradient norm before clipping{' (dashed: the clip threshold)' if clip else ''}"
            if "grad_norm_unclipped" in drawn else "the gradient norm after clipping")
    below = [what for key, what in (("evals", "at evaluation checkpoints (test sets, every train.eval_every steps)"),
                                    ("probe", "on the fixed probe batches")) if key in drawn]
    tail = f"; below, each split's accuracy {' and '.join(below)}." if below else "."
    return (f"Reference run {run.basename}: training loss (grey per step, blue a moving average), learning rate and "
            f"{norm} over optimizer steps{tail}")


def build_figures(inputs: Inputs) -> list[FigureItem]:
    """Every figure of the report, in reading order; each either drawn or with a note saying why not."""
    notes, sweep = inputs.notes, inputs.sweep
    n = 0 if sweep is None else len(sweep)
    no_gap = notes.get("gap")
    if inputs.gap is not None and not any("gap" in str(c).lower() for c in inputs.gap.columns):
        no_gap = ("gap.csv holds no train − test gap (gap_pts): the runs recorded no train accuracies "
                  "(train_acc_<split>): runs stored before gradtrace recorded them, or trained with "
                  "task.n_train_eval: 0.")
    items = [
        _item("accuracy_on_the_line", "results", "Accuracy on the line",
              f"Each panel is one OOD shift, each point one sweep run (n = {n}). Both axes are on the probit scale "
              f"(Φ⁻¹ of accuracy clipped to [1/(2N), 1 − 1/(2N)], N = {inputs.n_items}), labelled in percent. The "
              "black line is the least-squares fit in probit space (slope and Pearson r in the title); the dotted "
              "diagonal is equal accuracy. The line is what ID skill explains; the scatter around it is what the "
              "partial correlations compare." + ("" if inputs.sweep is None or base_groups(inputs.sweep) is None else
                                                 " With several base runs, each base has its colour and its line: "
                                                 "one common slope, each base its own intercept; slope and r are "
                                                 "taken within base, as the partial correlations are."),
              lambda: figures.accuracy_on_the_line(inputs.results, n_items=inputs.n_items), notes.get("results")),
        _item("partial_correlations", "correlations", "Partial correlations given ID", _correlations_caption(inputs),
              lambda: figures.partial_correlation_heatmap(inputs.stats, residualize="all"), notes.get("stats")),
        _item("predicted_vs_observed", "predictions", "Predicted vs observed",
              "One panel per predictor; each point is a shift pair: x the predictor's output (computed from reference "
              "runs only), y the observed partial r (probit residualisation) with its 95% CI. Titles give the "
              "Spearman ρ between predicted and observed over pairs and the observed matrix's noise ceiling (its "
              "split-half agreement), which no predictor can meaningfully exceed. Predictor scales differ: only rank "
              "and sign matter.",
              lambda: figures.predicted_vs_observed(inputs.predictions, inputs.scores), notes.get("predictions")),
        _item("generalisation_gap", "gap", "Generalisation gap",
              "Train − test accuracy per split in percentage points: one dot per run, the bar at the median. Train "
              "accuracy is exact match on training-pool items of the split's training form (task.n_train_eval per "
              "split), test accuracy on its held-out test items. Bands: below 5 points healthy, 5–10 watch, above 10 "
              "warning. Where a split trains on its test form (ID, length, order on the default task) a gap is "
              "memorisation; where training shows only a shorter or simpler form, it is how far the test form lies "
              "beyond it, by design.",
              lambda: figures.generalisation_gap_bands(inputs.gap), no_gap),
    ]
    run = inputs.reference  # without one, a note in its place (the paper's placeholder for it says why)
    items.append(_item("training_curves", "training", "Training curves", _training_caption(run),
                       lambda: figures.training_curves(run)) if run is not None else
                 _item("training_curves", "training", "Training curves", "", None,
                       inputs.notes.get("reference", "no reference run")))
    items += _span_items(inputs)
    items.append(_item(
        "benchmarks", "benchmarks", "Benchmarks",
        "Capture overhead: time per training step with capture relative to training without it (1 = no overhead). "
        "Sweep throughput: runs per hour relative to a naive sequential loop (above 1: faster). Read from "
        "benchmarks/out/*.json, written by benchmarks/capture_overhead.py (`make bench`) and "
        "benchmarks/sweep_throughput.py.",
        lambda: figures.benchmark_bars(inputs.benchmarks), notes.get("benchmarks")))
    return items


RESIDUALIZATIONS = {"linear": "linear on raw accuracy", "probit": "a line on probit axes",
                    "spline": "a spline on probit axes"}


def _correlations_caption(inputs: Inputs) -> str:
    """The heatmap's caption, for the ways of removing ID accuracy that stats.csv holds."""
    stats = inputs.stats
    ways = ([w for w in RESIDUALIZATIONS if w in set(stats["residualize"])]
            if stats is not None and "residualize" in stats else [])
    what = "Partial correlation r(a, b | ID) of two shifts' accuracies across sweep runs"
    compare = ""
    if len(ways) > 1:
        what += f", one panel per way of removing ID accuracy ({'; '.join(RESIDUALIZATIONS[w] for w in ways)})."
        compare = (" Linear residualisation can manufacture correlation when ID spans a wide range: trust pairs that "
                   "agree across panels." if "linear" in ways else " Trust pairs that agree across panels.")
    else:
        what += f", ID accuracy removed by {RESIDUALIZATIONS[ways[0]]}." if ways else "."
    return (what + " Red: the shifts rise and fall together beyond what ID explains; blue: they trade off. * marks "
            "pairs whose Holm-adjusted p < 0.05 within a panel." + compare + _within_note(inputs.sweep))


def _within_note(sweep: pd.DataFrame | None) -> str:
    """The caption's sentence on a sweep over several base runs (its correlations are taken within base)."""
    if sweep is None or base_groups(sweep) is None:
        return ""
    return (f" The sweep's runs fine-tuned {sweep['base'].nunique()} base runs: every pair is correlated within "
            "base (each base its own intercept, bootstrap and permutations within base), so differences between "
            "bases do not count.")


def _span_items(inputs: Inputs) -> list[FigureItem]:
    """The span spectrum, dominant/bulk and principal-angle figures of the reference run."""
    names = (("span_energy", "Span energy spectrum"), ("dominant_bulk", "Dominant vs bulk energy"),
             ("principal_angles", "Principal angles between splits"))
    missing = inputs.notes.get("reference")
    analysis = None
    if missing is None:
        try:
            analysis = span_analysis(inputs.reference)
        except Exception as err:  # a failed analysis leaves notes in place of its three figures
            missing = f"span analysis failed: {type(err).__name__}: {err}"
    if analysis is None:
        return [_item(name, "training", title, "", None, missing) for name, title in names]
    a = analysis
    no_probe = None if a.dominant is not None else f"run {a.run_id} recorded no probe gradients (capture.probe_every)."
    r = a.dominant_rank
    return [
        _item("span_energy", "training", "Span energy spectrum",
              f"Spectrum of the reference run's sketched parameter updates Δθ_t (top {len(a.singular_values)} "
              "directions by SVD, exact where cheap, else randomised: gradtrace.subspace.run_span). Bars: share of "
              "the whole trajectory's energy (squared Frobenius norm) along each direction; line: cumulative share. "
              "A curve that rises steeply means training moved in few directions.",
              lambda: figures.span_energy_spectrum(a.singular_values, a.total_energy)),
        _item("dominant_bulk", "training", "Dominant vs bulk energy",
              f"Share of each split's probe-gradient energy ({a.probe_loss} loss, sketched) inside the top-{r} span "
              "of the reference run's updates (left, the dominant subspace) and outside it (right, the bulk), at "
              "each probe. Gradients concentrate in a small dominant subspace while learning happens in the bulk "
              "(Song, Ahn & Yun 2024); the span here is the whole trajectory's, so early probes are compared with "
              "directions training takes later.",
              lambda: figures.dominant_bulk_energy(a.probe_steps, a.dominant, a.splits, rank=r), no_probe),
        _item("principal_angles", "training", "Principal angles between splits",
              f"Mean principal angle between the subspaces spanned by each split's probe gradients over training "
              f"(reference run, {a.probe_loss} loss). 0° means two splits' gradients point along the same "
              "directions, 90° that they are orthogonal; small angles between two shifts suggest steps that help "
              "one help the other.",
              lambda: figures.principal_angle_matrix(a.angles, a.splits), no_probe),
    ]


# ------------------------------------------------------------------------------------------------ provenance


def run_arithmetic(groups: dict[str, zarr.Group]) -> str:
    """The torch and transformers versions, devices, CPU kernels, thread counts and gradtrace code the store's runs
    trained with (they set the float rounding, and so a chaotic study's realisation: experiments/README.md), each
    with how many runs."""
    counts = Counter(kernels.describe(g.attrs) for g in groups.values())
    return "; ".join(f"{what} ({n} run{'s' * (n > 1)})" for what, n in counts.most_common())


def store_metadata_digest(store_path: Path) -> tuple[str, int]:
    """sha256 over every zarr.json of a store (relative path + bytes, sorted) and how many there are.

    It covers every group's and array's metadata (attributes: status, accuracy, config; shapes; codecs) but not
    the chunk bytes, so it is fast on any store size.
    """
    metadata = _metadata_files(store_path)
    digest = hashlib.sha256()
    for file in sorted(metadata):
        digest.update(file.relative_to(store_path).as_posix().encode() + b"\0" + metadata[file])
    return digest.hexdigest(), len(metadata)


def _metadata_files(store_path: Path) -> dict[Path, bytes]:
    """Every zarr.json under a store with its bytes; the folders of arrays are not entered, as they hold only chunks.
    The root's folders (its runs) are read by `store.map_reads`: on threads where the filesystem makes reads wait."""
    def read(folder: Path) -> tuple[bytes | None, list[Path]]:
        try:
            metadata = (folder / "zarr.json").read_bytes()
        except FileNotFoundError:
            metadata = None
        with contextlib.suppress(ValueError, AttributeError):  # unreadable metadata: look inside as for a group
            if metadata is not None and json.loads(metadata).get("node_type") == "array":
                return metadata, []
        return metadata, [Path(entry.path) for entry in os.scandir(folder) if entry.is_dir()]

    def under(top: Path) -> dict[Path, bytes]:
        found, waiting = {}, [top]
        while waiting:
            folder = waiting.pop()
            metadata, subfolders = read(folder)
            if metadata is not None:
                found[folder / "zarr.json"] = metadata
            waiting += subfolders
        return found

    metadata, runs = read(store_path)
    found = {} if metadata is None else {store_path / "zarr.json": metadata}
    for part in store.map_reads(under, runs):
        found.update(part)
    return found


def _git_commit() -> str:
    """The gradtrace checkout's commit, marked `(modified)` when its tracked files differ from it; `unknown` where
    git does not track the package (installed into a venv that lies inside a repository of another project)."""
    package = Path(gradtrace.__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=package, capture_output=True, encoding="utf-8", errors="replace",
                              timeout=10)

    try:
        if not git("ls-files", "--", "__init__.py").stdout.strip():
            return "unknown"
        done = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip() if done.returncode == 0 else ""
    return (commit + (" (modified)" if dirty.stdout.strip() else "")) if commit else "unknown"


def _torch() -> str:
    """The installed torch's release, from its package metadata: the report computes nothing with torch, so it does
    not import it (a second and ~200 MB on a laptop that only reads studies)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def provenance(inputs: Inputs) -> dict[str, str]:
    """Versions, code commit, machine, date and input checksums of a report."""
    info = {
        "gradtrace version": gradtrace.__version__,
        "code commit": _git_commit(),
        "gradtrace code": kernels.code_fingerprint(),  # as each run records it (`gradtrace_code`): which ran this code
        "generated (UTC)": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "experiment directory": str(inputs.exp_dir.resolve()),
        **({"tables and report written to": str(inputs.analysis_dir.resolve())}
           if inputs.analysis_dir != inputs.exp_dir else {}),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "CPU count": str(os.cpu_count()),
        "torch": _torch(),
    }
    for name in INPUT_FILES:
        if inputs.path(name).exists():
            info[f"sha256 {name}"] = sha256_of(inputs.path(name))
    if (inputs.exp_dir / "store.zarr").is_dir():
        digest, count = store_metadata_digest(inputs.exp_dir / "store.zarr")
        info["sha256 store.zarr metadata"] = f"{digest} (over {count} zarr.json files; chunk bytes not hashed)"
        info["arithmetic of the runs"] = run_arithmetic(inputs.run_groups)
    info.update(task_module_digests(inputs.config))
    for key, origin in inputs.origins.items():
        info[f"source of {key}"] = origin
    return info


def task_module_digests(config: dict) -> dict[str, str]:
    """The sha256 of each file of a study's `task.modules`, where its splits (and predictors) of its own are: the
    runs' items digest holds what they drew, this which code drew them."""
    task = config.get("task")
    modules = task.get("modules") if isinstance(task, dict) else None
    out = {}
    for module in modules if isinstance(modules, list) else []:
        module = str(module)
        try:
            is_file = names_a_file(module)
            path = Path(module) if is_file else _module_file(module)
            out[f"sha256 task.modules {module}"] = sha256_of(path) + ("" if is_file else f" ({path})")
        except Exception as err:  # moved, not importable here, or a package that fails as it is imported
            out[f"sha256 task.modules {module}"] = f"not read here ({type(err).__name__}: {err})"
    return out


def _module_file(module: str) -> Path:
    """The file of a module named by its dotted name, found on the Python path (its parent packages imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"no module file for {module!r} on this Python path")
    return Path(spec.origin)


# ------------------------------------------------------------------------------------------------------ html

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.lead{font-size:1.05em;color:#333} .facts{color:#555}
nav ol{columns:2} figure{margin:1.5em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:.4em} .note{background:#fff8e1;border-left:4px solid #E69F00;
padding:.4em .8em;margin:.8em 0} table.data{border-collapse:collapse;font-size:.82em;margin:.8em 0}
table.data th,table.data td{padding:.2em .6em;border-bottom:1px solid #e4e4e4;text-align:right}
table.data th{background:#f5f5f5} table.data td:first-child,table.data th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.82em} details{margin:.8em 0}
table.data td.mono{font-family:ui-monospace,monospace;font-size:.85em;word-break:break-all;text-align:left}
"""

STUDY = ("Can we predict, from the gradient trajectory of training alone, whether two out-of-distribution shifts "
         "move together once in-domain skill is accounted for? The measured target is the partial correlation "
         "r(a₁, a₂ | a_ID) of two shifts' accuracies across many {runs}; predictors built from the reference runs' "
         "stored gradient trajectories are scored against it.")
OUR_RUNS = "fine-tuning runs of a small transformer on gradtrace's synthetic arithmetic task (exact match)"


def _esc(text: object) -> str:
    return html.escape(str(text))


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def rounded(value: float, decimals: int) -> str:
    """`value` to `decimals` places as a reader rounds the number the CSV shows, halves away from zero: format()
    rounds the binary value, and a half it holds exactly (6.25, an accuracy of 125 of 2000 items) to even ("6.2")."""
    return str(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def _table(df: pd.DataFrame) -> str:
    """An HTML table: p-values to 2 significant digits, other floats to 3 decimals, a missing value as "–" (in a
    nullable column too: pandas writes `<NA>` there whatever `na_rep` says)."""
    df = df.copy()
    for col in [col for col in df.columns if pd.api.types.is_extension_array_dtype(df[col]) and df[col].hasnans]:
        df[col] = (df[col].astype(float) if pd.api.types.is_float_dtype(df[col])
                   else df[col].astype(object).where(df[col].notna(), np.nan))
    formatters = {}
    for col in df.columns:
        if pd.api.types.is_float_dtype(df[col]):
            p_like = str(col) == "p" or str(col).startswith("p_")
            formatters[col] = (lambda v: f"{v:.2g}") if p_like else (lambda v: rounded(v, 3))
    return df.to_html(index=False, border=0, classes="data", na_rep="–", formatters=formatters)


def results_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per split: runs, mean, std, min and max accuracy (percent)."""
    columns = [c for c in results.columns if str(c).startswith("acc_")]
    if not columns:
        raise ValueError("results table has no acc_<split> columns")
    acc = 100 * results[columns].astype(float)
    return pd.DataFrame({"split": [c[4:] for c in columns], "runs": acc.count().to_numpy(),
                         "mean %": acc.mean().to_numpy(), "std %": acc.std().to_numpy(),
                         "min %": acc.min().to_numpy(), "max %": acc.max().to_numpy()})


def _stats_summary(stats: pd.DataFrame) -> pd.DataFrame:
    groups = stats.groupby("residualize", sort=False) if "residualize" in stats else [("all", stats)]
    rows = []
    for method, g in groups:
        row = {"residualize": method, "pairs": len(g), "median r": g["r"].median()}
        if "p_holm" in g:
            row["Holm p < 0.05"] = int((g["p_holm"] < 0.05).sum())
        if "p_bh" in g:
            row["BH p < 0.05"] = int((g["p_bh"] < 0.05).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _gap_summary(gap: pd.DataFrame) -> pd.DataFrame:
    """Per split, means over runs in percent or points (units in the headers) and band counts; seed columns only
    where runs share a config (a random search gives every run its own)."""
    gap = gap.copy()
    for column in ("test_acc", "train_acc", "val_acc"):
        if column in gap:
            gap[column] = 100 * gap[column]
    if "n_seeds" in gap and not (gap["n_seeds"] > 1).any():
        gap = gap.drop(columns=[c for c in ("n_seeds", "seed_sd_pts") if c in gap])
    gap = gap.rename(columns={"test_acc": "test %", "train_acc": "train %", "val_acc": "val %",
                              "gap_pts": "train − test (points)", "val_test_diff_pts": "val − test (points)",
                              "seed_sd_pts": "seed sd (points)"})
    numeric = [c for c in gap.select_dtypes("number").columns if c != "step"]
    table = gap.groupby("split", sort=False)[numeric].mean().add_prefix("mean ").reset_index()
    if "band" in gap:
        counts = gap.groupby("split", sort=False)["band"].value_counts().unstack(fill_value=0)
        table = table.merge(counts.reset_index(), on="split", how="left")
    return table


def splits_table(task: dict) -> pd.DataFrame:
    """Each split of a study's task config: its description at the study's `task.max_digits` and its share of the
    training mix (the split's own `share` applied)."""
    from gradtrace.config import from_dict
    from gradtrace.tasks.shifts import get_split, import_split_modules, train_mix

    cfg = from_dict({"task": task}).task
    import_split_modules(cfg.modules)
    mix = train_mix(cfg)
    return pd.DataFrame([{"split": name, "training mix": f"{mix.get(name, 0):.1%}",
                          "description": get_split(name).describe(cfg.max_digits)} for name in ["ID", *cfg.shifts]])


def _section_tables(key: str, inputs: Inputs) -> list[str]:
    """The tables (and notes) that follow a section's figures."""
    out = []
    if key == "results" and isinstance(inputs.config.get("task"), dict):
        try:
            out.append("<h3>The splits</h3>" + _table(splits_table(inputs.config["task"])))
        except Exception as err:  # a split file of the study's own that fails here: the rest of the report stands
            out.append(_note(f"The splits are not described here ({type(err).__name__}: {err})."))
    if key == "results" and inputs.sweep is not None and len(inputs.sweep):
        out.append(f"<h3>Accuracy per split over {len(inputs.sweep)} sweep runs</h3>"
                   + _table(results_summary(inputs.sweep)))
    if key == "results" and inputs.reliability is not None:
        out.append("<h3>Split-half reliability of each split's accuracy</h3><p>Spearman-Brown reliability of the "
                   "across-run accuracy from random halves of each split's items; below 0.9 the accuracy is noisy "
                   "enough to weaken every correlation it enters.</p>" + _table(inputs.reliability))
    if key == "correlations" and inputs.stats is not None:
        stats = inputs.stats
        out.append("<h3>Summary per residualisation</h3>" + _table(_stats_summary(stats)))
        if "disagree" in stats and stats["disagree"].astype(str).str.lower().eq("true").any():
            pairs = stats.loc[stats["disagree"].astype(str).str.lower().eq("true"), ["a", "b"]].drop_duplicates()
            out.append(_note(f"{len(pairs)} pair(s) change sign or significance between residualisations "
                             "(column disagree): read them with care."))
        keep = [c for c in ("a", "b", "residualize", "n", "dof", "r", "ci_low", "ci_high", "p", "p_perm", "p_holm",
                            "p_bh", "boot_ci_low", "boot_ci_high", "r_disattenuated", "disagree") if c in stats]
        out.append(f"<details><summary>All {len(stats)} rows of stats.csv</summary>{_table(stats[keep])}</details>")
    if key == "predictions" and inputs.scores is not None:
        out.append("<h3>Predictor scores</h3>" + _table(inputs.scores))
    if key == "gap" and inputs.gap is not None and "split" in inputs.gap:
        out.append("<h3>Per split (means over runs; band counts)</h3>" + _table(_gap_summary(inputs.gap)))
    return out


def _figure_html(item: FigureItem, number: int, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{item.name}"><img src="data:image/png;base64,{data}" alt="{_esc(item.title)}">'
            f"<figcaption><b>Figure {number}. {_esc(item.title)}.</b> {_esc(item.caption)}</figcaption></figure>")


def _header(inputs: Inputs) -> str:
    facts = []
    if inputs.results is not None:
        roles = Counter(inputs.results["role"])
        facts.append(", ".join(f"{roles[role]} {role} run(s)" for role in ROLES if roles[role])
                     or "no sweep run")
        shifts = [c[4:] for c in inputs.results.columns if str(c).startswith("acc_") and c != "acc_ID"]
        facts.append("shifts: " + ", ".join(shifts))
    model, train, sweep_cfg = (inputs.config.get(k) or {} for k in ("model", "train", "sweep"))
    if isinstance(model, dict) and model.get("name"):
        start = f", from the weights in {Path(model['init_from']).name}" if model.get("init_from") else ""
        facts.append(f"model: {model['name']}{start}")
    if isinstance(train, dict) and train.get("steps"):
        base = (f" (base runs: {sweep_cfg['pretrain_steps']})"
                if isinstance(sweep_cfg, dict) and sweep_cfg.get("pretrain_steps") else "")
        facts.append(f"{train['steps']} optimizer steps per run{base}")
    return (f"<h1>gradtrace report: {_esc(inputs.exp_dir.resolve().name)}</h1>"
            f'<p class="lead">{_esc(STUDY.format(runs=OUR_RUNS if "task" in inputs.config else "training runs"))}'
            f'</p><p class="facts">{_esc("; ".join(facts))}</p>')


def write_report(exp_dir: str | Path, benchmarks_dir: str | Path | None = None,
                 out: str | Path | None = None) -> Path:
    """Write `OUT/report/index.html` (self-contained) and its figures under `OUT/report/figures/`, OUT being `out`
    (where the tables of stats and predict are read, or computed: `load_inputs`) or else `exp_dir`."""
    inputs = load_inputs(exp_dir, benchmarks_dir=benchmarks_dir, out=out)
    out = inputs.analysis_dir / "report"
    items = build_figures(inputs)
    body, number, shown = {key: [] for key, _ in SECTIONS}, 0, set()
    for item in items:
        if item.figure is None:
            body[item.section].append(_note(f"{item.title}: {item.note}"))
            shown.add(item.note)
            continue
        number += 1
        _, png = figures.save(item.figure, out / "figures" / item.name)
        body[item.section].append(_figure_html(item, number, png.read_bytes()))
    for key, inputs_shown in SECTION_INPUTS.items():
        body[key] += [_note(inputs.notes[k]) for k in inputs_shown if inputs.notes.get(k) not in shown | {None}]
        body[key] += _section_tables(key, inputs)
    body["config"].append(f"<pre>{_esc(inputs.config_text)}</pre>" if inputs.config_text
                          else _note(inputs.notes["config"]))
    rows = "".join(f'<tr><th>{_esc(k)}</th><td class="mono">{_esc(v)}</td></tr>'
                   for k, v in provenance(inputs).items())
    body["provenance"].append(f'<table class="data">{rows}</table>')
    toc = "".join(f'<li><a href="#{key}">{_esc(title)}</a></li>' for key, title in SECTIONS)
    sections = "".join(f'<section id="{key}"><h2>{_esc(title)}</h2>{"".join(body[key])}</section>'
                       for key, title in SECTIONS)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>gradtrace report: '
            f"{_esc(inputs.exp_dir.resolve().name)}</title><style>{CSS}</style></head><body>{_header(inputs)}"
            f"<nav><h2>Contents</h2><ol>{toc}</ol></nav>{sections}</body></html>")
    out.mkdir(parents=True, exist_ok=True)
    with written_whole(out / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "index.html"
