"""Figures from a small synthetic experiment: each returns a Figure with the expected panels and saves PDF+PNG.

`make_experiment` writes the fixture (store, results, stats, gap, predictions, scores, config, benchmarks) in
the formats the pipeline's stages write; test_report.py reuses it.
"""
from __future__ import annotations

import json
import signal
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from matplotlib.figure import Figure
from scipy.special import ndtr, ndtri

from gradtrace import figures, store

SHIFTS = ["length", "carry", "zeropad"]
SPLITS = ["ID", *SHIFTS]
PREDICTORS = ["zero", "cosine", "covariance"]
T, K, R = 40, 64, 4  # recorded steps, sketch dimension, probes
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reference_run(root: zarr.Group, run_id: str, rng: np.random.Generator) -> None:
    """A reference run with scalars, sketched grad/update, probes and evals, as train.py writes it."""
    group = store.create_run(root, run_id, {"role": "reference", "seeds": {"init": 0, "data": 0}, "steps": T,
                                            "splits": SPLITS, "probe_losses": ["ce", "margin"]})
    writer = store.RunWriter(group, chunk=16)
    writer.declare("step", (), "int64")
    for name in ("loss", "lr", "grad_norm"):
        writer.declare(name, (), "float32")
    writer.declare("grad", (K,), dims=("sketch",))
    writer.declare("update", (K,), storage=store.BF16, dims=("sketch",))
    writer.declare("probe/step", (), "int64")
    writer.declare("probe/accuracy", (len(SPLITS),), dims=("split",))
    writer.declare("probe/grad", (len(SPLITS), 2, K), dims=("split", "probe_loss", "sketch"))
    writer.declare("evals/step", (), "int64")
    writer.declare("evals/accuracy", (len(SPLITS),), dims=("split",))
    directions = np.linalg.qr(rng.standard_normal((K, 3)))[0].T  # a 3-dim dominant span
    for t in range(T):
        update = (3.0 / (t + 1)) * rng.standard_normal(3) @ directions + 0.02 * rng.standard_normal(K)
        writer.append({"step": t, "loss": 2.5 * np.exp(-t / 15) + 0.1 * rng.random(), "lr": 1e-3 * min(1, (t + 1) / 5),
                       "grad_norm": 1 + rng.random(), "grad": rng.standard_normal(K), "update": update})
        if (t + 1) % (T // R) == 0:
            acc = np.clip(np.linspace(0.9, 0.3, len(SPLITS)) * (t + 1) / T + 0.05 * rng.random(len(SPLITS)), 0, 1)
            probe = rng.standard_normal((len(SPLITS), 2, K))
            probe[:, :, :] += 2 * rng.standard_normal((len(SPLITS), 2, 3)) @ directions
            writer.append({"probe/step": t + 1, "probe/accuracy": acc, "probe/grad": probe,
                           "evals/step": t + 1, "evals/accuracy": acc})
    writer.close()
    store.set_status(group, "complete", accuracy=dict(zip(SPLITS, [0.9, 0.6, 0.4, 0.3])), steps_done=T)


def make_experiment(path: Path, n_runs: int = 14, seed: int = 0) -> Path:
    """A tiny experiment directory with every file the report reads; returns its path."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    root = store.open_experiment(path / "store.zarr", mode="a")
    _reference_run(root, "ref-000", rng)
    for i in range(n_runs):  # sweep runs record scalars only
        group = store.create_run(root, f"run-{i:03d}", {"role": "sweep", "seeds": {"init": i, "data": i}, "steps": T,
                                                         "cpu_kernels": "AVX2", "cpu_threads": 1, "torch_version":
                                                         "2.13.0+cpu", "transformers_version": "5.24.0"})
        store.set_status(group, "complete", accuracy=dict.fromkeys(SPLITS, 0.5))

    id_acc = rng.uniform(0.6, 0.98, n_runs)
    rows = {"run_id": [f"run-{i:03d}" for i in range(n_runs)], "role": "sweep", "init_seed": range(n_runs),
            "data_seed": range(n_runs), "lr": rng.uniform(8e-4, 3e-3, n_runs), "weight_decay": 0.05,
            "steps": T, "wall_time_s": 1.0, "acc_ID": id_acc}
    general = rng.standard_normal(n_runs)
    for j, shift in enumerate(SHIFTS):
        rows[f"acc_{shift}"] = ndtr(-0.5 * j + 0.9 * ndtri(id_acc) + 0.3 * general + 0.3 * rng.standard_normal(n_runs))
    results = pd.DataFrame(rows)
    reference = results.iloc[:1].assign(run_id="ref-000", role="reference")
    pd.concat([reference, results]).to_csv(path / "results.csv", index=False)

    pairs = [(a, b) for i, a in enumerate(SHIFTS) for b in SHIFTS[i + 1:]]
    stats = []
    for method in ("linear", "probit", "spline"):
        for a, b in pairs:
            r = float(np.tanh(rng.normal(0.3, 0.4)))
            stats.append({"a": a, "b": b, "residualize": method, "unit": "runs", "n": n_runs, "k": 1,
                          "dof": n_runs - 3, "r": r, "ci_low": r - 0.3, "ci_high": min(1, r + 0.3),
                          "p": 0.5 * (1 - abs(r)), "p_perm": 0.5, "p_holm": 0.02 if abs(r) > 0.5 else 0.4, "p_bh": 0.3,
                          "boot_ci_low": r - 0.3, "boot_ci_high": min(1, r + 0.3), "disagree": False})
    stats_df = pd.DataFrame(stats)
    stats_df.to_csv(path / "stats.csv", index=False)

    observed = stats_df[stats_df["residualize"] == "probit"]
    predictions = []
    for name in PREDICTORS:
        for row in observed.itertuples():
            predicted = 0.0 if name == "zero" else row.r + rng.normal(0, 0.3)
            predictions.append({"predictor": name, "a": row.a, "b": row.b, "predicted": predicted,
                                "observed": row.r, "observed_ci_low": row.ci_low, "observed_ci_high": row.ci_high})
    pd.DataFrame(predictions).to_csv(path / "predictions.csv", index=False)
    pd.DataFrame({"predictor": PREDICTORS, "preregistered": [True, False, True],
                  "group": ["preregistered", "baseline", "preregistered"],
                  "spearman": [np.nan, 0.5, -0.5], "pearson": [np.nan, 0.4, -0.3], "sign_acc": [0.0, 0.67, 0.33],
                  "majority_sign_acc": 0.67, "noise_ceiling": 0.38, "p_relabel": [1.0, 0.3, 0.8]}
                 ).to_csv(path / "predict_scores.csv", index=False)

    gap = [{"run_id": rid, "split": s, "test_acc": 0.5, "train_acc": 0.5 + g / 100, "gap_pts": g,
            "band": "healthy" if g < 5 else "watch" if g <= 10 else "warning"}
           for rid in rows["run_id"] for s, g in zip(SPLITS, rng.gamma(2.0, 3.0, len(SPLITS)))]
    pd.DataFrame(gap).to_csv(path / "gap.csv", index=False)

    (path / "config.yaml").write_text("model:\n  name: tiny\ntask:\n  shifts: [length, carry, zeropad]\n"
                                      f"train:\n  steps: {T}\nsweep:\n  runs: {n_runs}\n")
    bench = path / "benchmarks"
    bench.mkdir(exist_ok=True)
    (bench / "capture_overhead.json").write_text(json.dumps(  # records as benchmarks/capture_overhead.py writes
        [{"model": "tiny", "device": "cpu", "optimizer": "adamw", "k": 4096, "what": "grad+update+adam_m",
          "ratio": 1.025},
         {"model": "tiny", "device": "cpu", "k": None, "what": "wandb.watch(gradients, log_freq=1)", "ratio": 1.78},
         {"model": "pythia-70m", "device": "cpu", "optimizer": "muon", "k": 4096, "what": "grad+update+adam_m",
          "ratio": 1.05}]))
    (bench / "sweep_throughput.json").write_text(json.dumps(  # as benchmarks/sweep_throughput.py writes, in part
        [{"name": "tiny/128: naive loop, padded batches, 2 threads", "runs_per_hour": 333.0, "ratio": 1.0},
         {"name": "tiny/128: packed, ensembles of 4, pool of 2×1-thread workers", "runs_per_hour": 441.1,
          "ratio": 1.33}]))
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_experiment(tmp_path_factory.mktemp("exp"))


def _check(fig: Figure, n_axes: int, tmp_path: Path, name: str) -> None:
    assert isinstance(fig, Figure)
    assert len(fig.axes) == n_axes
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "constrained_layout not applied")  # axes squeezed to nothing
        pdf, png = figures.save(fig, tmp_path / name)
    assert pdf.read_bytes().startswith(b"%PDF") and png.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="a file size limit (POSIX) stands in for a full disk")
def test_a_figure_cut_off_by_a_full_disk_is_an_os_error_and_leaves_no_file(tmp_path: Path) -> None:
    """matplotlib's PDF writer, failing mid-file, raised an AttributeError from its clean-up: the report died with a
    traceback that said nothing of the disk."""
    import resource

    fig = Figure()
    fig.add_subplot().set_title("a title")  # text: a font embedded, the stream that failed so
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(OSError, match="File too large"):
            figures.save(fig, tmp_path / "cut")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    assert list(tmp_path.iterdir()) == []


def test_partial_correlation_heatmap(experiment: Path, tmp_path: Path) -> None:
    stats = pd.read_csv(experiment / "stats.csv")
    fig = figures.partial_correlation_heatmap(stats, residualize="all")
    _check(fig, 3 + 1, tmp_path, "heatmap")  # three panels and a colour bar
    panel = fig.axes[0]
    texts = [t.get_text() for t in panel.texts]
    assert len(texts) == len(SHIFTS) * (len(SHIFTS) - 1)  # off-diagonal cells annotated
    linear = stats[stats["residualize"] == "linear"]
    assert sum(t.endswith("*") for t in texts) == 2 * int((linear["p_holm"] < 0.05).sum())
    one = figures.partial_correlation_heatmap(stats)
    assert len(one.axes) == 2 and one.axes[0].get_title().startswith("probit")
    with pytest.raises(ValueError, match="residualize='bogus'"):
        figures.partial_correlation_heatmap(stats, residualize="bogus")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['r'\]"):
        figures.partial_correlation_heatmap(stats.drop(columns="r"))


def _stats_of(n_shifts: int) -> pd.DataFrame:
    """A stats table over n_shifts shifts and the three residualisations; every third pair significant."""
    shifts = [f"shift{i:02d}" for i in range(n_shifts)]
    pairs = [(a, b) for i, a in enumerate(shifts) for b in shifts[i + 1:]]
    r = np.random.default_rng(n_shifts).uniform(-0.9, 0.9, len(pairs))
    return pd.concat([pd.DataFrame({"a": [a for a, _ in pairs], "b": [b for _, b in pairs], "residualize": method,
                                    "r": r, "p_holm": np.where(np.arange(len(pairs)) % 3 == 0, 0.01, 0.5)})
                      for method in ("linear", "probit", "spline")])


def test_partial_correlation_heatmap_stays_legible_with_many_shifts(tmp_path: Path) -> None:
    few, many = (figures.partial_correlation_heatmap(_stats_of(n), residualize="all") for n in (7, 20))
    _check(many, 3 + 1, tmp_path, "heatmap20")
    assert {ax.get_subplotspec().rowspan.start for ax in few.axes[:3]} == {0}  # 7 shifts: one row, numbers
    assert len(few.axes[0].texts) == 7 * 6 and few.get_size_inches()[1] < 2.5
    assert {ax.get_subplotspec().rowspan.start for ax in many.axes[:3]} == {0, 1}  # 20 shifts: two rows, taller
    assert many.get_size_inches()[1] > 2 * few.get_size_inches()[1]
    assert {t.get_text() for t in many.axes[0].texts} == {"*"}  # only the stars: numbers would overprint
    assert len(many.axes[2].get_yticklabels()) == 20  # each row's first panel names the rows
    panel = many.axes[0].get_window_extent()
    assert panel.width / many.dpi / 20 >= 0.12  # a cell holds a 7-pt tick label


def test_heatmap_and_titles_stay_legible_with_long_split_names(tmp_path: Path) -> None:
    """A 39-character name (40 are allowed) shrank the heatmap's panels to smudges whose numbers overprinted, and
    titles of the accuracy-on-the-line panels ran into their neighbours from ~15 characters."""
    long = "octal_zero_padded_operands_long_name_40"
    names = {f"shift{i:02d}": name for i, name in enumerate(["length", "carry", long, "spaced_digits_lead", "order"])}
    stats = _stats_of(5).replace(names)
    fig = figures.partial_correlation_heatmap(stats, residualize="all")
    _check(fig, 3 + 1, tmp_path, "heatmap_long")
    assert {ax.get_subplotspec().colspan.start for ax in fig.axes[:3]} == {0}  # one panel to a row
    for ax in fig.axes[:3]:
        cell = (ax.transData.transform((1, 0)) - ax.transData.transform((0, 0)))[0] / fig.dpi
        numbers = [t for t in ax.texts if t.get_text() not in ("", "*")]
        assert numbers and cell >= figures.HEATMAP_TEXT_CELL  # numbers, each in a cell that holds it
    assert long in [t.get_text() for t in fig.axes[0].get_yticklabels()]
    results = pd.DataFrame({"acc_ID": np.linspace(0.5, 0.9, 12), f"acc_{long}": np.linspace(0.2, 0.6, 12) ** 1.1,
                            "acc_carry": np.linspace(0.1, 0.5, 12) ** 0.9})
    short, longer = figures.accuracy_on_the_line(results).axes[1], figures.accuracy_on_the_line(results).axes[0]
    assert longer.title.get_fontsize() < short.title.get_fontsize() == 8
    assert longer.get_title().startswith(f"{long}\n(slope")


def test_accuracy_on_the_line(experiment: Path, tmp_path: Path) -> None:
    results = pd.read_csv(experiment / "results.csv")
    fig = figures.accuracy_on_the_line(results)
    _check(fig, len(SHIFTS), tmp_path, "aotl")
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == (results["role"] == "sweep").sum()  # reference row excluded
    assert len(ax.lines) == 2  # y = x and the fitted line
    assert figures.probit(np.array([0.0, 1.0])).round(3).tolist() == [-3.481, 3.481]  # clipped at 1/(2N)
    with pytest.raises(ValueError, match="acc_OOD"):
        figures.accuracy_on_the_line(results, id="OOD")
    sweep = results[results["role"] == "sweep"].reset_index(drop=True)
    sweep["base"] = ["base-0", "base-1"] * (len(sweep) // 2) + ["base-0"] * (len(sweep) % 2)
    ax = figures.accuracy_on_the_line(sweep).axes[0]  # runs from two bases: one marker each, in a legend
    assert [len(c.get_offsets()) for c in ax.collections] == [sum(sweep.base == b) for b in ("base-0", "base-1")]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["base-0", "base-1"]
    with pytest.raises(ValueError, match="no sweep runs yet"):  # mid-sweep: not the base and reference runs
        figures.accuracy_on_the_line(results[results["role"] != "sweep"])


def test_accuracy_on_the_line_fits_within_base(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    base = np.repeat(["base-0", "base-1"], 40)
    x = np.where(base == "base-0", 1.2, 0.0) + 0.2 * rng.standard_normal(80)  # probit ID: base-1 far lower
    y = 0.5 * x + np.where(base == "base-0", 0.0, -2.0) + 0.05 * rng.standard_normal(80)  # common slope 0.5
    table = pd.DataFrame({"base": base, "acc_ID": ndtr(x), "acc_carry": ndtr(y)})
    assert np.polyfit(x, y, 1)[0] > 1.5  # pooled over bases the slope would be 4 times too steep
    centred = table.assign(x=x, y=y).groupby("base")[["x", "y"]].transform(lambda v: v - v.mean())
    slope, r = np.polyfit(centred.x, centred.y, 1)[0], np.corrcoef(centred.x, centred.y)[0, 1]
    assert slope == pytest.approx(0.5, abs=0.05)
    fig = figures.accuracy_on_the_line(table)
    _check(fig, 1, tmp_path, "aotl_within")
    ax = fig.axes[0]
    assert ax.get_title() == f"carry\n(slope {slope:.2f}, r {r:.2f})"
    assert "within base" in fig.get_suptitle()
    fitted = ax.lines[1:]  # after the y = x diagonal: one line per base, in the base's colour, the common slope
    assert len(fitted) == 2 and fitted[0].get_color() != fitted[1].get_color()
    assert [np.polyfit(*line.get_data(), 1)[0] for line in fitted] == pytest.approx([slope, slope])
    crowded = figures.accuracy_on_the_line(pd.concat([table] * 10)).axes[0].collections[0]  # 800 runs
    assert crowded.get_sizes()[0] < 9 and crowded.get_alpha() < 0.8  # smaller, fainter markers than for 80


def test_training_curves(experiment: Path, tmp_path: Path) -> None:
    run = zarr.open_group(experiment / "store.zarr", mode="r")["ref-000"]
    fig = figures.training_curves(run)
    _check(fig, 3 + 2, tmp_path, "curves")  # loss, lr, grad norm, evals, probe
    assert [line.get_label() for line in fig.axes[3].lines] == SPLITS
    sweep_run = zarr.open_group(experiment / "store.zarr", mode="r")["run-000"]
    with pytest.raises(ValueError, match="no per-step scalars"):
        figures.training_curves(sweep_run)
    with pytest.raises(ValueError, match="is the experiment store, not one of its runs"):
        figures.training_curves(experiment)
    with pytest.raises(TypeError, match="zarr.Group or its folder's path"):
        figures.training_curves(run.attrs)
    by_path = figures.training_curves(experiment / "store.zarr" / "ref-000")  # its folder's path draws the same
    assert [ax.get_ylabel() for ax in by_path.axes] == [ax.get_ylabel() for ax in fig.axes]


def test_a_scalar_constant_but_for_rounding_is_drawn_flat(tmp_path: Path) -> None:
    run = zarr.open_group(tmp_path / "s.zarr", mode="w").create_group("r")
    run["step"], run["loss"] = np.arange(50), np.linspace(2.0, 1.0, 50)
    run["grad_norm"] = 1 + 1e-7 * np.random.default_rng(0).standard_normal(50)  # clipped at every step
    fig = figures.training_curves(run)
    _check(fig, 2, tmp_path, "clipped")
    norm = fig.axes[1]
    assert norm.get_ylim() == pytest.approx((0.99, 1.01))
    assert norm.yaxis.get_offset_text().get_text() == ""  # no "1e-7+1" above the axis
    assert fig.axes[0].get_ylim()[1] - fig.axes[0].get_ylim()[0] > 0.5  # a loss that moves keeps its own range
    run["grad_norm_unclipped"] = np.linspace(3.0, 1.5, 50)  # recorded where the loop gave it: drawn instead
    run.attrs["config"] = {"train": {"clip": 1.0}}
    norm = figures.training_curves(run).axes[1]
    assert norm.get_ylabel() == "gradient norm (before clip)" and norm.get_legend_handles_labels()[1] == ["clip at 1"]


def test_learning_rates_of_parameter_groups_are_drawn_each(tmp_path: Path) -> None:
    """A run whose groups stepped with other learning rates (layer-wise decay) draws each schedule, on log axes where
    they lie a decade or more apart; tensors held by no group (NaN) and rows a resume left unrecorded are passed
    over; one schedule is drawn as `lr` alone."""
    run = zarr.open_group(tmp_path / "s.zarr", mode="w").create_group("r")
    decay = np.linspace(1.0, 0.1, 40, dtype=np.float32)[:, None]
    run["step"], run["loss"], run["lr"] = np.arange(40), np.linspace(2.0, 1.0, 40), 1e-3 * decay[:, 0]
    layer_lr = decay * np.array([1e-3, 1e-3, 1e-2, np.nan, 1e-2], np.float32)
    layer_lr[:5] = np.nan  # recorded before a resume, by a gradtrace without layer_lr
    run["layer_lr"] = layer_lr
    fig = figures.training_curves(run)
    _check(fig, 2, tmp_path, "groups")
    lr = fig.axes[1]
    assert lr.get_ylabel() == "learning rate (per group)" and lr.get_yscale() == "log"
    np.testing.assert_allclose([line.get_ydata()[-1] for line in lr.lines], [1e-4, 1e-3], rtol=1e-6)
    run["layer_lr"] = np.repeat(1e-3 * decay, 5, axis=1)
    one = figures.training_curves(run).axes[1]
    assert one.get_ylabel() == "learning rate" and one.get_yscale() == "linear"


def test_span_energy_and_dominant_bulk(tmp_path: Path) -> None:
    s = np.array([4.0, 2.0, 1.0, 0.5])
    fig = figures.span_energy_spectrum(s, total_energy=float((s**2).sum()) * 1.1)
    _check(fig, 1, tmp_path, "span")
    assert len(fig.axes[0].patches) == s.size
    with pytest.raises(ValueError, match="singular values"):
        figures.span_energy_spectrum(np.array([[1.0]]))
    dominant = np.linspace(0.1, 0.6, R * 2).reshape(R, 2)
    fig = figures.dominant_bulk_energy(np.arange(R) * 10, dominant, ["ID", "carry"], rank=8)
    _check(fig, 2, tmp_path, "dombulk")
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), 1 - dominant[:, 0])
    with pytest.raises(ValueError, match="len\\(steps\\), len\\(splits\\)"):
        figures.dominant_bulk_energy(np.arange(3), dominant, ["ID", "carry"])


def test_each_of_eight_splits_has_a_colour_of_its_own_and_more_differ_in_style() -> None:
    """The default study's 8 splits shared 7 colours: its last shift ("order") was ID's blue, dashed."""
    splits = [f"s{j}" for j in range(11)]
    fig = figures.dominant_bulk_energy(np.arange(3), np.full((3, len(splits)), 0.5), splits)
    lines = fig.axes[0].lines
    styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines}
    assert len({line.get_color() for line in lines[:8]}) == 8 and len(styles) == len(splits)
    assert "#F0E442" not in {line.get_color() for line in lines}  # Okabe-Ito's yellow: too light for lines


def test_principal_angle_matrix(tmp_path: Path) -> None:
    m = np.array([[0.0, 30.0, 80.0], [30.0, 0.0, 45.0], [80.0, 45.0, 0.0]])
    fig = figures.principal_angle_matrix(m, ["ID", "a", "b"])
    _check(fig, 2, tmp_path, "angles")
    long = pd.DataFrame({"a": ["ID", "ID", "a"], "b": ["a", "b", "b"], "angle_deg": [30.0, 80.0, 45.0]})
    from_long = figures.principal_angle_matrix(long)
    np.testing.assert_array_equal(from_long.axes[0].images[0].get_array(), m)
    with pytest.raises(ValueError, match="degrees"):
        figures.principal_angle_matrix(m * 2)
    with pytest.raises(ValueError, match="2 labels"):
        figures.principal_angle_matrix(m, ["x", "y"])


def test_predicted_vs_observed(experiment: Path, tmp_path: Path) -> None:
    predictions = pd.read_csv(experiment / "predictions.csv")
    scores = pd.read_csv(experiment / "predict_scores.csv")
    fig = figures.predicted_vs_observed(predictions, scores)
    _check(fig, len(PREDICTORS), tmp_path, "pvo")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("zero (preregistered)") and "n/a" in titles[0]
    assert titles[1].startswith("cosine (baseline)")
    without_group = figures.predicted_vs_observed(predictions, scores.drop(columns="group"))
    assert without_group.axes[2].get_title().startswith("covariance (pre-registered)")
    assert "ρ = 0.50" in titles[1] and "ceiling 0.38" in titles[1]
    assert figures.predicted_vs_observed(predictions).axes[1].get_title().startswith("cosine\nρ = ")
    failed = predictions.assign(predicted=np.where(predictions["predictor"] == "cosine", np.nan,
                                                   predictions["predicted"]))  # a predictor that could not run
    assert figures.predicted_vs_observed(failed).axes[1].get_title() == "cosine\nρ n/a (no predictions)"
    with pytest.raises(ValueError, match="predicted"):
        figures.predicted_vs_observed(predictions.drop(columns="predicted"))


def test_generalisation_gap_bands(experiment: Path, tmp_path: Path) -> None:
    gap = pd.read_csv(experiment / "gap.csv")
    fig = figures.generalisation_gap_bands(gap)
    _check(fig, 1, tmp_path, "gap")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["healthy", "watch", "warning"]
    assert len(ax.collections) == len(SPLITS)
    with pytest.raises(ValueError, match="train_acc"):
        figures.generalisation_gap_bands(gap.drop(columns="gap_pts"))


def test_benchmark_bars(experiment: Path, tmp_path: Path) -> None:
    fig = figures.benchmark_bars(experiment / "benchmarks")
    _check(fig, 2, tmp_path, "bench")
    assert len(fig.axes[0].patches) == 3 and len(fig.axes[1].patches) == 2
    names = [t.get_text() for t in fig.axes[0].texts if not t.get_text().startswith(" ")]  # values start " "
    assert names == ["tiny cpu k=4096: grad+update+adam_m", "tiny cpu: wandb.watch(gradients, log_freq=1)",
                     "pythia-70m cpu muon k=4096: grad+update+adam_m"]  # the optimizer named unless AdamW
    assert [ax.get_xlabel() for ax in fig.axes] == [figures.BENCHMARK_AXES["capture_overhead"],
                                                    figures.BENCHMARK_AXES["sweep_throughput"]]
    assert figures.load_benchmarks({"x": {"a": 1.5, "b": {"ratio": 2.0}, "c": "n/a"}}) == {
        "x": [{"name": "a", "unit": "value", "value": 1.5}, {"name": "b", "unit": "ratio", "value": 2.0}]}
    assert figures.load_benchmarks(tmp_path / "missing") == {}
    with pytest.raises(ValueError, match="no benchmark records"):
        figures.benchmark_bars(tmp_path / "missing")
