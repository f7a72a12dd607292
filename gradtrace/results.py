"""The results table (runs × splits accuracies with each run's settings) and per-item correctness."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from gradtrace import kernels, store
from gradtrace.files import write_csv

# every run's columns before its acc_<split> (test) and train_acc_<split> ones
FIXED_COLUMNS = ["run_id", "role", "base", "init_seed", "data_seed", "lr", "weight_decay", "steps", "wall_time_s"]
ROLES = ("sweep", "reference", "base")  # what a sweep's runs are (sweep.plan)
# how to write results.csv again from the store, its single source of truth
REWRITE = ("Rewrite it from the store: run the sweep again (`gradtrace sweep {exp_dir}/config.yaml --out {exp_dir}`; "
           "it trains no run that is complete) or call gradtrace.results.write_results(results_table(DIR), DIR).")


def results_table(out: str | Path) -> pd.DataFrame:
    """One row per complete run gradtrace trained, rebuilt from the store's attributes (the single source of truth);
    runs recorded in a loop of your own (`attach`), which hold no test accuracies, are not rows."""
    root = store.open_experiment(Path(out) / "store.zarr")
    rows = []
    for rid, run in store.run_groups(root).items():
        a = run.attrs
        if not _a_result(a):
            continue
        rows.append({"run_id": rid, "role": a.get("role"), "base": started_from(store.init_weights(a)),
                     "init_seed": a["seeds"]["init"],
                     "data_seed": a["seeds"]["data"], **a.get("hparams", {}), "steps": a["steps"],
                     "wall_time_s": round(float(a.get("wall_time_s", 0.0)), 2),
                     **accuracy_columns(a["accuracy"], a.get("train_accuracy", {}))})
    return pd.DataFrame(rows, columns=None if rows else FIXED_COLUMNS)  # a header even before the first run ends


def accuracy_columns(accuracy: dict[str, float], train_accuracy: dict[str, float]) -> dict[str, float]:
    """A run's `acc_<split>` (test) and `train_acc_<split>` columns, as every results row names them."""
    return {**{f"acc_{s}": a for s, a in accuracy.items()}, **{f"train_acc_{s}": a for s, a in train_accuracy.items()}}


def started_from(init_from: str | None) -> str:
    """The base a run fine-tuned, from its `model.init_from`: a base run's name (`DIR/weights/<base>/
    final.safetensors`), another file's name without its suffix (`default_base`, the default's shipped base), or ""
    for a run trained from scratch."""
    if not init_from:
        return ""
    path = Path(init_from)
    return path.parent.name if path.name == "final.safetensors" else path.stem


def base_groups(table: pd.DataFrame) -> str | None:
    """`"base"` where the runs fine-tuned several base runs (`sweep.bases` > 1): their statistics are then taken
    within base (`stats.partial_correlations(within=...)`); None for one base or none."""
    return "base" if "base" in table.columns and table["base"].nunique() > 1 else None


def write_results(table: pd.DataFrame, out: str | Path) -> None:
    """Write `out/results.csv` atomically: a sweep rewrites it after every run, and a reader mid-sweep (or a kill
    mid-write) must never see half a file."""
    write_csv(table, Path(out) / "results.csv")


def load_results(exp_dir: str | Path, role: str | None = "sweep", groups: dict | None = None) -> pd.DataFrame:
    """The experiment's results table (results.csv, checked by `read_results`), optionally only runs of one role;
    warns where the experiment is not finished (what is computed from the table then covers only the runs complete
    so far). `groups`: the store's run groups (`run_groups_of`), where already read."""
    groups = run_groups_of(exp_dir) if groups is None else groups
    table = read_results(exp_dir, groups)
    if role is not None:
        if role not in ROLES and not (table["role"] == role).any():  # a role of a table of your own is its own
            raise ValueError(f"role {role!r}: gradtrace's runs have roles {', '.join(ROLES)} (this table's: "
                             f"{', '.join(sorted(table['role'].astype(str).unique())) or 'none yet'})")
        table = table[table["role"] == role].reset_index(drop=True)
    _warn_if_incomplete(exp_dir, table, role, groups)
    warn_of_mixed_arithmetic(exp_dir, groups, [rid for rid in table["run_id"] if rid in groups], stacklevel=2)
    table = _without_lone_bases(table) if role == "sweep" else table
    warn_of_divergence(groups, table, stacklevel=2)
    return table


def why_no_results(exp_dir: str | Path) -> str:
    """What a directory without results.csv holds, and what to run: a sweep that has finished no run yet, runs of
    `gradtrace train` or of a loop of your own, or nothing of a sweep's."""
    path = Path(exp_dir) / "results.csv"
    if (Path(exp_dir) / "plan.json").exists():
        return (f"{path} not found: the sweep planned there has finished no run yet; wait for its first where it is "
                f"running, or run it (`gradtrace sweep {exp_dir}/config.yaml --out {exp_dir}`)")
    if (Path(exp_dir) / "store.zarr").exists():
        return (f"{exp_dir} holds runs of `gradtrace train` or of a loop of your own (no plan.json), not a sweep's: "
                "the statistics are of a sweep's runs (`gradtrace sweep CONFIG --out DIR` into a directory of its "
                "own), or of a results.csv of your own beside store.zarr (README: Analysing runs of your own)")
    return f"{path} not found; run `gradtrace sweep CONFIG --out {exp_dir}` first"


def read_results(exp_dir: str | Path, groups: dict | None = None) -> pd.DataFrame:
    """results.csv, every row, refused where it is not a table of this experiment's runs: without run_id or role
    (the reference runs joined the sweep's statistics), or naming runs its store does not hold (another store's
    table, or groups removed). `groups`: the store's run groups, where already read."""
    path = Path(exp_dir) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(why_no_results(exp_dir))
    table = pd.read_csv(path)
    missing = [column for column in ("run_id", "role") if column not in table]
    if missing:
        raise ValueError(f"{path} has no {' or '.join(missing)} column: it is not the table gradtrace writes. "
                         f"{REWRITE.format(exp_dir=exp_dir)} A table of your own needs run_id and role (`sweep` for "
                         "the runs to correlate).")
    _refuse_runs_the_store_lacks(exp_dir, table, run_groups_of(exp_dir) if groups is None else groups)
    return table


def _refuse_runs_the_store_lacks(exp_dir: str | Path, table: pd.DataFrame, groups: dict) -> None:
    """Refuse a table naming runs store.zarr does not hold (none checked without a store: a table of one's own)."""
    if not (Path(exp_dir) / "store.zarr").exists():
        return
    missing = [rid for rid in table["run_id"] if rid not in groups]
    if missing:
        raise ValueError(f"{Path(exp_dir) / 'results.csv'} lists {len(missing)} run(s) that store.zarr does not "
                         f"hold ({first_ids(missing)}): the table is another store's, or their groups were "
                         f"removed. {REWRITE.format(exp_dir=exp_dir)}")


def _without_lone_bases(sweep: pd.DataFrame) -> pd.DataFrame:
    """Sweep runs less those of a base with no other complete run (fewer sweep runs than two per base, or the
    others failed), with a warning: within base a lone run has nothing to differ from, so it moves no statistic
    (its residual is 0 and it adds one run and one intercept) but the within-base analyses refuse it."""
    if base_groups(sweep) is None:
        return sweep
    runs = sweep["base"].map(sweep["base"].value_counts())
    if (runs > 1).all():
        return sweep
    lone = sweep.loc[runs < 2, "base"].astype(str).tolist()
    warnings.warn(f"left out {len(lone)} sweep run(s) alone in their base ({first_ids(lone)}): statistics within "
                  "base need two runs of a base; a lone run would move none of them", UserWarning, stacklevel=3)
    return sweep[runs > 1].reset_index(drop=True)


def mixed_arithmetic(groups: dict, run_ids) -> str:
    """Where runs of one role among `run_ids` trained with other code, releases, device, CPU, its kernels or threads
    (each run records them: `kernels.RECORDED`), or a run went on from a checkpoint with others than it started with
    (`resumed_with`), what differs in words: "sweep runs' torch_version: 2.12.0 (run-000, run-001), 2.13.0
    (run-002)"; "" where nothing does. Runs recorded before a key was added are not compared on it; roles apart, as
    a study's base runs train on other threads than its fine-tuning runs."""
    by_role: dict[str, list[str]] = {}
    for rid in run_ids:
        by_role.setdefault(groups[rid].attrs.get("role"), []).append(rid)
    parts = []
    for role, ids in by_role.items():
        for key in kernels.RECORDED:
            by_value: dict[str, list[str]] = {}
            for rid in ids:
                if key in groups[rid].attrs:
                    by_value.setdefault(str(groups[rid].attrs[key]), []).append(rid)
            if len(by_value) > 1:
                parts.append(f"{role} runs' {key}: " + ", ".join(f"{value} ({first_ids(runs, 3)})"
                                                                for value, runs in by_value.items()))
    resumed = [rid for rid in run_ids if groups[rid].attrs.get("resumed_with")]
    if resumed:
        parts.append(f"resumed with other arithmetic than they started with: {first_ids(resumed, 3)}")
    return "; ".join(parts)


def warn_of_mixed_arithmetic(exp_dir, groups: dict, run_ids, stacklevel: int) -> None:
    """Warn where runs of one role among `run_ids` did not all train alike (`mixed_arithmetic`), at `stacklevel` of
    the caller."""
    mixed = mixed_arithmetic(groups, run_ids)
    if mixed:
        warnings.warn(f"{exp_dir}'s runs did not all train alike ({mixed}): {MIXED_ADVICE}", kernels.OtherArithmetic,
                      stacklevel=stacklevel + 1)


def warn_of_divergence(groups: dict, table: pd.DataFrame, stacklevel: int) -> None:
    """Warn where runs of `table` diverged (`describe_divergence`), at `stacklevel` of the caller."""
    if diverged := describe_divergence(groups, table):
        warnings.warn(diverged, UserWarning, stacklevel=stacklevel + 1)


def describe_divergence(groups: dict, table: pd.DataFrame) -> str:
    """The runs of `table` that diverged, in words ("" for none): they took optimizer steps with a NaN or Inf
    gradient (`nonfinite_steps`; a step GradScaler skipped is not taken), or their training loss ended non-finite or
    tenfold where it began (`store.loss_diverged`; runs written before `train_loss` was recorded are judged by their
    gradients alone). A diverged run's accuracies are a broken model's and pull every correlation towards their
    corner."""
    diverged = table["run_id"].map(lambda rid: rid in groups and diverged_run(groups[rid].attrs))
    if not diverged.any():
        return ""
    lr = table.loc[diverged, "lr"] if "lr" in table else pd.Series(dtype=float)
    at = f"; lr {lr.min():.3g}" + (f" to {lr.max():.3g}" if lr.max() > lr.min() else "") if lr.notna().any() else ""
    return (f"{int(diverged.sum())} of {len(table)} run(s) diverged ({first_ids(list(table.run_id[diverged]))}{at}): "
            f"NaN or Inf gradients, or {store.DIVERGED_WORDS}, so their accuracies are a broken model's, not what "
            "it learned, and weigh on every correlation. Keep sweep.lr below where runs diverge (or clip harder: "
            "train.clip) for a study")


def diverged_run(attrs) -> bool:
    """Whether a run's attributes say it diverged: NaN or Inf gradients, or its loss (`store.loss_diverged`)."""
    return bool(attrs.get("nonfinite_steps")) or store.loss_diverged(attrs)


MIXED_ADVICE = ("their float rounding differs, so a chaotic run's realisation may too, and the study mixes runs no "
                "single setting reproduces (each run's: `gradtrace info`). To keep one realisation, extend or resume "
                "a study with the gradtrace, torch and transformers, device, kind of CPU, train.cpu_kernels and "
                "train.threads it was trained with")


def describe_unfinished(unfinished: dict[str, list[str]]) -> str:
    """`_unfinished` in words: "2 failed (run-004, run-017), 1 running or stopped"; "" when none."""
    words = {"failed": "failed", "running": "running or stopped", "not started": "not started"}
    return ", ".join(f"{len(ids)} {words[status]} ({first_ids(ids)})" for status, ids in unfinished.items() if ids)


def plan_progress(exp_dir: str | Path) -> str:
    """How far an experiment's plan (plan.json) has come: "plan: 102 run(s), 87 complete; 3 failed (…), …"."""
    groups = run_groups_of(exp_dir)
    planned = _planned(exp_dir, None, groups)
    unfinished = _unfinished(planned, groups)
    left = sum(map(len, unfinished.values()))
    done = f"plan: {len(planned)} run(s), {len(planned) - left} complete"
    return f"{done}; {describe_unfinished(unfinished)}" if left else done


def first_ids(run_ids: list[str], shown: int = 5) -> str:
    """The first `shown` run ids, and how many more: "run-001, run-004 and 3 more"."""
    more = len(run_ids) - shown
    return ", ".join(run_ids[:shown]) + (f" and {more} more" if more > 0 else "")


def run_groups_of(exp_dir: str | Path) -> dict:
    """The experiment store's run groups by id (none before the store exists)."""
    path = Path(exp_dir) / "store.zarr"
    return store.run_groups(store.open_experiment(path)) if path.exists() else {}


def _planned(exp_dir: str | Path, role: str | None, groups: dict) -> list[str]:
    """The ids of the runs of one role (None: every role) in plan.json, or without one among the store's runs."""
    plan = Path(exp_dir) / "plan.json"
    if plan.exists():
        return [r["run_id"] for r in json.loads(plan.read_text(encoding="utf-8")) if role is None or r["role"] == role]
    return [rid for rid, run in groups.items() if role is None or run.attrs.get("role") == role]


def _unfinished(planned: list[str], groups: dict) -> dict[str, list[str]]:
    """The planned ids that are not complete, by what the store's groups say of each: `failed`, `running`
    (training now, or stopped by a kill) and `not started`; empty lists for a finished plan."""
    unfinished: dict[str, list[str]] = {"failed": [], "running": [], "not started": []}
    for rid in planned:
        status = groups[rid].attrs.get("status") if rid in groups else "not started"
        if status != "complete":
            unfinished[status if status in ("failed", "not started") else "running"].append(rid)
    return unfinished


def _warn_if_incomplete(exp_dir: str | Path, table: pd.DataFrame, role: str | None, groups: dict) -> None:
    """Warn where results.csv lacks complete runs of the store (`groups`; a sweep stopped before it rewrote the table:
    a kill; a cluster's runs that trained on after Ctrl-C), or where runs of the plan are not complete (failed,
    running, stopped, not started): either way an analysis of the table leaves runs out."""
    exp_dir = Path(exp_dir)
    if not (exp_dir / "store.zarr").exists():
        return
    missing = _not_in_table(groups, table, role)
    if missing:
        warnings.warn(f"{exp_dir / 'results.csv'} lacks {len(missing)} complete run(s) of store.zarr "
                      f"({first_ids(missing)}): a sweep stopped before it rewrote the table; run the sweep again "
                      "to finish it (or `gradtrace.results.write_results(results_table(DIR), DIR)`)", UserWarning,
                      stacklevel=3)
    unfinished = _unfinished(_planned(exp_dir, role, groups), groups)
    if any(unfinished.values()):
        why = f" (`gradtrace info {exp_dir}` shows why a run failed)" if unfinished["failed"] else ""
        warnings.warn(f"{exp_dir} is not finished: of its planned {role + ' ' if role else ''}runs, "
                      f"{describe_unfinished(unfinished)}{why}; "
                      f"results.csv holds the {len(table)} complete, and what is computed from it covers those only. "
                      "Run the sweep again to finish it (it retries failed runs).", UserWarning, stacklevel=3)


def describe_shortfall(exp_dir: str | Path, table: pd.DataFrame | None, groups: dict | None = None) -> str:
    """What the results table leaves out of the experiment, in words ("" for nothing), the store read once: planned
    runs of every role failed, running or stopped, or not started, and complete runs the table lacks (a sweep stopped
    before it rewrote results.csv). `groups`: the store's run groups, where already read."""
    groups = run_groups_of(exp_dir) if groups is None else groups
    parts = [describe_unfinished(_unfinished(_planned(exp_dir, None, groups), groups))]
    behind = [] if table is None or "run_id" not in table else _not_in_table(groups, table, None)
    if behind:
        parts.append(f"{len(behind)} complete but not yet in results.csv ({first_ids(behind)}; the sweep run again "
                     "lists them)")
    return ", ".join(part for part in parts if part)


def _not_in_table(groups: dict, table: pd.DataFrame, role: str | None) -> list[str]:
    listed = set(table["run_id"])
    return [rid for rid, run in groups.items()
            if _a_result(run.attrs) and (role is None or run.attrs.get("role") == role) and rid not in listed]


def _a_result(attrs) -> bool:
    """Whether a run is a row of results.csv: complete and trained by gradtrace (one recorded by `attach` in a loop
    of your own holds no test accuracies)."""
    return attrs.get("status") == "complete" and "accuracy" in attrs


def load_item_correctness(exp_dir: str | Path, role: str | None = "sweep", table: pd.DataFrame | None = None,
                          groups: dict | None = None) -> dict[str, np.ndarray]:
    """Per split, a runs × items bool matrix of exact-match correctness, rows in `load_results` order (of `table`,
    that table already loaded, where given; `groups`, the store's run groups, where already read), the runs read by
    `store.map_reads` (on threads where the filesystem makes reads wait: 3,000 runs took 29 s on sshfs).

    Empty when there are no such runs, no store, or a run lacks per-item correctness (then reliability cannot be
    computed).
    """
    table = load_results(exp_dir, role) if table is None else table
    if table.empty or not (Path(exp_dir) / "store.zarr").exists():  # results.csv alone: no per-item data
        return {}
    groups = run_groups_of(exp_dir) if groups is None else groups
    _refuse_runs_the_store_lacks(exp_dir, table, groups)

    def correct(run_id: str) -> tuple[list[str], np.ndarray] | None:
        """A run's splits and its splits × items correctness; None where it saved none."""
        if not store.has(groups[run_id], "eval/correct"):
            return None
        arr = groups[run_id]["eval/correct"]
        return list(arr.attrs["splits"]), store.stored(arr)

    per_run = store.map_reads(correct, table["run_id"])
    if any(read is None for read in per_run):
        return {}
    stacked = np.stack([correctness for _, correctness in per_run])  # runs × splits × items
    return {split: stacked[:, i, :] for i, split in enumerate(per_run[-1][0])}
