"""Task calibration: a pilot sweep, then per split whether it is usable and which shifts measure the same thing."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gradtrace import config as config_mod
from gradtrace.config import Config
from gradtrace.files import write_csv

MIN_PILOT_RUNS = 3  # what reliability and a spread across runs need at the least
MEAN_RANGE = (0.10, 0.90)  # usable: mean accuracy inside this range,
MIN_STD = 0.03  # across-run std of at least 3 points,
MIN_RELIABILITY = 0.9  # and split-half reliability of at least 0.9
SAME_AXIS = 0.8  # |partial r| above which two shifts are flagged as one axis
ENOUGH_USABLE = 6  # usable shifts a study aims for (the default's: experiments/README.md)
BASES_COLUMNS = ["init_seed", "base_ID", "ID_mean", "ID_std", "usable", "usable_shifts", "one_axis"]  # bases.csv


@dataclass
class Calibration:
    """Per-split usability and the shift pairs too correlated to count as separate axes."""

    splits: pd.DataFrame
    pairs: pd.DataFrame
    bases: int = 1  # base runs the pilot's runs fine-tuned; with several, std, r(ID) and pairs are within base
    pairs_note: str = ""  # why no pairs were assessed, where the pilot allows none

    def format(self) -> str:
        """A readable report for the terminal."""
        width = max([14, *map(len, self.splits.split)])  # a name of your own up to 40 characters
        lines = [f"{'split':<{width}}{'mean':>7}{'std':>7}{'min':>7}{'max':>7}{'r(ID)':>7}{'rel':>7}  verdict"]
        for _, s in self.splits.iterrows():
            verdict = "usable" if s.usable else f"not usable ({s.reason})"
            if s.split == "ID":
                verdict = "ID"
            lines.append(f"{s.split:<{width}}{s['mean']:7.1%}{s['std']:7.1%}{s['min']:7.1%}{s['max']:7.1%}"
                         f"{s.r_id:7.2f}{s.reliability:7.2f}  {verdict}")
        usable = int(self.splits.usable.sum())
        within = f"; std, r(ID), reliability and pairs within each of {self.bases} bases" if self.bases > 1 else ""
        lines.append(f"\n{usable} usable shift(s) (mean {MEAN_RANGE[0]:.0%}–{MEAN_RANGE[1]:.0%}, std ≥ "
                     f"{MIN_STD:.0%}, reliability ≥ {MIN_RELIABILITY}{within})")
        if self.pairs_note:
            return "\n".join([*lines, self.pairs_note])
        same = self.pairs[self.pairs.same_axis]
        lines.append("pairs on one axis (|partial r| > %.1f): %s" % (SAME_AXIS, ", ".join(
            f"{a}~{b} ({r:+.2f}, 95% CI {lo:+.2f} to {hi:+.2f})"
            for a, b, r, lo, hi in zip(same.a, same.b, same.partial_r, same.ci_low, same.ci_high)) or "none"))
        if ((same.ci_low <= SAME_AXIS) & (same.ci_high >= -SAME_AXIS)).any():  # a CI holding some |r| ≤ 0.8
            lines.append(f"  a CI reaching below {SAME_AXIS} leaves it open: more pilot runs (--runs) narrow it")
        return "\n".join(lines)


def enough_usable(shifts: int) -> int:
    """The usable shifts a study of `shifts` shifts aims for: ENOUGH_USABLE, or all of them where it has fewer."""
    return min(ENOUGH_USABLE, shifts)


def assess(table: pd.DataFrame, items: dict[str, np.ndarray]) -> Calibration:
    """Usability of each split and same-axis shift pairs from a pilot's results and per-item correctness.

    Runs from several base runs (a `base` column with more than one value) are assessed within base, as the
    study's statistics are: std, r(ID) and reliability of the differences between runs of one base (pooled over
    bases), pairs from the partial correlation within base; mean, min and max over all runs."""
    from gradtrace import stats
    from gradtrace.results import base_groups

    within = base_groups(table)
    groups = None if within is None else stats.group_codes(table[within], "base")
    bases = 1 if groups is None else int(groups.max() + 1)
    splits = [c[4:] for c in table.columns if c.startswith("acc_")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rel = stats.split_half_reliability(items, groups=groups).set_index("split")["reliability"] if items else {}
    dof = len(table) - (1 if groups is None else groups.max() + 1)
    centred_id = stats.centre_within(table[["acc_ID"]].to_numpy(float), groups)[:, 0]
    rows, varying = [], []
    for s in splits:
        acc = table[f"acc_{s}"].to_numpy(float)
        centred = stats.centre_within(acc[:, None], groups)[:, 0]
        if s != "ID" and np.ptp(centred) > 0:
            varying.append(s)
        std = float(np.sqrt(np.sum(centred ** 2) / dof)) if dof > 0 else np.nan
        reliability = float(rel.get(s, np.nan)) if len(rel) else np.nan
        reasons = []
        if not MEAN_RANGE[0] <= acc.mean() <= MEAN_RANGE[1]:
            reasons.append(f"mean {acc.mean():.1%}")  # 90.2% must not read as 90%
        if not std >= MIN_STD:
            reasons.append(f"std {std:.1%}")
        if not reliability >= MIN_RELIABILITY:
            reasons.append(f"reliability {reliability:.2f}")
        r_id = float(np.corrcoef(centred, centred_id)[0, 1]) if centred.std() > 0 else np.nan
        rows.append({"split": s, "mean": acc.mean(), "std": std, "min": acc.min(), "max": acc.max(),
                     "r_id": r_id, "reliability": reliability, "usable": s != "ID" and not reasons,
                     "reason": ", ".join(reasons)})
    frame = pd.DataFrame(rows)
    pairs = pd.DataFrame({"a": pd.Series(dtype=str), "b": pd.Series(dtype=str), "partial_r": pd.Series(dtype=float),
                          "ci_low": pd.Series(dtype=float), "ci_high": pd.Series(dtype=float),
                          "same_axis": pd.Series(dtype=bool)})  # typed: a boolean mask of no rows still selects rows
    if len(table) >= 5 and len(varying) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                n_items = {s: m.shape[1] for s, m in items.items()} if items else stats.DEFAULT_N_ITEMS
                pc = stats.partial_correlations(table, shifts=varying, residualize="probit", n_boot=200,
                                                n_perm=200, within=within, n_items=n_items)
            except ValueError as err:  # e.g. a pilot so small that ID determines a shift: the splits still count
                return Calibration(frame, pairs, bases, f"no pairs assessed: {err}")
        pairs = pd.DataFrame({"a": pc.a, "b": pc.b, "partial_r": pc.r, "ci_low": pc.ci_low, "ci_high": pc.ci_high,
                              "same_axis": pc.r.abs() > SAME_AXIS})
    elif len(varying) >= 2:  # a pair's partial correlation given ID needs n ≥ 5: saying "none" would claim it checked
        return Calibration(frame, pairs, bases, f"no pairs assessed: {len(table)} runs, and a partial correlation "
                                                "given ID needs at least 5")
    return Calibration(frame, pairs, bases)


def calibrate(cfg: Config, out: str | Path, runs: int | None = None) -> Calibration:
    """Run (or resume) a pilot sweep of the config into `out` and assess its splits."""
    from gradtrace.results import load_item_correctness
    from gradtrace.sweep import base_ids, run_sweep

    runs = cfg.sweep.runs if runs is None else runs
    if runs < MIN_PILOT_RUNS:
        raise ValueError(f"a pilot of {runs} run(s) cannot be assessed: split-half reliability and the spread across "
                         f"runs need at least {MIN_PILOT_RUNS} (--runs; 12 by default)")
    bases = max(1, len(base_ids(cfg)))  # the base runs the pilot's runs spread over
    if runs < 2 * bases:  # refused before anything trains: the spread within a base needs two of its runs
        raise ValueError(f"a pilot of {runs} run(s) over {bases} bases leaves a base with fewer than 2, and the "
                         f"spread within a base needs 2: use --runs {2 * bases} or more")
    pilot = config_mod.from_dict(cfg.to_dict(), {"sweep.runs": runs, "sweep.reference_runs": 0})
    table = run_sweep(pilot, out)
    table = table[table.role == "sweep"].reset_index(drop=True)
    result = assess(table, load_item_correctness(out))
    write_csv(result.splits, Path(out) / "calibration.csv")
    return result


def calibrate_bases(cfg: Config, out: str | Path, seeds: list[int], runs: int | None = None) -> pd.DataFrame:
    """One pilot per candidate base (`train.init_seed`), each into `out/base-seed-N`: a study hangs on its base
    run's realisation (experiments/README.md), so pick the base by its pilot (one base each, whatever
    `sweep.bases` says). A row per base: the base's own ID accuracy, the pilot's ID mean and std, its usable
    shifts and pairs on one axis; written to `out/bases.csv`. A pilot that fails stops no other: the others run,
    their rows are written, then a `SweepError` names the failed ones (running again retries them)."""
    from gradtrace.results import load_results
    from gradtrace.sweep import SweepError

    if not cfg.sweep.pretrain_steps:
        given = (f": this one fine-tunes {Path(cfg.model.init_from).name} (to train bases from a random init instead, "
                 "add --set model.init_from=null --set sweep.pretrain_steps=800, the recipe of the default's)"
                 if cfg.model.init_from else "")
        raise ValueError(f"choosing a base needs a config that trains one (sweep.pretrain_steps > 0){given}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--bases lists a seed more than once ({' '.join(map(str, seeds))}): one pilot per base")
    pilots = {seed: config_mod.from_dict(cfg.to_dict(), {"train.init_seed": seed, "sweep.bases": 1})
              for seed in seeds}  # a seed the config refuses is refused before any pilot trains
    rows, failed = [], []
    for seed, pilot in pilots.items():
        pilot_out = Path(out) / f"base-seed-{seed}"
        try:
            result = calibrate(pilot, pilot_out, runs)
        except SweepError as err:
            failed.append(f"init_seed {seed}: {err}")
            continue
        base_id = float(load_results(pilot_out, role="base")["acc_ID"].iloc[0])
        split = result.splits.set_index("split")
        same = result.pairs[result.pairs.same_axis]
        rows.append({"init_seed": seed, "base_ID": base_id, "ID_mean": split.loc["ID", "mean"],
                     "ID_std": split.loc["ID", "std"], "usable": int(split.usable.sum()),
                     "usable_shifts": " ".join(split.index[split.usable]),
                     "one_axis": " ".join(f"{a}~{b}" for a, b in zip(same.a, same.b))})
    table = pd.DataFrame(rows, columns=BASES_COLUMNS)
    write_csv(table, Path(out) / "bases.csv")
    if failed:
        raise SweepError(f"{len(failed)} of {len(seeds)} pilots did not finish ({Path(out) / 'bases.csv'} holds "
                         f"the other {len(rows)}; run again to retry them):\n  " + "\n  ".join(failed))
    return table
