"""A sweep's runs on a dask cluster (`gradtrace sweep --scheduler`).

`connect` reaches the scheduler and its workers before anything trains and refuses workers that run another
gradtrace; `Cluster.check_workers_see` refuses workers that do not see what the sweep's runs need (its folder, at
the same path; the files and modules its config names); `Cluster.train` trains each job on a worker, one job at a
time in each (`_execute_on_cluster`), and retires a worker that lost the sweep's folder, its runs sent to the others.
The sweep itself (plan, directory, results) is `gradtrace.sweep`'s, as on one machine.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from gradtrace import config as config_mod
from gradtrace import kernels, sweep
from gradtrace.config import Config
from gradtrace.sweep import PlannedRun, SweepError

CONNECT_TIMEOUT = "30s"  # to reach a dask scheduler
WORKERS_TIMEOUT = "60s"  # for its first worker to join
SEND_AGAIN = 3  # times a run a worker without the sweep's folder refused goes to another worker
SCHEDULER_LOST = "scheduler-connection-lost"  # dask's reason for each job it cancels when the scheduler is lost
WORKERS_MARK = ".workers-see-"  # + the token: the file's name, never used before (no file system has it cached)


@dataclass(frozen=True)
class Cluster:
    """A dask cluster a sweep trains on: its client, and the token of the file each worker reads in the sweep's
    folder before it trains a run (`check_workers_see`)."""

    client: Any
    token: str

    def check_workers_see(self, out: Path, cfg: Config) -> None:
        """Refuse a cluster whose workers do not all see the sweep's folder (a shared file system, at this path),
        the files its config names (`model.init_from`, `.py` files of `task.modules`) and the modules it imports: a
        worker that did not see the folder trained its runs into a folder of its own machine, which the sweep never
        read (it ended without them, not saying why, and trained them again when run again); one without the weights
        or a module failed every run it was given. Each worker also checks the folder before each run
        (`_execute_on_cluster`)."""
        files = [cfg.model.init_from] if cfg.model.init_from else []
        files += [m for m in cfg.task.modules if config_mod.names_a_file(m)]
        modules = [m for m in cfg.task.modules if not config_mod.names_a_file(m)]
        answers = self.client.run(_what_this_worker_lacks, str(out.resolve()), self.token, files, modules,
                                  on_error="return")
        said, kinds = [], set()
        for worker, what in answers.items():
            if isinstance(what, BaseException):
                said.append(f"{worker} could not tell ({type(what).__name__}: {what})")
            elif what:
                said.append(f"{worker} lacks {', '.join(what)}")
                kinds |= {next((kind for kind in ADVICE if kind and item.startswith(kind)), "") for item in what}
        if said:
            advice = [text.format(out=out.resolve()) for kind, text in ADVICE.items() if kind in kinds]
            raise SweepError(f"{len(said)} dask worker(s) do not see what the sweep's runs need ("
                             f"{'; '.join(said[:3])}{'; …' if len(said) > 3 else ''}): "
                             f"{'; '.join(advice or ['mend what their error says'])}")

    def train(self, cfg: Config, out: Path, jobs: list[list[PlannedRun]], items: str | None = None):
        """Yield each finished job with its rows, or with the exception it raised (the other jobs go on), each
        trained on a worker that draws the task's `items` (`sweep.train_job`); a job a worker without the sweep's
        folder refused goes to another, that worker retired (`_retire`). Closed early (interrupted), it cancels the
        jobs not yet started; running ones train on. A lost scheduler stops it (`SweepError`)."""
        from dask.distributed import as_completed

        cfg_dict = cfg.to_dict()

        def submit(job: list[PlannedRun]):
            return self.client.submit(_execute_on_cluster, cfg_dict, str(out.resolve()), job,
                                      sweep.job_threads(cfg, job), self.token, items, pure=False)

        futures = {submit(job): job for job in jobs}
        finished, sent_again, retired = as_completed(futures), Counter(), set()
        try:
            for fut in finished:
                job, outcome = futures.pop(fut), sweep.job_outcome(fut)
                if getattr(outcome, "reason", None) == SCHEDULER_LOST:  # every job left would fail alike, one by one
                    raise SweepError(_scheduler_lost_words(self.client))
                if isinstance(outcome, WorkerWithoutSweep) and _retire(self.client, outcome, retired) \
                        and sent_again[job[0].run_id] < SEND_AGAIN:
                    sent_again[job[0].run_id] += 1
                    futures[again := submit(job)] = job
                    finished.add(again)
                    continue
                yield job, outcome
        finally:
            self.client.cancel(list(futures))


def _scheduler_lost_words(client) -> str:
    """What to say when the sweep lost its scheduler: each job came back cancelled, which read as every run failing
    one by one, each with dask's traceback."""
    return (f"lost the dask scheduler at {getattr(client.scheduler, 'address', None) or 'its address'} (it stopped, "
            "or the network to it failed): the sweep stops. Its complete runs are kept; a run that was training "
            "trains on in its worker where the worker lives on, and a re-run refuses it until it ends. Start the "
            "scheduler and its workers again and run the same sweep to go on: the runs left resume from their last "
            "checkpoints")


@contextlib.contextmanager
def connect(scheduler: str, out: Path) -> Iterator[Cluster]:
    """The dask cluster at `scheduler`, connected before anything trains: an address (tcp://HOST:PORT), or the file
    a scheduler wrote it in (`dask scheduler --scheduler-file PATH`, as on a batch cluster, where the scheduler's host
    is known only once its job starts). Its workers' file in `out` is removed as the sweep ends (one a killed sweep
    left, as the next starts: one sweep at a time per folder)."""
    from dask.distributed import Client

    file = Path(scheduler).expanduser()
    is_file = file.is_file()
    where = {"scheduler_file": str(file)} if is_file else {"address": scheduler}
    try:
        client = Client(**where, timeout=CONNECT_TIMEOUT)
    except (OSError, ValueError) as err:  # ValueError: no address (a scheduler file not written yet, say)
        raise SweepError(f"cannot reach the dask scheduler at {scheduler} ({err}); start it and its workers, or run "
                         "without --scheduler") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=WORKERS_TIMEOUT)  # with none, the sweep waited forever, saying nothing
        except TimeoutError:
            start = f"--scheduler-file {scheduler}" if is_file else scheduler
            raise SweepError(f"the dask cluster at {scheduler} has no worker (none joined in {WORKERS_TIMEOUT}): start "
                             f"some (`dask worker {start} --nthreads 1`), or run without --scheduler") from None
        check_workers_code(client)
        for stale in out.glob(WORKERS_MARK + "*"):
            stale.unlink(missing_ok=True)
        token = uuid.uuid4().hex
        mark = _workers_mark(str(out.resolve()), token)
        try:
            mark.write_text(token, encoding="utf-8")
            yield Cluster(client, token)
        finally:
            mark.unlink(missing_ok=True)


def check_workers_code(client) -> None:
    """Refuse a cluster whose workers run another gradtrace than this sweep (started before an upgrade, say): they
    would fail every run with errors about the old code, or train with it and record nothing of the difference."""
    ours = kernels.code_fingerprint()
    try:
        theirs = client.run(kernels.code_fingerprint)
    except Exception as err:  # workers so old they lack this function
        theirs = {"(workers)": f"unknown ({type(err).__name__}: {err})"}
    other = {worker: code for worker, code in theirs.items() if code != ours}
    if other:
        raise SweepError(f"{len(other)} dask worker(s) run another gradtrace than this sweep (code {ours}; theirs: "
                         f"{', '.join(f'{w} {c}' for w, c in list(other.items())[:3])}): restart them from the same "
                         "install (`dask worker` started after the upgrade)")


ADVICE = {  # what to do where a worker lacks what an item of `_what_this_worker_lacks` begins with ("": a file)
    "the sweep's folder": "give --out a folder on a file system every worker shares, at the same path as here ({out})",
    "": "copy the files the config names onto a file system every worker shares and name the copies in the config "
        "(gradtrace's shipped base lies where gradtrace is installed)",
    "module ": "install the modules the config imports on every worker (or put them on the workers' Python path)",
}


def _workers_mark(out: str, token: str) -> Path:
    """The file in the sweep's folder `out` that its dask workers read (`Cluster.token`)."""
    return Path(out) / (WORKERS_MARK + token)


def _sees_the_sweep(out: str, token: str) -> bool:
    """Whether this process sees the sweep's folder: its workers' file there holds `token`."""
    try:
        return _workers_mark(out, token).read_text(encoding="utf-8") == token
    except OSError:
        return False


def _what_this_worker_lacks(out: str, token: str, files: list[str], modules: list[str]) -> list[str]:
    """What a dask worker does not see of the sweep's folder, of the files its config names and of the modules it
    imports."""
    import importlib.util

    lacks = ([] if _sees_the_sweep(out, token) else [f"the sweep's folder {out}"])
    lacks += [f for f in files if not os.path.isfile(f)]  # False, not an error, where it may not look (EACCES)
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except Exception:  # its parent package missing, or failing as it is imported
            found = False
        lacks += [] if found else [f"module {module}"]
    return lacks


class WorkerWithoutSweep(RuntimeError):
    """A dask worker does not see the sweep's folder (`_execute_on_cluster`); `worker`: its address, or None."""

    def __init__(self, message: str, worker: str | None) -> None:
        super().__init__(message)
        self.worker = worker

    def __reduce__(self):
        return type(self), (str(self), self.worker)


def _retire(client, err: WorkerWithoutSweep, retired: set[str]) -> bool:
    """Take a worker that does not see the sweep's folder out of the cluster (it closes), so that it is given no more
    runs, saying so once (`retired`: those taken out so far); whether another worker is left to train its run. The
    last worker stays, failing its runs: with none, the sweep would wait for one forever."""
    workers = client.nthreads()  # every worker's address
    left = [w for w in workers if w != err.worker]
    if left and err.worker in workers and err.worker not in retired:
        retired.add(err.worker)
        tqdm.write(f"gradtrace sweep: {err}: it leaves the cluster, its runs go to the other workers", file=sys.stderr)
        with contextlib.suppress(Exception):  # gone already
            client.retire_workers(workers=[err.worker], close_workers=True)
    return bool(left)


_ONE_JOB_AT_A_TIME = threading.Lock()


def _execute_on_cluster(cfg_dict: dict, out: str, job: list[PlannedRun], threads: int, token: str,
                        items: str | None = None) -> list[dict]:
    """A dask task: `sweep.train_job`, one job at a time in a worker process (torch's thread count and CPU kernels
    belong to the process, and transformers' lazy imports race), refused where the run's kernels cannot be pinned
    because the worker computed with others before (a local sweep's fresh workers never do), and before it trains
    where the worker does not see the sweep's folder (`token`: its workers' file there; one that joined the cluster
    after the sweep's check, say) or draws other `items` for the task than the sweep (`sweep.train_job`)."""
    if not _sees_the_sweep(out, token):
        import socket

        from dask.distributed import get_worker

        try:
            worker = get_worker().address
        except ValueError:  # not in a worker's task
            worker = None
        where = f"{worker} on {socket.gethostname()}" if worker else f"on {socket.gethostname()}"
        raise WorkerWithoutSweep(f"the dask worker {where} does not see the sweep's folder {out}: it would train into "
                                 "a folder of its own machine, which the sweep never reads; every worker must see it "
                                 "at that path (a shared file system)", worker)
    with _ONE_JOB_AT_A_TIME, warnings.catch_warnings():
        warnings.simplefilter("error", kernels.KernelsNotPinned)
        try:
            return sweep.train_job(cfg_dict, out, job, threads, items=items)
        except kernels.KernelsNotPinned as err:
            raise RuntimeError(f"{err} On a dask cluster: restart the workers (`Client.restart()`), so that each "
                               "starts its runs in a fresh process") from None


