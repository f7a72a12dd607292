"""Predictors and scoring on a planted experiment where the first-order model holds exactly."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy.special import ndtr, ndtri

from gradtrace import config, stats, store
from gradtrace.predict import (PREDICTORS, ReferenceData, ReferenceRun, _partial_across_samples, baselines,
                               format_scores, load_reference, noise_ceiling, partial_from_covariance, probit_partials,
                               relabel_pvalue, run_predict, score, sign_accuracy, spearman)
from gradtrace.subspace import top_span

D, SHIFTS, RANK = 40, [f"s{i}" for i in range(1, 7)], 4
SPLITS = ["ID", *SHIFTS]
PROBE_EVERY, STEPS = 50, 1000


@dataclass
class Planted:
    exp_dir: Path
    truth: pd.DataFrame  # planted S×S partial correlations
    G: np.ndarray  # (1+S, D) accuracy gradients


def _sigma_factor(rng: np.random.Generator) -> np.ndarray:
    """A factor F with FᵀF = Σ: low rank (RANK strong directions) plus an isotropic bulk."""
    Q = np.linalg.qr(rng.standard_normal((D, RANK)))[0]
    return np.vstack([np.sqrt([4.0, 2.5, 1.5, 1.0])[:, None] * Q.T, 0.15 * np.eye(D)])


def _put(group, name: str, values: np.ndarray, dims: tuple[str, ...]) -> None:
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=dims,
                             chunks=values.shape, attributes={"storage_dtype": str(values.dtype)})
    arr[...] = values


def _write_reference(root, run_id: str, G: np.ndarray, F: np.ndarray, rng: np.random.Generator,
                     sketch_seed: int = 0, init_seed: int = 0, drift: np.ndarray | None = None,
                     base: str | None = None) -> None:
    """A reference run whose updates have covariance Σ = FᵀF and whose losses are exactly linear in θ."""
    sketch = {"kind": "identity", "dim": D, "seed": sketch_seed, "layout_hash": "planted", "num_params": D}
    init_from = None if base is None else f"/x/weights/{base}/final.safetensors"
    group = store.create_run(root, run_id, {
        "role": "reference", "status": "complete", "sketch": sketch, "splits": SPLITS,
        "layout": [{"name": "w", "shape": [D], "offset": 0}], "probe_losses": ["ce", "margin"],
        "seeds": {"init": init_seed, "data": int(rng.integers(1000))}, "wall_time_s": 12.0,
        "config": {"model": {"init_from": init_from}}})
    updates = (rng.standard_normal((STEPS, F.shape[0])) @ F).astype(np.float32)
    if drift is not None:
        updates += drift.astype(np.float32)
    writer = store.RunWriter(group, chunk=64)
    writer.declare("step", (), dtype="int64")
    writer.declare("lr", ())
    writer.declare("update", (D,), dims=("sketch",))
    for t in range(STEPS):
        writer.append({"step": t, "lr": 1e-3, "update": updates[t]})
    writer.close()

    probe_steps = np.arange(0, STEPS + 1, PROBE_EVERY)
    theta = np.vstack([np.zeros(D), np.cumsum(updates, axis=0, dtype=np.float64)])[probe_steps]  # θ_p − θ_0
    scales = np.array([1.0, 0.3])  # ce and margin: loss gradient = −scale · accuracy gradient
    loss_grad = -scales[None, :, None] * G[:, None, :]  # (1+S, Lp, D), constant along the path
    probe_grad = np.broadcast_to(loss_grad, (len(probe_steps), *loss_grad.shape)).astype(np.float32)
    precond = rng.uniform(0.5, 2.0, D)
    loss = 5.0 + np.einsum("sld,rd->rsl", loss_grad, theta)
    _put(group, "probe/step", probe_steps.astype(np.int64), ("probe",))
    _put(group, "probe/grad", probe_grad, ("probe", "split", "probe_loss", "sketch"))
    _put(group, "probe/grad_adam", (probe_grad * precond).astype(np.float32),
         ("probe", "split", "probe_loss", "sketch"))
    _put(group, "probe/loss", loss.astype(np.float32), ("probe", "split", "probe_loss"))
    eval_acc = ndtr(0.2 + 0.01 * theta @ G.T).astype(np.float32)
    _put(group, "evals/step", probe_steps.astype(np.int64), ("eval",))
    _put(group, "evals/accuracy", eval_acc, ("eval", "split"))


def make_planted(tmp_path: Path, n_sweep: int = 300, n_reference: int = 1, seed: int = 0,
                 preregistered: tuple[str, ...] = ("covariance",)) -> Planted:
    """An experiment where accuracies are exactly linear (probit scale) in parameter movement δ ~ N(0, Σ)."""
    rng = np.random.default_rng(seed)
    F = _sigma_factor(rng)
    G = rng.standard_normal((len(SPLITS), D)) * 0.1
    noise = 0.02
    sigma = F.T @ F
    truth = partial_from_covariance(G @ sigma @ G.T + noise**2 * np.eye(len(SPLITS)))

    delta = rng.standard_normal((n_sweep, F.shape[0])) @ F
    probit = rng.uniform(-0.5, 0.5, len(SPLITS)) + delta @ G.T + noise * rng.standard_normal((n_sweep, len(SPLITS)))
    results = pd.DataFrame({"run_id": [f"sweep-{i:03d}" for i in range(n_sweep)], "role": "sweep",
                            "wall_time_s": 10.0, **{f"acc_{s}": ndtr(probit[:, j]) for j, s in enumerate(SPLITS)}})
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    results.to_csv(exp_dir / "results.csv", index=False)
    config.dump(config.from_dict({"predict": {"preregistered": list(preregistered),
                                              "exploratory": ["path_integrated"]}}), exp_dir / "config.yaml")
    root = store.open_experiment(exp_dir / "store.zarr", mode="w")
    for rid in results.run_id:  # the sweep's runs are the store's too (their groups need no arrays here)
        root.create_group(rid).update_attributes({"role": "sweep", "status": "complete"})
    drift = rng.standard_normal(D) * 0.01
    for i in range(n_reference):
        _write_reference(root, f"ref-{i:03d}", G, F, rng, drift=drift)
    return Planted(exp_dir, pd.DataFrame(truth, index=SHIFTS, columns=SHIFTS), G)


def _pairs(matrix: pd.DataFrame) -> np.ndarray:
    ia, ib = np.triu_indices(len(matrix), k=1)
    return matrix.to_numpy()[ia, ib]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    return make_planted(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def minisweep(tmp_path_factory) -> Planted:
    return make_planted(tmp_path_factory.mktemp("minisweep"), n_sweep=40, n_reference=6, seed=1)


# ---------------------------------------------------------------------------------------------------------------
# the matrices


def test_partial_from_covariance_equals_precision_formula():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((50, 5))
    C = A.T @ A
    out = partial_from_covariance(C)
    for a in range(4):
        for b in range(4):
            if a == b:
                assert np.isnan(out[a, b])
                continue
            P = np.linalg.inv(C[np.ix_([0, a + 1, b + 1], [0, a + 1, b + 1])])
            assert out[a, b] == pytest.approx(-P[1, 2] / np.sqrt(P[1, 1] * P[2, 2]))


def test_probit_partials_agree_with_stats():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((60, 4)) @ rng.standard_normal((4, 4)) * 0.5
    acc = ndtr(z)
    acc[0, 1] = 1.0  # exercises the clip
    table = pd.DataFrame({f"acc_{s}": acc[:, j] for j, s in enumerate(["ID", "a", "b", "c"])})
    observed = stats.partial_correlations(table, id="ID", residualize="probit", n_boot=0, n_perm=0)
    ours = probit_partials(acc)
    pos = {"a": 0, "b": 1, "c": 2}
    expected = [ours[pos[a], pos[b]] for a, b in zip(observed["a"], observed["b"])]
    np.testing.assert_allclose(observed["r"], expected, atol=1e-10)


def test_probit_partials_within_groups_agree_with_stats():
    """Runs from several bases: one intercept per base, as stats' group fixed effects; a base offset shared by
    every split correlates them pooled and not within base; the ceiling splits each base's runs into halves."""
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(3), 20)
    z = 0.4 * rng.standard_normal((60, 4)) + 1.5 * rng.standard_normal(3)[groups][:, None]
    acc = ndtr(z)
    table = pd.DataFrame({f"acc_{s}": acc[:, j] for j, s in enumerate(["ID", "a", "b", "c"])})
    table["base"] = [f"base-{g}" for g in groups]
    observed = stats.partial_correlations(table, residualize="probit", n_boot=0, n_perm=0, within="base")
    ours = probit_partials(acc, groups=groups)
    pos = {"a": 0, "b": 1, "c": 2}
    np.testing.assert_allclose(observed["r"], [ours[pos[a], pos[b]] for a, b in zip(observed["a"], observed["b"])],
                               atol=1e-10)
    assert np.all(np.abs(observed["r"]) < 0.45) and np.all(np.abs(probit_partials(acc)[[0, 0, 1], [1, 2, 2]]) > 0.5)
    assert np.isfinite(noise_ceiling(acc, n_splits=20, groups=groups)[0])
    scores = score({"zero": pd.DataFrame(0.0, index=list(pos), columns=list(pos))}, observed, table,
                   within="base", n_boot=50, n_perm=100)
    assert np.isfinite(scores["reliability"].iloc[0])


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_load_reference(planted):
    ref = load_reference(planted.exp_dir)
    assert ref.id_split == "ID" and ref.shifts == tuple(SHIFTS) and ref.probe_losses == ("ce", "margin")
    run = ref.runs[0]
    assert run.probe_grad.shape == (STEPS // PROBE_EVERY + 1, len(SPLITS), 2, D)
    assert run.update.shape == (STEPS, D) and run.wall_time_s == 12.0
    lazy = load_reference(planted.exp_dir / "store.zarr", lazy=True)
    assert hasattr(lazy.runs[0].update, "dask")
    assert [r.run_id for r in load_reference(planted.exp_dir, run_ids="ref-000").runs] == ["ref-000"]  # not r, e, …
    with pytest.raises(ValueError, match="not captured"):
        ref.loss_index("hinge")


def test_a_reference_run_without_captures_attributes_is_refused_by_what_it_lacks(tmp_path):
    """The message named storage/README.md, a file only a checkout has."""
    exp = make_planted(tmp_path, n_sweep=12).exp_dir
    zarr.open_group(exp / "store.zarr", mode="a")["ref-000"].attrs.pop("probe_losses")
    with pytest.raises(KeyError, match="run 'ref-000' lacks the 'probe_losses' attribute every run gradtrace's "
                                       "capture records .*cannot serve as a reference run"):
        load_reference(exp)


def test_trajectories_are_read_lazily_where_all_the_runs_together_pass_the_memory_limit(minisweep, monkeypatch):
    """The limit applied to each array alone: 8 runs of 1.9 GiB each would have been held whole (15 GiB)."""
    import gradtrace.predict as predict_module

    one = zarr.open_group(minisweep.exp_dir / "store.zarr")["ref-000"]["update"].nbytes
    monkeypatch.setattr(predict_module, "IN_MEMORY_BYTES", 2 * one)  # each run's under it, the six together over
    assert all(hasattr(run.update, "dask") for run in load_reference(minisweep.exp_dir).runs)
    monkeypatch.setattr(predict_module, "IN_MEMORY_BYTES", 6 * one)
    assert not any(hasattr(run.update, "dask") for run in load_reference(minisweep.exp_dir).runs)


def test_the_dominant_and_bulk_predictors_share_one_span_per_run(planted, monkeypatch):
    import gradtrace.predict as predict_module

    calls = []
    monkeypatch.setattr(predict_module, "top_span", lambda *a, **k: calls.append(1) or top_span(*a, **k))
    reference = load_reference(planted.exp_dir)
    for name in ("covariance_dominant", "covariance_bulk"):
        PREDICTORS[name](rank=RANK).fit(reference).predict()
    assert len(calls) == len(reference.runs)


def test_incompatible_sketches_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    root = store.open_experiment(tmp_path / "store.zarr", mode="w")
    G, F = rng.standard_normal((len(SPLITS), D)), _sigma_factor(rng)
    _write_reference(root, "ref-000", G, F, rng, sketch_seed=0)
    _write_reference(root, "ref-001", G, F, rng, sketch_seed=1)
    with pytest.raises(ValueError, match="incompatible sketches.*seed"):
        load_reference(root)
    assert len(load_reference(root, run_ids=["ref-001"]).runs) == 1
    with pytest.raises(ValueError, match="no reference runs"):
        load_reference(store.open_experiment(tmp_path / "empty.zarr", mode="w"))


# ---------------------------------------------------------------------------------------------------------------
# predictors on the planted experiment


def test_partial_from_covariance_leaves_a_constant_variable_undefined():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((50, 4))
    A[:, 2] = 0.37  # a shift at one accuracy in every run: centring leaves only rounding
    A -= A.mean(axis=0)
    out = partial_from_covariance(A.T @ A)
    assert np.isnan(out[1]).all() and np.isnan(out[:, 1]).all() and np.isfinite(out[0, 2])
    A[:, 0] = 0.5  # a constant variable 0 explains nothing: the others' plain correlation
    out = partial_from_covariance(A.T @ A)
    assert out[0, 2] == pytest.approx(np.corrcoef(A[:, 1], A[:, 3])[0, 1])


def test_covariance_recovers_planted_partials(planted):
    ref = load_reference(planted.exp_dir)
    truth = _pairs(planted.truth)
    full = PREDICTORS["covariance"]().fit(ref).predict()
    assert list(full.matrix.index) == SHIFTS and full.runs_used == ("ref-000",)
    assert spearman(_pairs(full.matrix), truth) >= 0.95
    margin = PREDICTORS["covariance"](probe_loss="margin").fit(ref).predict()  # per-split scale cancels
    np.testing.assert_allclose(_pairs(margin.matrix), _pairs(full.matrix), atol=1e-5)
    zero = PREDICTORS["zero"]().fit(ref).predict()
    assert np.isnan(spearman(_pairs(zero.matrix), truth)) and zero.wall_time_s == 0
    dominant = PREDICTORS["covariance_dominant"](rank=RANK).fit(ref).predict()
    bulk = PREDICTORS["covariance_bulk"](rank=RANK).fit(ref).predict()
    assert spearman(_pairs(dominant.matrix), truth) > 0.5
    assert not np.allclose(_pairs(dominant.matrix), _pairs(bulk.matrix))
    with pytest.raises(ValueError, match="the 4 tail updates span at most 3 directions.*no bulk is left"):
        PREDICTORS["covariance_bulk"](rank=RANK, tail=0.004).fit(ref).predict()


def test_every_single_run_predictor_gives_a_symmetric_matrix(planted):
    ref = load_reference(planted.exp_dir)
    for name in [*baselines(), "path_integrated", "trajectory_loss", "checkpoint_accuracy"]:
        M = PREDICTORS[name]().fit(ref).predict().matrix.to_numpy()
        assert M.shape == (len(SHIFTS), len(SHIFTS)), name
        assert np.all(np.isnan(np.diag(M))), name
        off = ~np.eye(len(SHIFTS), dtype=bool)
        assert np.all(np.isfinite(M[off])), name
        np.testing.assert_allclose(M, M.T, atol=1e-6, err_msg=name)


def test_lazy_trajectories_give_the_same_predictions(planted):
    eager, lazy = load_reference(planted.exp_dir, lazy=False), load_reference(planted.exp_dir, lazy=True)
    for name, tol in [("covariance", 1e-5), ("path_integrated", 1e-5), ("covariance_dominant", 0.05)]:
        a = PREDICTORS[name](**({"rank": RANK} if name == "covariance_dominant" else {})).fit(eager).predict()
        b = PREDICTORS[name](**({"rank": RANK} if name == "covariance_dominant" else {})).fit(lazy).predict()
        np.testing.assert_allclose(_pairs(a.matrix), _pairs(b.matrix), atol=tol, err_msg=name)


def test_cosine_id_projected_is_covariance_with_identity_sigma(planted):
    ref = load_reference(planted.exp_dir)
    G = planted.G
    expected = partial_from_covariance(G @ G.T)
    got = PREDICTORS["cosine_id_projected"]().fit(ref).predict().matrix.to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_path_integral_is_exact_for_linear_losses(planted):
    ref = load_reference(planted.exp_dir)
    path = PREDICTORS["path_integrated"]().fit(ref)
    np.testing.assert_allclose(path.fidelity_["first_order"], path.fidelity_["measured"], rtol=1e-3, atol=1e-3)
    measured = PREDICTORS["trajectory_loss"]().fit(ref).predict().matrix.to_numpy()
    np.testing.assert_allclose(path.predict().matrix.to_numpy(), measured, atol=1e-3)


def _memory_run(rng: np.random.Generator, n_splits: int = 4, k: int = 6, steps: int = 41,
                probe_steps: tuple[int, ...] = (0, 10, 20, 30, 40), **fields) -> ReferenceRun:
    """A reference run held in memory: random probe gradients (one probe loss), updates, losses and a learning rate
    that changes every step."""
    P = len(probe_steps)
    defaults = dict(run_id="mem-000", probe_step=np.array(probe_steps),
                    probe_grad=rng.standard_normal((P, n_splits, 1, k)),
                    probe_grad_adam=rng.standard_normal((P, n_splits, 1, k)),
                    probe_loss=rng.uniform(1, 3, (P, n_splits, 1)),
                    step=np.arange(steps), update=rng.standard_normal((steps, k)), grad=None,
                    lr=np.linspace(1e-3, 2e-3, steps), eval_step=None, eval_accuracy=None, seeds={}, wall_time_s=1.0,
                    nonfinite_steps=0)
    return ReferenceRun(**{**defaults, **fields})


def _memory_reference(run: ReferenceRun) -> ReferenceData:
    splits = ("ID", *[f"s{i}" for i in range(1, run.probe_grad.shape[1])])
    return ReferenceData((run,), splits, ("ce",), {"kind": "identity"}, [])


def _precision_partials(C: np.ndarray) -> np.ndarray:
    """Partial correlations given variable 0 from the inverse of each 3×3 block [0, a, b] of a covariance."""
    S = len(C) - 1
    out = np.full((S, S), np.nan)
    for a in range(S):
        for b in range(S):
            if a != b:
                P = np.linalg.inv(C[np.ix_([0, a + 1, b + 1], [0, a + 1, b + 1])])
                out[a, b] = -P[1, 2] / np.sqrt(P[1, 1] * P[2, 2])
    return out


def test_tag_lookahead_is_its_first_order_formula():
    """Z_a→b = η (M_ab − M_a,ID M_b,ID / M_ID,ID) / L_b, M the symmetrised g_iᵀ P g_j and η the learning rate of the
    last step before the probe (the first step's at step 0); the prediction (Z_a→b + Z_b→a) / 2. On the planted
    runs (constant learning rate) only its symmetry was checked: the ID projection could go, η be the next
    step's."""
    rng = np.random.default_rng(0)
    run = _memory_run(rng)
    for probe in (0, 2, -1):
        got = PREDICTORS["tag_lookahead"](probe=probe).fit(_memory_reference(run)).predict().matrix.to_numpy()
        G, PG = run.probe_grad[probe, :, 0], run.probe_grad_adam[probe, :, 0]
        M = (G @ PG.T + PG @ G.T) / 2
        eta = run.lr[run.step == max(run.probe_step[probe] - 1, 0)][0]
        loss = run.probe_loss[probe, :, 0]
        Z = np.array([[eta * (M[a, b] - M[a, 0] * M[b, 0] / M[0, 0]) / loss[b] for b in range(1, 4)]
                      for a in range(1, 4)])
        expected = (Z + Z.T) / 2
        np.fill_diagonal(expected, np.nan)
        np.testing.assert_allclose(got, expected, rtol=1e-10, err_msg=f"probe {probe}")


def test_tag_lookahead_takes_the_rate_the_moving_tensors_stepped_with_and_refuses_rates_that_differ(tmp_path):
    """η is read from `layer_lr` where recorded: the moving tensors' rate (a group frozen at 0 left aside), and where
    their param groups' rates differ (layer-wise decay) there is no one η: refused, where the first group's was
    taken."""
    exp_dir = make_planted(tmp_path, n_sweep=20).exp_dir
    at_first_group_rate = PREDICTORS["tag_lookahead"](probe=1).fit(load_reference(exp_dir)).predict().matrix  # 1e-3
    group = store.open_experiment(exp_dir / "store.zarr", mode="a")["ref-000"]
    layer_lr = np.tile(np.array([0.0, 2e-3, 2e-3], np.float32), (STEPS, 1))
    layer_lr[STEPS // 2:, 1] = 4e-3  # layer-wise rates from half-way
    layer_lr[:3] = np.nan  # rows recorded before `layer_lr` was, then resumed: `lr` stands
    _put(group, "layer_lr", layer_lr, ("step", "param"))
    run = load_reference(exp_dir).runs[0]
    expected = np.r_[np.full(3, 1e-3), np.full(STEPS // 2 - 3, 2e-3), np.full(STEPS - STEPS // 2, np.nan)]
    np.testing.assert_allclose(run.lr, expected, rtol=1e-6)
    at_moving_rate = PREDICTORS["tag_lookahead"](probe=1).fit(load_reference(exp_dir)).predict().matrix
    np.testing.assert_allclose(at_moving_rate.to_numpy(), 2 * at_first_group_rate.to_numpy(), rtol=1e-6)  # η 2e-3
    with pytest.raises(ValueError, match=rf"'ref-000''s parameter groups stepped with different learning rates at "
                                         rf"step {STEPS - 1}, and tag_lookahead's step takes one for all"):
        PREDICTORS["tag_lookahead"](probe=-1).fit(load_reference(exp_dir)).predict()


def test_covariance_predictor_takes_the_centred_tail_of_the_updates():
    """Σ is the sample covariance of the last ceil(tail · T) updates, their mean (a drift) removed: with 41 updates
    and tail 0.5 the last 21. Against np.cov and the precision formula (the planted updates barely drift, and a
    tail of 20 or 21 of 500 rows changes little). Its dominant part is Σ within its top-`rank` eigenvectors, the
    bulk the rest: coordinates in the span left uncentred passed the planted tests, and put the drift into both."""
    rng = np.random.default_rng(1)
    run = _memory_run(rng, update=rng.standard_normal((41, 6)) * rng.uniform(0.5, 2, 6) + 3.0)
    got = PREDICTORS["covariance"](tail=0.5).fit(_memory_reference(run)).predict().matrix.to_numpy()
    G = run.probe_grad[-1, :, 0]
    sigma = np.cov(run.update[-21:].T)
    np.testing.assert_allclose(got, _precision_partials(G @ sigma @ G.T), atol=1e-5)
    top = np.linalg.eigh(sigma)[1][:, ::-1][:, :3]
    dominant = top @ top.T @ sigma @ top @ top.T
    for name, part in (("covariance_dominant", dominant), ("covariance_bulk", sigma - dominant)):
        got = PREDICTORS[name](tail=0.5, rank=3).fit(_memory_reference(run)).predict().matrix.to_numpy()
        np.testing.assert_allclose(got, _precision_partials(G @ part @ G.T), atol=1e-5, err_msg=name)


def test_path_integral_is_exact_for_quadratic_losses_and_correlates_centred_windows():
    """With losses L_i(θ) = b_iᵀθ + ½θᵀA_iθ the gradient moves along the path and only the trapezoid rule is
    exact: the first-order sums equal the measured loss changes (the planted losses are linear, where the
    left-point rule is exact too). The prediction is the partial correlation of the windows' contributions,
    centred (updates that drift give contributions with a mean)."""
    rng = np.random.default_rng(2)
    n_splits, k, T = 4, 5, 40
    probe_steps = np.arange(0, T + 1, 5)
    updates = rng.standard_normal((T, k)) + 0.5
    theta = np.vstack([np.zeros(k), np.cumsum(updates, axis=0)])[probe_steps]
    b, A = rng.standard_normal((n_splits, k)), rng.standard_normal((n_splits, k, k))
    A = (A + A.transpose(0, 2, 1)) / 2
    grad = b[None] + np.einsum("sij,pj->psi", A, theta)
    loss = 5 + np.einsum("sk,pk->ps", b, theta) + 0.5 * np.einsum("pi,sij,pj->ps", theta, A, theta)
    run = _memory_run(rng, n_splits, k, T, tuple(probe_steps), probe_grad=grad[:, :, None],
                      probe_loss=loss[:, :, None], update=updates)
    path = PREDICTORS["path_integrated"]().fit(_memory_reference(run))
    np.testing.assert_allclose(path.fidelity_["first_order"], path.fidelity_["measured"], rtol=1e-9)
    expected = _precision_partials(np.cov(np.diff(loss, axis=0).T))  # the windows' exact loss changes
    np.testing.assert_allclose(path.predict().matrix.to_numpy(), expected, atol=1e-9)


def test_checkpoint_accuracy_centres_each_split_across_the_tail_of_checkpoints():
    """The probit accuracies of the last ceil(tail · E) checkpoints, each split centred on its own mean: against
    np.cov (the planted accuracies barely move, so one mean for all splits went unnoticed)."""
    rng = np.random.default_rng(4)
    acc = ndtr(rng.uniform(-1, 1, 4) + 0.3 * rng.standard_normal((11, 4)))  # splits at their own levels
    run = _memory_run(rng, eval_step=np.arange(11) * 4, eval_accuracy=acc)
    got = PREDICTORS["checkpoint_accuracy"](tail=0.5).fit(_memory_reference(run)).predict().matrix.to_numpy()
    np.testing.assert_allclose(got, _precision_partials(np.cov(ndtri(acc[-6:]).T)), atol=1e-10)


def test_partial_correlations_across_samples_need_four_independent_ones():
    """dof = n − 3 ≥ 1: three independent samples are refused, four are not."""
    Y = np.random.default_rng(3).standard_normal((10, 3))
    with pytest.raises(ValueError, match="only 3 independent samples"):
        _partial_across_samples(Y, 3)
    assert np.isfinite(_partial_across_samples(Y, 4)[0, 1])


def test_path_needs_every_step(planted):
    ref = load_reference(planted.exp_dir)
    run = ref.runs[0]
    keep = run.step % 2 == 0
    sparse = dataclasses.replace(run, step=run.step[keep], update=run.update[keep])
    with pytest.raises(ValueError, match="capture.every=1"):
        PREDICTORS["path_integrated"]().fit(dataclasses.replace(ref, runs=(sparse,)))


def test_minisweep_recovers_planted_partials(minisweep):
    ref = load_reference(minisweep.exp_dir)
    truth = _pairs(minisweep.truth)
    cov = PREDICTORS["minisweep_covariance"]().fit(ref).predict()
    assert len(cov.runs_used) == 6 and cov.wall_time_s == pytest.approx(72.0)
    assert spearman(_pairs(cov.matrix), truth) >= 0.6  # 6 runs: noisy by nature (0.66–0.94 over seeds 0–2)
    loss = PREDICTORS["minisweep_loss"]().fit(ref).predict()  # losses are linear here: the same samples
    np.testing.assert_allclose(_pairs(loss.matrix), _pairs(cov.matrix), atol=1e-3)


def test_minisweep_refuses_one_run_and_mixed_inits(planted, tmp_path):
    ref = load_reference(planted.exp_dir)
    with pytest.raises(ValueError, match="needs ≥ 2"):
        PREDICTORS["minisweep_covariance"]().fit(ref)
    rng = np.random.default_rng(0)
    root = store.open_experiment(tmp_path / "store.zarr", mode="w")
    G, F = rng.standard_normal((len(SPLITS), D)), _sigma_factor(rng)
    _write_reference(root, "ref-000", G, F, rng, init_seed=0)
    _write_reference(root, "ref-001", G, F, rng, init_seed=1)
    with pytest.raises(ValueError, match="share a base run and init seed, but no two of the 2 do"):
        PREDICTORS["minisweep_covariance"]().fit(load_reference(root))
    PREDICTORS["minisweep_loss"]().fit(load_reference(root))  # needs no shared init


def _two_bases(path, drift: np.ndarray | None = None, per_base: int = 2):
    """Reference runs fine-tuning two base runs; `drift` moves every run of base-1 alike."""
    rng = np.random.default_rng(0)
    root = store.open_experiment(path / "store.zarr", mode="w")
    G, F = rng.standard_normal((len(SPLITS), D)), _sigma_factor(rng)
    for b in range(2):
        for i in range(per_base):
            _write_reference(root, f"ref-{b}{i}", G, F, rng, base=f"base-{b}", drift=drift if b else None)
    return load_reference(root)


@pytest.mark.parametrize("name", ["minisweep_covariance", "minisweep_loss"])
def test_minisweep_compares_runs_within_their_base(tmp_path, name):
    with pytest.raises(ValueError, match="but no two of the 2 do"):  # one reference run per base: no spread
        PREDICTORS[name]().fit(_two_bases(tmp_path / "one", per_base=1))
    apart = PREDICTORS[name]().fit(_two_bases(tmp_path / "apart", drift=np.full(D, 0.05))).predict()
    alike = PREDICTORS[name]().fit(_two_bases(tmp_path / "alike")).predict()
    np.testing.assert_allclose(_pairs(apart.matrix), _pairs(alike.matrix), atol=1e-6)  # bases' offsets drop out
    with pytest.raises(ValueError, match="only 2 independent samples"):  # two runs a base, one probe each
        PREDICTORS[name](tail=0.01).fit(_two_bases(tmp_path / "alike2"))


def test_option_errors():
    with pytest.raises(ValueError, match="tail"):
        PREDICTORS["covariance"](tail=0)
    with pytest.raises(ValueError, match="epsilon"):
        PREDICTORS["majority_sign"](epsilon=0)
    with pytest.raises(RuntimeError, match="fit"):
        PREDICTORS["zero"]().predict()


# ---------------------------------------------------------------------------------------------------------------
# scoring


def _observed_frame(matrix: np.ndarray, names: list[str], half_width: float = 0.1) -> pd.DataFrame:
    ia, ib = np.triu_indices(len(names), k=1)
    r = matrix[ia, ib]
    return pd.DataFrame({"a": [names[i] for i in ia], "b": [names[j] for j in ib], "r": r,
                         "ci_low": r - half_width, "ci_high": r + half_width})


def test_scores_on_hand_made_matrices():
    names = ["a", "b", "c", "d"]
    obs = np.array([[np.nan, 0.5, -0.3, 0.2], [0.5, np.nan, 0.05, 0.4],
                    [-0.3, 0.05, np.nan, -0.6], [0.2, 0.4, -0.6, np.nan]])
    frame = lambda m: pd.DataFrame(m, index=names, columns=names)  # noqa: E731
    scores = score({"perfect": frame(obs), "reversed": frame(-obs), "zero": frame(np.zeros((4, 4))),
                    "scaled": frame(obs**3)}, _observed_frame(obs, names), preregistered=["perfect"])
    s = scores.set_index("predictor")
    assert s.loc["perfect", "spearman"] == pytest.approx(1) and s.loc["perfect", "pearson"] == pytest.approx(1)
    assert s.loc["reversed", "spearman"] == pytest.approx(-1)
    assert s.loc["scaled", "spearman"] == pytest.approx(1) and s.loc["scaled", "pearson"] < 1
    assert np.isnan(s.loc["zero", "spearman"]) and np.isnan(s.loc["zero", "p_relabel"])
    assert s.loc["perfect", "n_sig_pairs"] == 5  # |r| = 0.05 has a CI covering 0
    assert s.loc["perfect", "sign_acc"] == 1 and s.loc["reversed", "sign_acc"] == 0 and s.loc["zero", "sign_acc"] == 0.5
    assert s.loc["perfect", "majority_sign_acc"] == pytest.approx(3 / 5)
    negated = score({"negated": frame(-obs)}, _observed_frame(-obs, names), n_perm=0)
    assert negated["majority_sign_acc"].iloc[0] == pytest.approx(3 / 5)  # the better constant sign: −
    assert s.loc["perfect", "p_relabel"] == pytest.approx(1 / 24) and s.loc["perfect", "n_relabel"] == 24
    assert s.loc["reversed", "p_relabel"] == pytest.approx(1)
    assert s.loc["perfect", "group"] == "preregistered" and bool(s.loc["perfect", "preregistered"])
    assert s.loc["zero", "group"] == "baseline" and s.loc["reversed", "group"] == "exploratory"
    assert sign_accuracy(np.array([1.0, -1.0, 0.0]), np.array([1.0, 1.0, 1.0])) == pytest.approx(0.5)


def test_scores_of_a_single_pair_say_why_they_are_empty():
    """A study of 2 shifts scored every predictor NaN, its note column empty and nothing said."""
    names = ["a", "b"]
    obs = np.array([[np.nan, 0.5], [0.5, np.nan]])
    with pytest.warns(UserWarning, match=r"predictor scores say little: 1 pair\(s\) of shifts scored: a rank "
                                         "correlation over pairs needs at least 3"):
        scores = score({"mine": pd.DataFrame(obs, index=names, columns=names)}, _observed_frame(obs, names))
    assert np.isnan(scores.spearman[0]) and scores.note[0].startswith("1 pair(s) of shifts scored")


def test_score_bootstraps_in_bounded_batches_with_the_same_result(monkeypatch):
    import gradtrace.predict as predict

    rng = np.random.default_rng(0)
    n, names = 60, ["a", "b", "c", "d"]
    acc = pd.DataFrame(rng.uniform(0.2, 0.8, (n, 5)), columns=[f"acc_{s}" for s in ["ID", *names]])
    obs = np.corrcoef(rng.standard_normal((4, 10)))
    pred = pd.DataFrame(obs + 0.1, index=names, columns=names)
    whole = score(pred, _observed_frame(obs, names), acc, n_boot=50, n_perm=10)
    batches = []
    monkeypatch.setattr(predict, "probit_partials",
                        lambda a, *rest: batches.append(a.shape) or probit_partials(a, *rest))
    monkeypatch.setattr(predict, "BOOT_CHUNK", 8)  # 50 resamples in 7 batches, not one array of all of them
    chunked = score(pred, _observed_frame(obs, names), acc, n_boot=50, n_perm=10)
    assert max(shape[0] for shape in batches if len(shape) == 3 and shape[1] == n) == 8
    assert whole[["boot_ci_low", "boot_ci_high"]].to_numpy().tolist() == \
        chunked[["boot_ci_low", "boot_ci_high"]].to_numpy().tolist()
    assert np.isfinite(whole[["boot_ci_low", "boot_ci_high"]].to_numpy()).all()


def test_score_refuses_what_it_cannot_score():
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    acc = pd.DataFrame(rng.uniform(0.2, 0.8, (30, 4)), columns=[f"acc_{s}" for s in ["ID", *names]])
    obs = np.corrcoef(rng.standard_normal((3, 10)))
    pred, observed = pd.DataFrame(obs, index=names, columns=names), _observed_frame(obs, names)
    with pytest.raises(ValueError, match="percentages"):  # gave NaN scores before
        score(pred, observed, acc * 100, n_boot=40, n_perm=10)
    with pytest.raises(ValueError, match="NaN accuracies"):  # a bootstrap over the resamples that missed the run
        score(pred, observed, acc.assign(acc_a=acc["acc_a"].where(acc.index != 3)), n_boot=40, n_perm=10)
    with pytest.raises(ValueError, match="no 'probit' ones"):  # a linear r beside a probit CI and ceiling
        score(pred, observed.assign(residualize="linear"), acc, n_boot=40, n_perm=10)
    for bad in (dict(n_boot=-1), dict(n_items=0), dict(n_boot=39)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            score(pred, observed, acc, **bad)
    assert np.isnan(noise_ceiling(acc.to_numpy()[:, :3], n_splits=20)).all()  # one pair: no reliability, no 0


def test_relabel_p_small_for_signal_not_for_noise():
    rng = np.random.default_rng(0)
    S = 7
    A = rng.standard_normal((S, S))
    obs = (A + A.T) / 2
    p, n = relabel_pvalue(obs, obs)
    assert n == 5040 and p <= 2 / 5040
    noisy = obs + 0.3 * rng.standard_normal((S, S))
    assert relabel_pvalue((noisy + noisy.T) / 2, obs)[0] < 0.01
    ps = []
    for _ in range(20):
        B = rng.standard_normal((S, S))
        ps.append(relabel_pvalue((B + B.T) / 2, obs)[0])
    assert np.mean(np.array(ps) < 0.05) <= 0.2 and np.median(ps) > 0.2
    p_sampled, n_sampled = relabel_pvalue(obs, obs, n_perm=500, max_exhaustive=4)
    assert n_sampled == 500 and p_sampled == pytest.approx(1 / 501, abs=2 / 501)
    assert p_sampled >= 1 / 501 and abs(p_sampled * 501 - round(p_sampled * 501)) < 1e-9  # (1 + hits) / 501
    assert relabel_pvalue(obs, obs, n_perm=500, max_exhaustive=S)[1] == 5040  # S ≤ max_exhaustive: every one
    p_none, n_none = relabel_pvalue(obs, obs, n_perm=0, max_exhaustive=4)
    assert np.isnan(p_none) and n_none == 0  # no permutation: no test, not p = 1


def test_noise_ceiling_tracks_reliability(planted):
    results = pd.read_csv(planted.exp_dir / "results.csv")
    acc = results[[f"acc_{s}" for s in SPLITS]].to_numpy()
    reliability, ceiling = noise_ceiling(acc, n_splits=50)
    assert reliability > 0.9 and ceiling == pytest.approx(np.sqrt(reliability))
    noise = np.random.default_rng(0).uniform(0.2, 0.8, acc.shape)
    assert noise_ceiling(noise, n_splits=50)[0] < 0.5


def _grouped_sweep(rng, loadings, bases, runs_per_base):
    """Accuracies (runs, 1+S) of a sweep whose shifts share two factors, over bases with offsets of their own."""
    groups = np.repeat(np.arange(bases), runs_per_base)
    offsets = rng.normal(0, 0.5, (bases, 1 + len(loadings)))[groups]
    id_z = offsets[:, 0] + 0.3 * rng.normal(size=len(groups))
    factors = rng.normal(size=(len(groups), loadings.shape[1]))
    shifts = offsets[:, 1:] + 0.5 * id_z[:, None] + 0.3 * factors @ loadings.T + 0.3 * rng.normal(size=(len(groups),
                                                                                                     len(loadings)))
    return ndtr(np.column_stack([id_z, shifts])), groups


@pytest.mark.parametrize("bases,runs_per_base", [(8, 5), (1, 20)])
def test_noise_ceiling_predicts_the_agreement_of_two_sweeps(bases, runs_per_base):
    """The reliability is what it claims: the Spearman over pairs between two independent sweeps of this size, also
    for many small bases, whose halves hold fewer than half the whole's degrees of freedom (a Spearman–Brown factor
    of 2 put 8 bases × 5 runs at 0.41 against 0.64)."""
    rng = np.random.default_rng(0)
    loadings = rng.normal(size=(6, 2))
    ia, ib = np.triu_indices(6, k=1)
    agreement, estimate = [], []
    for _ in range(100):
        (first, groups), (second, _) = (_grouped_sweep(rng, loadings, bases, runs_per_base) for _ in range(2))
        groups = groups if bases > 1 else None
        agreement.append(spearman(probit_partials(first, groups=groups)[ia, ib],
                                  probit_partials(second, groups=groups)[ia, ib]))
        estimate.append(noise_ceiling(first, n_splits=50, seed=len(estimate), groups=groups)[0])
    assert np.mean(estimate) == pytest.approx(np.mean(agreement), abs=0.06)


def test_the_bootstrap_ci_of_a_spearman_covers_the_sweeps_expected_spearman():
    """Resampled runs repeat some runs, so a resample's observed matrix is noisier and its Spearman with the
    prediction lower: the plain percentile interval sat low and missed the expected Spearman of such sweeps high
    only (here 26 times in 150 sweeps, never low: 83% coverage; now 3–5 times, 97%)."""
    rng = np.random.default_rng(1)
    names = [f"s{i}" for i in range(7)]
    ia, ib = np.triu_indices(7, k=1)
    loadings = rng.normal(size=(7, 2))

    def sweep(n):
        id_z = rng.normal(size=n)
        shifts = 0.5 * id_z[:, None] + 0.3 * rng.normal(size=(n, 2)) @ loadings.T + 0.3 * rng.normal(size=(n, 7))
        return ndtr(np.column_stack([id_z, shifts]))

    truth = probit_partials(sweep(200_000), 10 ** 9)
    expected = np.mean([spearman(truth[ia, ib], probit_partials(sweep(40))[ia, ib]) for _ in range(500)])
    prediction = {"perfect": pd.DataFrame(np.nan_to_num(truth), index=names, columns=names)}
    low = high = 0
    for rep in range(150):
        table = pd.DataFrame(sweep(40), columns=[f"acc_{s}" for s in ["ID", *names]])
        observed = stats.partial_correlations(table, residualize="probit", n_boot=0, n_perm=0)
        row = score(prediction, observed, table, n_boot=400, n_splits=1, n_perm=0, seed=rep).iloc[0]
        low, high = low + (expected < row.boot_ci_low), high + (expected > row.boot_ci_high)
    assert (low + high) / 150 <= 0.1 and high <= 12  # 5% misses on either side expected; 26 high before


def test_noise_ceiling_says_why_small_bases_give_none():
    acc, groups = _grouped_sweep(np.random.default_rng(0), np.ones((3, 1)), bases=10, runs_per_base=3)
    message = r"a half of these 30 runs holds 10 in 10 group\(s\).*more than 13 runs a half"
    with pytest.warns(UserWarning, match=message):
        assert np.isnan(noise_ceiling(acc, n_splits=10, groups=groups)).all()


def test_score_resamples_and_takes_the_ceiling_within_groups_at_the_items_given():
    """With a sweep of two bases scored `within` base at 20 items: the bootstrap CI is the 2.5–97.5 percentiles of
    the Spearmans of resamples drawn within base (probit partials within base, clipped at 1/40), moved by the
    observed Spearman less their median; reliability and ceiling are `noise_ceiling`'s within base at 20 items, and
    spearman_over_ceiling is their ratio. Resampling across bases, partials or ceiling pooled, n_items left at 2000,
    the mean for the median, a 90% interval, or ρ·ceiling passed the other tests."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(5)
    names = ["a", "b", "c", "d"]
    acc, groups = _grouped_sweep(rng, rng.normal(size=(4, 2)), bases=2, runs_per_base=12)
    acc = np.round(ndtr(1.5 * ndtri(acc)) * 20) / 20  # 20 items a split: some runs at 0 or 1
    assert ((acc == 0) | (acc == 1)).any()
    table = pd.DataFrame(acc, columns=[f"acc_{s}" for s in ["ID", *names]]).assign(base=groups.astype(str))
    ia, ib = np.triu_indices(4, k=1)
    observed = probit_partials(acc, 20, groups)
    prediction = observed + 0.3 * rng.standard_normal((4, 4))
    row = score(pd.DataFrame(prediction, index=names, columns=names), _observed_frame(observed, names), table,
                n_boot=200, n_splits=20, n_perm=0, seed=2, n_items=20, within="base").iloc[0]
    rho = spearmanr(prediction[ia, ib], observed[ia, ib]).statistic
    idx = stats.bootstrap_indices(len(acc), 200, np.random.default_rng(2), groups)
    boot = np.array([spearmanr(prediction[ia, ib], probit_partials(acc[i], 20, groups)[ia, ib]).statistic
                     for i in idx])
    assert row.spearman == pytest.approx(rho) and np.isfinite(boot).all()
    np.testing.assert_allclose([row.boot_ci_low, row.boot_ci_high],
                               np.clip(np.percentile(boot, [2.5, 97.5]) + rho - np.median(boot), -1, 1), atol=1e-12)
    reliability, ceiling = noise_ceiling(acc, 20, 2, 20, groups)
    assert reliability != noise_ceiling(acc, 20, 2, 20)[0] and reliability != noise_ceiling(acc, 20, 2, 2000, groups)[0]
    assert (row.reliability, row.noise_ceiling) == pytest.approx((reliability, ceiling))
    assert row.spearman_over_ceiling == pytest.approx(rho / ceiling)
    assert row.n_runs == 24 and row.n_pairs == 6


def test_score_reads_only_the_probit_rows_and_warns_below_three_pairs():
    """A stats table of every residualisation is scored on its probit rows alone (the others doubled the pairs),
    and fewer than 3 pairs make a note while 3 make none."""
    import warnings

    names = ["a", "b", "c"]
    obs = np.array([[np.nan, 0.5, -0.3], [0.5, np.nan, 0.2], [-0.3, 0.2, np.nan]])
    pred = pd.DataFrame(obs ** 3, index=names, columns=names)
    probit = _observed_frame(obs, names)
    every = pd.concat([probit.assign(residualize="linear", r=-probit.r), probit.assign(residualize="probit")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 3 pairs: no note
        alone, mixed = score(pred, probit, n_perm=0), score(pred, every, n_perm=0)
    pd.testing.assert_frame_equal(alone, mixed)
    assert alone.n_pairs[0] == 3 and alone.spearman[0] == pytest.approx(1) and alone.note[0] == ""
    with pytest.warns(UserWarning, match=r"2 pair\(s\) of shifts scored"):
        assert score(pred, probit.iloc[:2], n_perm=0).note[0].startswith("2 pair(s)")


def test_noise_ceiling_needs_eight_runs_and_warns_from_there():
    """Under 8 runs the ceiling is NaN without a word; from 8 runs on, a half too small for a partial correlation
    says so (and 10 runs, halves of 5, give one)."""
    import warnings

    acc, _ = _grouped_sweep(np.random.default_rng(0), np.ones((3, 1)), bases=1, runs_per_base=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(noise_ceiling(acc[:7], n_splits=10)).all()
        assert np.isfinite(noise_ceiling(acc, n_splits=10)).all()
    for n in (8, 9):
        with pytest.warns(UserWarning, match=f"a half of these {n} runs holds 4 in 1 group"):
            assert np.isnan(noise_ceiling(acc[:n], n_splits=10)).all()


def test_noise_ceiling_is_the_spearman_brown_of_the_mean_agreement_of_disjoint_halves():
    """reliability = Spearman–Brown, at the ratio of the whole's and a half's degrees of freedom, of the mean over
    random halvings of the Spearman between the halves' probit partials: the median for the mean passed the
    others, whose tolerance is statistical."""
    acc, _ = _grouped_sweep(np.random.default_rng(2), np.random.default_rng(3).normal(size=(4, 2)), 1, 12)
    ia, ib = np.triu_indices(4, k=1)
    order = np.argsort(np.random.default_rng(1).random((30, 12)), axis=1)  # noise_ceiling's halvings at seed 1
    rho = [spearman(probit_partials(acc[first])[ia, ib], probit_partials(acc[second])[ia, ib])
           for first, second in zip(order[:, :6], order[:, 6:])]
    reliability = float(stats.spearman_brown(np.mean(rho), (12 - 1 - 3) / (6 - 1 - 3)))
    assert np.mean(rho) != np.median(rho)
    assert noise_ceiling(acc, n_splits=30, seed=1) == pytest.approx((reliability, np.sqrt(reliability)))


def test_one_runs_windows_or_checkpoints_hold_one_fewer_independent_sample():
    """Samples centred across one run's windows (path_integrated) or checkpoints (checkpoint_accuracy) hold one
    fewer free: 4 of them are 3 independent samples, refused; 5 are not. Counting the rows passed the others."""
    rng = np.random.default_rng(6)
    for name in ("path_integrated", "trajectory_loss"):
        with pytest.raises(ValueError, match="only 3 independent samples"):  # probes at 0, 10, … 40: 4 windows
            PREDICTORS[name]().fit(_memory_reference(_memory_run(rng)))
        PREDICTORS[name]().fit(_memory_reference(_memory_run(rng, probe_steps=(0, 8, 16, 24, 32, 40))))
    for checkpoints, refused in ((4, True), (5, False)):
        run = _memory_run(rng, eval_step=np.arange(checkpoints) * 10,
                          eval_accuracy=ndtr(rng.standard_normal((checkpoints, 4))))
        with pytest.raises(ValueError, match="only 3 independent samples") if refused else contextlib.nullcontext():
            PREDICTORS["checkpoint_accuracy"](tail=1.0).fit(_memory_reference(run))


def test_run_predict_on_planted_experiment(planted):
    result = run_predict(planted.exp_dir, n_boot=200, n_splits=50)
    s = result.scores.set_index("predictor")
    assert list(result.scores["group"].iloc[:1]) == ["preregistered"]
    assert set(baselines()) | {"path_integrated"} <= set(s.index)
    assert bool(s.loc["covariance", "preregistered"]) and not bool(s.loc["path_integrated", "preregistered"])
    assert s.loc["covariance", "spearman"] >= 0.9
    assert s.loc["covariance", "p_relabel"] <= 0.01 and s.loc["covariance", "n_relabel"] == 720
    assert s.loc["covariance", "boot_ci_low"] > 0.5
    assert s.loc["covariance", "compute_ratio"] == pytest.approx(12.0 / (300 * 10.0))
    assert s.loc["zero", "compute_ratio"] == 0 and np.isnan(s.loc["zero", "spearman"])
    assert s.loc["covariance", "noise_ceiling"] > 0.9
    assert (planted.exp_dir / "predictions.csv").exists() and (planted.exp_dir / "predict_scores.csv").exists()
    pred = result.predictions
    assert list(pred.columns) == ["predictor", "a", "b", "predicted", "observed", "observed_ci_low", "observed_ci_high"]
    assert len(pred) == len(s) * 15
    text = format_scores(result.scores)
    assert "noise ceiling" in text and "[preregistered]" in text and "[exploratory]" in text
    assert "p_relabel" in text


def test_run_predict_leaves_out_a_shift_no_run_varies_on_as_stats_does(tmp_path):
    planted = make_planted(tmp_path, n_sweep=40)
    results = pd.read_csv(planted.exp_dir / "results.csv")
    results[f"acc_{SHIFTS[-1]}"] = 0.0  # a shift no sweep run ever gets right
    results.to_csv(planted.exp_dir / "results.csv", index=False)
    with pytest.warns(UserWarning, match=f"dropping shifts with the same accuracy in every run \\({SHIFTS[-1]}\\)"):
        result = run_predict(planted.exp_dir, predictors=["covariance"], n_boot=0, n_splits=10, n_perm=100)
    assert set(result.predictions.a) | set(result.predictions.b) == set(SHIFTS[:-1])
    assert len(result.predictions) == len(result.scores) * len(SHIFTS[:-1]) * (len(SHIFTS) - 2) // 2
    stamp = json.loads((planted.exp_dir / "predict.json").read_text(encoding="utf-8"))  # which table it scored
    assert stamp["results_sha256"] == hashlib.sha256((planted.exp_dir / "results.csv").read_bytes()).hexdigest()
    assert sorted(stamp["predictors"]) == sorted(result.scores["predictor"])


def test_run_predict_leaves_out_a_shift_constant_within_each_base(tmp_path):
    planted = make_planted(tmp_path, n_sweep=40)
    results = pd.read_csv(planted.exp_dir / "results.csv")
    sweep = results["role"] == "sweep"
    results.loc[sweep, "base"] = np.where(np.arange(sweep.sum()) % 2, "base-1", "base-0")
    results.loc[sweep, f"acc_{SHIFTS[-1]}"] = np.where(results.loc[sweep, "base"] == "base-1", 0.2, 0.1)
    results.to_csv(planted.exp_dir / "results.csv", index=False)
    with pytest.warns(UserWarning, match=f"every run of each base \\({SHIFTS[-1]}\\)"):
        result = run_predict(planted.exp_dir, predictors=["covariance"], n_boot=0, n_splits=10, n_perm=100)
    assert set(result.predictions.a) | set(result.predictions.b) == set(SHIFTS[:-1])


def test_predictors_that_meet_non_finite_values_say_so(tmp_path):
    planted = make_planted(tmp_path, n_sweep=40)
    run = zarr.open_group(planted.exp_dir / "store.zarr", mode="r+")["ref-000"]
    update = run["update"][...]
    update[-3, 0] = np.nan  # a step whose gradient overflowed
    run["update"][...] = update
    run.attrs["nonfinite_steps"] = 1
    with pytest.warns(UserWarning, match="non-finite"):
        result = run_predict(planted.exp_dir, predictors=["covariance", "path_integrated"], n_boot=0, n_splits=10)
    notes = result.scores.set_index("predictor")["note"]
    assert "ref-000" in notes["covariance"] and "NaN or Inf" in notes["covariance"]
    assert notes["path_integrated"] == ("gave no finite prediction: reference runs ['ref-000'] recorded non-finite "
                                        "gradients")


def test_a_registered_predictor_that_fails_or_misbehaves_is_noted_not_fatal(planted, monkeypatch):
    """Predictors added to the registry: one raising any error, one asymmetric (scored on one triangle before),
    one with NaN pairs (all-NaN scores and no note before), one marked baseline after import."""
    from gradtrace.predict import ZeroPredictor

    def predictor(name, matrix=None, error=None, baseline=False):
        def _matrix(self, reference):
            if error:
                raise error
            return matrix(len(reference.shifts))
        return type(name, (ZeroPredictor,), {"name": name, "baseline": baseline, "_matrix": _matrix})

    def lopsided(S):
        m = np.triu(np.ones((S, S)), 1) - np.tril(np.ones((S, S)), -1)
        np.fill_diagonal(m, np.nan)
        return m

    def holed(S):
        m = np.full((S, S), 0.3)
        m[0, 1] = m[1, 0] = np.nan
        np.fill_diagonal(m, np.nan)
        return m

    for cls in (predictor("crashing", error=IndexError("list index out of range")), predictor("lopsided", lopsided),
                predictor("holed", holed), predictor("flat", lambda S: np.zeros((S, S)), baseline=True)):
        monkeypatch.setitem(PREDICTORS, cls.name, cls)
    with pytest.warns(UserWarning, match="could not run"):
        result = run_predict(planted.exp_dir, predictors=["crashing", "lopsided", "holed"], n_boot=0, n_splits=10)
    rows = result.scores.set_index("predictor")
    assert rows.loc["crashing", "note"] == "list index out of range" and np.isnan(rows.loc["crashing", "spearman"])
    assert "not symmetric" in rows.loc["lopsided", "note"] and np.isnan(rows.loc["lopsided", "spearman"])
    assert rows.loc["holed", "note"].startswith("gave no finite prediction for 1 pair(s), e.g. s1~s2")
    assert rows.loc["flat", "group"] == "baseline"  # run with every predict, as the built-in baselines are


def test_run_predict_reports_predictors_that_cannot_run(planted):
    with pytest.warns(UserWarning, match="could not run"):
        result = run_predict(planted.exp_dir, predictors=["minisweep_covariance"], n_boot=0, n_splits=10)
    row = result.scores.set_index("predictor").loc["minisweep_covariance"]
    assert "needs ≥ 2" in row["note"] and np.isnan(row["spearman"]) and np.isnan(row["sign_acc"])
    assert np.isnan(result.scores.set_index("predictor").loc["majority_sign", "pearson"])
    assert "minisweep_covariance" in result.errors
    with pytest.raises(ValueError, match="unknown predictor"):
        run_predict(planted.exp_dir, predictors=["oracle"])


def _id_last(exp_dir: Path, run_id: str = "ref-000") -> None:
    """Rewrite a reference run as a loop of your own recorded it with its probes in another order: ID's last."""
    run = zarr.open_group(exp_dir / "store.zarr")[run_id]
    order = [*range(1, len(SPLITS)), 0]
    for name in ("probe/grad", "probe/grad_adam", "probe/loss", "evals/accuracy"):
        run[name][...] = run[name][:][:, order]
    run.attrs["splits"] = [SPLITS[i] for i in order]


def test_a_reference_run_whose_probes_list_the_id_split_last_predicts_as_with_it_first(tmp_path):
    """The first probe split was taken for ID: predict correlated the shifts given acc_s1 and counted ID as a shift,
    silently (stats, on the same table, takes acc_ID)."""
    planted = make_planted(tmp_path, n_sweep=40)
    expected = run_predict(planted.exp_dir, predictors=["covariance"], n_boot=0, n_splits=10, n_perm=100)
    _id_last(planted.exp_dir)
    reference = load_reference(planted.exp_dir)
    assert reference.id_split == "ID" and reference.shifts == tuple(SHIFTS)
    result = run_predict(planted.exp_dir, predictors=["covariance"], n_boot=0, n_splits=10, n_perm=100)
    pd.testing.assert_frame_equal(result.predictions, expected.predictions)


def test_reference_runs_without_an_id_probe_are_refused(tmp_path):
    planted = make_planted(tmp_path, n_sweep=40)
    zarr.open_group(planted.exp_dir / "store.zarr")["ref-000"].attrs["splits"] = SHIFTS + ["other"]
    with pytest.raises(ValueError, match="no probe of the ID split"):
        load_reference(planted.exp_dir)


def test_runs_recorded_without_probes_are_left_out_of_the_reference_runs(tmp_path):
    """`attach` records every run as a reference run: one recorded without probes stopped predict with "reference
    runs 'ref-000' and 'run-without' have different splits: [...] vs []"."""
    planted = make_planted(tmp_path, n_sweep=40)
    root = zarr.open_group(planted.exp_dir / "store.zarr")
    store.create_run(root, "run-without", {"role": "reference", "status": "complete", "splits": [],
                                           "sketch": dict(root["ref-000"].attrs["sketch"])})
    with pytest.warns(UserWarning, match=r"left out 1 reference run\(s\) that recorded no probe gradients "
                                         r"\(run-without\)"):
        assert [run.run_id for run in load_reference(planted.exp_dir).runs] == ["ref-000"]
    with pytest.raises(ValueError, match=r"runs run-without recorded no probe gradients, which predictors need"):
        load_reference(planted.exp_dir, run_ids=["run-without"])
    del root["ref-000"]
    with pytest.raises(ValueError, match=r"no reference run \(run-without\) recorded probe gradients"):
        load_reference(planted.exp_dir)



def test_run_predict_takes_a_directory_of_your_own_runs_without_a_config(tmp_path):
    """Runs of a loop of your own and a results.csv of your own: predict asked for the config.yaml a sweep writes;
    it now takes the defaults, as stats does (N = 2000 items for the probit clip)."""
    planted = make_planted(tmp_path, n_sweep=40)
    expected = run_predict(planted.exp_dir, predictors=["covariance"], n_boot=0, n_splits=10, n_perm=100)
    (planted.exp_dir / "config.yaml").unlink()
    result = run_predict(planted.exp_dir, predictors=["covariance"], n_boot=0, n_splits=10, n_perm=100)
    pd.testing.assert_frame_equal(result.predictions, expected.predictions)
    (planted.exp_dir / "plan.json").write_text("[]")  # a sweep's directory whose config.yaml is gone
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        run_predict(planted.exp_dir)


def test_run_predict_says_why_a_directory_has_no_results_csv(tmp_path):
    """Beside a sweep that had finished no run yet, or of runs of `gradtrace train`, predict said only what an
    experiment directory needs; it now says why results.csv is not there, in the words stats and report use."""
    (tmp_path / "config.yaml").write_text("{}\n")  # what a sweep writes before its first run: no results.csv yet
    (tmp_path / "plan.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="the sweep planned there has finished no run yet"):
        run_predict(tmp_path)
    (tmp_path / "plan.json").unlink()
    (tmp_path / "store.zarr").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds runs of `gradtrace train` or of a loop of your own"):
        run_predict(tmp_path)


def test_run_predict_takes_one_predictor_by_name_and_makes_its_out_directory(planted, tmp_path):
    """`predictors="covariance"` was read letter by letter (unknown predictor(s) ['c', 'o', …]); an `out` directory
    not yet made failed in pandas once every predictor had run."""
    out = tmp_path / "analysis" / "predict"
    result = run_predict(planted.exp_dir, predictors="covariance", n_boot=0, n_splits=10, n_perm=100, out=out)
    assert "covariance" in result.scores.predictor.tolist()
    assert sorted(p.name for p in out.iterdir()) == ["predict.json", "predict_scores.csv", "predictions.csv"]
