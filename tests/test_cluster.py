"""Sweeps on a dask cluster: connected before anything trains, workers that run another gradtrace or do not see the
sweep's folder refused, one job at a time in a worker, a worker that loses the folder retired."""
import re
import time

import pytest

from conftest import tiny_config
from gradtrace import cluster as cluster_mod
from gradtrace import kernels, sweep
from gradtrace.cluster import WORKERS_MARK, Cluster, _execute_on_cluster, _what_this_worker_lacks, check_workers_code
from gradtrace.sweep import PlannedRun, SweepError, plan, run_sweep


@pytest.mark.parametrize("by", ["address", "scheduler file"])
def test_sweep_on_a_dask_local_cluster(tmp_path, monkeypatch, by):
    """The scheduler named by its address, or by the file it wrote that in (a batch cluster's way). Its workers are
    asked whether they see the sweep's folder before anything trains (and refused where they do not)."""
    from dask.distributed import Client, LocalCluster

    checked, check = [], Cluster.check_workers_see
    monkeypatch.setattr(Cluster, "check_workers_see", lambda cluster, out, cfg: checked.append(out) or check(cluster,
                                                                                                             out, cfg))

    cfg = tiny_config(sweep__runs=2, sweep__reference_runs=0, train__steps=6)
    file = tmp_path / "scheduler.json"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                      scheduler_kwargs={"scheduler_file": str(file)}) as cluster:
        scheduler = cluster.scheduler_address if by == "address" else str(file)
        table = run_sweep(cfg, tmp_path / "study", progress=False, scheduler=scheduler)
        cluster = Cluster(Client(cluster.scheduler_address), "no such token")
        with pytest.raises(SweepError, match=r"1 dask worker\(s\) do not see .* lacks the sweep's folder"):
            check(cluster, tmp_path / "study", cfg)  # asked through the cluster itself
        cluster.client.close()
    assert sorted(table.run_id) == ["run-000", "run-001"]
    assert checked == [tmp_path / "study"] and not list((tmp_path / "study").glob(f"{WORKERS_MARK}*"))


def test_a_sweep_that_loses_its_scheduler_stops_and_says_so(tmp_path, monkeypatch):
    """A scheduler killed mid-sweep: every job came back cancelled ("scheduler-connection-lost"), read as each run
    failing in turn, the first with dask's traceback, and the sweep ended saying "4 run(s) failed"."""
    import asyncio
    import threading

    import dask
    from dask.distributed import LocalCluster

    training = threading.Event()

    def lose_the_scheduler(*args, **kwargs):
        asyncio.run_coroutine_threadsafe(cluster.scheduler.close(), cluster.loop.asyncio_loop)
        training.wait(30)  # a run training on in its worker
        return []

    monkeypatch.setattr(sweep, "train_job", lose_the_scheduler)
    monkeypatch.setattr(cluster_mod, "CONNECT_TIMEOUT", "2s")  # how long the client tries to reach it again
    cfg = tiny_config(sweep__runs=4, sweep__reference_runs=0, train__steps=4)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        try:
            with pytest.raises(SweepError, match=r"^lost the dask scheduler at \S+ \(it stopped, or the network to it "
                                                 r"failed\): the sweep stops\. .* run the same sweep to go on"):
                run_sweep(cfg, tmp_path / "study", progress=False, scheduler=cluster.scheduler_address)
        finally:
            training.set()


def test_a_scheduler_file_not_written_is_refused_by_name(tmp_path):
    with pytest.raises(SweepError, match=r"cannot reach the dask scheduler at .*scheduler\.json"):
        run_sweep(tiny_config(sweep__runs=1), tmp_path / "study", progress=False,
                  scheduler=str(tmp_path / "scheduler.json"))


def test_a_cluster_without_workers_is_refused_not_waited_on_forever(tmp_path, monkeypatch):
    from dask.distributed import LocalCluster

    monkeypatch.setattr(cluster_mod, "WORKERS_TIMEOUT", "1s")
    cfg = tiny_config(sweep__runs=1, sweep__reference_runs=0, train__steps=2)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(SweepError, match="has no worker"):
            run_sweep(cfg, tmp_path, progress=False, scheduler=cluster.scheduler_address)


def test_a_cluster_job_runs_alone_in_its_worker_and_refuses_unpinned_kernels(tmp_path, monkeypatch):
    import threading

    running, most = [], []

    def fake_train_job(*args, **kwargs):
        running.append(1)
        most.append(len(running))
        time.sleep(0.2)
        running.pop()
        return []

    monkeypatch.setattr(sweep, "train_job", fake_train_job)
    (tmp_path / f"{WORKERS_MARK}token").write_text("token")  # the sweep's folder, seen
    threads = [threading.Thread(target=_execute_on_cluster, args=({}, str(tmp_path), [], 1, "token"))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(most) == 1  # one job at a time in a worker process of several threads
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "in_use", lambda: "AVX512")  # a worker that computed before the run pinned
    cfg = tiny_config(train__cpu_kernels="avx2", train__steps=2)
    with pytest.raises(RuntimeError, match="this process runs AVX512.*restart the workers"):
        _execute_on_cluster(cfg.to_dict(), str(tmp_path), [PlannedRun("run-000", "sweep", {})], 1, "token")


def test_an_unreachable_scheduler_is_refused_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_mod, "CONNECT_TIMEOUT", "1s")
    cfg = tiny_config(sweep__runs=1, sweep__reference_runs=0, sweep__pretrain_steps=2, train__steps=2)
    with pytest.raises(SweepError, match="cannot reach the dask scheduler at tcp://127.0.0.1:9"):
        run_sweep(cfg, tmp_path, progress=False, scheduler="tcp://127.0.0.1:9")
    assert not (tmp_path / "store.zarr").exists()  # the base run did not train first


def test_a_cluster_whose_workers_run_another_gradtrace_is_refused():
    """Workers started before an upgrade failed every run with errors about the old code (or trained with it)."""
    from gradtrace.kernels import code_fingerprint

    class Workers:
        def __init__(self, codes):
            self.codes = codes

        def run(self, function):
            if isinstance(self.codes, Exception):
                raise self.codes
            return self.codes

    check_workers_code(Workers({"tcp://a": code_fingerprint(), "tcp://b": code_fingerprint()}))
    with pytest.raises(SweepError, match=r"1 dask worker\(s\) run another gradtrace .*tcp://b 0123"):
        check_workers_code(Workers({"tcp://a": code_fingerprint(), "tcp://b": "0123"}))
    with pytest.raises(SweepError, match="AttributeError"):
        check_workers_code(Workers(AttributeError("module 'gradtrace.sweep' has no attribute 'code_fingerprint'")))


def test_a_cluster_whose_workers_do_not_see_the_sweeps_folder_or_files_is_refused(tmp_path, monkeypatch):
    """A worker on a machine without the sweep's folder at its path (--out on a disk of this machine's own) trained
    its runs into a folder of its own machine, which the sweep never read: it ended without them, not saying why,
    and trained them again when run again. One without the config's weights failed every run it was given."""
    class Workers:
        """Workers that each see the file system under a root of their own: this machine's "", or a folder."""

        def __init__(self, roots):
            self.roots = roots

        def run(self, function, out, token, files, modules, on_error):
            return {worker: function(root + out, token, [root + f for f in files], modules)
                    for worker, root in self.roots.items()}

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    cfg = tiny_config(model__init_from=str(weights))
    out = tmp_path / "study"
    out.mkdir()
    (out / f"{WORKERS_MARK}token").write_text("token")
    Cluster(Workers({"tcp://a": "", "tcp://b": ""}), "token").check_workers_see(out, cfg)
    elsewhere = Cluster(Workers({"tcp://a": "", "tcp://b": str(tmp_path / "node-b")}), "token")
    with pytest.raises(SweepError, match=r"1 dask worker\(s\) do not see .*tcp://b lacks the sweep's folder .*study, "
                                         r".*node-b.*w\.safetensors\): give --out a folder .*; copy the files"):
        elsewhere.check_workers_see(out, cfg)
    assert _what_this_worker_lacks(str(out), "token", [], ["json", "no_such_module_x", "no_such_pkg.sub"]) == \
        ["module no_such_module_x", "module no_such_pkg.sub"]
    with pytest.raises(SweepError, match=r"lacks module no_such_module_x\): install the modules"):
        Cluster(Workers({"tcp://a": ""}), "token").check_workers_see(out,
                                                                     tiny_config(task__modules=["no_such_module_x"]))
    assert _what_this_worker_lacks(str(out), "another token", [], []) == [f"the sweep's folder {out}"]

    class Failing:
        def run(self, function, *args, on_error):
            return {"tcp://c": PermissionError(13, "Permission denied")}

    with pytest.raises(SweepError, match=r"tcp://c could not tell \(PermissionError: .*\): mend what their error"):
        Cluster(Failing(), "token").check_workers_see(out, cfg)
    monkeypatch.setattr(sweep, "_dispatch", lambda *args, **kwargs: pytest.fail("a run was dispatched"))
    with pytest.raises(SweepError, match="do not see"):  # before anything trains
        sweep._run_locked(tiny_config(sweep__runs=1, sweep__reference_runs=0), out, False, elsewhere)


def test_a_cluster_worker_that_does_not_see_the_sweeps_folder_trains_no_run(tmp_path):
    """A worker that joins the cluster after the sweep's check, on a machine without the sweep's folder, would train
    its runs into a folder of its own machine: it refuses each before it trains, naming its machine."""
    import socket

    cfg = tiny_config(sweep__runs=1, sweep__reference_runs=0, train__steps=2)
    job = [r for r in plan(cfg) if r.role == "sweep"]
    (tmp_path / f"{WORKERS_MARK}token").write_text("token")
    with pytest.raises(RuntimeError, match=rf"the dask worker on {re.escape(socket.gethostname())} does not see the "
                                           rf"sweep's folder {re.escape(str(tmp_path / 'elsewhere'))}"):
        _execute_on_cluster(cfg.to_dict(), str(tmp_path / "elsewhere"), job, 1, "token")
    assert not (tmp_path / "elsewhere").exists()


def test_a_cluster_worker_that_draws_other_items_than_the_sweep_trains_no_run(tmp_path):
    """A worker whose task draws other items than the sweep's process (a split of one's own drawing otherwise in each
    process, or other numpy on that machine) refuses each run before it trains."""
    cfg = tiny_config(sweep__runs=1, sweep__reference_runs=0, train__steps=2)
    job = [r for r in plan(cfg) if r.role == "sweep"]
    (tmp_path / f"{WORKERS_MARK}token").write_text("token")
    with pytest.raises(ValueError, match="this process draws other items for the task than the sweep's own process "
                                         "drew \\(items digest 0123456789abcdef\\)"):
        _execute_on_cluster(cfg.to_dict(), str(tmp_path), job, 1, "token", "0123456789abcdef")
    assert not (tmp_path / "store.zarr").exists()


@pytest.mark.parametrize("blind", [1, 2])
def test_a_worker_that_joins_without_the_sweeps_folder_leaves_and_its_runs_go_to_another(tmp_path, monkeypatch,
                                                                                          capsys, blind):
    """A worker that joined after the sweep's check, on a machine without the sweep's folder, took and failed one
    queued run after another while the others trained (10 of 12 on a real cluster). The last worker stays, failing
    its runs: with none left, the sweep would wait forever."""
    from dask.distributed import Client, LocalCluster, get_worker

    blind_ones, sees = [], cluster_mod._sees_the_sweep
    monkeypatch.setattr(Cluster, "check_workers_see", lambda *args: None)  # they join after the sweep's check
    monkeypatch.setattr(cluster_mod, "_sees_the_sweep", lambda out, token: get_worker().address not in blind_ones
                        and sees(out, token))
    cfg = tiny_config(sweep__runs=6, sweep__reference_runs=0, train__steps=4)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster.scheduler_address) as client:
            blind_ones += sorted(client.nthreads())[:blind]
        if blind == 1:
            table = run_sweep(cfg, tmp_path / "study", progress=False, scheduler=cluster.scheduler_address)
            assert table.run_id.tolist() == [f"run-00{i}" for i in range(6)]
        else:
            with pytest.raises(SweepError, match=r"6 run\(s\) failed .*WorkerWithoutSweep: the dask worker"):
                run_sweep(cfg, tmp_path / "study", progress=False, scheduler=cluster.scheduler_address)
        assert len(cluster.scheduler.workers) == 1 and (blind == 2 or blind_ones[0] not in cluster.scheduler.workers)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gradtrace sweep: the dask")]
    assert len(said) == 1 and said[0].endswith("it leaves the cluster, its runs go to the other workers")
