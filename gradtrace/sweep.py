"""A sweep of runs (init seed × data-order seed × hyper-parameters) into one experiment directory, resumable.

The plan is a pure function of the config. Re-running a killed sweep skips complete runs, resumes partial
ones from their last durable step, and rebuilds `results.csv` from the store, so no run is recorded twice. Its runs
train in this process, on a pool of single-thread workers, or on a dask cluster (`gradtrace.cluster`).
"""
from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from filelock import Timeout
from tqdm.auto import tqdm

from gradtrace import config as config_mod
from gradtrace import kernels, store
from gradtrace.console import write_plain_text_where_unencodable
from gradtrace.files import disk_full, full_disk_words, write_json
from gradtrace.results import (MIXED_ADVICE, first_ids, results_table, started_from, warn_of_divergence,
                               warn_of_mixed_arithmetic, write_results)
from gradtrace.config import Config, SweepConfig

if TYPE_CHECKING:
    from gradtrace.cluster import Cluster


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its id, role (`reference` or `sweep`) and the config keys it overrides."""

    run_id: str
    role: str
    overrides: dict = field(default_factory=dict)


def base_ids(cfg: Config) -> list[str]:
    """The base (pretraining) runs of a plan: none, `base`, or `base-0` … with `sweep.bases` > 1."""
    s = cfg.sweep
    if not s.pretrain_steps:
        if s.bases > 1:
            raise ValueError("sweep.bases > 1 needs base runs to start from: set sweep.pretrain_steps > 0")
        return []
    return ["base"] if s.bases == 1 else [f"base-{b}" for b in range(s.bases)]


def plan(cfg: Config) -> list[PlannedRun]:
    """Optional captured base (pretraining) runs, reference runs (base config, data order varied only, full
    capture; `sweep.reference_runs` per base), then the sweep's runs (random or grid search: `hparams`). With base
    runs every other run starts from one's final weights: reference runs from each, sweep run i from base i mod
    `sweep.bases`."""
    cfg = config_mod.checked(cfg)
    s, t = cfg.sweep, cfg.train
    unknown = set(s.vary) - {"init", "data", "hparams"}
    if unknown:
        raise ValueError(f"unknown sweep.vary entries {sorted(unknown)}; choose from init, data, hparams")
    base_init = t.seed if t.init_seed is None else t.init_seed
    base_data = t.seed if t.data_seed is None else t.data_seed
    bases = base_ids(cfg)
    runs = [PlannedRun(b, "base", {"train.steps": s.pretrain_steps, "train.init_seed": base_init + i,
                                   "train.data_seed": base_data}) for i, b in enumerate(bases)]
    starts = [{"model.init_from": f"{{out}}/weights/{b}/final.safetensors"} for b in bases] or [{}]
    references = [(start, i) for start in starts for i in range(s.reference_runs)]
    runs += [PlannedRun(f"ref-{j:03d}", "reference", {"train.init_seed": base_init, "train.data_seed": base_data + i,
                                                      **start}) for j, (start, i) in enumerate(references)]
    for i, (lr, wd) in enumerate(hparams(s)):
        over = {"train.init_seed": 10_000 + i if "init" in s.vary else base_init,
                "train.data_seed": 20_000 + i if "data" in s.vary else base_data,
                "capture.enabled": s.capture_sweep, **starts[i % len(starts)]}
        if "hparams" in s.vary:
            over.update({"train.lr": lr, "train.weight_decay": wd})
        runs.append(PlannedRun(f"run-{i:03d}", "sweep", over))
    if not runs:  # a sweep of none wrote an empty study and exited 0
        raise ValueError("the plan has no run: nothing to train with sweep.runs=0, sweep.reference_runs=0 and no base "
                         "run (sweep.pretrain_steps=0); set sweep.runs > 0")
    return runs


def hparams(s: SweepConfig) -> list[tuple[float, float]]:
    """Each sweep run's (lr, weight decay). Random search: lr log-uniform and weight decay uniform in their ranges,
    drawn in run order from `sweep.seed`. Grid search: run i takes point (i div B) mod G of the grid's G
    combinations (lr outer, weight decay inner; B bases, run i fine-tuning base i mod B), so every base's runs go
    through every point alike and more runs extend every point alike."""
    if s.search == "grid":
        if "hparams" not in s.vary:
            raise ValueError("sweep.search: grid sets each run's lr and weight decay: add hparams to sweep.vary")
        grid = list(itertools.product(s.lr, s.weight_decay))
        if not grid:
            raise ValueError("sweep.search: grid needs at least one value in sweep.lr and in sweep.weight_decay")
        return [grid[(i // s.bases) % len(grid)] for i in range(s.runs)]
    if s.search != "random":
        raise ValueError(f"sweep.search must be random or grid, got {s.search!r}")
    (lr_low, lr_high), weight_decay = _range(s.lr, "lr", positive=True), _range(s.weight_decay, "weight_decay")
    rng = np.random.default_rng(s.seed)
    draws = []
    for _ in range(s.runs):
        lr = float(np.exp(rng.uniform(np.log(lr_low), np.log(lr_high))))
        draws.append((_four_figures(lr), round(float(rng.uniform(*weight_decay)), 5)))
    return draws


def _four_figures(lr: float) -> float:
    """A drawn lr rounded to 7 decimals, or to 4 significant figures where that keeps more (below 1e-4): a small
    range keeps its spread instead of collapsing onto a few values, or to 0."""
    return round(lr, max(7, 3 - math.floor(math.log10(lr))))


def _range(values: list[float], name: str, positive: bool = False) -> tuple[float, float]:
    """A random search's [low, high] range of `sweep.<name>`, checked."""
    if len(values) != 2 or not values[0] <= values[1] or (positive and values[0] <= 0):
        raise ValueError(f"sweep.{name}: random search takes a range [low, high] with low <= high"
                         f"{' and low > 0 (drawn log-uniform)' if positive else ''}, got {list(values)}; for a grid "
                         "of values set sweep.search: grid")
    return values[0], values[1]


def run_config(cfg: Config, run: PlannedRun) -> Config:
    """The full config of one planned run."""
    return config_mod.from_dict(cfg.to_dict(), run.overrides)


def _worker_config(cfg_dict: dict, out: str, run: PlannedRun, threads: int) -> Config:
    """The config a worker trains one planned run with (`{out}` in overrides filled in)."""
    overrides = {k: v.format(out=out) if isinstance(v, str) else v for k, v in run.overrides.items()}
    return config_mod.from_dict(cfg_dict, {**overrides, "train.threads": threads})


def train_job(cfg_dict: dict, out: str, job: list[PlannedRun], threads: int,
              steps: tuple[StepsInFlight, int] | None = None, items: str | None = None) -> list[dict]:
    """Worker entry point: train one planned run (resuming if partial), or several as one vectorised ensemble
    (complete members skipped, the others resumed from their checkpoint); return their results rows. Its steps are
    counted in `steps` (the sweep's counts and this job's slot; a pool's worker: its own, from `_start_worker`).
    Refused before it trains where this process draws other items for the task than the sweep's did (`items`: their
    digest, from `check_study_items`)."""
    from gradtrace.ensemble import train_ensemble
    from gradtrace.train import default_threads, train

    threads = threads or default_threads()  # not what the process's previous job set (a dask worker's, say)
    cfgs = [_worker_config(cfg_dict, out, r, threads) for r in job]
    if items is not None:
        check_draws_as_the_sweep(cfgs[0], items)
    counts, slot = steps or _worker_steps or (None, 0)
    on_step = functools.partial(counts.count, slot) if counts is not None else None
    try:
        if len(job) == 1:
            return [train(cfgs[0], out, job[0].run_id, job[0].role, resume=True, progress=False,
                          on_step=on_step).row()]
        results = train_ensemble(cfgs, out, [r.run_id for r in job], [r.role for r in job], resume=True,
                                 on_step=on_step)
        return [r.row() for r in results]
    finally:
        if counts is not None:
            counts.count(slot, 0, 0)


def check_draws_as_the_sweep(cfg: Config, items: str) -> None:
    """Refuse to train in a process that draws other items for the task than the sweep's own process drew (`items`:
    their digest): a split of your own that draws otherwise in each process (a set's order, say) gave each worker
    test items of its own, and the study compared runs scored on different items as one, saying nothing."""
    from gradtrace.tasks import task_for
    from gradtrace.tasks.shifts import OWN_RANDOMNESS

    ours = task_for(cfg.task, cfg.model).items_digest
    if ours != items:
        raise ValueError(f"this process draws other items for the task than the sweep's own process drew (items "
                         f"digest {items}): a split of your own draws otherwise in each process; {OWN_RANDOMNESS}")


class StepsInFlight:
    """The runs, and the training steps done and planned, of the job each of `slots` workers trains (0 planned:
    none), each worker writing only its own slot: shared memory without a lock for a pool's processes (a lock a
    killed worker held would stop the others), plain lists in this process. The sweep's bar shows their sums."""

    def __init__(self, slots: int, context=None) -> None:
        self.runs, self.done, self.planned = ([0] * slots for _ in range(3)) if context is None else (
            context.Array("q", slots, lock=False) for _ in range(3))

    def count(self, slot: int, done: int, planned: int, runs: int = 1) -> None:
        """The job in `slot`, of `runs` runs (an ensemble's step together), has done `done` of its `planned` steps
        (0 of 0: it ended)."""
        self.runs[slot], self.done[slot], self.planned[slot] = runs, done, planned

    def describe(self) -> str:
        """"2 in flight: 75/300 steps" (an ensemble's runs counted each, its steps once), or "" with none."""
        jobs = [(r, d, p) for r, d, p in zip(self.runs[:], self.done[:], self.planned[:]) if p]
        return (f"{sum(r for r, _, _ in jobs)} in flight: {sum(d for _, d, _ in jobs)}/{sum(p for _, _, p in jobs)} "
                "steps" if jobs else "")


_worker_steps: tuple[StepsInFlight, int] | None = None  # a pool worker's: the sweep's counts and its slot


def _jobs(cfg: Config, runs: list[PlannedRun]) -> list[list[PlannedRun]]:
    """Runs grouped into jobs: with `sweep.ensemble` > 1, the reference runs and the sweep runs of each base in
    vmap ensembles of that many (members share everything but seeds and hyper-parameters); a base run alone."""
    size = cfg.sweep.ensemble
    if size == 1:
        return [[r] for r in runs]
    jobs = [[r] for r in runs if r.role == "base"]
    for role in ("reference", "sweep"):
        by_start: dict = {}
        for r in runs:
            if r.role == role:
                by_start.setdefault(r.overrides.get("model.init_from"), []).append(r)
        jobs += [members[i:i + size] for members in by_start.values() for i in range(0, len(members), size)]
    return jobs


def estimate_seconds(cfg: Config) -> float:
    """Rough time of one run on one CPU thread beside another worker (measured on the default, sixth session:
    ~0.7 ms per example-step for `tiny`, plus model building and evaluating every split's test and train-accuracy
    items)."""
    from gradtrace.models import EMBEDDED

    shape = EMBEDDED.get(cfg.model.name.removeprefix("EleutherAI/"), EMBEDDED["tiny"])
    scale = (shape.hidden ** 2 * shape.layers) / (96 ** 2 * 3)
    items = (cfg.task.n_test + cfg.task.n_train_eval) * (len(cfg.task.shifts) + 1)
    return (cfg.train.steps * cfg.train.batch_size * 0.7e-3 + items * 0.28e-3) * scale + 1.5


def estimate_total_seconds(jobs: list[list[PlannedRun]], seconds: dict[str, float], workers: int) -> float:
    """Rough time of a whole sweep from each run's `estimate_seconds`: the base runs first (every other run starts
    from their weights; one alone, several spread over the workers), then every other job (a run, or an ensemble
    timed as its members one after another: on a CPU the default model gains nothing from vmap,
    benchmarks/README.md) handed in turn to whichever worker is free first."""
    base = [seconds[job[0].run_id] for job in jobs if job[0].role == "base"]
    free = [0.0] * max(1, workers)  # when each worker is next free
    for job in jobs:
        if job[0].role != "base":
            heapq.heapreplace(free, free[0] + sum(seconds[r.run_id] for r in job))
    return sum(base) / bases_side_by_side(len(base), workers) + max(free)


def bases_side_by_side(bases: int, workers: int) -> int:
    """How many base runs train at once: one alone (on all threads), several spread over the workers."""
    return 1 if bases <= 1 else min(max(1, workers), bases)


ESTIMATE_CORES = 2  # the CPU a dry run's time is for: `estimate_seconds` was measured on 2 vCPUs
TWO_THREADS_SPEEDUP = 1.5  # a run alone on both threads against one of two single-thread workers (1.5–1.7×, the
#                            hosts of benchmarks/README.md's sweep_throughput tables)


def estimate_job_seconds(cfg: Config, job: list[PlannedRun]) -> dict[str, float]:
    """`estimate_seconds` of each run of a job, on the threads it trains on (`job_threads`; 0, torch's default,
    takes both of `ESTIMATE_CORES`)."""
    speedup = 1.0 if job_threads(cfg, job) == 1 else TWO_THREADS_SPEEDUP
    return {r.run_id: estimate_seconds(run_config(cfg, r)) / speedup for r in job}


def describe_plan(cfg: Config, runs: list[PlannedRun], out: Path | None = None) -> str:
    """The dry-run text: runs by role, steps and expected time (on `ESTIMATE_CORES` cores, which train no more
    single-thread workers at once than they are); with `out`, a study there, the time of what is left to train."""
    workers = max(1, cfg.sweep.workers)
    at_once = min(workers, ESTIMATE_CORES)
    roles = {role: sum(r.role == role for r in runs) for role in dict.fromkeys(r.role for r in runs)}
    jobs = _jobs(cfg, runs)
    seconds = {run_id: t for job in jobs for run_id, t in estimate_job_seconds(cfg, job).items()}
    base = f" (base: {cfg.sweep.pretrain_steps})" if cfg.sweep.pretrain_steps else ""
    if cfg.sweep.bases > 1:
        base = f" ({cfg.sweep.bases} bases: {cfg.sweep.pretrain_steps} each)"
    held = (store.run_groups(store.open_experiment(out / "store.zarr"))  # each run's group read once
            if out is not None and (out / "store.zarr" / "zarr.json").exists() else {})
    pending = set(_not_complete(held, runs))
    begun = sum(rid in held for rid in pending)  # stopped, or failed: resumed, retried
    left = [job for job in jobs if any(r.run_id in pending for r in job)]  # as the sweep takes them: a job whole
    lines = [f"{len(runs)} runs ({', '.join(f'{n} {role}' for role, n in roles.items())}) × {cfg.train.steps} steps"
             f"{base}, batch {cfg.train.batch_size}, model {cfg.model.name}, {workers} worker(s)",
             f"expected on a {ESTIMATE_CORES}-core CPU: ~{np.median(list(seconds.values())):.0f} s per run, "
             f"~{estimate_total_seconds(left, seconds, at_once) / 60:.0f} min "
             f"{'in all' if len(pending) == len(runs) else f'for the {len(pending)} left'} ("
             f"{f'{workers} single-thread workers share its cores; ' if workers > at_once else ''}"
             "GPU: see experiments/README.md)"]
    if not pending:
        lines[1] = f"{out} holds all {len(runs)} complete: nothing left to train (the sweep rewrites results.csv)"
    elif len(pending) < len(runs) or begun:
        lines.append(f"{out} holds {len(runs) - len(pending)} of them complete" + (
            f", {begun} begun and not finished (each resumes from its last checkpoint; timed whole here)" if begun
            else ""))
    if cfg.model.init_from:
        lines.append(f"{'the base run(s) start from' if base_ids(cfg) else 'every run fine-tunes'} the weights in "
                     f"{cfg.model.init_from}")
    s = cfg.sweep
    if s.search == "grid":
        points = len(s.lr) * len(s.weight_decay)
        each = f"{s.runs // points}" + (f"–{s.runs // points + 1}" if s.runs % points else "")
        lines.append(f"grid search: {points} points (lr {list(s.lr)} × weight decay {list(s.weight_decay)}), "
                     f"{each} run(s) each")
    if s.ensemble > 1:
        lines.append(f"vmap ensembles of up to {s.ensemble} runs of one base and role: {len(jobs)} jobs for the "
                     f"{workers} worker(s), each timed as its runs one after another")
    for r in runs[:5]:
        lines.append(f"  {r.run_id:<8} {r.role:<9} {json.dumps(r.overrides)}")
    if len(runs) > 5:
        lines.append(f"  ... {len(runs) - 5} more")
    return "\n".join(lines)


def check_config(cfg: Config, contact_hub: bool = True) -> None:
    """Refuse what every run, or the scoring after them, would fail on, before anything trains (and in a dry run,
    without loading torch): an unknown split or model, a split too long for `task.max_digits`, held-out sets it
    cannot draw, a missing `model.init_from` file, an unknown predictor, ensembles in mixed precision; and warn of
    too few shifts for the analyses and of splits a script registered (not a module of `task.modules`).
    Unknown keys, out-of-range values and probe losses the config refuses as it loads. A model from the Hugging Face
    hub is looked up there unless `contact_hub` is False (a dry run's: offline, the lookup retries for ~25 s)."""
    from gradtrace import predict
    from gradtrace.models import check_model
    from gradtrace.tasks.shifts import check_splits, draw_held_out, registered_by_a_script

    check_splits(cfg.task)
    draw_held_out(cfg.task)  # test and probe sets too many for the prompts there are (not the training pool: slow)
    if scripted := registered_by_a_script(cfg.task.shifts):
        warnings.warn(f"split(s) {', '.join(scripted)} are registered by this script or notebook, not by a module "
                      "that task.modules names: the sweep trains them, but the study's config.yaml cannot rebuild "
                      "them (resuming or extending it with `gradtrace sweep DIR/config.yaml` meets an unknown split); "
                      "register them in a .py file and name it in task.modules", UserWarning, stacklevel=2)
    if cfg.model.init_from and not Path(cfg.model.init_from).is_file():  # every run would fail at its start
        raise ValueError(f"model.init_from: no file {cfg.model.init_from}; give a safetensors file of weights, e.g. "
                         "DIR/weights/base/final.safetensors")
    if cfg.sweep.ensemble > 1:  # `auto` is checked where it resolves
        config_mod.check_ensemble_precision(cfg.train.precision)
    if contact_hub:
        check_model(cfg.model)  # looks up only a model from the hub: embedded names are known here
    predict.check_names([*cfg.predict.preregistered, *cfg.predict.exploratory])
    _warn_of_too_few_shifts(cfg)


def _warn_of_too_few_shifts(cfg: Config) -> None:
    """Warn, before a sweep trains, where `task.shifts` lists too few shifts for the analyses after it: stats'
    partial correlations need a pair, predict's scores (Spearman over pairs) three pairs. A study of one shift
    trained to its end and only then met stats' refusal."""
    shifts = cfg.task.shifts
    if not cfg.sweep.runs or len(shifts) >= 3:
        return
    warnings.warn(f"task.shifts lists {len(shifts)} shift(s) {shifts}: the partial correlations of stats and the "
                  "report need at least two shifts that vary across runs, predict's scores at least three (three "
                  "pairs); list more in task.shifts", UserWarning, stacklevel=2)


class WorkerDied(RuntimeError):
    """A run's worker process died (killed by the system, out of memory, say) with it on its pool each time it was
    tried: beside other runs, twice, and then alone. Running the sweep again retries it."""


class SweepError(RuntimeError):
    """A sweep did not finish: runs failed (every other run went on; re-running the sweep retries them), or another
    process is running a sweep into the same directory."""


def run_sweep(cfg: Config, out: str | Path, progress: bool = True, scheduler: str | None = None) -> pd.DataFrame:
    """Run every planned run not yet complete; write results.csv; return the results table. A run that fails does
    not stop the others (unless it is a base run, which the rest start from): its error is printed as it happens,
    its store group marked `failed`, and a `SweepError` naming the failed runs is raised once the others are done."""
    cfg, out = config_mod.checked(cfg), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # one sweep at a time per directory: a second would train the same runs over the first's; the operating system
    # releases the lock when its holder dies (filelock: the holder's process found dead, on a filesystem without
    # flock), so a killed sweep never blocks its re-run
    try:
        held = store.take_lock(out / "sweep.lock")
    except Timeout:
        raise SweepError(f"another process is running a sweep into {out} (it holds {out / 'sweep.lock'}); wait for "
                         "it to finish or stop it, then run this again to continue"
                         f"{store.held_where_no_flock(out / 'sweep.lock')}") from None
    with held:
        if not scheduler:
            return _run_locked(cfg, out, progress, None)
        from gradtrace.cluster import connect  # it imports this module: the sweep is the same, its runs elsewhere

        with connect(scheduler, out) as cluster:
            return _run_locked(cfg, out, progress, cluster)


BAR_REFRESH_S = (1.0, 30.0)  # how often the sweep's bar shows the steps in flight: on a terminal, into a file


class SweepBar:
    """The sweep's progress bar over its runs, and after it the runs in flight with their steps (`steps`, set by
    the dispatch of each stage and pool) and the runs failed, refreshed by a thread: each second on a terminal or in
    a notebook, each 30 s into a file (a batch job's log). Runs of many minutes (pythia-70m on a CPU) left the bar
    at 0 with no sign of life until the first ended."""

    def __init__(self, total: int, initial: int, disable: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="sweep", unit="run", disable=disable)
        self.steps: StepsInFlight | None = None
        self.failed = 0
        self._shown = ""
        self._showing = threading.Lock()  # the refresher's counts, read before a job ended, never shown after
        self._stop = threading.Event()
        self._thread = None
        if not disable:
            live = type(self.bar).__module__ == "tqdm.notebook" or getattr(sys.stderr, "isatty", lambda: False)()
            every = BAR_REFRESH_S[0] if live else BAR_REFRESH_S[1]
            self._thread = threading.Thread(target=self._refresh, args=(every,), name="gradtrace-sweep-bar",
                                            daemon=True)
            self._thread.start()

    def _refresh(self, every: float) -> None:
        while not self._stop.wait(every):
            self.show()

    def show(self, refresh: bool = True) -> None:
        """Set what is in flight and failed now after the bar (and write it, where it changed and `refresh`)."""
        with self._showing:
            words = (self.steps.describe() if self.steps is not None else "",
                     f"failed={self.failed}" if self.failed else "")
            text = ", ".join(word for word in words if word)
            if text != self._shown:
                self._shown = text
                self.bar.set_postfix_str(text, refresh=refresh)

    def update(self, runs: int = 1) -> None:
        """`runs` more ended (their jobs' steps no longer in flight)."""
        self.show(refresh=False)
        self.bar.update(runs)

    def close(self) -> None:
        """Stop the refresher and write the bar's last state."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a refresher held up (by tqdm's lock, say) stops no sweep from ending
        self.show(refresh=False)
        self.bar.close()


def _run_locked(cfg: Config, out: Path, progress: bool, cluster: Cluster | None) -> pd.DataFrame:
    """`run_sweep` with the directory's lock held."""
    from gradtrace import checkpoint  # here: a dry run imports this module, and must not import torch

    cfg = config_mod.with_absolute_paths(cfg)  # as a config loaded from a file has them (a cluster's workers too)
    runs = plan(cfg)
    check_config(cfg)  # before the plan is written
    if not base_ids(cfg):  # weights of another model: every run would fail on them at its start, one by one
        from gradtrace.models import check_init_from

        check_init_from(cfg.model)
    older = check_directory(cfg, out)
    items = check_study_items(cfg, out, runs)
    if not older:  # an older gradtrace's finished study keeps the config and plan it was trained with
        _write_plan(cfg, out, runs)
    root = store.open_experiment(out / "store.zarr", mode="a")
    pending = set(_not_complete(root, runs))
    foretold = cluster is None and foretell_other_arithmetic(cfg, out, root, len(pending))
    if cluster is not None and pending:
        cluster.check_workers_see(out, cfg)
    # jobs (ensembles) are formed from the whole plan, so a re-run trains each partial one with the same members
    jobs, complete = [], []
    for job in _jobs(cfg, runs):
        (jobs if any(r.run_id in pending for r in job) else complete).append(job)
    for job in complete:  # checkpoints a kill left between a run's complete status and their removal
        for root_dir in {f"ensemble-{job[0].run_id}", *(r.run_id for r in job)}:
            checkpoint.remove(out / "checkpoints" / root_dir)
    if any(len(job) > 1 for job in jobs):  # refuse members that cannot share an ensemble before any run trains
        from gradtrace.ensemble import check_members

        for job in jobs:
            check_members([run_config(cfg, r) for r in job])
    base = [job for job in jobs if job[0].role == "base"]  # base runs finish before the runs that start from them
    rest = [job for job in jobs if job[0].role != "base"]
    rows = results_table(out).to_dict("records")  # runs complete before this call; the finished ones join below
    bases = {r.run_id: started_from(r.overrides.get("model.init_from")) for r in runs}
    failed: dict[str, Exception] = {}
    bar = SweepBar(total=len(runs), initial=len(runs) - len(pending), disable=not progress)
    try:
        # closed when interrupted, so that the workers stop at once instead of training the queued jobs first
        with contextlib.closing(_in_stages(cfg, out, [base, rest], cluster, bases, failed, bar, items)) as outcomes:
            for job, outcome in outcomes:
                if isinstance(outcome, Exception):
                    ids = [r.run_id for r in job if r.run_id in pending]
                    _report_failure(ids, outcome, first=not failed, base=job[0].role == "base")
                    failed.update(dict.fromkeys(ids, outcome))
                    bar.failed = len(failed)
                    bar.update(len(ids))
                    # on a full disk every run after it would fail alike, one by one: the sweep stops, its runs in
                    # flight too (resumable from their checkpoints)
                    if disk_full(outcome):
                        break
                    continue
                for row in outcome:
                    if row["run_id"] not in pending:  # an ensemble's member that was already complete
                        continue
                    bar.update()
                    rows.append({"run_id": row["run_id"], "role": row["role"], "base": bases[row["run_id"]], **row})
                    table = pd.DataFrame(rows).sort_values("run_id", key=lambda ids: ids.map(store.run_order))
                    write_results(table, out)  # usable mid-sweep, in end order
    except KeyboardInterrupt:
        write_results(results_table(out), out)  # every run the store holds complete, also any not yet listed
        raise
    finally:
        bar.close()
    table = results_table(out)
    listed = f"{out / 'results.csv'} holds the {len(table)} complete run(s)"
    try:
        write_results(table, out)
    except OSError as err:
        if not (failed and disk_full(err)):
            raise
        # the failures' own error stands, not the table's: a re-run rewrites the table
        listed = (f"the store holds {len(table)} complete run(s) ({out / 'results.csv'} could not be rewritten and "
                  "lists those complete before the disk filled)")
    if pending:
        groups = store.run_groups(root)
        if not foretold:
            warn_of_mixed_arithmetic(out, groups, list(table.run_id), stacklevel=3)
        warn_of_divergence(groups, table, stacklevel=3)
    if failed:
        not_run = len(pending) - len(failed) - sum(row["run_id"] in pending for row in rows)
        alike = len(failed) > 1 and len({f"{type(e).__name__}: {e}" for e in failed.values()}) == 1
        retry = ("every run failed alike: mend what the error names (the config, say) and run the sweep again"
                 if alike and not len(table) else "run the same sweep again to retry the rest")
        not_run_words = "did not start (they start from a failed base run)"
        full = next((err for err in failed.values() if disk_full(err)), None)
        if full is not None:  # the sweep stopped: its runs in flight too
            not_run_words = "were stopped or did not start (the disk is full)"
            retry = f"{full_disk_words(full, out)}: free some space and run the same sweep again to go on"
        raise SweepError(f"{_failure_summary(failed, not_run, not_run_words)}. {listed}; {retry}")
    return table


def check_study_items(cfg: Config, out: Path, runs: list[PlannedRun]) -> str | None:
    """Refuse to train runs on other items than the study's finished runs were (a gradtrace whose task draws them
    otherwise: each run records its items' digest): both would be compared as one study, item by item. Returns the
    digest of the items this process draws, which every run left to train must draw too (`train_job`); None where
    none is left."""
    groups = store.run_groups(store.open_experiment(out / "store.zarr")) if (out / "store.zarr").exists() else {}
    finished = {name: g for name, g in groups.items() if g.attrs.get("status") == "complete"}
    pending = [r.run_id for r in runs if r.run_id not in finished]
    if not pending:
        return None
    from gradtrace.tasks import task_for

    today = task_for(cfg.task, cfg.model).items_digest
    recorded = {g.attrs.get("items_digest") for g in finished.values()}
    recorded.discard(None)  # runs from before the digest was recorded
    if recorded and recorded != {today}:
        from gradtrace.tasks.shifts import OWN_SPLIT_CHANGED

        others = ", ".join(sorted(recorded - {today}))
        raise SweepError(f"this study's runs were trained on other items (digest {others}) than this sweep draws for "
                         f"its config ({today}): its {len(pending)} run(s) left to train would be scored on other "
                         "test items beside them. Either this gradtrace draws them otherwise (train them with the "
                         f"gradtrace that made the study) {OWN_SPLIT_CHANGED}; or choose a new --out")
    return today


def foretell_other_arithmetic(cfg: Config, out: Path, root, pending: int) -> bool:
    """Warn, before anything trains, where the `pending` runs left would train with other gradtrace code, torch,
    transformers or kind of device than the study's complete runs recorded (all a local sweep knows before its runs
    start: their CPU kernels and threads are set in the process that trains them, and a GPU's name is read once CUDA
    starts, in the workers); whether it warned."""
    from gradtrace.train import resolve_device

    if not pending:
        return False
    finished = [{**g.attrs, "device": kernels.device_kind(g.attrs["device"])} if "device" in g.attrs else g.attrs
                for g in store.run_groups(root).values() if g.attrs.get("status") == "complete"]
    ours = {**kernels.versions(), "device": resolve_device(cfg.train.device).type}  # a GPU's name would start CUDA
    theirs = {key: sorted({str(a[key]) for a in finished if key in a} - {str(value)}) for key, value in ours.items()}
    changed = "; ".join(f"{key} {', '.join(values)} → {ours[key]}" for key, values in theirs.items() if values)
    if changed:
        warnings.warn(f"{out}'s {len(finished)} complete run(s) trained with other arithmetic than this sweep trains "
                      f"its {pending} run(s) left with ({changed}): {MIXED_ADVICE}", kernels.OtherArithmetic,
                      stacklevel=4)
    return bool(changed)


def _in_stages(cfg: Config, out: Path, stages: list[list[list[PlannedRun]]], cluster: Cluster | None,
               bases: dict[str, str | None], failed: dict[str, Exception], bar: SweepBar, items: str | None):
    """`_dispatch` of each stage's jobs in turn (the base runs, then the runs that start from them), leaving out
    the jobs whose base run has failed by the time their stage starts."""
    for stage in stages:
        with contextlib.closing(_dispatch(cfg, out, [job for job in stage if bases[job[0].run_id] not in failed],
                                          cluster, bar, items)) as outcomes:
            yield from outcomes


def _failure_summary(failed: dict[str, Exception], not_run: int, not_run_words: str) -> str:
    """Which runs failed with which error (runs sharing an error named together), and how many did not end, in
    `not_run_words` ("did not start (…)")."""
    by_error: dict[str, list[str]] = {}
    for run_id, err in failed.items():
        by_error.setdefault(f"{type(err).__name__}: {err}", []).append(run_id)
    named = "; ".join(f"{first_ids(ids)}: {error}" for error, ids in by_error.items())
    never = f" and {not_run} {not_run_words}" if not_run else ""
    return f"{len(failed)} run(s) failed{never} ({named})"


def _report_failure(run_ids: list[str], err: Exception, first: bool, base: bool) -> None:
    """Print a failed job's error as it happens: the first failure with its traceback, later ones in one line."""
    then = "the runs that start from it will not train" if base else "the sweep goes on with the other runs"
    if disk_full(err):
        then = "the disk is full: the sweep stops"
    text = f"{', '.join(run_ids)} failed: {type(err).__name__}: {err} ({then})"
    if first:
        text = "".join(traceback.format_exception(err)) + text
    tqdm.write(text, file=sys.stderr)


def _write_plan(cfg: Config, out: Path, runs: list[PlannedRun]) -> None:
    """Write the config and plan, where `check_directory` lets this sweep into `out`."""
    config_mod.dump(cfg, out / "config.yaml")
    write_json([asdict(r) for r in runs], out / "plan.json", indent=1)  # read by info, stats, predict and the report


def check_directory(cfg: Config, out: Path) -> list[str]:
    """Refuse a directory holding runs trained outside a sweep, or another sweep that trained anything, unless this
    one only extends it (more `sweep.runs`, other `predict` settings: every run planned before is planned again
    unchanged) or names its split files where they lie now (`task.modules`; `check_study_items` holds what they
    draw to the runs'), and an older gradtrace's sweep with anything left to train. Returns the config keys such a
    finished study lacks (none for a study of this gradtrace's, or none trained). Torch-free: a dry run given --out
    checks it too."""
    if not _trained_anything(out):
        return []
    if not (out / "plan.json").exists():  # a sweep writes its plan before any run
        raise ValueError(f"{out} holds runs trained outside a sweep (`gradtrace train` or your own loop: it has no "
                         "plan.json); a sweep would take those of its run ids for its own: choose a new --out")
    if not (out / "config.yaml").exists():  # nothing to hold this config against: it could mix two studies
        raise ValueError(f"{out} holds a trained sweep but not its config.yaml: put it back (each run records its "
                         "config, the run's own overrides applied: `gradtrace info`) or choose a new --out")
    older = config_mod.keys_missing_from(config_mod.read_resolved(out / "config.yaml"))
    unfinished = _not_complete(store.open_experiment(out / "store.zarr"), plan(cfg)) if older else []
    if unfinished:
        raise ValueError(f"{out} was trained by an older gradtrace, whose config had no {first_ids(older, 4)}: its "
                         f"{len(unfinished)} run(s) left to train ({first_ids(unfinished, 3)}) would train under "
                         "today's defaults, items and arrays beside runs of the old recipe; extend or resume it with "
                         "the gradtrace that made it, or choose a new --out (its finished runs read as they are)")
    previous = config_mod.load(out / "config.yaml")
    # task.modules: where the splits' files lie, named anew for a moved study; what they draw, the items digest holds;
    # model.init_from: the same weights at another path, their digest (`_other_start`)
    changed = config_mod.changed_keys(previous, cfg, ignore=("predict", "sweep.runs", "task.modules",
                                                              "model.init_from"))
    changed += _other_start(previous.model.init_from, cfg.model.init_from, out)
    if cfg.sweep.runs < previous.sweep.runs:
        changed.append(f"sweep.runs: {previous.sweep.runs} → {cfg.sweep.runs}, fewer")
    if changed:
        raise ValueError(f"{out} holds a sweep with a different config ({'; '.join(changed)}); resume with the "
                         "same config, extend it (only more sweep.runs or other predict settings), or choose a "
                         "new --out directory")
    return older


def _other_start(before: str | None, now: str | None, out: Path) -> list[str]:
    """`model.init_from` as a changed key where it names other weights than the study's runs started from: none
    where it names the same file at another path (a study moved, or gradtrace installed anew, whose shipped base
    lies elsewhere), as the digest its runs recorded (`init_digest`) tells."""
    from gradtrace.models import weights_digest

    if before == now:
        return []
    started = [g.attrs.get("init_digest") for g in store.run_groups(store.open_experiment(out / "store.zarr")).values()
               if store.init_weights(g.attrs) == before]
    if before and now and started and Path(now).is_file() and set(started) == {weights_digest(now)}:
        return []
    return [f"model.init_from: {before!r} → {now!r}"]


def _not_complete(root, runs: list[PlannedRun]) -> list[str]:
    """The ids of the planned runs that the store (its root group, or its run groups by id) does not hold complete."""
    return [r.run_id for r in runs if not (r.run_id in root and root[r.run_id].attrs.get("status") == "complete")]


def _trained_anything(out: Path) -> bool:
    """Whether the sweep in `out` holds a run that is complete or has a durable step (runs that failed before any,
    on a config error, say, leave nothing a new config would mix with)."""
    if not (out / "store.zarr").exists():
        return False
    runs = store.run_groups(store.open_experiment(out / "store.zarr")).values()
    return any(run.attrs.get("status") == "complete" or run.attrs.get("last_durable_step", -1) > 0 for run in runs)


def _dispatch(cfg: Config, out: Path, jobs: list[list[PlannedRun]], cluster: Cluster | None,
              bar: SweepBar | None = None, items: str | None = None):
    """Yield each finished job with its rows, or with the exception it raised (the other jobs go on): in process,
    on a pool of single-thread workers, or on a dask cluster (`Cluster.train`). Closed early (interrupted), it
    cancels the jobs not yet started and stops the pool's workers; a cluster's running tasks cannot be stopped and
    train on.
    The steps of the jobs in flight here or on a pool are shown in `bar`."""
    cfg_dict, workers = cfg.to_dict(), cfg.sweep.workers
    if cluster is not None:
        yield from cluster.train(cfg, out, jobs, items)
        return
    if workers <= 1 or len(jobs) <= 1:
        steps = StepsInFlight(1)
        if bar is not None:
            bar.steps = steps
        for job in jobs:
            try:
                outcome = train_job(cfg_dict, str(out), job, job_threads(cfg, job), (steps, 0), items)
            except Exception as err:
                outcome = err
            yield job, outcome
        return
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # spawned workers inherit it: one thread each, no mutual stalls
    context, gpus = get_context("spawn"), worker_gpus(cfg.train.device)
    queued, breaks = list(jobs), Counter()  # a job's count of pools that broke under it (a worker died: killed)
    try:
        while queued:  # a broken pool's jobs go to a new pool; broken twice, each to a pool of its own
            batches = [([j for j in queued if breaks[j[0].run_id] < 2], workers),
                       *(([j], 1) for j in queued if breaks[j[0].run_id] >= 2)]
            queued = []
            for batch, size in (b for b in batches if b[0]):
                steps = StepsInFlight(size, context)
                if bar is not None:
                    bar.steps = steps
                with contextlib.closing(_on_pool(cfg_dict, out, batch, size, context, gpus, steps, items)) as outcomes:
                    for job, outcome in outcomes:
                        if isinstance(outcome, BrokenProcessPool) and breaks[job[0].run_id] < 2:
                            breaks[job[0].run_id] += 1
                            queued.append(job)
                        else:
                            yield job, (WorkerDied(f"the worker process training this run died ({outcome}; killed by "
                                                   "the system, out of memory?), again when it trained alone")
                                        if isinstance(outcome, BrokenProcessPool) else outcome)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads


def _on_pool(cfg_dict: dict, out: Path, jobs: list[list[PlannedRun]], workers: int, context, gpus,
             steps: StepsInFlight | None = None, items: str | None = None):
    """Yield each job with its rows or exception, trained on a new pool of `workers` single-thread processes, each
    counting its job's steps in its slot of `steps`."""
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), gpus, context.Value("i", 0), steps)) as pool:
        futures = {pool.submit(train_job, cfg_dict, str(out), job, 1, None, items): job for job in jobs}
        try:
            while futures:
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in finished:
                    yield futures.pop(fut), job_outcome(fut)
        except BaseException:  # interrupted, or closed early: no queued job starts, the running ones stop
            _stop(pool)
            raise


def _stop(pool: ProcessPoolExecutor) -> None:
    """End a pool's workers now and cancel its queued jobs (a run stopped mid-way resumes from its checkpoint)."""
    workers = list((pool._processes or {}).values())  # no public way to reach them before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        process.terminate()


def job_threads(cfg: Config, job: list[PlannedRun]) -> int:
    """The threads a job trains on in this process, set by the config alone, never by how many jobs are left:
    thread counts set the summation order, so a retried, resumed or extended sweep trains each run as an
    uninterrupted one does. A study's one base run trains alone on `train.threads`, and so does every run with one
    worker; otherwise one thread, as each pool worker or dask task has."""
    alone = job[0].role == "base" and cfg.sweep.bases == 1
    return cfg.train.threads if alone or cfg.sweep.workers <= 1 else 1


def worker_gpus(device: str) -> list[str]:
    """The GPUs a local pool's workers take in turn, one each, where runs train on `cuda` (or `auto`) and this
    process sees more than one: their entries of CUDA_VISIBLE_DEVICES, or their indices. Otherwise none, and
    every worker sees what this process sees (a run given `cuda:N` trains there)."""
    if device not in ("cuda", "auto"):
        return []
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d.strip() for d in visible.split(",")][:count] if visible else [str(i) for i in range(count)]


def _start_worker(parent: int, gpus: list[str], started=None, steps: StepsInFlight | None = None) -> None:
    """A pool worker's start: Ctrl-C (SIGINT to the terminal's whole process group) is left to the sweep, which
    stops its workers in order, and the worker ends when the sweep that started it dies (killed, it cannot tell
    its workers), so none trains on into the store once the sweep's lock is gone, nor waits forever for work.
    tqdm's write lock is a thread lock here: its default, a multiprocessing semaphore, outlives a stopped worker
    and had Python report "leaked semaphore objects" as the sweep ended. The worker takes the next number of
    `started` (a shared count of the pool's workers started): given `gpus`, it sees the GPU of that turn, before
    anything touches CUDA; given `steps`, it counts its jobs' steps in that slot of them."""
    global _worker_steps
    from tqdm.std import tqdm as every_tqdm  # the base class: tqdm.auto's and any library's bars share its lock

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    every_tqdm.set_lock(threading.RLock())
    write_plain_text_where_unencodable()  # its warnings as the sweep's own: "≥" as ">=", not "\\u2265", where needed
    if started is not None:
        with started.get_lock():
            number, started.value = started.value, started.value + 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[number % len(gpus)]
    if steps is not None:
        _worker_steps = (steps, number) if number < len(steps.done) else None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def job_outcome(future) -> list[dict] | Exception:
    """A finished job's rows, or the exception it raised (a dask or concurrent.futures future)."""
    try:
        return future.result()
    except Exception as err:
        return err
