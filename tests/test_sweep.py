"""Sweeps: the plan varies axes independently, re-runs never record a run twice, a failed run stops no other,
base-run modes (the checks of a dask cluster: test_cluster.py)."""
import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
import zarr

from conftest import TINY, set_args, tiny_config
from gradtrace import config, store
from gradtrace.calibrate import SAME_AXIS, Calibration, assess
from gradtrace.sweep import (PlannedRun, SweepError, estimate_seconds, estimate_total_seconds, plan, run_config,
                             run_sweep)

TRAINS_ITS_BASE = {"model.init_from": None, "sweep.pretrain_steps": 800}  # the default, training its shipped base


def test_plan_varies_only_the_requested_axes():
    runs = [r for r in plan(tiny_config(sweep__runs=5, sweep__vary=["data"])) if r.role == "sweep"]
    assert len({r.overrides["train.init_seed"] for r in runs}) == 1
    assert len({r.overrides["train.data_seed"] for r in runs}) == 5
    assert all("train.lr" not in r.overrides for r in runs)
    runs = [r for r in plan(tiny_config(sweep__runs=5, sweep__vary=["init", "hparams"])) if r.role == "sweep"]
    assert len({r.overrides["train.init_seed"] for r in runs}) == 5
    assert len({r.overrides["train.data_seed"] for r in runs}) == 1
    assert len({r.overrides["train.lr"] for r in runs}) == 5
    assert plan(tiny_config(sweep__runs=5)) == plan(tiny_config(sweep__runs=5))  # a pure function of the config


def test_grid_search_gives_every_combination_alike_and_extends_them_alike():
    grid = {"sweep__search": "grid", "sweep__lr": [1e-3, 2e-3, 4e-3], "sweep__weight_decay": [0.0, 0.1]}
    runs = [r for r in plan(tiny_config(sweep__runs=12, **grid)) if r.role == "sweep"]
    points = [(r.overrides["train.lr"], r.overrides["train.weight_decay"]) for r in runs]
    assert points[:6] == [(1e-3, 0.0), (1e-3, 0.1), (2e-3, 0.0), (2e-3, 0.1), (4e-3, 0.0), (4e-3, 0.1)]
    assert points[6:] == points[:6]  # two runs at each point, in different data orders
    assert len({r.overrides["train.data_seed"] for r in runs}) == 12
    more = [r for r in plan(tiny_config(sweep__runs=18, **grid)) if r.role == "sweep"]
    assert more[:12] == runs  # a larger sweep adds a third run to every point
    spread = [r for r in plan(tiny_config(sweep__runs=12, sweep__bases=2, sweep__pretrain_steps=4, **grid))
              if r.role == "sweep"]
    for base in ("base-0", "base-1"):  # every base goes through every point: hparams not tied to a base
        mine = [r for r in spread if base in r.overrides["model.init_from"]]
        assert {(r.overrides["train.lr"], r.overrides["train.weight_decay"]) for r in mine} == set(points[:6])
    with pytest.raises(ValueError, match="add hparams to sweep.vary"):
        plan(tiny_config(sweep__vary=["data"], **grid))
    with pytest.raises(ValueError, match="random or grid"):
        plan(tiny_config(sweep__search="latin"))


@pytest.mark.parametrize("ranges", [{"sweep__lr": [1e-3, 2e-3, 4e-3]}, {"sweep__weight_decay": [0.1, 0.0]}])
def test_random_search_refuses_a_range_that_is_not_one(ranges):
    with pytest.raises(ValueError, match=r"random search takes a range \[low, high\].*sweep.search: grid"):
        plan(tiny_config(**ranges))


def test_random_search_keeps_small_learning_rates_apart():
    tiny = [r.overrides["train.lr"] for r in plan(tiny_config(sweep__runs=20, sweep__lr=[1e-8, 1e-7]))
            if r.role == "sweep"]
    assert all(1e-8 <= lr <= 1e-7 for lr in tiny) and len(set(tiny)) == 20  # not collapsed onto 0 and 1e-7
    assert all(float(f"{lr:.4g}") == lr for lr in tiny)  # 4 significant figures
    usual = [r.overrides["train.lr"] for r in plan(config.load("experiments/default.yaml")) if r.role == "sweep"]
    assert all(round(lr, 7) == lr for lr in usual)  # from 1e-4 up: 7 decimals, the default's lrs as they were


def test_random_search_draws_lr_log_uniform_and_weight_decay_uniform():
    """Over 1e-4–1e-2 half the lrs fall below 1e-3 (log-uniform: log10 lr uniform on [−4, −2]), and weight decay is
    uniform in its range; the default's first runs keep the draws its documented results came from. A uniform lr
    draw passed every other test (each lr in range, rounded, distinct)."""
    from scipy import stats as sps

    runs = [r.overrides for r in plan(tiny_config(sweep__runs=2000, sweep__lr=[1e-4, 1e-2],
                                                  sweep__weight_decay=[0.0, 0.1])) if r.overrides.get("train.lr")]
    lr, wd = np.array([r["train.lr"] for r in runs]), np.array([r["train.weight_decay"] for r in runs])
    assert len(lr) == 2000 and sps.kstest(np.log10(lr), sps.uniform(-4, 2).cdf).pvalue > 0.01
    assert sps.kstest(wd, sps.uniform(0, 0.1).cdf).pvalue > 0.01
    default = [r.overrides for r in plan(config.load("experiments/default.yaml")) if r.role == "sweep"][:3]
    assert [(r["train.lr"], r["train.weight_decay"]) for r in default] == [
        (0.0030083, 0.02698), (0.0008711, 0.00165), (0.0043406, 0.09128)]


def test_reference_runs_differ_only_in_data_order():
    refs = [r for r in plan(tiny_config(sweep__reference_runs=3)) if r.role == "reference"]
    assert len({r.overrides["train.init_seed"] for r in refs}) == 1
    assert len({r.overrides["train.data_seed"] for r in refs}) == 3
    assert all(set(r.overrides) == {"train.init_seed", "train.data_seed"} for r in refs)


def test_the_plans_time_puts_the_base_run_first_and_alone():
    cfg = config.load("experiments/default.yaml", TRAINS_ITS_BASE)
    runs = plan(cfg)
    seconds = {r.run_id: estimate_seconds(run_config(cfg, r)) for r in runs}
    base, rest = seconds["base"], sorted(s for run_id, s in seconds.items() if run_id != "base")
    assert runs[0].role == "base" and base > rest[0]  # 800 steps against 150
    jobs = [[r] for r in runs]
    assert estimate_total_seconds(jobs, seconds, 1) == pytest.approx(base + sum(rest))
    for w in (2, 4):  # the rest spread over the workers, whole runs each: the busiest one's share
        assert base + sum(rest) / w <= estimate_total_seconds(jobs, seconds, w) <= base + sum(rest) / w + max(rest)


def test_the_plans_time_counts_an_ensemble_as_its_members_on_one_worker():
    cfg = tiny_config(sweep__runs=10, sweep__reference_runs=1, sweep__ensemble=8, sweep__workers=2,
                      sweep__pretrain_steps=6)
    runs = plan(cfg)
    seconds = dict.fromkeys((r.run_id for r in runs), 1.0)
    seconds["base"] = 5.0
    from gradtrace.sweep import _jobs, describe_plan

    assert estimate_total_seconds(_jobs(cfg, runs), seconds, 2) == pytest.approx(5 + 8)  # not 5 + 11 / 2
    assert "vmap ensembles of up to 8 runs of one base and role: 4 jobs for the 2 worker(s)" in describe_plan(cfg, runs)


def test_the_plans_time_on_two_cores_trains_no_more_than_two_runs_at_once():
    """8 and 32 workers gave a quarter and a sixteenth of 2 workers' time, 'expected on a 2-core CPU'."""
    from gradtrace.sweep import describe_plan

    def expected(workers: int) -> str:
        cfg = config.load("experiments/large.yaml", {"sweep.workers": workers})
        return describe_plan(cfg, plan(cfg)).splitlines()[1]

    two = expected(2)
    assert two.startswith("expected on a 2-core CPU")
    for more in (8, 32):
        assert expected(more) == two.replace("(GPU", f"({more} single-thread workers share its cores; GPU")


def test_the_plans_time_counts_the_threads_a_run_trains_on():
    """With one worker every run trains on `train.threads`, and a study's one base run does with any number: the
    estimate, of one thread beside another worker, was shown for them too (large.yaml, one worker: ~139 min)."""
    from gradtrace.sweep import TWO_THREADS_SPEEDUP, describe_plan, estimate_job_seconds

    def minutes(**overrides) -> float:
        cfg = config.load("experiments/large.yaml", overrides)
        return float(describe_plan(cfg, plan(cfg)).splitlines()[1].split("~")[2].split(" min")[0])

    one, both = minutes(**{"sweep.workers": 1, "train.threads": 1}), minutes(**{"sweep.workers": 1, "train.threads": 2})
    assert both == pytest.approx(one / TWO_THREADS_SPEEDUP, abs=1) and minutes(**{"sweep.workers": 1}) == both
    cfg = config.load("experiments/default.yaml", {"train.threads": 2, **TRAINS_ITS_BASE})
    base = next(r for r in plan(cfg) if r.role == "base")
    assert estimate_job_seconds(cfg, [base])["base"] == pytest.approx(
        estimate_seconds(run_config(cfg, base)) / TWO_THREADS_SPEEDUP)  # alone on both threads
    sweep_run = next(r for r in plan(cfg) if r.role == "sweep")
    assert estimate_job_seconds(cfg, [sweep_run])[sweep_run.run_id] == estimate_seconds(run_config(cfg, sweep_run))


def test_rerun_of_an_interrupted_sweep_has_every_run_exactly_once(tmp_path):
    cfg = tiny_config(sweep__runs=3, sweep__workers=1, sweep__reference_runs=0, train__steps=8)
    run_sweep(cfg, tmp_path, progress=False)
    root = zarr.open_group(tmp_path / "store.zarr", mode="a")
    store.set_status(root["run-001"], "running")  # as if killed before it finished
    root["run-002"].attrs["status"] = "failed"
    (tmp_path / "checkpoints" / "run-000").mkdir(parents=True)  # as if killed after its status, before removal
    meta = tmp_path / "store.zarr" / "run-002" / "zarr.json"  # as if killed while its group was created
    meta.rename(meta.with_suffix(".0a1b.partial"))
    with pytest.warns(UserWarning, match="run-002 is left out"):
        table = run_sweep(cfg, tmp_path, progress=False)
    assert sorted(table.run_id) == ["run-000", "run-001", "run-002"]
    assert zarr.open_group(tmp_path / "store.zarr")["run-002"].attrs["status"] == "complete"
    assert not list((tmp_path / "store.zarr").rglob("*.partial"))
    assert pd.read_csv(tmp_path / "results.csv").run_id.is_unique
    assert not (tmp_path / "checkpoints" / "run-000").exists()


@pytest.mark.parametrize("workers, ensemble", [(2, 1), (1, 1), (1, 2)])
def test_the_sweeps_bar_counts_the_steps_of_the_runs_in_flight(tmp_path, capsys, monkeypatch, workers, ensemble):
    """Runs of many minutes (pythia-70m on a CPU) left the bar at 0 runs with no sign of life until the first ended:
    it shows the steps their training loops have done, in a pool's workers, in this process and in ensembles."""
    from gradtrace import sweep

    monkeypatch.setattr(sweep, "BAR_REFRESH_S", (0.02, 0.02))
    run_sweep(tiny_config(sweep__runs=2, sweep__workers=workers, sweep__ensemble=ensemble, sweep__reference_runs=0,
                          train__steps=60), tmp_path)
    err = capsys.readouterr().err
    shown = [(int(n), int(done), int(planned)) for n, done, planned
             in re.findall(r"(\d) in flight: (\d+)/(\d+) steps", err)]
    assert "in flight" not in err.rsplit("\r", 1)[-1]  # its last state: nothing in flight
    assert any(done > 0 for _, done, _ in shown)  # counted before a run ended
    assert all(0 <= done <= planned == 60 * n // ensemble for n, done, planned in shown)  # an ensemble's once
    assert {n for n, _, _ in shown} <= {1, 2} and (ensemble == 1 or {n for n, _, _ in shown} == {2})  # its members


def test_a_sweep_refused_before_it_trains_leaves_no_bar_behind(tmp_path, monkeypatch):
    """A sweep that raised before its first run (members that cannot share an ensemble, say) left its bar's
    refresher thread running, one more for each call in a notebook."""
    import threading

    import gradtrace.ensemble

    def refuse(cfgs):
        raise ValueError("not members of one ensemble")

    monkeypatch.setattr(gradtrace.ensemble, "check_members", refuse)
    with pytest.raises(ValueError, match="not members"):
        run_sweep(tiny_config(sweep__runs=2, sweep__ensemble=2, sweep__reference_runs=0), tmp_path)
    assert not [t for t in threading.enumerate() if t.name == "gradtrace-sweep-bar"]


def test_steps_in_flight_are_those_of_the_jobs_each_worker_trains():
    from multiprocessing import get_context

    from gradtrace import sweep

    code = ("import os; from multiprocessing import get_context; from gradtrace import sweep; "
            "steps, started = sweep.StepsInFlight(2, get_context('spawn')), get_context('spawn').Value('i', 0)\n"
            "for _ in range(3):\n"
            "    sweep._start_worker(os.getppid(), [], started, steps)\n"
            "    print(None if sweep._worker_steps is None else sweep._worker_steps[1])")
    slots = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert slots == ["0", "1", "None"]  # each worker of a pool of two takes the next slot; one more counts nothing
    steps = sweep.StepsInFlight(2, get_context("spawn"))
    assert steps.describe() == ""
    steps.count(0, 40, 150)
    steps.count(1, 10, 800, runs=4)  # an ensemble of 4
    assert steps.describe() == "5 in flight: 50/950 steps"
    steps.count(0, 0, 0)  # its job ended
    assert steps.describe() == "4 in flight: 10/800 steps"


@pytest.mark.parametrize("where", ["worker pool", "dask"])
def test_a_failed_run_stops_no_other(tmp_path, capsys, where):
    from dask.distributed import LocalCluster

    cfg = tiny_config(sweep__runs=4, sweep__workers=2, sweep__reference_runs=0, train__steps=2,
                      train__checkpoint_every=1)
    failing = {"run-001", "run-003"}
    for run_id in failing:  # a file where their checkpoint is written first: they fail at their first checkpoint
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        (tmp_path / "checkpoints" / f"{run_id}.tmp").write_text("in the way")
    with pytest.raises(SweepError, match=r"^2 run\(s\) failed \(.*(FileExistsError|NotADirectoryError)") as raised:
        if where == "dask":
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
                run_sweep(cfg, tmp_path, progress=False, scheduler=cluster.scheduler_address)
        else:
            run_sweep(cfg, tmp_path, progress=False)
    assert all(run_id in str(raised.value) for run_id in failing)
    complete = {f"run-00{i}" for i in range(4)} - failing
    assert set(pd.read_csv(tmp_path / "results.csv").run_id) == complete
    root = zarr.open_group(tmp_path / "store.zarr", mode="r")
    assert not any(run_id in root and root[run_id].attrs["status"] == "complete" for run_id in failing)
    assert "Traceback" in capsys.readouterr().err  # the first failure's, printed as it happened


DYING_WORKER = """
import multiprocessing, os, pathlib
from gradtrace import store
_set_status, _marker = store.set_status, pathlib.Path(__file__).with_name("died")
def set_status(group, status, **kw):  # a pool worker dies as run-001 completes: always, or the first time only
    if status == "complete" and group.basename == "run-001" and multiprocessing.parent_process() is not None:
        if {always} or not _marker.exists():
            _marker.touch()
            os._exit(9)
    return _set_status(group, status, **kw)
store.set_status = set_status
"""


@pytest.mark.slow
@pytest.mark.parametrize("always", [False, True], ids=["once", "always"])
def test_a_worker_that_dies_fails_no_other_run(tmp_path, always):
    """A worker killed mid-run (by the system, out of memory, say) broke the pool, and every run queued on it was
    reported failed ("the sweep goes on with the other runs", which none did). Its runs are retried on a new pool;
    a run whose worker dies each time fails alone."""
    (tmp_path / "dying.py").write_text(DYING_WORKER.format(always=always))
    cfg = tiny_config(sweep__runs=4, sweep__workers=2, sweep__reference_runs=0, train__steps=2,
                      task__modules=[str(tmp_path / "dying.py")])
    if always:
        with pytest.raises(SweepError, match=r"^1 run\(s\) failed \(run-001: WorkerDied"):
            run_sweep(cfg, tmp_path / "out", progress=False)
    else:
        run_sweep(cfg, tmp_path / "out", progress=False)
    assert (tmp_path / "died").exists()
    complete = {f"run-00{i}" for i in range(4)} - ({"run-001"} if always else set())
    assert set(pd.read_csv(tmp_path / "out" / "results.csv").run_id) == complete


def fail_in_training(monkeypatch, fails, error: Exception = MemoryError("out of memory")) -> None:
    """Make gradtrace's `train` raise `error` for the runs `fails(cfg, run_id, role)` picks (runs in process)."""
    import gradtrace.train

    train = gradtrace.train.train

    def train_or_fail(cfg, out, run_id, role, **kwargs):
        if fails(cfg, run_id, role):
            raise error
        return train(cfg, out, run_id, role, **kwargs)

    monkeypatch.setattr(gradtrace.train, "train", train_or_fail)


def test_a_full_disk_starts_no_other_run(tmp_path, monkeypatch, capsys):
    """On a full disk each run after the first to fail failed alike in its turn, a line each (a study of hundreds of
    runs printed hundreds). None starts; the message says the disk is full, and a re-run after freeing space ends
    the study."""
    import errno

    fail_in_training(monkeypatch, lambda cfg, run_id, role: run_id == "run-001",
                     OSError(errno.ENOSPC, "No space left on device"))
    cfg = tiny_config(sweep__runs=4, sweep__workers=1, sweep__reference_runs=0, train__steps=2)
    with pytest.raises(SweepError, match=r"^1 run\(s\) failed and 2 were stopped or did not start \(the disk is "
                                         r"full\) .*"
                                         r"is full \(or your quota on it is used up\): free some space"):
        run_sweep(cfg, tmp_path, progress=False)
    assert "run-001 failed: OSError: [Errno 28] No space left on device (the disk is full: the sweep stops)" in (
        capsys.readouterr().err)
    assert set(zarr.open_group(tmp_path / "store.zarr", mode="r")) == {"run-000"}
    monkeypatch.undo()
    assert sorted(run_sweep(cfg, tmp_path, progress=False).run_id) == [f"run-00{i}" for i in range(4)]


def test_a_full_disk_that_stops_the_tables_rewrite_too_keeps_the_sweeps_error(tmp_path, monkeypatch):
    """The disk still full as the sweep ended, rewriting results.csv failed, and its OSError replaced the sweep's
    error: which runs failed, and what to do. The sweep's error stands and says the table was not rewritten."""
    import errno

    import gradtrace.sweep

    full = OSError(errno.ENOSPC, "No space left on device")
    fail_in_training(monkeypatch, lambda cfg, run_id, role: run_id == "run-001", full)
    written = []

    def write_once(table, out):  # run-000's row; then the disk is full
        if written:
            raise full
        written.append(len(table))

    monkeypatch.setattr(gradtrace.sweep, "write_results", write_once)
    cfg = tiny_config(sweep__runs=3, sweep__workers=1, sweep__reference_runs=0, train__steps=2)
    with pytest.raises(SweepError, match=r"^1 run\(s\) failed and 1 were stopped .*the store holds 1 complete run\(s\) "
                                         r"\(.*results.csv could not be rewritten and lists those complete before"):
        run_sweep(cfg, tmp_path, progress=False)
    assert written == [1]


def test_a_failed_base_run_stops_the_runs_that_start_from_it(tmp_path, monkeypatch):
    fail_in_training(monkeypatch, lambda cfg, run_id, role: role == "base")
    cfg = tiny_config(sweep__runs=2, sweep__workers=1, sweep__reference_runs=1, sweep__pretrain_steps=4,
                      train__steps=2)
    with pytest.raises(SweepError, match=r"^1 run\(s\) failed and 3 did not start .*\(base: MemoryError: out of"):
        run_sweep(cfg, tmp_path, progress=False)
    from gradtrace.results import load_item_correctness

    assert load_item_correctness(tmp_path) == {}  # no complete sweep run: nothing to stack
    monkeypatch.undo()
    table = run_sweep(cfg, tmp_path, progress=False)  # running it again retries them all
    assert sorted(table.run_id) == ["base", "ref-000", "run-000", "run-001"]


def test_a_failed_base_stops_only_its_own_runs_and_a_base_keeps_its_weights_uncaptured(tmp_path, monkeypatch):
    fail_in_training(monkeypatch, lambda cfg, run_id, role: run_id == "base-1")
    cfg = tiny_config(sweep__runs=4, sweep__workers=1, sweep__reference_runs=0, sweep__pretrain_steps=4,
                      sweep__bases=2, train__steps=2, capture__enabled=False)  # no capture: the bases save weights
    with pytest.raises(SweepError, match=r"^1 run\(s\) failed and 2 did not start"):
        run_sweep(cfg, tmp_path, progress=False)
    assert sorted(pd.read_csv(tmp_path / "results.csv").run_id) == ["base-0", "run-000", "run-002"]


def test_a_jobs_threads_are_set_by_the_config_not_by_how_many_jobs_are_left(tmp_path, monkeypatch):
    import gradtrace.sweep as sweep

    threads = []
    monkeypatch.setattr(sweep, "train_job", lambda cfg_dict, out, job, n, *rest: threads.append(n) or [])
    cfg = tiny_config(sweep__runs=2, sweep__workers=2, train__threads=2)
    last = [[r for r in plan(cfg) if r.run_id == "run-001"]]  # the one job left of a resumed or extended sweep
    list(sweep._dispatch(cfg, tmp_path, last, None))
    assert threads == [1]  # as in the pool of single-thread workers that trained the others
    base = [[PlannedRun("base", "base")]]
    list(sweep._dispatch(tiny_config(sweep__workers=2, train__threads=2, sweep__pretrain_steps=4), tmp_path, base,
                         None))
    assert threads == [1, 2]  # a study's one base trains alone, on train.threads


def test_a_run_on_the_default_threads_does_not_inherit_those_of_the_jobs_before(tmp_path, monkeypatch):
    """`train.threads: 0` is torch's thread count in a fresh process; in a process whose earlier job set another
    (a dask worker's, the in-process base run's) the run trained on that one, and a resumed sweep on another."""
    import torch

    import gradtrace.sweep as sweep
    import gradtrace.train

    trained_on = []

    def train(cfg, *args, **kwargs):
        trained_on.append(cfg.train.threads)
        return types.SimpleNamespace(row=dict)

    monkeypatch.setattr(gradtrace.train, "train", train)
    monkeypatch.setattr(gradtrace.train, "default_threads", lambda: 1)  # read by the process's first job
    torch.set_num_threads(2)  # left by an earlier job
    try:
        sweep.train_job(tiny_config(train__threads=0).to_dict(), str(tmp_path), [PlannedRun("run-000", "sweep")], 0)
    finally:
        torch.set_num_threads(1)
    assert trained_on == [1]


def test_train_on_the_default_threads_after_a_run_that_set_others(tmp_path):
    """The same in your own process: a run of `train.threads: 0` after one of 2 trained on 2 and recorded it."""
    script = ("import sys, torch, zarr; sys.path.insert(0, 'tests'); from conftest import tiny_config; "
              "from gradtrace.train import train; default = torch.get_num_threads(); "
              "train(tiny_config(train__steps=1, train__threads=default + 1), sys.argv[1], 'more', progress=False); "
              "train(tiny_config(train__steps=1, train__threads=0), sys.argv[1], 'default', progress=False); "
              "root = zarr.open_group(sys.argv[1] + '/store.zarr', mode='r'); "
              "print(default, [root[r].attrs['cpu_threads'] for r in ('more', 'default')])")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.stdout.split()[-3:] == ["1", "[2,", "1]"]  # a fresh process: its own default, 1 here


def _as_if_written_by_an_older_gradtrace(out: Path, key: str = "task.n_train_eval") -> None:
    """Take `key` out of a study's config.yaml and its runs' config attributes: a gradtrace from before the key."""
    import yaml

    section, name = key.split(".")
    data = yaml.safe_load((out / "config.yaml").read_text())
    del data[section][name]
    (out / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    root = zarr.open_group(out / "store.zarr", mode="a")
    for run in root.group_values():
        attrs = dict(run.attrs["config"])
        attrs[section] = {k: v for k, v in attrs[section].items() if k != name}
        run.attrs["config"] = attrs


def test_an_older_gradtraces_study_is_read_as_it_is_and_not_trained_on(tmp_path):
    """Extending or resuming a study of an older gradtrace trained new runs under today's defaults and items beside
    the old ones (an audit: 6.5% against 0.0% ID for the same planned run), and a re-run rewrote its config.yaml with
    keys its runs never had."""
    cfg = tiny_config(sweep__runs=2, sweep__workers=1, sweep__reference_runs=0, train__steps=4)
    run_sweep(cfg, tmp_path, progress=False)
    _as_if_written_by_an_older_gradtrace(tmp_path)
    written = (tmp_path / "config.yaml").read_text()
    assert run_sweep(cfg, tmp_path, progress=False).run_id.tolist() == ["run-000", "run-001"]  # nothing to train
    assert (tmp_path / "config.yaml").read_text() == written  # kept as its runs were trained
    with pytest.raises(ValueError, match=r"trained by an older gradtrace, whose config had no task.n_train_eval: "
                                         r"its 1 run\(s\) left to train \(run-002\)"):
        run_sweep(config.from_dict(cfg.to_dict(), {"sweep.runs": 3}), tmp_path, progress=False)
    store.set_status(zarr.open_group(tmp_path / "store.zarr", mode="a")["run-001"], "running")  # as if killed
    with pytest.raises(ValueError, match=r"older gradtrace.*left to train \(run-001\)"):
        run_sweep(cfg, tmp_path, progress=False)
    from gradtrace.train import check_resumes_its_config  # what `train --resume` asks of a checkpointed run

    with pytest.raises(ValueError, match="run 'run-001' was started by an older gradtrace, whose config had no "
                                         "task.n_train_eval"):
        check_resumes_its_config(zarr.open_group(tmp_path / "store.zarr")["run-001"], run_config(cfg, plan(cfg)[1]),
                                 "run-001")


def test_runs_on_other_items_than_the_studys_are_refused(tmp_path):
    """A gradtrace whose task draws its items otherwise (the same config) would score new or resumed runs on other
    test items beside the study's: each run records its items' digest, and a sweep or resume compares it."""
    from gradtrace.tasks import task_for
    from gradtrace.train import check_same_items

    cfg = tiny_config(sweep__runs=2, sweep__workers=1, sweep__reference_runs=0, train__steps=4)
    run_sweep(cfg, tmp_path, progress=False)
    root = zarr.open_group(tmp_path / "store.zarr", mode="a")
    digest = task_for(cfg.task, cfg.model).items_digest
    assert {root[r].attrs["items_digest"] for r in ("run-000", "run-001")} == {digest}
    assert task_for(config.from_dict(cfg.to_dict(), {"task.n_test": cfg.task.n_test + 1}).task,
                    cfg.model).items_digest != digest
    root["run-000"].attrs["items_digest"] = "drawn-otherwise"  # as an older gradtrace's task would have drawn them
    assert run_sweep(cfg, tmp_path, progress=False).run_id.tolist() == ["run-000", "run-001"]  # nothing to train
    with pytest.raises(SweepError, match=r"other items \(digest drawn-otherwise\) than this sweep draws for its "
                                         r"config .*its 1 run\(s\) left to train.* its file \(task.modules\) edited "
                                         r"since"):
        run_sweep(config.from_dict(cfg.to_dict(), {"sweep.runs": 3}), tmp_path, progress=False)
    assert "run-002" not in root and len(json.loads((tmp_path / "plan.json").read_text())) == 2  # refused first
    with pytest.raises(ValueError, match="run 'run-000' was trained on other items than this gradtrace draws"):
        check_same_items(root["run-000"], task_for(cfg.task, cfg.model), "run-000")  # as a resume asks
    check_same_items(root["run-001"], task_for(cfg.task, cfg.model), "run-001")


NO_FLOCK = "import errno, fcntl; fcntl.flock = lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, 'no flock')); "


def _without_flock(monkeypatch) -> None:
    """This process's flock failing as on a filesystem without it (ENOSYS), as NO_FLOCK makes another's."""
    monkeypatch.setattr("fcntl.flock", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no flock")))


@contextlib.contextmanager
def _lock_held_elsewhere(path: Path, flock: bool = True) -> Iterator[None]:
    """A file lock held by another process while the block runs, which is then killed (SIGKILL: no cleanup, as when a
    sweep is killed); `flock=False`: on a filesystem without flock (a Lustre mount without it)."""
    script = ("" if flock else NO_FLOCK) + ("import sys, time; from filelock import FileLock; "
                                            "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
                                            "time.sleep(600)")
    with subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline() == "held\n"
            yield
        finally:
            holder.kill()


def test_a_second_sweep_into_a_directory_is_refused_until_the_first_is_gone(tmp_path):
    cfg = tiny_config(sweep__runs=1, sweep__workers=1, sweep__reference_runs=0, train__steps=2)
    with _lock_held_elsewhere(tmp_path / "sweep.lock"):  # as a sweep running there holds it
        with pytest.raises(SweepError, match="another process is running a sweep into"):
            run_sweep(cfg, tmp_path, progress=False)
        assert not (tmp_path / "store.zarr").exists()  # refused before touching anything
    assert run_sweep(cfg, tmp_path, progress=False).run_id.tolist() == ["run-000"]  # the lock died with its holder


@pytest.mark.filterwarnings("ignore:flock not supported on this filesystem")
def test_a_sweep_into_a_directory_without_flock_is_refused_while_held_and_says_how_to_free_a_dead_machines_lock(
        tmp_path, monkeypatch):
    """On a filesystem without flock (Lustre mounted without it) filelock locks by the lock file's existence: before
    filelock 4.2.1 a sweep crashed there (NotImplementedError, before 3.24), ran beside another (3.24–4.0) or was
    refused for good once its holder was killed (4.1–4.2.0); and a lock left by a machine that died cannot be told
    from a live one's, which gradtrace's words said to wait for."""
    _without_flock(monkeypatch)
    cfg = tiny_config(sweep__runs=1, sweep__workers=1, sweep__reference_runs=0, train__steps=2)
    lock = tmp_path / "sweep.lock"
    with _lock_held_elsewhere(lock, flock=False):
        with pytest.raises(SweepError, match=rf"another process is running a sweep into .*'s filesystem has no flock "
                                             rf".*delete {re.escape(str(lock))} and run again"):
            run_sweep(cfg, tmp_path, progress=False)
        held = lock.read_text()
    assert lock.exists()  # its holder killed, on this machine: the lock is taken
    assert run_sweep(cfg, tmp_path, progress=False).run_id.tolist() == ["run-000"]
    lock.write_text(re.sub(r"(?m)^(\d+\n)[^\n]*", r"\1another-node", held, count=1))  # a dead machine's lock
    with pytest.raises(SweepError, match="has no flock"):
        run_sweep(cfg, tmp_path, progress=False)
    lock.unlink()  # as the words say
    assert run_sweep(cfg, tmp_path, progress=False).run_id.tolist() == ["run-000"]


def test_a_filesystem_refusing_locks_is_an_error_naming_the_lock_file_and_what_to_do(tmp_path, monkeypatch, capsys):
    """An NFS mount whose lock service is down refuses flock with ENOLCK: the sweep (and a run's trainer) stopped with
    "[Errno 37] No locks available", naming neither the file nor the cause."""
    from gradtrace.cli import main
    from gradtrace.train import train

    monkeypatch.setattr("fcntl.flock", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks available")))
    cfg = tiny_config(sweep__runs=1, sweep__workers=1, sweep__reference_runs=0, train__steps=2)
    words = r"\[Errno 37\] the filesystem of .* refused to lock .*{} \(No locks available\).*lock service"
    with pytest.raises(OSError, match=words.format(re.escape(str(tmp_path / "sweep.lock")))) as refused:
        run_sweep(cfg, tmp_path, progress=False)
    assert refused.value.errno == errno.ENOLCK
    with pytest.raises(OSError, match=words.format(re.escape(str(tmp_path / "locks" / "run-000.lock")))):
        train(cfg, tmp_path, "run-000", progress=False)
    assert not (tmp_path / "store.zarr").exists()
    config.dump(cfg, tmp_path / "study.yaml")
    assert main(["sweep", str(tmp_path / "study.yaml"), "--out", str(tmp_path)]) == 2
    assert re.fullmatch(r"gradtrace sweep: error: \[Errno 37\] the filesystem of .*sweep\.lock.*\)\n",
                        capsys.readouterr().err, re.S)


def _children(pid: int) -> set[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _sweep_process(tmp_path: Path, settings: dict) -> subprocess.Popen:
    """`gradtrace sweep` of the tiny config with these settings into tmp_path/sweep, started in a subprocess that
    writes its messages to tmp_path/stderr.txt (a pipe nobody reads could fill and stall it)."""
    from conftest import TINY, set_args

    with open(tmp_path / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "gradtrace.cli", "sweep", os.devnull, "--out",
                                 str(tmp_path / "sweep"), *set_args({**TINY, "sweep.reference_runs": 0, **settings})],
                                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                start_new_session=True)  # a process group of its own, as a terminal's command has


def _wait_for(condition, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.2)
    assert condition(), "timed out"


def _assert_ended(workers: set[int], seconds: float = 30) -> None:
    """The sweep's worker processes end within `seconds` (any left are killed: no orphan outlives a failed test)."""
    deadline = time.time() + seconds
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "pool workers outlived the sweep"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_sweeps_workers_end_with_it(tmp_path):
    sweep = _sweep_process(tmp_path, {"train.steps": 2000, "sweep.runs": 4, "sweep.workers": 2})
    try:
        _wait_for(lambda: len(_children(sweep.pid)) >= 2)  # its two workers (and a helper or two)
        workers = _children(sweep.pid)
        assert len(workers) >= 2 and sweep.poll() is None
    finally:
        sweep.kill()  # SIGKILL: the sweep cannot tell its workers
        sweep.wait()
    _assert_ended(workers)


def test_a_terminated_sweep_stops_as_ctrl_c_does(tmp_path):
    """SIGTERM (a batch scheduler cancelling the job): the run training in the sweep's process records that it
    stopped, results.csv is written, and the command says how to go on, with the signal's exit status."""
    sweep = _sweep_process(tmp_path, {"sweep.pretrain_steps": 5000, "sweep.runs": 1, "sweep.workers": 1})
    try:
        _wait_for(lambda: (tmp_path / "sweep" / "checkpoints" / "base").exists() or sweep.poll() is not None)
        sweep.send_signal(signal.SIGTERM)  # while the base run trains
        sweep.wait(60)
    finally:
        sweep.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert sweep.returncode == 143, err
    assert "terminated (SIGTERM); what was complete is kept: run the same command to go on" in err
    attrs = zarr.open_group(tmp_path / "sweep" / "store.zarr", mode="r")["base"].attrs
    assert attrs["status"] == "failed" and attrs["error"].startswith("Terminated")
    assert (tmp_path / "sweep" / "results.csv").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop", ["SIGTERM to the sweep", "Ctrl-C: SIGINT to its process group"])
def test_a_stopped_sweep_stops_its_workers_cleanly(tmp_path, stop):
    """The sweep stops its workers (theirs is no SIGINT of their own), so the runs they trained are left to resume,
    and nothing of theirs outlives them (tqdm's multiprocessing lock did: "leaked semaphore objects")."""
    sweep = _sweep_process(tmp_path, {"train.steps": 2000, "sweep.runs": 4, "sweep.workers": 2})
    try:
        _wait_for(lambda: (tmp_path / "sweep" / "checkpoints" / "run-000").exists() or sweep.poll() is not None)
        workers = _children(sweep.pid)
        if stop.startswith("SIGTERM"):
            sweep.send_signal(signal.SIGTERM)
        else:
            os.killpg(sweep.pid, signal.SIGINT)
        sweep.wait(60)
    finally:
        sweep.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert sweep.returncode == (143 if stop.startswith("SIGTERM") else 130), err
    assert "leaked" not in err
    _assert_ended(workers)
    runs = zarr.open_group(tmp_path / "sweep" / "store.zarr", mode="r").groups()
    statuses = [run.attrs["status"] for _, run in runs]
    assert "running" in statuses and "failed" not in statuses  # stopped by the sweep, left to resume


def test_an_unknown_shift_is_refused_before_the_sweep_writes_its_plan(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'lenght'"):
        run_sweep(tiny_config(task__shifts=["lenght"], sweep__runs=1, sweep__workers=1), tmp_path, progress=False)
    assert not (tmp_path / "config.yaml").exists()  # so the corrected sweep is not refused as another config


def test_resuming_with_another_config_is_refused(tmp_path):
    run_sweep(tiny_config(sweep__runs=1, sweep__workers=1, sweep__reference_runs=0, train__steps=2), tmp_path,
              progress=False)
    with pytest.raises(ValueError, match=r"different config \(train.steps: 2 → 3\)"):
        run_sweep(tiny_config(sweep__runs=1, sweep__workers=1, sweep__reference_runs=0, train__steps=3), tmp_path,
                  progress=False)
    (tmp_path / "config.yaml").unlink()  # without it, the other config trained beside the first, mixing two studies
    with pytest.raises(ValueError, match="holds a trained sweep but not its config.yaml"):
        run_sweep(tiny_config(sweep__runs=1, sweep__workers=1, sweep__reference_runs=0, train__steps=3), tmp_path,
                  progress=False)


def test_a_sweep_can_be_extended_with_more_runs(tmp_path):
    small = tiny_config(sweep__runs=2, sweep__workers=1, sweep__reference_runs=0, train__steps=2)
    run_sweep(small, tmp_path, progress=False)
    before = zarr.open_group(tmp_path / "store.zarr")["run-001"].attrs["updated"]
    larger = config.from_dict(small.to_dict(), {"sweep.runs": 3, "predict.exploratory": ["cosine"]})
    assert [r for r in plan(larger)][:2] == plan(small)
    table = run_sweep(larger, tmp_path, progress=False)
    assert sorted(table.run_id) == ["run-000", "run-001", "run-002"]
    assert zarr.open_group(tmp_path / "store.zarr")["run-001"].attrs["updated"] == before  # not retrained
    with pytest.raises(ValueError, match="different config"):  # fewer runs would leave runs outside the plan
        run_sweep(small, tmp_path, progress=False)


def test_extending_a_study_under_other_arithmetic_is_warned_of_before_and_after(tmp_path):
    """Runs added under another torch joined the study's table silently: the sweep warns before it trains them (and
    not where nothing differs), each run records its code, releases and device, and the analyses and report say so."""
    from gradtrace import kernels, report
    from gradtrace.kernels import code_fingerprint
    from gradtrace.results import load_results

    small = tiny_config(sweep__runs=2, sweep__workers=1, sweep__reference_runs=0, train__steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernels.OtherArithmetic)
        run_sweep(small, tmp_path, progress=False)
        run_sweep(config.from_dict(small.to_dict(), {"sweep.runs": 3}), tmp_path, progress=False)
    root = zarr.open_group(tmp_path / "store.zarr")
    assert (root["run-002"].attrs["gradtrace_code"], root["run-002"].attrs["device"]) == (code_fingerprint(), "cpu")
    for rid in ("run-000", "run-001", "run-002"):
        root[rid].attrs["torch_version"] = "2.12.0"
    with pytest.warns(kernels.OtherArithmetic, match=r"3 complete run\(s\) trained with other arithmetic than this "
                                                     r"sweep trains its 1 run\(s\) left with \(torch_version 2.12.0 →"):
        run_sweep(config.from_dict(small.to_dict(), {"sweep.runs": 4}), tmp_path, progress=False)
    assert root["run-003"].attrs["torch_version"] != "2.12.0"
    mixed = r"sweep runs' torch_version: 2.12.0 \(run-000, run-001, run-002\)"
    with pytest.warns(kernels.OtherArithmetic, match=mixed):
        load_results(tmp_path)
    inputs = report.load_inputs(tmp_path, compute_missing=False)
    assert "did not all train alike (sweep runs' torch_version" in inputs.notes["mixed"]
    for rid in ("run-000", "run-001", "run-002", "run-003"):  # trained on a GPU: told apart from the CPU by kind,
        root[rid].attrs.update({"torch_version": root["run-003"].attrs["torch_version"], "device": "NVIDIA H100"})
    with pytest.warns(kernels.OtherArithmetic, match=r"its 1 run\(s\) left with \(device cuda → cpu\)"):
        run_sweep(config.from_dict(small.to_dict(), {"sweep.runs": 5}), tmp_path, progress=False)  # not by name


def test_base_run_trains_first_and_every_run_starts_from_it(tmp_path):
    cfg = tiny_config(sweep__runs=1, sweep__workers=1, sweep__reference_runs=1, sweep__pretrain_steps=6,
                      train__steps=4)
    table = run_sweep(cfg, tmp_path, progress=False)
    assert set(table.role) == {"base", "reference", "sweep"}
    root = zarr.open_group(tmp_path / "store.zarr")
    assert root["base"].attrs["steps"] == 6
    assert root["run-000"].attrs["config"]["model"]["init_from"].endswith("weights/base/final.safetensors")
    from gradtrace.predict import PREDICTORS, load_reference

    pretraining = load_reference(tmp_path, role="base")  # frontier mode: predictors read the base run alone
    assert [r.run_id for r in pretraining.runs] == ["base"]
    predicted = PREDICTORS["covariance"]().fit(pretraining).predict().matrix
    assert list(predicted.index) == list(pretraining.splits[1:])


def test_plan_spreads_runs_over_several_bases():
    runs = plan(tiny_config(sweep__runs=5, sweep__bases=2, sweep__reference_runs=2, sweep__pretrain_steps=6))
    bases = [r for r in runs if r.role == "base"]
    assert [b.run_id for b in bases] == ["base-0", "base-1"]
    assert [b.overrides["train.init_seed"] for b in bases] == [0, 1]  # bases differ in init only
    start = {r.run_id: r.overrides["model.init_from"].split("/")[-2] for r in runs if r.role != "base"}
    assert start == {"ref-000": "base-0", "ref-001": "base-0", "ref-002": "base-1", "ref-003": "base-1",
                     "run-000": "base-0", "run-001": "base-1", "run-002": "base-0", "run-003": "base-1",
                     "run-004": "base-0"}
    with pytest.raises(ValueError, match="pretrain_steps"):
        plan(tiny_config(sweep__bases=2))
    cfg = tiny_config(sweep__runs=6, sweep__bases=2, sweep__pretrain_steps=6, sweep__ensemble=2)
    from gradtrace.sweep import _jobs

    for job in _jobs(cfg, plan(cfg)):  # an ensemble's members start from one base
        assert len({r.overrides.get("model.init_from") for r in job}) == 1
    runs = plan(tiny_config(sweep__runs=1, sweep__bases=2, sweep__reference_runs=1, sweep__pretrain_steps=6))[:4]
    seconds = dict(zip((r.run_id for r in runs), [10.0, 10.0, 1.0, 1.0]))
    assert estimate_total_seconds([[r] for r in runs], seconds, 2) == pytest.approx(10 + 2 / 2)  # bases side by side


def test_sweep_over_several_bases_is_analysed_within_base(tmp_path):
    from gradtrace.stats import partial_correlations, stats_report

    cfg = tiny_config(sweep__runs=8, sweep__bases=2, sweep__workers=1, sweep__reference_runs=0,
                      sweep__pretrain_steps=6, train__steps=4)
    table = run_sweep(cfg, tmp_path, progress=False)
    sweep = table[table.role == "sweep"]
    assert sweep.base.tolist() == ["base-0", "base-1"] * 4
    assert pd.read_csv(tmp_path / "results.csv").query("role == 'sweep'").base.tolist() == sweep.base.tolist()
    root = zarr.open_group(tmp_path / "store.zarr")
    assert root["base-1"].attrs["seeds"]["init"] == 1
    assert root["run-001"].attrs["config"]["model"]["init_from"].endswith("weights/base-1/final.safetensors")
    assert root["run-001"].attrs["sketch"] is None and root["base-1"].attrs["sketch"]["kind"] == "countsketch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny model: low reliability, some shifts barely vary
        report = stats_report(tmp_path, residualize="linear", n_boot=0, n_perm=0)
        direct = partial_correlations(tmp_path, residualize="linear", n_boot=0, n_perm=0,
                                      shifts=list(dict.fromkeys([*report.stats.a, *report.stats.b])))
    assert report.summary["within"] == "base" and (report.stats.k == 2).all()  # ID and one base indicator
    both = report.stats.merge(direct, on=["a", "b"], suffixes=("", "_direct"))
    assert len(both) == len(report.stats) and (both.k_direct == 2).all()  # a directory's runs within base too
    np.testing.assert_array_equal(both.r_direct, both.r)
    assert assess(sweep.reset_index(drop=True), {}).bases == 2


def test_calibrating_candidate_bases_runs_one_pilot_per_base_seed(tmp_path, capsys, monkeypatch):
    from conftest import TINY, set_args
    from gradtrace.cli import main

    sets = {**TINY, "sweep.pretrain_steps": 6, "train.steps": 4, "sweep.runs": 5, "sweep.workers": 1}
    argv = ["calibrate", "/dev/null", "--out", str(tmp_path), "--runs", "5", "--bases", "3", "7"]
    fail_in_training(monkeypatch, lambda cfg, run_id, role: role == "base" and cfg.train.init_seed == 3)
    assert main(argv + set_args(sets)) == 1  # a failed pilot stops no other
    assert "1 of 2 pilots did not finish" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "bases.csv").init_seed.tolist() == [7]
    monkeypatch.undo()
    assert main(argv + set_args(sets)) == 0  # running again retries the failed pilot
    out = capsys.readouterr().out
    assert "train.init_seed=N" in out and "no base with 6 usable shifts: pilot other seeds" in out  # 4 steps: none
    table = pd.read_csv(tmp_path / "bases.csv")
    assert table.init_seed.tolist() == [3, 7]
    for seed, base_id, usable, mean, std in zip(table.init_seed, table.base_ID, table.usable, table.ID_mean,
                                                table.ID_std):
        base = zarr.open_group(tmp_path / f"base-seed-{seed}" / "store.zarr")["base"].attrs
        assert base["seeds"]["init"] == seed and base_id == pytest.approx(base["accuracy"]["ID"])
        calibration = pd.read_csv(tmp_path / f"base-seed-{seed}" / "calibration.csv")
        assert usable == calibration.usable.sum()
        id_row = calibration.set_index("split").loc["ID"]
        assert (mean, std) == pytest.approx((id_row["mean"], id_row["std"]))
    assert main(argv + set_args({**sets, "sweep.pretrain_steps": 0})) == 2
    assert "sweep.pretrain_steps > 0" in capsys.readouterr().err
    assert main(["calibrate", "/dev/null", "--out", str(tmp_path / "one"), "--runs", "5", *set_args(sets)]) == 0
    usable = int(pd.read_csv(tmp_path / "one" / "calibration.csv").usable.sum())
    assert (f"{usable} of {len(config.TaskConfig().shifts)} shifts usable on this base; another base may give more"
            in capsys.readouterr().out)  # 4 steps from a 6-step base: few if any


def test_a_pilot_too_small_for_partial_correlations_still_reports():
    table = pd.DataFrame({"acc_ID": [0.5, 0.6, 0.7], "acc_length": [0.1, 0.2, 0.3], "acc_carry": [0.88, 0.91, 0.917]})
    report = assess(table, {}).format()  # 3 runs: no pairs assessed (it said "none", as if it had looked)
    assert report.endswith("no pairs assessed: 3 runs, and a partial correlation given ID needs at least 5")
    assert "not usable (mean 90.2%" in report  # not "mean 90%", which reads as inside 10–90%
    from scipy.special import ndtr, ndtri

    id_acc = np.array([0.5, 0.55, 0.6, 0.7, 0.75, 0.8])
    table = pd.DataFrame({"acc_ID": id_acc, "acc_length": ndtr(2 * ndtri(id_acc) - 1),  # ID determines it
                          "acc_carry": [0.3, 0.2, 0.4, 0.35, 0.25, 0.3], "acc_space": [0.5, 0.4, 0.45, 0.6, 0.5, 0.3]})
    calibration = assess(table, {})  # the splits are still assessed, the pairs say why they are not
    assert len(calibration.splits) == 4 and calibration.pairs.empty
    assert "no pairs assessed: shifts ['length'] are exactly determined by the covariates (ID" in calibration.format()
    five = pd.DataFrame({"acc_ID": [0.5, 0.6, 0.7, 0.8, 0.55], "acc_a": [0.3, 0.5, 0.4, 0.6, 0.2],
                         "acc_b": [0.4, 0.3, 0.5, 0.45, 0.6]})
    calibration = assess(five, {})  # 5 runs, the fewest a partial correlation given ID allows: the pair is assessed
    assert not calibration.pairs_note and calibration.pairs[["a", "b"]].values.tolist() == [["a", "b"]]


def test_calibration_flags_unusable_splits_and_same_axis_pairs():
    rng = np.random.default_rng(0)
    n, items = 12, 4000
    ability = rng.uniform(-1, 1, n)
    p = {"ID": 0.8 + 0.1 * ability, "good": 0.5 + 0.2 * ability + 0.1 * rng.normal(size=n),
         "twin": None, "floor": np.full(n, 0.01) + 0.001 * rng.random(n), "other": 0.4 + 0.1 * rng.normal(size=n)}
    p["twin"] = np.clip(p["good"] + 0.01 * rng.normal(size=n), 0, 1)
    correct = {k: rng.random((n, items)) < np.clip(v, 0, 1)[:, None] for k, v in p.items()}
    table = pd.DataFrame({f"acc_{k}": c.mean(1) for k, c in correct.items()})
    cal = assess(table, correct)
    verdict = cal.splits.set_index("split")
    assert verdict.loc["good", "usable"] and not verdict.loc["floor", "usable"]
    same = cal.pairs[cal.pairs.same_axis]
    assert {("good", "twin")} <= set(zip(same.a, same.b)) | set(zip(same.b, same.a))
    assert "usable" in cal.format()
    twin = same[(same.a + same.b).isin(["goodtwin", "twingood"])].iloc[0]
    assert SAME_AXIS < twin.ci_low < twin.partial_r < twin.ci_high  # near-copies: one axis even at 12 runs
    assert f"({twin.partial_r:+.2f}, 95% CI {twin.ci_low:+.2f} to {twin.ci_high:+.2f})" in cal.format()
    assert "leaves it open" not in Calibration(cal.splits, same[same.ci_low > SAME_AXIS]).format()
    unsure = pd.DataFrame([{"a": "good", "b": "other", "partial_r": 0.85, "ci_low": 0.52, "ci_high": 0.96,
                            "same_axis": True}])
    assert "a CI reaching below 0.8 leaves it open" in Calibration(cal.splits, unsure).format()
    settled = unsure.assign(partial_r=-0.93, ci_low=-0.98, ci_high=-0.81)  # every r in the CI: |r| > 0.8
    assert "leaves it open" not in Calibration(cal.splits, settled).format()
    touching = unsure.assign(partial_r=0.9, ci_low=SAME_AXIS, ci_high=0.97)  # holds r = 0.8 itself, not above it
    assert "leaves it open" in Calibration(cal.splits, touching).format()
    assert re.search(r"\nID .*  ID\n", cal.format())  # the ID row is no shift: neither usable nor not


def test_calibration_std_divides_by_the_runs_degrees_of_freedom():
    """std is the sample sd (n − 1) of one base's runs, and within bases the pooled sd of the runs' differences from
    their base's mean (n − bases), and under 3 points it makes a split unusable: dividing by n, or dropping the
    std criterion, passed the other calibration tests."""
    rng = np.random.default_rng(1)
    table = pd.DataFrame({"acc_ID": rng.uniform(0.5, 0.9, 8), "acc_a": rng.uniform(0.2, 0.6, 8)})
    assert assess(table, {}).splits.set_index("split").loc["a", "std"] == pytest.approx(table.acc_a.std(ddof=1))
    based = table.assign(base=["base-0"] * 4 + ["base-1"] * 4)
    within = based.acc_a - based.groupby("base").acc_a.transform("mean")
    assert assess(based, {}).splits.set_index("split").loc["a", "std"] == pytest.approx(np.sqrt((within**2).sum() / 6))
    flat = assess(table.assign(acc_b=0.5 + 0.01 * rng.standard_normal(8)), {}).splits.set_index("split")
    assert flat.loc["b", "reason"].startswith("std ") and not flat.loc["b", "usable"]  # under 3 points: not usable


def test_calibration_thresholds_hold_at_their_edges(monkeypatch):
    """A split is usable at exactly 10% or 90% mean, 3 points of std and 0.9 reliability (the criteria read "10–90%",
    "≥ 3%", "≥ 0.9"): strict comparisons at any edge passed the other calibration tests. A reliability that could
    not be had (NaN: no per-item correctness, or halves that never vary) is not one of 0.9 or more: `rel < 0.9` for
    `not rel >= 0.9` passed them too, marking such a split usable."""
    from gradtrace import stats

    table = pd.DataFrame({"acc_ID": [0.5, 0.6, 0.7, 0.8], "acc_low": [0.06, 0.08, 0.12, 0.14],
                          "acc_high": [0.86, 0.88, 0.92, 0.94], "acc_spread": [0.5, 0.44, 0.44, 0.44],
                          "acc_shaky": [0.3, 0.4, 0.5, 0.6], "acc_unmeasured": [0.3, 0.4, 0.5, 0.6]})
    reliability = {"ID": 0.9, "low": 0.9, "high": 0.9, "spread": 0.9, "shaky": np.nextafter(0.9, 0),
                   "unmeasured": np.nan}
    monkeypatch.setattr(stats, "split_half_reliability", lambda items, groups=None: pd.DataFrame(
        {"split": list(reliability), "reliability": list(reliability.values())}))
    verdict = assess(table, {"ID": np.zeros((4, 2))}).splits.set_index("split")
    assert verdict.loc["low", "mean"] == 0.1 and verdict.loc["high", "mean"] == 0.9  # exactly at the edges
    assert verdict.loc["spread", "std"] == 0.03
    assert verdict.usable.to_dict() == {"ID": False, "low": True, "high": True, "spread": True, "shaky": False,
                                        "unmeasured": False}
    assert verdict.loc["shaky", "reason"] == "reliability 0.90"
    assert verdict.loc["unmeasured", "reason"] == "reliability nan"


def test_calibration_over_several_bases_takes_r_id_reliability_and_pairs_within_base():
    """With two bases, r(ID) is the correlation of the runs' differences from their base's mean, reliability that of
    the differences, a shift that moves only between bases varies for no pair, pairs are the probit partial r given
    ID and the base (pingouin) with the pilot's own item count in the probit clip, and a pair of shifts that move
    against each other (r < −0.8) is one axis as well. Pooled r(ID) or reliability, a shift counted as varying
    across bases, n_items left at its default, |r| read as r, or ID counted as a usable shift passed the others."""
    import pingouin as pg
    from scipy.special import ndtr, ndtri

    rng = np.random.default_rng(3)
    n, items = 16, 400
    base = np.repeat([0, 1], n // 2)
    ability, twin = rng.standard_normal(n), rng.standard_normal(n)
    probit = {"ID": 0.3 + 0.8 * base + 0.3 * ability, "good": 0.8 * base + 0.4 * ability + 0.6 * twin,
              "mirror": 0.8 * base + 0.4 * ability - 0.6 * twin, "other": 0.8 * base + 0.3 * rng.standard_normal(n),
              "rare": -2.6 + 0.3 * ability + 0.3 * rng.standard_normal(n)}  # some runs get no item right
    correct = {s: rng.random((n, items)) < ndtr(z)[:, None] for s, z in probit.items()}
    correct["between"] = rng.permuted(np.arange(items) < np.where(base, 300, 100)[:, None], axis=1)  # 25% or 75%
    table = pd.DataFrame({"base": [f"base-{b}" for b in base], **{f"acc_{s}": c.mean(1) for s, c in correct.items()}})
    cal = assess(table, correct)
    verdict = cal.splits.set_index("split")
    centred = table.filter(like="acc_") - table.groupby("base")[list(table.filter(like="acc_"))].transform("mean")
    for s in ["good", "mirror", "other", "rare"]:
        assert verdict.loc[s, "r_id"] == pytest.approx(np.corrcoef(centred[f"acc_{s}"], centred.acc_ID)[0, 1])
    assert np.isnan(verdict.loc["between", "r_id"]) and verdict.loc["between", "reliability"] < 0.5  # pooled: ~1
    assert verdict.usable.to_dict() == {"ID": False, "good": True, "mirror": True, "other": True, "rare": False,
                                        "between": False}
    assert "\n3 usable shift(s)" in cal.format()
    assert not cal.pairs_note and set(cal.pairs.a) | set(cal.pairs.b) == {"good", "mirror", "other", "rare"}
    clipped = {s: ndtri(np.clip(c.mean(1), 1 / (2 * items), 1 - 1 / (2 * items))) for s, c in correct.items()}
    data = pd.DataFrame({**clipped, "base": base})
    reference = [pg.partial_corr(data, x=a, y=b, covar=["ID", "base"])["r"].iloc[0]
                 for a, b in zip(cal.pairs.a, cal.pairs.b)]
    np.testing.assert_allclose(cal.pairs.partial_r, reference, atol=1e-9)
    assert cal.pairs.same_axis.tolist() == (cal.pairs.partial_r.abs() > SAME_AXIS).tolist()
    mirror = cal.pairs[(cal.pairs.a + cal.pairs.b).isin(["goodmirror", "mirrorgood"])].iloc[0]
    assert mirror.partial_r < -SAME_AXIS and mirror.same_axis and "good~mirror (-0.92" in cal.format()


def test_calibrate_assesses_a_pilot_of_the_fewest_runs_it_allows(tmp_path, monkeypatch):
    """3 runs, or 2 per base over several bases, are enough: refusing them (`<=` for `<`) passed the other tests,
    which train pilots of 5. The pilot trains the runs asked for and no reference run, and only its sweep runs are
    assessed."""
    import gradtrace.results
    import gradtrace.sweep
    from gradtrace.calibrate import calibrate

    pilots = []

    def pilot(cfg, out):
        pilots.append((cfg.sweep.runs, cfg.sweep.reference_runs))
        Path(out).mkdir()
        n = cfg.sweep.runs
        return pd.DataFrame({"run_id": [f"run-{i:03d}" for i in range(n)] + ["base"], "role": ["sweep"] * n + ["base"],
                             "acc_ID": np.linspace(0.4, 0.8, n + 1), "acc_a": np.linspace(0.6, 0.2, n + 1)})

    monkeypatch.setattr(gradtrace.sweep, "run_sweep", pilot)
    monkeypatch.setattr(gradtrace.results, "load_item_correctness", lambda out: {})
    verdict = calibrate(tiny_config(), tmp_path / "three", runs=3).splits.set_index("split")
    assert verdict.loc["a", "min"] == pytest.approx(1 / 3) and verdict.loc["a", "max"] == 0.6  # not the base row (0.2)
    assert (tmp_path / "three" / "calibration.csv").exists()
    calibrate(tiny_config(sweep__pretrain_steps=2, sweep__bases=2), tmp_path / "bases", runs=4)
    assert pilots == [(3, 0), (4, 0)]


def test_ensembled_sweep_gives_the_same_accuracies_as_standalone_runs(tmp_path):
    base = {"sweep__runs": 4, "sweep__workers": 1, "sweep__reference_runs": 2, "train__steps": 10}
    alone = run_sweep(tiny_config(**base), tmp_path / "alone", progress=False)
    together = run_sweep(tiny_config(**base, sweep__ensemble=2), tmp_path / "together", progress=False)
    columns = [c for c in alone.columns if c.startswith("acc_")]
    pd.testing.assert_frame_equal(alone.sort_values("run_id")[columns].reset_index(drop=True),
                                  together.sort_values("run_id")[columns].reset_index(drop=True))
    root = zarr.open_group(tmp_path / "together/store.zarr")
    assert len(root["run-001"].attrs["ensemble"]["members"]) == 2
    assert root["ref-001"].attrs["ensemble"]["members"] == ["ref-000", "ref-001"]  # captured runs ensemble too
    assert root["ref-001"]["grad"].shape == zarr.open_group(tmp_path / "alone/store.zarr")["ref-001"]["grad"].shape


def test_what_cannot_run_is_refused_before_anything_trains(tmp_path, capsys):
    from conftest import TINY, set_args
    from gradtrace.calibrate import calibrate
    from gradtrace.cli import main

    with pytest.raises(ValueError, match="the plan has no run: nothing to train"):  # an empty study, exit status 0
        run_sweep(tiny_config(sweep__runs=0, sweep__reference_runs=0), tmp_path / "empty", progress=False)
    assert not (tmp_path / "empty" / "plan.json").exists()
    cfg = tiny_config(sweep__runs=2, sweep__ensemble=2, sweep__workers=1, train__precision="fp16")
    with pytest.raises(ValueError, match="ensembles train in fp32"):
        run_sweep(cfg, tmp_path / "fp16", progress=False)
    assert not (tmp_path / "fp16" / "store.zarr").exists()  # not even the reference run: refused with the config
    with pytest.raises(ValueError, match="a pilot of 2 run"):
        calibrate(tiny_config(), tmp_path / "pilot", runs=2)
    assert not (tmp_path / "pilot").exists()
    with pytest.raises(ValueError, match="over 4 bases leaves a base with fewer than 2.*--runs 8"):
        calibrate(tiny_config(sweep__pretrain_steps=2, sweep__bases=4), tmp_path / "bases", runs=6)
    assert not (tmp_path / "bases").exists()  # assessing it failed after every run had trained
    assert main(["calibrate", os.devnull, "--out", str(tmp_path / "zero"), "--runs", "0", *set_args(TINY)]) == 2
    assert "a pilot of 0 run" in capsys.readouterr().err  # 0 is not "the default"
    assert main(["calibrate", os.devnull, "--out", str(tmp_path / "twice"), "--bases", "0", "0",
                 *set_args({**TINY, "sweep.pretrain_steps": 2})]) == 2
    assert "--bases lists a seed more than once (0 0)" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()


def test_results_mid_sweep_are_in_run_order(tmp_path, monkeypatch):
    import gradtrace.sweep as sweep_module

    written, real = [], sweep_module.write_results
    monkeypatch.setattr(sweep_module, "write_results",
                        lambda table, out: (written.append(table.run_id.tolist()), real(table, out)))
    run_sweep(tiny_config(sweep__runs=3, sweep__bases=2, sweep__pretrain_steps=4, sweep__workers=1, train__steps=2,
                          sweep__ensemble=2), tmp_path, progress=False)  # run-000 and run-002 finish before run-001
    assert len(written) > 3 and all(ids == sorted(ids) for ids in written)


@pytest.mark.filterwarnings("ignore:flock not supported on this filesystem")
@pytest.mark.parametrize("flock", [True, False])
def test_a_run_another_process_trains_is_refused_not_written_by_two(tmp_path, monkeypatch, flock):
    """A run's lock is held while it trains (a re-run of a sweep whose interrupted client left the run training on
    a cluster): a second trainer of it, standalone or in an ensemble, is refused before it writes anything. Without
    flock (a Lustre mount without it) the words say how to free a lock that a machine which died left."""
    from gradtrace.ensemble import train_ensemble
    from gradtrace.train import train

    if not flock:
        _without_flock(monkeypatch)
    (tmp_path / "locks").mkdir()
    cfg = tiny_config(train__steps=2)
    words = "run again once it is done$" if flock else r"has no flock .*delete .*run-001\.lock and run again$"
    with _lock_held_elsewhere(tmp_path / "locks" / "run-001.lock", flock=flock):
        with pytest.raises(store.RunInUse, match=f"'run-001' is being trained by another process.*{words}"):
            train(cfg, tmp_path, "run-001", resume=True, progress=False)
        with pytest.raises(store.RunInUse, match="'run-001'"):
            train_ensemble([cfg, cfg], tmp_path, ["run-000", "run-001"], resume=True)
        assert not (tmp_path / "store.zarr").exists()
        train(cfg, tmp_path, "run-000", progress=False)  # its lock is free again after the refused ensemble
    train(cfg, tmp_path, "run-001", progress=False)  # the operating system released the dead holder's lock


def test_a_closed_dispatch_stops_its_pool_at_once(tmp_path):
    """An interrupted sweep (Ctrl-C: its outcomes closed) cancels the queued jobs and ends the running ones instead
    of waiting for the pool to train all of them."""
    from gradtrace.sweep import _dispatch

    cfg = tiny_config(sweep__workers=2, train__steps=400, train__checkpoint_every=1000, capture__enabled=False)
    jobs = [[PlannedRun(f"run-{i:03d}", "sweep", {"train.steps": 2 if i == 0 else 400, "train.data_seed": i})]
            for i in range(4)]
    outcomes = _dispatch(cfg, tmp_path, jobs, None)
    job, rows = next(outcomes)
    assert job[0].run_id == "run-000" and rows[0]["run_id"] == "run-000"
    outcomes.close()
    root = zarr.open_group(tmp_path / "store.zarr", mode="r")
    assert [r for r in root.group_keys() if root[r].attrs["status"] == "complete"] == ["run-000"]
    assert not (tmp_path / "store.zarr" / "run-003").exists()  # queued behind the others: never started


def test_pool_workers_spread_over_the_gpus_the_sweep_sees(monkeypatch):
    """With runs on `cuda` or `auto` and several GPUs visible, a local pool's workers take them in turn (their
    CUDA_VISIBLE_DEVICES entries, or indices); with one GPU, or runs the config places, workers see what it sees."""
    import torch

    from gradtrace.sweep import worker_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_gpus("cuda") == worker_gpus("auto") == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, GPU-8f2c,7")
    assert worker_gpus("auto") == ["4", "GPU-8f2c", "7"]
    assert worker_gpus("cpu") == worker_gpus("cuda:1") == worker_gpus("mps") == []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_gpus("cuda") == []


_ALL_STARTED = None  # a worker's barrier: each task waits for every worker to hold one


def _start_worker_with_barrier(barrier, *args) -> None:
    global _ALL_STARTED
    _ALL_STARTED = barrier
    from gradtrace.sweep import _start_worker
    _start_worker(*args)


def _gpu_seen(_) -> str:
    _ALL_STARTED.wait(timeout=120)
    return os.environ["CUDA_VISIBLE_DEVICES"]


def test_each_pool_worker_sees_one_gpu_in_turn():
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    context = get_context("spawn")
    barrier, started = context.Barrier(3), context.Value("i", 0)
    with ProcessPoolExecutor(3, mp_context=context, initializer=_start_worker_with_barrier,
                             initargs=(barrier, os.getpid(), ["4", "7"], started)) as pool:
        seen = sorted(pool.map(_gpu_seen, range(3)))  # three tasks held at the barrier at once: three workers
    assert seen == ["4", "4", "7"] and started.value == 3


def test_a_configs_relative_file_paths_are_made_absolute_as_it_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(model__init_from="w.safetensors", task__modules=["splits.py", "my.splits"])
    assert cfg.model.init_from == str(tmp_path / "w.safetensors")
    assert cfg.task.modules == [str(tmp_path / "splits.py"), "my.splits"]  # a module name is the Python path's to find
    assert tiny_config().model.init_from is None


def test_a_sweeps_workers_get_the_configs_relative_paths_made_absolute(tmp_path, monkeypatch, split_registry):
    """A cluster's workers run in folders of their own; a config built in Python keeps its paths as typed."""
    from gradtrace import sweep
    from gradtrace.checkpoint import save_weights
    from gradtrace.models import build_model
    from gradtrace.tasks.tokenizer import CharTokenizer

    monkeypatch.chdir(tmp_path)
    save_weights(build_model(tiny_config().model, CharTokenizer().vocab_size, seed=0), tmp_path / "w.safetensors")
    (tmp_path / "splits.py").write_text(MY_SPLIT)
    given = []

    def dispatch(cfg, out, jobs, cluster, bar=None, items=None):
        given.append(cfg)
        yield from ()

    monkeypatch.setattr(sweep, "_dispatch", dispatch)
    typed = config.from_dict(tiny_config().to_dict(), {"model.init_from": "w.safetensors", "sweep.runs": 1,
                                                       "task.modules": ["splits.py"], "task.shifts": ["double"]})
    run_sweep(typed, tmp_path / "study", progress=False)
    assert {cfg.model.init_from for cfg in given} == {str(tmp_path / "w.safetensors")}
    assert {tuple(cfg.task.modules) for cfg in given} == {(str(tmp_path / "splits.py"),)}


MY_SPLIT = """
from gradtrace.tasks import Problem, Split, register_split

register_split(Split("double", "a+a, 1-{d} digits; training sees 1-2 digits",
                     test=lambda r, d: Problem((int(r.integers(1, 10**d)),) * 2),
                     train=lambda r, d: Problem((int(r.integers(1, 100)),) * 2)))
"""


def test_a_moved_study_names_its_splits_file_anew_and_is_held_to_its_items(tmp_path, monkeypatch, split_registry):
    """A study moved with the file of its own splits (to another machine, a colleague's disk) extends and resumes with
    task.modules naming the file where it lies now (it was refused as another config, the file's old place having
    gone); a file whose splits draw other items is refused by the runs' items digest."""
    from gradtrace.train import train

    (tmp_path / "splits.py").write_text(MY_SPLIT)
    cfg = tiny_config(sweep__runs=1, sweep__workers=1, sweep__reference_runs=0, train__steps=2,
                      task__modules=[str(tmp_path / "splits.py")], task__shifts=["double"])
    run_sweep(cfg, tmp_path / "study", progress=False)
    study = tmp_path / "elsewhere" / "study"
    study.parent.mkdir()
    (tmp_path / "study").rename(study)
    (tmp_path / "splits.py").rename(study / "splits.py")
    monkeypatch.chdir(study)
    here = config.from_dict(cfg.to_dict(), {"task.modules": ["splits.py"], "sweep.runs": 2})
    assert sorted(run_sweep(here, ".", progress=False).run_id) == ["run-000", "run-001"]
    assert config.load("config.yaml").task.modules == [str(study / "splits.py")]
    resumed = config.with_absolute_paths(run_config(here, plan(here)[0]))
    assert train(resumed, ".", "run-000", role="sweep", resume=True, progress=False).accuracy  # complete: not refused
    Path("other.py").write_text(MY_SPLIT.replace("10**d", "10**(d - 1)"))  # double's test items of one digit fewer
    with pytest.raises(SweepError, match="trained on other items"):
        run_sweep(config.from_dict(here.to_dict(), {"task.modules": ["other.py"], "sweep.runs": 3}), ".",
                  progress=False)


def test_a_study_extends_from_its_weights_at_another_path_but_not_from_other_weights(tmp_path):
    """The default fine-tunes a base gradtrace ships: a study moved to another machine, or extended after gradtrace
    was installed anew, names the same weights at another path, which was refused as another config. The digest
    each run records of the weights it started from (`init_digest`) tells the same weights from others."""
    import shutil

    from gradtrace.models import weights_digest

    base = config.from_dict(tiny_config().to_dict(), {"sweep.runs": 0, "sweep.reference_runs": 0,
                                                       "sweep.pretrain_steps": 2, "sweep.workers": 1})
    run_sweep(base, tmp_path / "base", progress=False)
    trained = tmp_path / "base" / "weights" / "base"
    shutil.copy(trained / "final.safetensors", tmp_path / "elsewhere.safetensors")
    study = config.from_dict(base.to_dict(), {"sweep.pretrain_steps": 0, "sweep.runs": 1, "train.steps": 2,
                                              "model.init_from": str(trained / "final.safetensors")})
    run_sweep(study, tmp_path / "study", progress=False)
    run = zarr.open_group(tmp_path / "study" / "store.zarr")["run-000"]
    assert run.attrs["init_digest"] == weights_digest(trained / "final.safetensors")
    moved = config.from_dict(study.to_dict(), {"model.init_from": str(tmp_path / "elsewhere.safetensors"),
                                               "sweep.runs": 2})
    assert sorted(run_sweep(moved, tmp_path / "study", progress=False).run_id) == ["run-000", "run-001"]
    listed = store.summary(tmp_path / "study" / "store.zarr")  # gradtrace info: each run's start, with its digest
    digest = run.attrs["init_digest"]
    assert f"started from: {trained / 'final.safetensors'} (sha256 {digest}…)" in listed
    assert f"started from: {tmp_path / 'elsewhere.safetensors'} (sha256 {digest}…)" in listed
    other = config.from_dict(study.to_dict(), {"model.init_from": str(trained / "initial.safetensors"),
                                               "sweep.runs": 3})
    with pytest.raises(ValueError, match="different config.*model.init_from: .*elsewhere.safetensors' → "
                                         ".*initial.safetensors'"):
        run_sweep(other, tmp_path / "study", progress=False)


def test_a_sweep_of_a_split_of_your_own_trains_it_in_every_worker(tmp_path, monkeypatch, capsys, split_registry):
    """The split is registered in a file task.modules names: the spawned pool workers (and `gradtrace tasks`) run
    it too; by a script's own registration it was known to the process that planned the sweep only."""
    from gradtrace.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "splits.py").write_text(MY_SPLIT)
    settings = {**TINY, "task.modules": "[splits.py]", "task.shifts": "[double,space]", "sweep.runs": 2,
                "sweep.workers": 2, "sweep.reference_runs": 0, "train.steps": 4}
    assert main(["tasks", *set_args(settings)]) == 0
    assert re.search(r"^double +yes +.*a\+a, 1-3 digits", capsys.readouterr().out, re.M)
    assert main(["sweep", str(Path(__file__).parents[1] / "experiments/scratch.yaml"), "--out", "study",
                 *set_args(settings)]) == 0
    table = pd.read_csv(tmp_path / "study" / "results.csv")
    assert sorted(table.run_id) == ["run-000", "run-001"] and table["acc_double"].notna().all()


PROCESS_SPLIT = """
import multiprocessing
from gradtrace.tasks import Problem, Split, register_split

WORKER = multiprocessing.parent_process() is not None  # as a set of strings' order, it differs between processes
register_split(Split("double", "a+a, 1-{d} digits, its operand shifted in a sweep's workers",
                     test=lambda r, d: Problem((int(r.integers(1, 10**d)) + WORKER,) * 2),
                     train=lambda r, d: Problem((int(r.integers(1, 100)),) * 2)))
"""


def test_a_split_that_draws_otherwise_in_each_process_trains_no_run(tmp_path, monkeypatch, split_registry):
    """A split drawing otherwise in each process (from the order of a set of strings, say) gave each of a sweep's
    workers test items of its own: runs scored on different items were compared as one study, nothing said. Each
    run is refused before it trains; in the sweep's own process (one worker) they train."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "splits.py").write_text(PROCESS_SPLIT)
    cfg = tiny_config(task__modules=["splits.py"], task__shifts=["double", "space"], sweep__runs=2, sweep__workers=2,
                      sweep__reference_runs=0, train__steps=2)
    with pytest.raises(SweepError, match=r"^2 run\(s\) failed \(run-00., run-00.: ValueError: this process draws other "
                                         r"items for the task than the sweep's own process drew .*every run failed "
                                         r"alike"):
        run_sweep(cfg, tmp_path / "study", progress=False)
    assert not store.runs(store.open_experiment(tmp_path / "study" / "store.zarr"))  # none began
    table = run_sweep(config.from_dict(cfg.to_dict(), {"sweep.workers": 1}), tmp_path / "study", progress=False)
    assert sorted(table.run_id) == ["run-000", "run-001"]


def test_a_study_of_relative_paths_extends_from_another_directory(tmp_path, monkeypatch, split_registry):
    """config.yaml kept a relative model.init_from and task.modules file as typed: extended from another directory,
    each run failed to find the weights, the sweep to find the splits, and the absolute paths were refused as another
    config. A study written so before still resumes from the directory it was started in."""
    from gradtrace.cli import main

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    (here / "splits.py").write_text(MY_SPLIT)
    settings = {**TINY, "train.steps": 2, "sweep.workers": 1, "sweep.reference_runs": 0}
    monkeypatch.chdir(here)
    assert main(["sweep", os.devnull, "--out", "base", *set_args({**settings, "sweep.runs": 0,
                                                                   "sweep.pretrain_steps": 2})]) == 0
    study = {**settings, "task.modules": "[splits.py]", "task.shifts": "[double,space]", "sweep.vary": "[data]",
             "model.init_from": "base/weights/base/final.safetensors"}
    assert main(["sweep", os.devnull, "--out", "study", *set_args({**study, "sweep.runs": 1})]) == 0
    written = config.load(here / "study" / "config.yaml")
    assert (written.model.init_from, written.task.modules) == (str(here / "base/weights/base/final.safetensors"),
                                                               [str(here / "splits.py")])
    monkeypatch.chdir(elsewhere)
    absolute = {**study, "task.modules": f"[{here / 'splits.py'}]", "model.init_from": written.model.init_from}
    assert main(["sweep", os.devnull, "--out", str(here / "study"), *set_args({**absolute, "sweep.runs": 2})]) == 0
    assert sorted(pd.read_csv(here / "study" / "results.csv").run_id) == ["run-000", "run-001"]
    before = (here / "study" / "config.yaml").read_text().replace(str(here) + "/", "")  # as it was written before
    (here / "study" / "config.yaml").write_text(before)
    monkeypatch.chdir(here)
    assert main(["sweep", os.devnull, "--out", "study", *set_args({**study, "sweep.runs": 3})]) == 0


def test_a_run_started_with_relative_paths_resumes_with_them_made_absolute(tmp_path, monkeypatch):
    from gradtrace.train import check_resumes_its_config

    monkeypatch.chdir(tmp_path)
    typed = {"task.modules": ["splits.py"], "model.init_from": "w.safetensors"}
    started = types.SimpleNamespace(attrs={"config": config.from_dict(tiny_config().to_dict(), typed).to_dict()})
    check_resumes_its_config(started, tiny_config(**{k.replace(".", "__"): v for k, v in typed.items()}), "run-000")


@pytest.mark.parametrize("override, message", [
    (dict(model__name="micr0"), "(?s)model 'micr0' is neither embedded.*did you mean 'micro'"),
    (dict(predict__exploratory=["covarianse"]), r"unknown predictor\(s\) \['covarianse'\]"),  # after the sweep, before
    (dict(capture__probe_losses=["ce", "hinge"]), r"unknown capture.probe_losses \['hinge'\]"),  # the reference run
    (dict(model__init_from="no/such.safetensors"), "model.init_from: no file .*no/such.safetensors"),
    (dict(model__pretrained=True), "the embedded 'micro' is built from its config, with none to load"),  # "is neither
], ids=["model", "predictor", "probe-loss", "init-from", "pretrained-embedded"])  # embedded (tiny, micro, …)" before
def test_an_unknown_name_is_refused_before_any_run_and_leaves_the_directory_open(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run_sweep(tiny_config(sweep__runs=1, sweep__reference_runs=0, **override), tmp_path, progress=False)
    assert not (tmp_path / "store.zarr").exists()
    fixed = tiny_config(sweep__runs=1, sweep__reference_runs=0, train__steps=2, sweep__workers=1)
    assert sorted(run_sweep(fixed, tmp_path, progress=False).run_id) == ["run-000"]  # nothing trained: not locked


def test_a_sweep_whose_runs_all_failed_alike_takes_the_mended_config(tmp_path):
    """A config error every run meets (held-out sets that leave a training form no prompt) advised running the same
    sweep again, and the directory then refused the mended config, though nothing had trained. The sweep builds the
    task before any run (`check_study_items`), so it is refused there, nothing written."""
    broken = tiny_config(sweep__runs=2, sweep__workers=1, sweep__reference_runs=0, train__steps=2,
                         task__max_digits=2, task__n_test=2000, task__shifts=["zeropad"])
    with pytest.raises(ValueError, match="none is left to train on"):
        run_sweep(broken, tmp_path, progress=False)
    assert not (tmp_path / "plan.json").exists() and not (tmp_path / "store.zarr").exists()
    mended = tiny_config(sweep__runs=2, sweep__workers=1, sweep__reference_runs=0, train__steps=2,
                         task__shifts=["space"])
    assert sorted(run_sweep(mended, tmp_path, progress=False).run_id) == ["run-000", "run-001"]
    with pytest.raises(ValueError, match="holds a sweep with a different config"):  # once a run trained: refused
        run_sweep(broken, tmp_path, progress=False)


def test_a_results_table_behind_its_store_is_warned_of(tmp_path):
    """A sweep killed after a run completed but before results.csv was rewritten: stats used fewer runs, silently."""
    from gradtrace.results import load_results, results_table, write_results

    run_sweep(tiny_config(sweep__runs=2, sweep__workers=1, sweep__reference_runs=0, train__steps=2), tmp_path,
              progress=False)
    table = pd.read_csv(tmp_path / "results.csv")
    write_results(table[table.run_id != "run-001"], tmp_path)  # as the kill left it
    with pytest.warns(UserWarning, match=r"results.csv lacks 1 complete run\(s\) of store.zarr \(run-001\)"):
        assert list(load_results(tmp_path).run_id) == ["run-000"]
    write_results(results_table(tmp_path), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(load_results(tmp_path).run_id) == ["run-000", "run-001"]


def test_runs_that_diverged_are_warned_of_by_the_sweep_and_the_analyses(tmp_path):
    """A run its lr blew up ended `complete` at 0% on every split, and nothing said so: its accuracies, a broken
    model's, pulled every correlation towards their corner."""
    from gradtrace.results import load_results

    cfg = tiny_config(sweep__runs=3, sweep__workers=1, sweep__reference_runs=0, train__steps=21,
                      sweep__lr=[100.0, 1000.0])
    diverged = r"3 of 3 run\(s\) diverged \(run-000, run-001, run-002; lr \d+ to \d+\): NaN or Inf gradients"
    with pytest.warns(UserWarning, match=diverged):
        run_sweep(cfg, tmp_path, progress=False)
    for group in store.run_groups(zarr.open_group(tmp_path / "store.zarr", mode="r")).values():
        loss = group["loss"][:]
        assert store.loss_ends(group.attrs) == pytest.approx((loss[0], loss[-1]), nan_ok=True)
        json.loads((tmp_path / "store.zarr" / group.basename / "zarr.json").read_text(encoding="utf-8"),
                   parse_constant=lambda name: pytest.fail(f"{name} in zarr.json: not JSON"))
    with pytest.warns(UserWarning, match=diverged):
        load_results(tmp_path)


def test_an_analysis_of_an_unfinished_sweep_is_warned_of(tmp_path, capsys):
    """`gradtrace stats` of a sweep with failed, stopped or unstarted runs covered its complete runs, silently."""
    import json

    from gradtrace.results import load_results, results_table, write_results

    run_sweep(tiny_config(sweep__runs=3, sweep__workers=1, sweep__reference_runs=0, train__steps=2), tmp_path,
              progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_results(tmp_path)) == 3
    root = zarr.open_group(tmp_path / "store.zarr", mode="a")
    store.set_status(root["run-001"], "failed", error="MemoryError: out of memory")
    store.set_status(root["run-002"], "running")  # training now, or killed
    plan = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps([*plan, {**plan[-1], "run_id": "run-003"}]))  # extended, not run
    write_results(results_table(tmp_path), tmp_path)
    expected = (f"{tmp_path} is not finished: of its planned sweep runs, 1 failed (run-001), 1 running or stopped "
                f"(run-002), 1 not started (run-003) (`gradtrace info {tmp_path}` shows why a run failed); results.csv "
                "holds the 1 complete")
    with pytest.warns(UserWarning, match=re.escape(expected)):
        assert list(load_results(tmp_path).run_id) == ["run-000"]
    from gradtrace.cli import main

    assert main(["info", str(tmp_path)]) == 0  # and info says how far the plan has come
    assert ("plan: 4 run(s), 1 complete; 1 failed (run-001), 1 running or stopped (run-002), 1 not started (run-003)"
            in capsys.readouterr().out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_results(tmp_path, role="base")) == 0  # no base run planned: none unfinished
    store.set_status(root["run-001"], "running")
    with pytest.warns(UserWarning, match=r"1 not started \(run-003\); results.csv holds"):  # no run failed: no word
        load_results(tmp_path)  # of why one did


@pytest.mark.parametrize("usable, hinted, shifts", [(5, True, 7), (6, False, 7), (4, False, 4)])
def test_calibrate_points_to_other_bases_only_below_six_usable_shifts(tmp_path, monkeypatch, capsys, usable, hinted,
                                                                      shifts):
    """A study of fewer than 6 shifts aims for all of them: 4 of 4 usable is no reason to pilot other bases."""
    import gradtrace.calibrate
    from gradtrace.cli import main

    splits = ["ID", "length", "carry", "zeropad", "base8", "space", "spaced_ops", "order"][:shifts + 1]
    frame = pd.DataFrame({"split": splits, "mean": 0.5, "std": 0.05, "min": 0.4, "max": 0.6, "r_id": 0.5,
                          "reliability": 0.95, "usable": [False] + [i < usable for i in range(shifts)], "reason": ""})
    monkeypatch.setattr(gradtrace.calibrate, "calibrate",
                        lambda cfg, out, runs: Calibration(frame, pd.DataFrame(), 1, "no pairs assessed: faked"))
    assert main(["calibrate", "experiments/default.yaml", "--out", str(tmp_path)]) == 0  # faked: writes nothing
    said = capsys.readouterr().out
    assert ("another base may give more" in said) == hinted  # the default fine-tunes a shipped base: train others
    assert ("--set model.init_from=null --set sweep.pretrain_steps=800 --bases 0 1 2 3" in said) == hinted
    assert main(["calibrate", "experiments/large.yaml", "--out", str(tmp_path), "--set", "sweep.bases=1"]) == 0
    assert ("experiments/large.yaml --bases 0 1 2 3` pilots four" in capsys.readouterr().out) == hinted


def test_calibrating_bases_names_those_with_six_usable_shifts(tmp_path, monkeypatch, capsys):
    import gradtrace.calibrate
    from gradtrace.calibrate import BASES_COLUMNS
    from gradtrace.cli import main

    table = pd.DataFrame([[0, 0.84, 0.88, 0.01, 4, "", ""], [3, 0.81, 0.94, 0.01, 6, "", ""]], columns=BASES_COLUMNS)
    monkeypatch.setattr(gradtrace.calibrate, "calibrate_bases", lambda cfg, out, seeds, runs: table)
    assert main(["calibrate", "experiments/default.yaml", "--out", str(tmp_path), "--bases", "0", "3"]) == 0
    assert "bases with at least 6 usable shifts: init_seed 3\n" in capsys.readouterr().out


def test_a_run_of_your_own_in_a_sweeps_store_is_no_row_of_its_results(tmp_path):
    """A run recorded by `attach` into a sweep's store holds no accuracies: rebuilding results.csv (a re-run of the
    sweep does) raised KeyError: 'config'."""
    import torch

    from gradtrace.capture import attach
    from gradtrace.config import CaptureConfig
    from gradtrace.results import results_table

    cfg = tiny_config(sweep__runs=1, sweep__workers=1, sweep__reference_runs=0, train__steps=2)
    run_sweep(cfg, tmp_path, progress=False)
    model = torch.nn.Linear(3, 3)
    attach(model, torch.optim.AdamW(model.parameters()), tmp_path, "mine", total_steps=1,
           capture=CaptureConfig(quantities=[], probe_every=0)).close()
    assert list(results_table(tmp_path).run_id) == ["run-000"]
    assert list(run_sweep(cfg, tmp_path, progress=False).run_id) == ["run-000"]


def test_train_leaves_the_callers_thread_count_and_random_state_as_they_were(tmp_path):
    """A notebook's `train(...)` of `train.threads: 2` left its kernel on 2 threads once it returned, and torch's
    global generator seeded by the model's init seed."""
    import torch

    from gradtrace.train import train

    before, state = torch.get_num_threads(), torch.random.get_rng_state()
    train(tiny_config(train__steps=1, train__threads=before + 1), tmp_path, progress=False)
    assert torch.get_num_threads() == before and torch.equal(torch.random.get_rng_state(), state)
