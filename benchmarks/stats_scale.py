"""Benchmark the statistics at study sizes a cluster reaches: BCa's jackknife and the whole of partial_correlations.

BCa needs the partial correlations with each run left out in turn. `stats._jackknife_corr` takes them from the full
fit alone (the regression deletion formula, O(n m²)); this times it against refitting the n designs of n − 1 rows
(what it replaced, O(n² q) time and n² memory), checks they agree, and times `partial_correlations` end to end
(2,000 bootstrap resamples, no permutations) on a synthetic study of 6 shifts.

    python benchmarks/stats_scale.py                 # 300, 1,000 and 3,000 runs
    python benchmarks/stats_scale.py --runs 300      # one size
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

from gradtrace.stats import _batched, _corr_matrix, _jackknife_corr, _residualize, partial_correlations


def study(n: int, rng: np.random.Generator, shifts: int = 6) -> pd.DataFrame:
    """Accuracies of n runs: ID and shifts that follow it with noise."""
    id_acc = rng.uniform(0.3, 0.9, n)
    noisy = {f"acc_s{j}": np.clip(id_acc * rng.uniform(0.3, 1.0) + rng.normal(0, 0.05, n), 0.01, 0.99)
             for j in range(shifts)}
    return pd.DataFrame({"acc_ID": id_acc, **noisy})


def refit_jackknife(Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Residual correlation matrices with each row left out, each refitted (the reference)."""
    rows = np.arange(len(Y))
    keep = [np.delete(rows, i) for i in rows]
    return _batched(lambda idx: _corr_matrix(_residualize(Y[idx], Z[idx])), keep)


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[300, 1000, 3000])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("runs | jackknife by refits (s) | by the deletion formula (s) | ratio | max |diff| "
          "| partial_correlations (s)")
    for n in args.runs:
        table = study(n, rng)
        Y, Z = table.drop(columns="acc_ID").to_numpy(), table[["acc_ID"]].to_numpy()
        t_refit, ref = seconds(lambda: refit_jackknife(Y, Z))
        t_formula, ours = seconds(lambda: _jackknife_corr(Y, Z, None))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_all, _ = seconds(lambda: partial_correlations(table, residualize="linear", n_boot=2000, n_perm=0))
        print(f"{n} | {t_refit:.2f} | {t_formula:.4f} | {t_refit / t_formula:.0f}× | "
              f"{np.nanmax(np.abs(ref - ours)):.1e} | {t_all:.2f}")


if __name__ == "__main__":
    main()
