"""Validation of gradtrace.stats: agreement with pingouin, calibration by simulation, refusals, reports."""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from scipy.special import ndtr, ndtri

from gradtrace.stats import (
    _band,
    _bca_ci,
    _bh,
    _corr_matrix,
    _disagreement,
    _fisher_ci,
    _freedman_lane,
    _half_accuracies,
    _holm,
    _jackknife_corr,
    _partial_r,
    _percentile_ci,
    _permutations,
    _probit,
    _resample_indices,
    _residualize,
    _spline_basis,
    _t_pvalue,
    format_table,
    centre_within,
    generalisation_gap,
    partial_correlations,
    runs_needed,
    spearman_brown,
    split_half_reliability,
    stats_report,
    varying_shifts,
)

FAST = dict(n_boot=0, n_perm=0)


def probit_lines(rng, n, sims=None, rho=0.0, sigma=0.15, lines=((-1.0, 1.0), (-0.5, 1.2))):
    """ID accuracy uniform on [0.3, 0.97]; two shifts on probit lines in ID with noise correlated rho."""
    shape = (n,) if sims is None else (sims, n)
    id_acc = rng.uniform(0.3, 0.97, shape)
    e1 = rng.standard_normal(shape)
    e2 = rho * e1 + np.sqrt(1 - rho**2) * rng.standard_normal(shape)
    (a1, b1), (a2, b2) = lines
    z = ndtri(id_acc)
    return id_acc, ndtr(a1 + b1 * z + sigma * e1), ndtr(a2 + b2 * z + sigma * e2)


def table_from(id_acc, *shifts, **extra):
    df = pd.DataFrame({"run_id": [f"r{i}" for i in range(len(id_acc))], "acc_ID": id_acc})
    for j, s in enumerate(shifts):
        df[f"acc_s{j}"] = s
    for name, col in extra.items():
        df[name] = col
    return df


def random_table(rng, n=50, shifts=3):
    """Correlated uniform-ish accuracies in [0, 1]."""
    base = rng.standard_normal((n, 1))
    x = ndtr(0.8 * base + rng.standard_normal((n, shifts + 1)))
    return table_from(x[:, 0], *x[:, 1:].T)


# ------------------------------------------------------------------------------------------------ pingouin


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_matches_pingouin(seed, monkeypatch):
    """r and p agree to 1e-8. pingouin's CI is Fisher z with se = 1/sqrt((n - k) - 3) — the same n - k - 3 as
    ours — but partial_corr rounds it to 6 decimals (and, by default, to 2 for display: switched off here), so
    the CI is compared to pingouin's output at that rounding (5e-7) and to pingouin's own compute_esci with the
    same nx = n - k and no rounding at 1e-12."""
    pg = pytest.importorskip("pingouin")
    from pingouin.effsize import compute_esci

    monkeypatch.setitem(pg.options, "round.column.CI95", None)

    rng = np.random.default_rng(seed)
    df = random_table(rng, n=40 + 10 * seed)
    out = partial_correlations(df, residualize="linear", **FAST)
    assert len(out) == 3
    for row in out.itertuples():
        ref = pg.partial_corr(df, x=f"acc_{row.a}", y=f"acc_{row.b}", covar="acc_ID")
        assert row.n == ref["n"].iloc[0] and row.k == 1 and row.dof == row.n - 3
        assert abs(row.r - ref["r"].iloc[0]) < 1e-8
        assert abs(row.p - ref["p_val"].iloc[0]) < 1e-8
        assert np.allclose([row.ci_low, row.ci_high], ref["CI95"].iloc[0], atol=5e-7 + 1e-12, rtol=0)
        exact = compute_esci(stat=row.r, nx=row.n - row.k, ny=row.n - row.k, eftype="r", decimals=15)
        assert np.allclose([row.ci_low, row.ci_high], exact, atol=1e-12, rtol=0)


def test_core_matches_pingouin_with_several_covariates():
    pg = pytest.importorskip("pingouin")
    rng = np.random.default_rng(3)
    df = pd.DataFrame(rng.standard_normal((35, 5)), columns=list("xyabc"))
    df["y"] += 0.5 * df["x"] + df["a"]
    ref = pg.partial_corr(df, x="x", y="y", covar=["a", "b", "c"])
    r = _partial_r(df["x"].to_numpy(), df["y"].to_numpy(), df[["a", "b", "c"]].to_numpy())
    assert abs(r - ref["r"].iloc[0]) < 1e-10
    assert abs(_t_pvalue(r, 35 - 3 - 2) - ref["p_val"].iloc[0]) < 1e-10


def test_t_pvalue_is_zero_only_at_a_perfect_correlation():
    import scipy.stats as sps

    r = 0.999996
    exact = 2 * sps.t.sf(r * np.sqrt(2 / (1 - r**2)), 2)  # ~4e-6
    assert exact > 0 and _t_pvalue(r, 2) == pytest.approx(exact, rel=1e-6)
    assert _t_pvalue(np.array([1.0, -1.0]), 5).tolist() == [0.0, 0.0]


def grouped_table(rng, n_groups=4, per_group=15, offset=1.5):
    """Runs in groups (bases) whose shifts share a group offset: correlated across groups, not within them."""
    groups = np.repeat(np.arange(n_groups), per_group)
    shared = offset * rng.standard_normal(n_groups)[groups]
    x = ndtr(0.4 * rng.standard_normal((len(groups), 4)) + shared[:, None] * np.array([0.3, 1, 1, -1]))
    return table_from(x[:, 0], *x[:, 1:].T, base=[f"base-{g}" for g in groups])


def test_within_groups_matches_pingouin_with_group_indicators():
    """Fixed effects: r and p equal pingouin's partial correlation given ID and the groups' indicator columns."""
    pg = pytest.importorskip("pingouin")
    df = grouped_table(np.random.default_rng(21))
    dummies = pd.get_dummies(df["base"], drop_first=True, dtype=float)
    joined = pd.concat([df, dummies], axis=1)
    out = partial_correlations(df, residualize="linear", within="base", **FAST)
    pooled = partial_correlations(df, residualize="linear", **FAST)
    for row in out.itertuples():
        ref = pg.partial_corr(joined, x=f"acc_{row.a}", y=f"acc_{row.b}", covar=["acc_ID", *dummies.columns])
        assert row.k == 1 + 3 and row.dof == row.n - row.k - 2
        assert abs(row.r - ref["r"].iloc[0]) < 1e-8 and abs(row.p - ref["p_val"].iloc[0]) < 1e-8
    # the planted between-group offsets correlate the shifts pooled; within groups they are independent
    assert (pooled["r"].abs() > 0.5).all() and (out["r"].abs() < 0.4).all()


def test_within_groups_resamples_and_permutes_inside_each_group():
    groups = np.repeat([0, 1, 2], [5, 7, 4])
    rng = np.random.default_rng(0)
    for idx in (_resample_indices(16, 30, None, rng, groups), _permutations(16, 30, rng, groups)):
        assert idx.shape == (30, 16) and (groups[idx] == groups).all()
    perms = _permutations(16, 30, rng, groups)
    assert (np.sort(perms, axis=1) == np.arange(16)).all()
    df = grouped_table(np.random.default_rng(22))
    out = partial_correlations(df, within="base", n_boot=200, n_perm=200)
    assert (out["boot_ci_low"] <= out["r"]).all() and (out["r"] <= out["boot_ci_high"]).all()
    assert out["p_perm"].between(0, 1).all()


def test_within_groups_refusals():
    df = grouped_table(np.random.default_rng(23))
    with pytest.raises(ValueError, match="not a column"):
        partial_correlations(df, within="nope", **FAST)
    with pytest.raises(ValueError, match="single run"):
        partial_correlations(df.iloc[:-14], within="base", **FAST)
    by_base = df.assign(acc_s0=df["base"].map({b: 0.1 * (i + 1) for i, b in enumerate(sorted(set(df["base"])))}))
    with pytest.raises(ValueError, match="constant within every base"):  # it blamed ID accuracy
        partial_correlations(by_base, within="base", **FAST)


def test_core_is_batched():
    rng = np.random.default_rng(4)
    x, y, Z = rng.standard_normal((6, 30)), rng.standard_normal((6, 30)), rng.standard_normal((6, 30, 2))
    batched = _partial_r(x, y, Z)
    assert batched.shape == (6,)
    assert np.allclose(batched, [_partial_r(x[i], y[i], Z[i]) for i in range(6)], atol=1e-12)
    # a 1-d covariate and a covariate shared by the whole batch broadcast
    assert np.allclose(_partial_r(x, y, Z[0, :, 0]), [_partial_r(x[i], y[i], Z[0, :, 0]) for i in range(6)])


# ------------------------------------------------------------------------------------------------ calibration


def _rejections(id_acc, a, b, alpha=0.05):
    """Per-simulation rejection at alpha under each residualisation, vectorised over simulations."""
    n = id_acc.shape[-1]
    out = {"linear": _t_pvalue(_partial_r(a, b, id_acc), n - 3) < alpha}
    pa, pb, pid = _probit(a, 2000), _probit(b, 2000), _probit(id_acc, 2000)
    out["probit"] = _t_pvalue(_partial_r(pa, pb, pid), n - 3) < alpha
    basis = np.stack([_spline_basis(z, 4) for z in pid])
    k = basis.shape[-1]
    out["spline"] = _t_pvalue(_partial_r(pa, pb, basis), n - k - 2) < alpha
    return out


def test_null_false_positive_rate():
    """Two shifts on probit lines in ID with independent noise: probit and spline hold alpha, linear does not."""
    rng = np.random.default_rng(0)
    rej = _rejections(*probit_lines(rng, n=60, sims=4000))
    rate = {m: v.mean() for m, v in rej.items()}
    assert 0.035 <= rate["probit"] <= 0.065, rate
    assert 0.035 <= rate["spline"] <= 0.065, rate
    assert rate["linear"] > 0.2, rate  # raw-scale residualisation manufactures correlation


def test_api_matches_vectorised_core_on_simulated_cases():
    rng = np.random.default_rng(1)
    for _ in range(3):
        id_acc, a, b = probit_lines(rng, n=60)
        out = partial_correlations(table_from(id_acc, a, b), residualize="all", **FAST).set_index("residualize")
        pid = _probit(id_acc, 2000)
        assert np.isclose(out.loc["linear", "r"], _partial_r(a, b, id_acc), atol=1e-12)
        assert np.isclose(out.loc["probit", "r"], _partial_r(_probit(a, 2000), _probit(b, 2000), pid), atol=1e-12)
        assert np.isclose(out.loc["spline", "r"],
                          _partial_r(_probit(a, 2000), _probit(b, 2000), _spline_basis(pid, 4)), atol=1e-12)
        assert out.loc["spline", "k"] == 5 and out.loc["spline", "dof"] == 60 - 5 - 2
        assert np.isclose(out.loc["spline", "p"], _t_pvalue(out.loc["spline", "r"], 53))


def test_probit_clips_accuracies_half_an_item_from_0_and_1():
    """Phi^-1 of 0 and 1 is taken at 1/(2N) and 1 - 1/(2N), N the split's items (n_items per split). The test above
    compares the API with _probit itself, so a clip a whole item from the boundary went unnoticed."""
    np.testing.assert_allclose(_probit(np.array([0.0, 1.0, 0.3]), 50), ndtri([0.01, 0.99, 0.3]), rtol=1e-12)
    np.testing.assert_allclose(_probit(np.array([[0.0, 1.0]]), np.array([10, 1000])), ndtri([[0.05, 0.9995]]))
    rng = np.random.default_rng(24)
    n = 30
    id_acc, a, b = probit_lines(rng, n=n, rho=0.4, sigma=0.3)
    id_acc[0], a[3], b[7] = 1.0, 1.0, 0.0  # runs at the boundary on splits of 500 and 40 items
    out = partial_correlations(table_from(id_acc, a, b), residualize="probit",
                               n_items={"ID": 500, "s0": 40, "s1": 40}, **FAST).iloc[0]
    X = np.c_[np.ones(n), ndtri(np.clip(id_acc, 1 / 1000, 1 - 1 / 1000))]

    def resid(acc):  # least-squares residuals of the clipped probit accuracy on [1, probit ID]
        y = ndtri(np.clip(acc, 1 / 80, 1 - 1 / 80))
        return y - X @ np.linalg.lstsq(X, y, rcond=None)[0]

    assert out.r == pytest.approx(np.corrcoef(resid(a), resid(b))[0, 1], abs=1e-12)


def test_spline_counts_the_covariates_its_tied_basis_spans():
    """ID at 5 distinct accuracies: the spline basis spans every function of them (rank 5 with the intercept), so
    k = 4 and the residuals are each ID level's deviations from its mean. Counting the basis' 5 columns (k = 5)
    would take a degree of freedom too many from p and the CI."""
    rng = np.random.default_rng(0)
    n = 40
    id_acc = np.repeat([0.55, 0.65, 0.75, 0.85, 0.9], 8)
    a, b = (ndtr(ndtri(id_acc) + 0.3 * rng.standard_normal(n)) for _ in range(2))
    out = partial_correlations(table_from(id_acc, a, b), residualize="spline", **FAST).iloc[0]

    def level(acc):  # deviation of probit accuracy from its ID level's mean
        z = ndtri(acc)
        return z - pd.Series(z).groupby(id_acc).transform("mean").to_numpy()

    r = np.corrcoef(level(a), level(b))[0, 1]
    assert out.k == 4 and out.dof == n - 4 - 2
    assert out.r == pytest.approx(r, abs=1e-10)
    assert out.p == pytest.approx(2 * sps.t.sf(abs(r) * np.sqrt((n - 6) / (1 - r**2)), n - 6), rel=1e-8)
    half = ndtri(0.975) / np.sqrt(n - 4 - 3)
    assert [out.ci_low, out.ci_high] == pytest.approx(np.tanh(np.arctanh(r) + np.array([-half, half])), abs=1e-10)


def test_disagree_flag_follows_sign_and_significance():
    rng = np.random.default_rng(2)
    id_acc, a, b = probit_lines(rng, n=60)
    c = ndtr(0.3 + ndtri(id_acc) + 0.2 * rng.standard_normal(60))
    out = partial_correlations(table_from(id_acc, a, b, c), residualize="all", **FAST)
    for _, g in out.groupby(["a", "b"]):
        expected = g["r"].apply(np.sign).nunique() > 1 or (g["p"] < 0.05).nunique() > 1
        assert (g["disagree"] == expected).all()
    assert out["disagree"].any()  # linear is spuriously significant here, probit is not
    single = partial_correlations(table_from(id_acc, a, b), residualize="probit", **FAST)
    assert single["disagree"].isna().all()


def test_disagreement_reads_significance_at_the_given_alpha():
    """`alpha` sets where p counts as significant: p = 0.03 beside p = 0.07 disagree at 0.05, not at 0.1 or 0.01
    (the test above only meets the default alpha)."""
    out = pd.DataFrame({"a": ["x", "x", "x", "x"], "b": ["y", "y", "z", "z"], "r": [0.3, 0.2, 0.3, 0.2],
                        "p": [0.03, 0.07, 0.5, 0.6]})
    assert _disagreement(out, 0.05).tolist() == [True, True, False, False]
    assert not _disagreement(out, 0.1).any() and not _disagreement(out, 0.01).any()
    assert _disagreement(out.assign(r=[0.3, 0.2, 0.3, -0.2]), 0.1).tolist() == [False, False, True, True]


@pytest.mark.parametrize("method", ["probit", "spline"])
def test_fisher_ci_coverage(method):
    """Planted partial correlation 0.4 on probit axes: the Fisher-z CI (dof n - k - 3) covers it 95% +- 2%."""
    rng = np.random.default_rng(5)
    rho, n, sims = 0.4, 60, 3000
    id_acc, a, b = probit_lines(rng, n=n, sims=sims, rho=rho, sigma=0.3)
    pid = _probit(id_acc, 2000)
    Z = pid if method == "probit" else np.stack([_spline_basis(z, 4) for z in pid])
    k = 1 if method == "probit" else Z.shape[-1]
    r = _partial_r(_probit(a, 2000), _probit(b, 2000), Z)
    lo, hi = _fisher_ci(r, n, k, 0.95)
    coverage = np.mean((lo <= rho) & (rho <= hi))
    assert 0.93 <= coverage <= 0.97, coverage


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_cis_agree_with_scipy():
    """Our vectorised percentile and BCa CIs agree with scipy.stats.bootstrap up to Monte Carlo error."""
    rng = np.random.default_rng(6)
    id_acc, a, b = probit_lines(rng, n=50, rho=0.5, sigma=0.3)
    out = partial_correlations(table_from(id_acc, a, b), residualize="linear", n_boot=4000, n_perm=0).iloc[0]
    Z = id_acc[:, None]

    def stat(idx, axis=-1):
        return _partial_r(a[idx], b[idx], Z[idx])

    for method, cols in (("percentile", ("boot_ci_low", "boot_ci_high")), ("BCa", ("bca_ci_low", "bca_ci_high"))):
        ref = sps.bootstrap((np.arange(50),), stat, n_resamples=4000, method=method, rng=np.random.default_rng(7),
                            vectorized=True).confidence_interval
        ours = [out[cols[0]], out[cols[1]]]
        assert np.allclose(ours, [ref.low, ref.high], atol=0.025), (method, ours, ref)
    # sanity: intervals are ordered, contain r, and resemble the Fisher interval at this n
    for lo, hi in (("boot_ci_low", "boot_ci_high"), ("bca_ci_low", "bca_ci_high"), ("ci_low", "ci_high")):
        assert out[lo] < out["r"] < out[hi]
        assert abs(out[lo] - out["ci_low"]) < 0.12 and abs(out[hi] - out["ci_high"]) < 0.12


def test_resampling_is_reproducible_and_skippable():
    df = random_table(np.random.default_rng(8), n=30)
    one = partial_correlations(df, n_boot=300, n_perm=300, seed=3)
    two = partial_correlations(df, n_boot=300, n_perm=300, seed=3)
    pd.testing.assert_frame_equal(one, two)
    skipped = partial_correlations(df, **FAST)
    assert skipped[["p_perm", "boot_ci_low", "bca_ci_high"]].isna().all().all()
    assert np.allclose(skipped["r"], one["r"])


def test_block_bootstrap_indices_are_contiguous_blocks():
    idx = _resample_indices(20, 50, 4, np.random.default_rng(0))
    assert idx.shape == (50, 20) and idx.min() >= 0 and idx.max() < 20
    assert (np.diff(idx.reshape(50, 5, 4), axis=-1) == 1).all()


def test_resamples_draw_every_run_and_every_block_start_equally_often():
    """Each row (within its group) is drawn once per resample on average, and moving blocks start at every
    position 0..n-b alike: a draw that never reached a group's last row, or a last block start never taken, kept
    the shape, range and group checks above passing."""
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2], [5, 7, 4])
    for g in (None, groups):
        counts = np.bincount(_resample_indices(16, 4000, None, rng, g).ravel(), minlength=16)
        assert np.abs(counts / 4000 - 1).max() < 0.1, counts  # sd of each ratio ≈ 0.016
    starts = _resample_indices(20, 4000, 4, rng)[:, ::4]  # 5 blocks of 4: the first index of each is its start
    counts = np.bincount(starts.ravel(), minlength=17)
    assert len(counts) == 17 and np.abs(counts / (starts.size / 17) - 1).max() < 0.15, counts


def test_percentile_and_bca_ends_equal_scipys_on_the_same_resamples():
    """Given scipy.stats.bootstrap's own resampled statistics, both intervals' ends are scipy's to rounding, BCa's
    with the jackknife from `_jackknife_corr`. The comparison above draws other resamples and allows 0.025, which
    BCa met with its acceleration left out (a = 0) or doubled, and the percentile interval at 2.27% and 97.73%."""
    rng = np.random.default_rng(30)
    n = 25
    id_acc, a, b = probit_lines(rng, n=n, rho=0.8, sigma=0.3)
    Z = id_acc[:, None]

    def stat(idx, axis=-1):
        return _partial_r(a[idx], b[idx], Z[idx])

    r = np.array([_partial_r(a, b, id_acc)])
    jack = _jackknife_corr(np.c_[a, b], Z, None)[:, 0, 1]
    d = jack.mean() - jack
    assert abs(np.sum(d**3) / (6 * np.sum(d**2) ** 1.5)) > 0.005  # an acceleration that moves the ends
    for method in ("percentile", "BCa"):
        res = sps.bootstrap((np.arange(n),), stat, n_resamples=2000, method=method, rng=np.random.default_rng(7),
                            vectorized=True)
        theta_b = res.bootstrap_distribution[:, None]
        ours = _percentile_ci(theta_b, 0.95) if method == "percentile" else _bca_ci(theta_b, r, jack[:, None], 0.95)
        ref = res.confidence_interval
        np.testing.assert_allclose(np.ravel(ours), [ref.low, ref.high], rtol=0, atol=1e-12, err_msg=method)


@pytest.mark.parametrize("n, block, singletons", [(40, None, False), (40, None, True), (37, 4, False), (36, 4, True)])
def test_jackknife_equals_refitting_without_each_row_or_block(n, block, singletons):
    """BCa's jackknife, from the full fit alone, equals refitting with each row (block of checkpoints) deleted, also
    where a deletion removes a group's every member and leaves a design of lower rank."""
    rng = np.random.default_rng(12)
    Z = rng.standard_normal((n, 2))
    Y = Z @ rng.standard_normal((2, 4)) + rng.standard_normal((n, 4))
    if singletons:  # groups of one run (n = 40), or one group that is the last block of checkpoints
        Z = np.c_[Z, np.eye(n)[:, -4:] if block is None else np.r_[np.zeros(n - 4), np.ones(4)]]
    rows = np.arange(n)
    deleted = rows[:, None] if block is None else np.array_split(rows, -(-n // block))
    refits = [np.setdiff1d(rows, d) for d in deleted]
    ref = np.stack([_corr_matrix(_residualize(Y[keep], Z[keep])) for keep in refits])
    assert np.allclose(_jackknife_corr(Y, Z, block), ref, atol=1e-12)


# ---------------------------------------------------------------------------------------- permutation, adjustment


def test_freedman_lane_matches_loop_and_parametric():
    rng = np.random.default_rng(9)
    n = 40
    Z = rng.standard_normal((n, 2))
    Y = Z @ rng.standard_normal((2, 3)) + rng.standard_normal((n, 3))
    Y[:, 1] += 0.3 * Y[:, 0]
    ia, ib = np.triu_indices(3, k=1)
    r = np.array([_partial_r(Y[:, i], Y[:, j], Z) for i, j in zip(ia, ib)])
    perms = np.stack([rng.permutation(n) for _ in range(200)])
    p = _freedman_lane(Y, Z, r, perms, ia, ib)
    # the same test, one permutation at a time: y* = fitted + permuted residuals, refit the partial correlation
    for q, i, j, r_ij in zip(p, ia, ib, r):
        fitted = Y[:, j] - _residualize(Y[:, [j]], Z)[:, 0]
        resid = Y[:, j] - fitted
        r_star = np.array([_partial_r(Y[:, i], fitted + resid[perm], Z) for perm in perms])
        assert q == (1 + np.sum(np.abs(r_star) >= np.abs(r_ij) - 1e-12)) / (1 + len(perms))
    big = partial_correlations(random_table(rng, n=80), n_boot=0, n_perm=2000)
    assert np.allclose(big["p_perm"], big["p"], atol=0.05)


def test_freedman_lane_counts_the_unpermuted_rows_as_extreme_as_themselves():
    """The identity permutation reproduces r up to rounding and must count as at least as extreme: nine of them
    give p = (1 + 9) / (1 + 9) = 1, not 1/10."""
    rng = np.random.default_rng(9)
    n = 30
    Z = rng.standard_normal((n, 2))
    Y = Z @ rng.standard_normal((2, 3)) + rng.standard_normal((n, 3))
    ia, ib = np.triu_indices(3, k=1)
    r = _corr_matrix(_residualize(Y, Z))[ia, ib]
    assert (_freedman_lane(Y, Z, r, np.tile(np.arange(n), (9, 1)), ia, ib) == 1).all()


def test_holm_and_bh_hand_computed():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    assert np.allclose(_holm(p), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(_bh(p), [0.02, 0.04, 0.04, 0.02])


def test_holm_equals_statsmodels_with_ties_and_nan():
    from statsmodels.stats.multitest import multipletests

    for p in ([0.01, np.nan, 0.03, 0.5, 0.5], [0.2, 0.01, 0.2, 0.04, 0.9, 0.0], [0.3]):
        np.testing.assert_allclose(_holm(np.array(p)), multipletests(np.array(p), method="holm")[1])
    assert _holm(np.array([])).shape == (0,)  # statsmodels 0.14.0 divides by zero on no p-values


def test_adjustment_is_within_each_residualisation():
    from statsmodels.stats.multitest import multipletests

    df = random_table(np.random.default_rng(10), n=40, shifts=4)
    out = partial_correlations(df, residualize="all", **FAST)
    assert len(out) == 3 * 6
    for _, g in out.groupby("residualize"):
        assert np.allclose(g["p_holm"], multipletests(g["p"], method="holm")[1])
        assert np.allclose(g["p_bh"], multipletests(g["p"], method="fdr_bh")[1])


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_warn_note_and_order_by_step():
    rng = np.random.default_rng(11)
    df = random_table(rng, n=40).assign(run_id="run0", step=np.arange(40) * 10)
    with pytest.warns(UserWarning, match="naive p-values"):
        out = partial_correlations(df, unit="checkpoints", n_boot=200, n_perm=0)
    assert (out["unit"] == "checkpoints").all() and out["note"].str.contains("block-bootstrap").all()
    assert out[["boot_ci_low", "bca_ci_low"]].notna().all().all()
    shuffled = df.sample(frac=1, random_state=0)
    with pytest.warns(UserWarning):
        again = partial_correlations(shuffled, unit="checkpoints", n_boot=200, n_perm=0)
    pd.testing.assert_frame_equal(out, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (partial_correlations(df.drop(columns=["step", "run_id"]), **FAST)["note"] == "").all()
    with pytest.raises(ValueError, match="leaves nothing to resample among the 40 checkpoints"):
        partial_correlations(df, unit="checkpoints", block_length=40, **FAST)  # every resample the same rows


def test_checkpoints_default_block_is_the_cube_root_of_their_number():
    """block_length=None takes round(n^(1/3)) checkpoints a block, as documented: 3 of 40 (not √40 ≈ 6)."""
    df = random_table(np.random.default_rng(11), n=40).assign(run_id="run0", step=np.arange(40))
    with pytest.warns(UserWarning, match="naive p-values"):
        default = partial_correlations(df, unit="checkpoints", n_boot=100, n_perm=0, seed=1)
    with pytest.warns(UserWarning, match="naive p-values"):
        three = partial_correlations(df, unit="checkpoints", n_boot=100, n_perm=0, seed=1, block_length=3)
    with pytest.warns(UserWarning, match="naive p-values"):
        six = partial_correlations(df, unit="checkpoints", n_boot=100, n_perm=0, seed=1, block_length=6)
    pd.testing.assert_frame_equal(default, three)
    assert not np.allclose(default["boot_ci_low"], six["boot_ci_low"])


def test_checkpoint_items_follow_their_rows_when_the_table_is_out_of_step_order():
    """Items come in the table's row order; checkpoints are sorted by step and their items must move with them:
    a shuffled table and its items give what the sorted ones give."""
    rng = np.random.default_rng(40)
    n = 30
    id_acc, pa, pb = probit_lines(rng, n=n, rho=0.5, sigma=0.3)
    items = {"s0": _items(rng, pa, 100), "s1": _items(rng, pb, 100)}
    df = table_from(id_acc, items["s0"].mean(1), items["s1"].mean(1)).assign(run_id="run0", step=np.arange(n) * 5)
    order = rng.permutation(n)
    with pytest.warns(UserWarning, match="naive p-values"):
        in_order = partial_correlations(df, unit="checkpoints", items=items, n_splits=10, **FAST)
    with pytest.warns(UserWarning, match="naive p-values"):
        shuffled = partial_correlations(df.iloc[order], unit="checkpoints", n_splits=10, **FAST,
                                        items={s: v[order] for s, v in items.items()})
    pd.testing.assert_frame_equal(in_order, shuffled)
    assert shuffled[["rel_a", "rel_b"]].notna().all().all()


# ------------------------------------------------------------------------------------------------ refusals


def test_too_few_runs_says_how_many_are_needed():
    assert runs_needed(0.3, 0.2, k=1) == 82
    df = random_table(np.random.default_rng(12), n=4)
    with pytest.raises(ValueError, match=r"n=4.*k \+ 4 = 5.*82 runs"):
        partial_correlations(df, residualize="linear", **FAST)
    df = random_table(np.random.default_rng(12), n=5)  # the spline's 5 columns have rank 4 in 5 rows: still 9 needed
    with pytest.raises(ValueError, match=r"n=5.*k=5.*k \+ 4 = 9"):
        partial_correlations(df, residualize="spline", **FAST)
    df = random_table(np.random.default_rng(12), n=8)
    partial_correlations(df, residualize="probit", **FAST)  # 8 >= 1 + 4
    with pytest.warns(UserWarning, match=r"residualize='spline' left out, the others computed: too few rows for "
                                         r"residualize='spline'.*k=5.*spline_knots"):  # it refused all three
        out = partial_correlations(df, residualize="all", **FAST)
    assert list(out.residualize.unique()) == ["linear", "probit"] and out.disagree.notna().all()


def test_runs_needed_is_the_fewest_runs_whose_interval_is_narrow_enough():
    """Checked against the Fisher-z half-width itself, down to the fewest runs a CI allows (k + 4)."""
    def half_width(n, r, k):
        z, c = np.arctanh(r), ndtri(0.975) / np.sqrt(n - k - 3)
        return (np.tanh(z + c) - np.tanh(z - c)) / 2

    for r, hw, k in [(0.3, 0.2, 1), (0.0, 0.99, 1), (0.0, 0.99, 4), (0.6, 0.1, 3), (-0.5, 0.3, 6)]:
        n = runs_needed(r, hw, k)
        assert n >= k + 4 and half_width(n, r, k) <= hw, (r, hw, k, n)
        assert n == k + 4 or half_width(n - 1, r, k) > hw, (r, hw, k, n)
    assert runs_needed(0.0, 0.99, k=1) == 5 and runs_needed(0.0, 0.99, k=4) == 8


def test_all_residualisations_leave_out_one_whose_curve_fits_a_shift_exactly():
    """The default `gradtrace stats` (`all`) failed outright where the spline of ID fits one shift exactly."""
    rng = np.random.default_rng(15)
    df = random_table(rng, n=20)
    df["acc_ID"] = ndtr(rng.uniform(-1, 1, 20))  # probit ID away from the clipped ends
    df["acc_s1"] = ndtr(0.3 + ndtri(df["acc_ID"]) - 0.2 * ndtri(df["acc_ID"]) ** 2)  # a curve in probit ID
    with pytest.warns(UserWarning, match=r"residualize='spline' left out.*\['s1'\] are exactly determined"):
        out = partial_correlations(df, residualize="all", **FAST)
    assert set(out.residualize) == {"linear", "probit"}
    with pytest.raises(ValueError, match=r"\['s1'\] are exactly determined.*residualize='spline'"):
        partial_correlations(df, residualize="spline", **FAST)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.assign(acc_s1=0.5), "constant accuracy in \\['acc_s1'\\]"),
        (lambda d: d.assign(acc_s0=d["acc_s0"].where(d.index != 3)), "NaN accuracies in \\['acc_s0'\\]"),
        (lambda d: d.assign(acc_s2=d["acc_s2"] * 100), "out of range.*percentages"),
        (lambda d: d.assign(acc_ID=d["acc_ID"] - 1), "out of range"),
        (lambda d: d.assign(run_id=["r0"] * 2 + list(d["run_id"][2:])), "duplicate run ids \\['r0'\\]"),
        (lambda d: d.drop(columns="acc_ID"), "no ID accuracy column 'acc_ID'"),
        (lambda d: d[["run_id", "acc_ID", "acc_s0"]], "list at least two shifts that vary across runs in task.shifts"),
        (lambda d: d.assign(acc_s1=ndtr(0.3 + ndtri(d["acc_ID"]))), r"exactly determined by the covariates \(ID"),
        (lambda d: pd.concat([d, d[["acc_s0"]]], axis=1), "several columns named \\['acc_s0'\\]"),
    ],
)
def test_refusals(mutate, match):
    df = random_table(np.random.default_rng(13), n=20)
    with pytest.raises(ValueError, match=match):
        partial_correlations(mutate(df), **FAST)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(residualize="logit"), "residualize='logit'"),
        (dict(unit="steps"), "unit='steps'"),
        (dict(unit="checkpoints"), "'step' column"),
        (dict(n_boot=-1), "n_boot"),
        (dict(block_length=3), "block_length only applies"),
        (dict(shifts=["s0", "nope"]), "\\['nope'\\]"),
        (dict(n_boot=1), "n_boot=1 resamples cannot place the ends of a 95% interval"),
        (dict(n_boot=10, confidence=0.9), "give at least 20"),
        (dict(seed=None), "seed=None"),
        (dict(seed=-1), "seed=-1"),
        (dict(confidence="0.95"), "confidence='0.95'"),
    ],
)
def test_argument_refusals(kwargs, match):
    df = random_table(np.random.default_rng(14), n=20)
    with pytest.raises(ValueError, match=match):
        partial_correlations(df, **{**FAST, **kwargs})


def test_missing_labels_steps_and_items_are_refused():
    df = random_table(np.random.default_rng(15), n=20).assign(base=["x"] * 10 + [None] * 10)
    with pytest.raises(ValueError, match="no group label"):
        partial_correlations(df, within="base", **FAST)  # once pooled silently into a group called "None"
    with pytest.raises(ValueError, match="missing label"):
        centre_within(np.ones((4, 2)), np.array([0.0, 0.0, np.nan, np.nan]))  # all-NaN rows before
    steps = df.drop(columns="base").assign(run_id="run0", step=[np.nan, *range(1, 20)])
    with pytest.raises(ValueError, match="'step' holds a missing value"):
        partial_correlations(steps, unit="checkpoints", **FAST)
    items = {"s0": np.where(np.arange(20)[:, None] < 1, np.nan, 1.0) * np.ones((20, 4))}
    with pytest.raises(ValueError, match="0/1"):
        partial_correlations(df.drop(columns="base"), items=items, **FAST)


def test_checkpoints_without_bootstrap():
    df = random_table(np.random.default_rng(16), n=30).assign(run_id="run0", step=np.arange(30))
    with pytest.warns(UserWarning, match="naive p-values"):
        out = partial_correlations(df, unit="checkpoints", **FAST)  # the block bootstrap's indices failed to form
    assert out["boot_ci_low"].isna().all() and out["r"].notna().all()


# ------------------------------------------------------------------------------------------------ reliability


def _items(rng, p, m):
    return rng.random((len(p), m)) < p[:, None]


def test_split_half_reliability_recovers_known_value():
    rng = np.random.default_rng(15)
    p = rng.uniform(0.3, 0.7, 400)
    items = {"noisy": _items(rng, p, 100), "clean": _items(rng, p, 4000)}
    with pytest.warns(UserWarning, match="noisy"):
        rel = split_half_reliability(items, n_splits=50).set_index("split")
    for split, m in (("noisy", 100), ("clean", 4000)):
        truth = p.var() / (p.var() + np.mean(p * (1 - p)) / m)  # true-score variance / observed variance
        assert abs(rel.loc[split, "reliability"] - truth) < 0.04, (split, rel.loc[split, "reliability"], truth)
        assert rel.loc[split, "n_items"] == m and rel.loc[split, "n_runs"] == 400
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split_half_reliability({"clean": items["clean"]})


def _fixed_total_items(rng, totals, m):
    """Per-item correctness whose run totals are `totals`, at random positions: the two halves of a split trade
    items one for one, so their accuracies correlate negatively across runs."""
    return np.array([rng.permutation(np.arange(m) < t) for t in totals])


def test_split_halves_hold_every_item_once_for_an_odd_count_too():
    """A split of m items halves them into m // 2 and m − m // 2, disjoint and covering all, each half's accuracy its
    items' mean: of 41 items, one run all right gives 1 in both halves. Dividing the larger half by m // 2 passed
    every other test (their item counts are even, or their reliabilities blind to a scale): under probit it changed
    a disattenuated r near the ceiling from 0.26 to 0.32."""
    rng = np.random.default_rng(4)
    items = np.vstack([np.ones(41, bool), rng.random((29, 41)) < 0.6])
    first, second, m1, m2 = _half_accuracies(items, n_splits=20, seed=3)
    assert (m1, m2) == (20, 21) and first.shape == second.shape == (30, 20)
    np.testing.assert_allclose(m1 * first + m2 * second, np.repeat(items.sum(1)[:, None], 20, axis=1))
    np.testing.assert_array_equal([first[0], second[0]], np.ones((2, 20)))
    assert first.min() >= 0 and second.min() >= 0


def test_spearman_brown_gives_zero_where_halves_agree_no_better_than_chance():
    assert spearman_brown(0.5) == pytest.approx(2 / 3) and spearman_brown(0.5, length=3) == pytest.approx(0.75)
    np.testing.assert_array_equal(spearman_brown([-0.75, -1.0, 0.0]), [0.0, 0.0, 0.0])  # the formula: −6, −inf, 0
    assert np.isnan(spearman_brown(np.nan))


def test_split_half_reliability_without_between_run_signal_is_zero_not_negative():
    rng = np.random.default_rng(3)
    items = _fixed_total_items(rng, rng.integers(48, 53, 60), 100)  # the halves' accuracies sum to ~0.5 in each run
    with pytest.warns(UserWarning, match=r"noise \(0.00\)"):
        rel = split_half_reliability({"noise": items}, n_splits=20)
    assert rel["reliability"].iloc[0] == 0 and rel["reliability_sd"].iloc[0] == 0  # was −36 (rho ≈ −0.95)


def test_item_correctness_other_than_zeros_and_ones_is_refused():
    rng = np.random.default_rng(4)
    n, m = 40, 50
    items = {s: (rng.random((n, m)) < 0.5).astype(float) for s in ("ID", "s0", "s1")}
    df = table_from(items["ID"].mean(1), items["s0"].mean(1), items["s1"].mean(1))
    assert len(partial_correlations(df, residualize="linear", items=items, n_splits=5, **FAST)) == 1
    assert len(partial_correlations(df, residualize="linear", items={k: v.astype(bool) for k, v in items.items()},
                                    n_splits=5, **FAST)) == 1
    for other in (np.nan, 2.0, 0.5):
        bad = {**items, "s1": items["s1"].copy()}
        bad["s1"][3, 7] = other
        with pytest.raises(ValueError, match=r"items\['s1'\] must hold 0/1 \(or bool\) correctness"):
            partial_correlations(df, residualize="linear", items=bad, n_splits=5, **FAST)
        with pytest.raises(ValueError, match=r"items\['s1'\] must hold 0/1 \(or bool\) correctness"):
            split_half_reliability(bad, n_splits=5)


def test_disattenuation_is_missing_where_a_reliability_is_zero():
    """Two shifts without between-run signal in their items: reliabilities 0, nothing to disattenuate (their
    negative Spearman–Brown values multiplied to a positive product and gave a finite r_disattenuated)."""
    rng = np.random.default_rng(5)
    n, m = 80, 100
    id_acc = rng.uniform(0.4, 0.9, n)
    items = {s: _fixed_total_items(rng, rng.integers(48, 53, n), m) for s in ("s0", "s1")}
    df = table_from(id_acc, items["s0"].mean(1), items["s1"].mean(1))
    out = partial_correlations(df, residualize="linear", items=items, n_splits=20, **FAST)
    assert (out["rel_a"] == 0).all() and (out["rel_b"] == 0).all()
    assert out["r_disattenuated"].isna().all() and out["r"].notna().all()
    assert "r_dis nan: a reliability of 0" in format_table(out)


def test_disattenuation_moves_r_towards_the_planted_value():
    rng = np.random.default_rng(16)
    n, rho = 300, 0.6
    id_acc, pa, pb = probit_lines(rng, n=n, rho=rho, sigma=0.35, lines=((-0.3, 0.8), (0.0, 0.9)))
    items = {"s0": _items(rng, pa, 60), "s1": _items(rng, pb, 60)}
    df = table_from(id_acc, items["s0"].mean(1), items["s1"].mean(1))
    out = partial_correlations(df, residualize="all", items=items, **FAST).set_index("residualize")
    assert np.allclose(out["r_disattenuated"], out["r"] / np.sqrt(out["rel_a"] * out["rel_b"]))
    assert (out["rel_a"] < 1).all() and (out["rel_a"] > 0.3).all()
    for m in ("probit", "spline"):
        assert abs(out.loc[m, "r_disattenuated"] - rho) < abs(out.loc[m, "r"] - rho)
        assert abs(out.loc[m, "r_disattenuated"] - rho) < 0.12
    with pytest.raises(ValueError, match="same order"):
        partial_correlations(df, items={"s0": items["s0"][::-1]}, **FAST)


def test_disattenuation_is_missing_where_one_reliability_is_zero():
    """r / sqrt(rel_a rel_b) with one reliability 0 and the other not is ±inf: r_disattenuated is missing where either
    is 0 (the test above has both at 0)."""
    rng = np.random.default_rng(5)
    n, m = 80, 100
    id_acc = rng.uniform(0.4, 0.9, n)
    items = {"s0": _fixed_total_items(rng, rng.integers(48, 53, n), m), "s1": _items(rng, rng.uniform(0.2, 0.8, n), m)}
    df = table_from(id_acc, items["s0"].mean(1), items["s1"].mean(1))
    out = partial_correlations(df, residualize="linear", items=items, n_splits=20, **FAST)
    assert (out["rel_a"] == 0).all() and (out["rel_b"] > 0.5).all()
    assert out["r_disattenuated"].isna().all() and out["r"].notna().all()


def test_items_of_two_runs_swapped_are_refused():
    """Item rows are checked against acc_<split> to 1e-3: two runs' rows swapped (accuracies an item or more apart)
    are refused as misaligned, not only a whole table reversed."""
    rng = np.random.default_rng(16)
    n = 30
    items = _items(rng, rng.uniform(0.3, 0.7, n), 200)
    acc = items.mean(1)
    df = table_from(rng.uniform(0.4, 0.9, n), acc, rng.uniform(0.2, 0.8, n))
    gaps = np.abs(acc[:, None] - acc[None, :]) + np.where(np.eye(n, dtype=bool) | (acc[:, None] == acc), 1, 0)
    i, j = np.unravel_index(np.argmin(gaps), gaps.shape)  # the two runs closest in accuracy, yet apart
    swapped = items.copy()
    swapped[[i, j]] = swapped[[j, i]]
    with pytest.raises(ValueError, match="same order"):
        partial_correlations(df, items={"s0": swapped}, **FAST)
    assert partial_correlations(df, items={"s0": items}, **FAST)["rel_a"].notna().all()


def test_centre_within_subtracts_each_groups_own_mean():
    """Against pandas' group means, batch axes included."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((3, 12, 2))
    groups = np.array(list("aabbbcccaacb"))
    expected = [x[i] - pd.DataFrame(x[i]).groupby(groups).transform("mean").to_numpy() for i in range(3)]
    np.testing.assert_allclose(centre_within(x, groups), expected, atol=1e-12)
    np.testing.assert_allclose(centre_within(x), x - x.mean(axis=-2, keepdims=True), atol=1e-12)


def test_split_half_reliability_within_groups_is_that_of_the_differences_within_them():
    """With `groups` (as `stats_report` passes each run's base) the halves are centred within groups: offsets shared
    by a group's runs carry no weight. Uncentred they put the reliability near 1 where the differences within
    groups are as noisy as their truth says."""
    rng = np.random.default_rng(31)
    m, groups = 200, np.repeat(np.arange(4), 100)
    p = ndtr(np.array([-1.0, -0.3, 0.3, 1.0])[groups] + 0.1 * rng.standard_normal(400))
    items = {"s": _items(rng, p, m)}
    with pytest.warns(UserWarning, match="below 0.9"):
        within = split_half_reliability(items, n_splits=50, groups=groups)["reliability"].iloc[0]
    pooled = split_half_reliability(items, n_splits=50)["reliability"].iloc[0]
    centred = p - pd.Series(p).groupby(groups).transform("mean").to_numpy()
    truth = centred.var() / (centred.var() + np.mean(p * (1 - p)) / m)  # true-score / observed variance within
    assert pooled > 0.97 and abs(within - truth) < 0.06, (pooled, within, truth)


# ------------------------------------------------------------------------------------------------ gap


def test_generalisation_gap_bands_consistency_and_seeds():
    df = pd.DataFrame({
        "run_id": ["a", "b", "c", "d"], "seed": [0, 1, 0, 1], "lr": [1e-3, 1e-3, 2e-3, 2e-3],
        "acc_ID": [0.90, 0.80, 0.70, 0.75], "train_acc_ID": [0.93, 0.87, 0.82, 0.75],
        "val_acc_ID": [0.91, 0.80, 0.72, 0.74], "acc_len": [0.5, 0.4, 0.3, 0.2],
    })
    gap = generalisation_gap(df)
    idg = gap[gap["split"] == "ID"].set_index("run_id")
    assert np.allclose(idg["gap_pts"], [3, 7, 12, 0])
    assert list(idg["band"]) == ["healthy", "watch", "warning", "healthy"]
    assert np.allclose(idg["val_test_diff_pts"], [1, 0, 2, -1])
    assert np.isclose(idg["val_test_r"].iloc[0], np.corrcoef(df["val_acc_ID"], df["acc_ID"])[0, 1])
    assert np.allclose(idg["seed_sd_pts"], [np.std([90, 80], ddof=1)] * 2 + [np.std([70, 75], ddof=1)] * 2)
    assert (idg["n_seeds"] == 2).all()
    length = gap[gap["split"] == "len"]
    assert length["gap_pts"].isna().all() and length["band"].isna().all()  # no train_acc_len: skipped
    # the sweep's own columns: two seeds, and a per-run wall time that is not configuration
    sweep = df.drop(columns="seed").assign(init_seed=[0, 1, 0, 1], data_seed=0, wall_time_s=[5.0, 6.0, 7.0, 8.0])
    assert np.allclose(generalisation_gap(sweep)["seed_sd_pts"], gap["seed_sd_pts"])
    bare = generalisation_gap(df[["run_id", "acc_ID", "acc_len"]])
    assert list(bare.columns) == ["run_id", "split", "test_acc"] and len(bare) == 8
    with pytest.raises(ValueError, match="out of range in \\['acc_ID', 'train_acc_ID'\\].*percentages"):
        generalisation_gap(df.assign(acc_ID=100 * df["acc_ID"], train_acc_ID=100 * df["train_acc_ID"]))


def test_generalisation_gap_bands_at_their_edges():
    """'healthy' below 5 points, 'watch' from 5 to 10 inclusive, 'warning' above 10, None where the gap is missing."""
    assert _band(np.array([4.99, 5.0, 10.0, 10.01, np.nan])).tolist() == ["healthy", "watch", "watch", "warning", None]


# ------------------------------------------------------------------------------------------------ report


@pytest.fixture
def fake_experiment(tmp_path, monkeypatch):
    """An experiment directory served by a stand-in for gradtrace.results (written by the lead)."""
    rng = np.random.default_rng(17)
    n = 40
    id_acc, pa, pb = probit_lines(rng, n=n, rho=0.4, sigma=0.3)
    items = {"ID": _items(rng, id_acc, 400), "s0": _items(rng, pa, 200), "s1": _items(rng, pb, 200),
             "s2": _items(rng, ndtr(ndtri(id_acc) - 0.5 + 0.3 * rng.standard_normal(n)), 20)}  # unreliable
    table = table_from(*(items[s].mean(1) for s in ("ID", "s0", "s1", "s2")),
                       train_acc_ID=np.minimum(items["ID"].mean(1) + 0.06, 1.0))
    serve_results(monkeypatch, tmp_path, table, items)
    return tmp_path


def serve_results(monkeypatch, exp_dir: Path, table: pd.DataFrame, items: dict[str, np.ndarray]) -> None:
    """A stand-in for gradtrace.results serving `table` and its per-item correctness `items` for any directory, and
    `table` as `exp_dir`'s results.csv (whose sha256 stats.json records)."""
    table.to_csv(exp_dir / "results.csv", index=False)
    fake = types.ModuleType("gradtrace.results")
    fake.load_results = lambda path, groups=None: table.copy()
    fake.load_item_correctness = lambda path, table=None, groups=None: items
    fake.run_groups_of = lambda path: {}
    fake.base_groups = lambda table: None
    monkeypatch.setitem(sys.modules, "gradtrace.results", fake)


def test_stats_report_writes_everything(fake_experiment):
    with pytest.warns(UserWarning, match="reliability below"):
        rep = stats_report(fake_experiment, n_boot=200, n_perm=200)
    for name in ("stats.csv", "stats.json", "reliability.csv", "gap.csv"):
        assert (fake_experiment / name).exists(), name
    saved = json.loads((fake_experiment / "stats.json").read_text())
    assert len(saved["records"]) == len(rep.stats) == 9
    np.testing.assert_allclose([r["p"] for r in saved["records"]], rep.stats["p"], rtol=1e-12)  # not 10 decimals
    assert saved["summary"]["n"] == 40 and set(saved["summary"]["residualizations"]) == {"linear", "probit", "spline"}
    assert any("reliability below" in w for w in saved["summary"]["warnings"])
    for method, counts in saved["summary"]["residualizations"].items():  # the headline counts, as stats.csv has them
        rows = rep.stats[rep.stats.residualize == method]
        assert counts["significant_p"] == (rows.p < 0.05).sum() and counts["significant_bh"] == (rows.p_bh < 0.05).sum()
    assert "r_disattenuated" in pd.read_csv(fake_experiment / "stats.csv").columns
    assert set(rep.reliability["split"]) == {"ID", "s0", "s1", "s2"}
    assert rep.gap.loc[rep.gap["split"] == "ID", "band"].isin(["watch", "healthy"]).all()
    from_path = partial_correlations(fake_experiment, residualize="all", n_boot=200, n_perm=200)
    pd.testing.assert_frame_equal(from_path, rep.stats)


def test_a_study_whose_reliabilities_are_all_undefined_is_summarised_without_them(tmp_path, monkeypatch):
    """Two items a split, one right in every run: no halving's halves correlate, every reliability is NaN, and the
    summary's least reliable split ended `gradtrace stats` in "Encountered all NA values" before stats.csv."""
    rng = np.random.default_rng(0)
    items = {s: np.column_stack([np.ones(30, int), rng.integers(0, 2, 30)]) for s in ("ID", "s0", "s1")}
    serve_results(monkeypatch, tmp_path, table_from(*(items[s].mean(1) for s in ("ID", "s0", "s1"))), items)
    with pytest.warns(UserWarning, match="reliability below"):
        rep = stats_report(tmp_path, residualize="linear", n_boot=0, n_perm=0)
    assert rep.reliability["reliability"].isna().all() and len(rep.stats) == 1
    assert json.loads((tmp_path / "stats.json").read_text())["summary"]["min_reliability"] is None


def test_stats_of_a_sweep_without_results_says_what_to_run(tmp_path):
    """Hashing results.csv for stats.json came before reading it: a bare "[Errno 2] No such file" instead."""
    (tmp_path / "plan.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match=r"results.csv not found: the sweep planned there has finished no run "
                                                r"yet; .*or run it \(`gradtrace sweep .*config.yaml --out "):
        stats_report(tmp_path)


def test_stats_of_a_results_table_without_a_store(tmp_path):
    rng = np.random.default_rng(3)
    id_acc, a, b = probit_lines(rng, n=30, rho=0.5, sigma=0.3)
    table_from(id_acc, a, b).assign(run_id=[f"run-{i}" for i in range(30)], role="sweep").to_csv(
        tmp_path / "results.csv", index=False)  # a table from elsewhere: no per-item data, no store.zarr
    rep = stats_report(tmp_path, residualize="probit", n_boot=50, n_perm=50)
    assert len(rep.stats) == 1 and rep.reliability is None and (tmp_path / "gap.csv").exists()



def test_a_table_of_your_own_without_sweep_rows_says_so(tmp_path):
    """A table of your own that gave its runs the role the store gives every `attach` run (`reference`) was read as
    "too few rows: n=0 … Add runs to the sweep (sweep.runs)", of a table of 30 runs."""
    rng = np.random.default_rng(3)
    table_from(*probit_lines(rng, n=30, rho=0.5, sigma=0.3)).assign(
        run_id=[f"run-{i}" for i in range(30)], role="reference").to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match=r"none of the 30 rows of .*results.csv has role `sweep` \(roles there: "
                                         r"reference\): the statistics correlate the sweep runs"):
        stats_report(tmp_path, residualize="probit", n_boot=0, n_perm=0)
    (tmp_path / "plan.json").write_text("{}")  # a sweep's directory, its sweep runs not yet complete: add runs
    with pytest.raises(ValueError, match="too few rows"):
        stats_report(tmp_path, residualize="probit", n_boot=0, n_perm=0)


def test_a_stats_run_killed_mid_write_leaves_the_earlier_tables_whole(tmp_path, monkeypatch):
    """stats.csv was written in place: a kill mid-write left a cut table, newer than results.csv, which the report
    then took for the whole (its freshness check is by modification time)."""
    rng = np.random.default_rng(3)
    table_from(*probit_lines(rng, n=30, rho=0.5, sigma=0.3)).assign(
        run_id=[f"run-{i}" for i in range(30)], role="sweep").to_csv(tmp_path / "results.csv", index=False)
    stats_report(tmp_path, residualize="probit", n_boot=0, n_perm=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write = pd.DataFrame.to_csv

    def killed(frame, path, **kw):  # half the table written, then the process dies
        write(frame.iloc[: len(frame) // 2], path, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", killed)
    with pytest.raises(KeyboardInterrupt):
        stats_report(tmp_path, residualize="probit", n_boot=0, n_perm=0)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing cut, no partial file left


def test_a_sweep_run_alone_in_its_base_is_left_out_with_a_warning(tmp_path):
    """A sweep over more bases than it has pairs of runs (or whose other runs failed) left a base with one run,
    and `gradtrace stats` refused the whole sweep ("Drop those runs": the command line cannot); the lone run
    moves no within-base statistic, so the statistics are the same without it."""
    rng = np.random.default_rng(4)
    id_acc, a, b = probit_lines(rng, n=25, rho=0.5, sigma=0.3)
    table = table_from(id_acc, a, b).assign(run_id=[f"run-{i:03d}" for i in range(25)], role="sweep",
                                            base=[f"base-{i % 3}" for i in range(24)] + ["base-3"])
    table.to_csv(tmp_path / "results.csv", index=False)
    with pytest.warns(UserWarning, match=r"left out 1 sweep run\(s\) alone in their base \(base-3\)"):
        rep = stats_report(tmp_path, residualize="probit", n_boot=0, n_perm=0)
    assert rep.summary["n"] == 24 and (rep.stats.k == 3).all()  # ID and two indicators: bases 0-2
    assert rep.summary["runs_for_ci_half_width_0.2_at_r_0.3"] == runs_needed(0.3, 0.2, k=3) == runs_needed(0.3) + 2
    direct = partial_correlations(table.iloc[:24], residualize="probit", n_boot=0, n_perm=0, within="base")
    np.testing.assert_allclose(rep.stats.r, direct.r, rtol=1e-12)


def test_format_table_is_fixed_width_with_stars():
    rng = np.random.default_rng(18)
    id_acc, a, b = probit_lines(rng, n=80, rho=0.6, sigma=0.3)
    out = partial_correlations(table_from(id_acc, a, b, rng.uniform(0.2, 0.8, 80)), residualize="all", **FAST)
    text = format_table(out)
    lines = text.splitlines()
    assert lines[0].startswith("residualize") and "p_BH" in lines[0]
    body = lines[2:2 + len(out)]
    assert len({line.index("[") for line in body}) == 1  # CI column aligned
    assert "s0 ~ s1" in text and "***" in text and text.count("\n") >= len(out) + 2
    assert "†" not in text
    dis = out["r"] / np.sqrt(0.045)  # a reliability of 0.05: r / 0.21
    flagged = format_table(out.assign(rel_a=0.05, rel_b=0.9, r_disattenuated=dis))
    assert 0 < (dis.abs() > 1).sum() < len(out)  # printed bare before, beside the others
    assert flagged.count("†") == (dis.abs() > 1).sum() + 1 and "too low or too noisy to disattenuate" in flagged
    long = "octal_zero_padded_operands_long_name_40"  # two pairs with it were cut alike at 32 characters, "…"
    named = format_table(out.assign(a=long, b=[f"shift{i}" for i in range(len(out))]))
    assert all(f"{long} ~ shift{i} " in named for i in range(len(out))) and "…" not in named
    assert len({line.index("[") for line in named.splitlines()[2:2 + len(out)]}) == 1


def test_stats_report_says_why_it_fails_when_constant_shifts_left_too_few(tmp_path):
    rng = np.random.default_rng(0)
    pd.DataFrame({"run_id": [f"run-{i:03d}" for i in range(6)], "role": "sweep", "acc_ID": rng.uniform(0.5, 0.9, 6),
                  "acc_a": rng.uniform(0.1, 0.5, 6), "acc_b": 0.0, "acc_c": 0.0}).to_csv(tmp_path / "results.csv",
                                                                                        index=False)
    with pytest.warns(UserWarning, match=r"dropping shifts .* \(b, c\)"), pytest.raises(ValueError, match="two shifts"):
        stats_report(tmp_path)


def test_stats_report_makes_its_out_directory(fake_experiment, tmp_path):
    """An `out` not yet made failed once the statistics were done (`--out` is made by the command line)."""
    out = tmp_path / "analysis" / "stats"
    with pytest.warns(UserWarning, match="reliability below"):
        stats_report(fake_experiment, n_boot=0, n_perm=0, out=out)
    assert {"stats.csv", "stats.json", "gap.csv"} <= {p.name for p in out.iterdir()}


def test_a_table_is_given_as_a_csv_file_and_splits_named_by_their_column_get_a_hint(tmp_path):
    """A path to a CSV was taken for an experiment directory ('…/mine.csv/results.csv not found'), and id='acc_ID'
    was looked up as 'acc_acc_ID'."""
    rng = np.random.default_rng(3)
    id_acc, pa, pb = probit_lines(rng, n=40, rho=0.4, sigma=0.3)
    table = table_from(id_acc, pa, pb)
    table.to_csv(tmp_path / "mine.csv", index=False)
    pd.testing.assert_frame_equal(partial_correlations(tmp_path / "mine.csv", n_boot=0, n_perm=0),
                                  partial_correlations(table, n_boot=0, n_perm=0))
    with pytest.raises(ValueError, match=r"Name splits, not columns: 'ID', not 'acc_ID'"):
        partial_correlations(table, id="acc_ID", n_boot=0, n_perm=0)
    with pytest.raises(ValueError, match=r"Name splits, not columns: 's0', not 'acc_s0'"):
        partial_correlations(table, shifts=["acc_s0", "s1"], n_boot=0, n_perm=0)
    with pytest.raises(ValueError, match=r"need at least two shifts to form a pair, got \['s0'\]"):  # not 's', '0'
        partial_correlations(table, shifts="s0", n_boot=0, n_perm=0)
    assert varying_shifts(table, "ID", shifts="s1") == ["s1"]
