"""The trajectory store: one Zarr v3 group per run inside an experiment store; schema in storage/README.md.

Writers buffer whole chunks along the step axis and write each chunk once; `checkpoint()` makes every
buffered row durable and records `last_durable_step`, so a killed run reopens there. Readers need only zarr.
"""
from __future__ import annotations

import builtins
import contextlib
import datetime
import errno
import itertools
import json
import math
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import numpy as np
import zarr

import gradtrace
from gradtrace import kernels
from gradtrace.files import written_whole

SCHEMA_VERSION = 1
BF16 = "bfloat16"  # stored as uint16 (the top half of float32); see `decode`
EXPERIMENT = "gradtrace-experiment"  # the root's `kind`


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sync_to_disk(*paths: Path) -> None:
    """Flush files (or a folder's entries) to the disk: what the operating system still holds in memory is lost to a
    power cut or a node's crash (a killed process loses nothing of it)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def local_path(node: zarr.Group | zarr.Array) -> Path | None:
    """The folder of a group or array in a store on the local file system; None in any other store."""
    return Path(node.store.root, node.path) if isinstance(node.store, zarr.storage.LocalStore) else None


def _update_attributes_synced(group: zarr.Group, attrs: dict[str, Any]) -> None:
    """`group.update_attributes`, synced to the disk in a local store."""
    group.update_attributes(attrs)
    if (folder := local_path(group)) is not None:
        sync_to_disk(folder / "zarr.json")


def check_compatible(a: dict, b: dict) -> None:
    """Refuse to compare vectors from different sketches (kind, dim, seed or parameter layout): two runs' `sketch`
    attributes, say."""
    keys = ("kind", "dim", "seed", "layout_hash")
    diff = [k for k in keys if a.get(k) != b.get(k)]
    if diff:
        detail = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff)
        raise ValueError(f"incompatible sketches ({detail}); sketched vectors are only comparable under the same "
                         "kind, dim, seed and parameter layout. Re-capture with matching capture.* settings.")


def encode(rows: np.ndarray, storage: str) -> np.ndarray:
    """Cast float32 rows to the storage dtype (bfloat16 kept as its uint16 bit pattern, rounded to nearest)."""
    if storage != BF16:
        return rows.astype(storage, copy=False)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    bits = rows.view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even
    # a NaN's low mantissa bits would round into the exponent (inf) or wrap round (0): keep it a quiet NaN
    return np.where(np.isnan(rows), (bits >> 16) | 0x0040, rounded >> 16).astype(np.uint16)


def decode(values: np.ndarray, storage: str | None) -> np.ndarray:
    """Stored values as float32 where they are floats (inverse of `encode`); other values as they are."""
    if storage == BF16:
        return (np.asarray(values, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(values, dtype=np.float32) if storage == "float16" else np.asarray(values)


def open_experiment(path: str | Path, mode: str = "r") -> zarr.Group:
    """The experiment store (a Zarr v3 group) at `path`, with a clear error when it is not one."""
    path = Path(path)
    if mode == "r" and not (path / "zarr.json").exists():
        hint = f" (did you mean {path / 'store.zarr'}?)" if (path / "store.zarr").exists() else ""
        raise FileNotFoundError(f"{path} is not a gradtrace store: no zarr.json there{hint}")
    attrs = {"schema_version": SCHEMA_VERSION, "gradtrace_version": gradtrace.__version__, "kind": EXPERIMENT}
    try:
        # a new store is created with its attributes in one write: of two workers opening it at once, one saw the
        # other's group bare (attributes not yet written) beside a run, and refused it as no gradtrace store
        if mode == "a" and not (path / "zarr.json").exists():
            with contextlib.suppress(zarr.errors.ContainsGroupError):  # the other was first
                zarr.create_group(path, zarr_format=3, attributes={**attrs, "created": _now()})
        root = zarr.open_group(path, mode=mode, zarr_format=3)
    except OSError:  # the folder cannot be made or read (a file on its way, a read-only disk): its own words
        raise
    except Exception as err:  # zarr raises several types for damaged metadata
        raise ValueError(f"{path} could not be opened as a Zarr v3 group ({type(err).__name__}: {err}); "
                         "the store may be truncated or corrupt") from err
    if mode != "r" and not root.attrs and not any(root.keys()):  # mode "w" (or a store of before, killed here)
        root.update_attributes({**attrs, "created": _now()})
    if root.attrs.get("kind") != EXPERIMENT:
        raise ValueError(_not_an_experiment(path, root))
    version = root.attrs.get("schema_version")
    if version is not None and version > SCHEMA_VERSION:
        raise ValueError(f"{path} has schema version {version}; this gradtrace reads up to {SCHEMA_VERSION}. "
                         "Upgrade gradtrace.")
    return root


def _not_an_experiment(path: Path, group: zarr.Group) -> str:
    """Why a Zarr group is not an experiment store, and the store it lies in, if any (as the path was given: a
    relative one stays relative, not the working directory joined to its `..`)."""
    store = next((p for p in (*path.parents, *path.absolute().parents) if _kind(p) == EXPERIMENT), None)
    what = "a run group" if "status" in group.attrs else "a group"
    if store is not None:
        return f"{path} is {what} inside the experiment store {store}, not a store: pass {store}"
    return f"{path} is a Zarr group but not a gradtrace experiment store (its attribute `kind` is not {EXPERIMENT!r})"


def _kind(folder: Path) -> str | None:
    """The `kind` attribute of the Zarr group in a folder, None where there is none."""
    try:
        return json.loads((folder / "zarr.json").read_text(encoding="utf-8"))["attributes"]["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunWriter:
    """Appends rows of named arrays to one run group, a whole chunk per write.

    `declare` creates an array with a leading `step` axis; `append` buffers one row of several arrays (numpy
    values, or torch tensors on any device: those stay where they are until their chunk is stacked and copied to
    the host in one transfer, so a GPU run synchronises once per chunk, not once per step); full chunks are
    written (by a background thread with a bounded queue when `thread=True`); `flush` writes every buffered row
    and syncs what was written to the disk (in a local store); `checkpoint` then records the last durable step.
    """

    def __init__(self, group: zarr.Group, chunk: int = 256, thread: bool = False, queue_size: int = 4) -> None:
        self.group, self.chunk = group, chunk
        self._buffers: dict[str, list] = {}
        self._chunk_rows: dict[str, int] = {}
        self._written: dict[str, int] = {}
        self._unsynced: set[Path] = set()  # files and folders written since the last flush (local stores)
        self._queue: queue.Queue | None = None
        self._error: BaseException | None = None
        if thread:
            self._queue = queue.Queue(maxsize=queue_size)  # chunks in flight: training waits, memory bounded
            self._thread = threading.Thread(target=self._drain, name=f"gradtrace writer {group.path}", daemon=True)
            self._thread.start()

    def declare(self, name: str, row_shape: tuple[int, ...], dtype: str = "float32",
                dims: tuple[str, ...] = (), storage: str | None = None, every: int = 1) -> None:
        """Create (or reopen) array `name` of rows shaped `row_shape`; dims name the axes after the first.

        The first axis is `step` for top-level arrays, `probe` under `probe/` and `eval` under `evals/`. An array
        given a row every `every` steps has chunks of chunk // every rows (at least one): written once in `chunk`
        steps, like an array with a row every step, not once in `every` × chunk steps (probes every 50 steps: once
        in 12,800, so a run killed without checkpoints lost them all).
        """
        self._chunk_rows[name] = max(1, self.chunk // every)
        storage = storage or dtype
        if name in self.group:
            arr = self.group[name]
            if arr.shape[1:] != tuple(row_shape):  # zarr would cut wider rows to fit, silently
                raise ValueError(f"array {name!r} of run {self.group.basename!r} holds rows of shape {arr.shape[1:]}, "
                                 f"not {tuple(row_shape)}: rows of another kind cannot join it")
        else:
            zdtype = "uint16" if storage == BF16 else storage
            axis = {"probe": "probe", "evals": "eval"}.get(name.split("/")[0], "step") if "/" in name else "step"
            index = INDEX_ARRAYS[axis]  # a run resumed from rows an older gradtrace wrote without this array:
            rows = self.group[index].shape[0] if index != name and index in self.group else 0  # theirs unrecorded
            arr = self.group.create_array(
                name, shape=(rows, *row_shape), chunks=(self._chunk_rows[name], *row_shape), dtype=zdtype,
                dimension_names=(axis, *(dims or [f"dim_{i}" for i in range(1, len(row_shape) + 1)])),
                fill_value=_fill_value(zdtype, storage), attributes={"storage_dtype": storage})
        self._buffers[name] = []
        self._written[name] = arr.shape[0]

    def append(self, row: dict[str, Any]) -> None:
        """Buffer one row per named array; write the arrays whose buffers hold a whole chunk."""
        self._raise()
        full = []
        for name, value in row.items():
            buf = self._buffers[name]
            buf.append(value)
            if len(buf) == self._chunk_rows[name]:
                full.append(name)
        if full:
            self._submit(full)

    def _submit(self, names: list[str]) -> None:
        """Hand the buffered rows of `names` to the disk as one job (the queue bounds chunks of rows in flight)."""
        job = []
        for name in names:
            values, self._buffers[name] = self._buffers[name], []
            job.append((name, self._written[name], values))
            self._written[name] += len(values)
        if self._queue is None:
            self._write(job)
        else:
            self._queue.put(job)

    def _write(self, job: list[tuple[str, int, list]]) -> None:
        for name, start, values in job:
            rows = stack_rows(values)  # in the writer thread, if any: device tensors are copied there
            arr = self.group[name]
            stop = start + len(rows)
            if arr.shape[0] < stop:
                arr.resize((stop, *arr.shape[1:]))
            arr[start:stop] = encode(rows, arr.attrs.get("storage_dtype", str(arr.dtype)))
            self._note_written(arr, start, stop)

    def _note_written(self, arr: zarr.Array, start: int, stop: int) -> None:
        """Remember the files rows start..stop went to: their chunks, the metadata of the array and its groups, and
        the folders holding them."""
        folder = local_path(arr)
        if folder is None:
            return
        root = Path(arr.store.root)
        nodes = [folder, *itertools.takewhile(lambda p: p != root, folder.parents)]  # the array, its groups
        self._unsynced.update(p / "zarr.json" for p in nodes)
        for index in range(start // arr.chunks[0], (stop - 1) // arr.chunks[0] + 1):
            path = folder / _chunk_key(arr, index)
            self._unsynced.update([path, *itertools.takewhile(lambda p: p != root, path.parents)])

    def _sync(self) -> None:
        """Sync the files written since the last call (a chunk equal to the fill value is not written at all)."""
        paths, self._unsynced = self._unsynced, set()
        sync_to_disk(*(p for p in sorted(paths, key=lambda p: -len(p.parts)) if p.exists()))

    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is not None and self._error is None:
                    self._write(job)
            except BaseException as err:  # surfaced to the training thread on its next call
                self._error = err
            finally:
                self._queue.task_done()
            if job is None:
                return

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the store writer failed: {self._error}") from self._error

    def flush(self) -> None:
        """Write every buffered row (partial chunks too) and wait until it is on disk, synced."""
        pending = [name for name, buf in self._buffers.items() if buf]
        if pending:
            self._submit(pending)
        if self._queue is not None:
            self._queue.join()
        self._raise()
        self._sync()

    def checkpoint(self, step: int) -> None:
        """Make everything appended so far durable and record `step` as the last durable step."""
        self.flush()
        _update_attributes_synced(self.group, {"last_durable_step": int(step), "updated": _now()})

    def close(self) -> None:
        """Flush and stop the background thread (stopped also where the flush fails)."""
        try:
            self.flush()
        finally:
            self._stop_thread()

    def abort(self) -> None:
        """Stop the background thread, dropping the rows not yet handed to it: a failed run's. A sweep's worker
        goes on to its next run, and the thread, blocked on its queue, held the writer and its rows (a GPU's
        tensors) for the life of the process; a resume cuts the run back to its last durable step anyway."""
        self._buffers = {name: [] for name in self._buffers}
        self._stop_thread()

    def _stop_thread(self) -> None:
        """End the background thread once the chunks already queued are written (or skipped, after an error)."""
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None


def _fill_value(dtype: str, storage: str) -> Any:
    """What a row never written reads as: NaN for floats (bfloat16's as its uint16 pattern), so a lost chunk file reads
    back as NaN, not as rows of plausible zeros (zarr reads a missing chunk as the fill value); 0 for the others."""
    if storage == BF16:
        return 0x7FC0
    return np.nan if np.dtype(dtype).kind == "f" else 0


def stack_rows(values: list) -> np.ndarray:
    """Buffered rows as one host array. Torch tensors (with Python or numpy values beside them) are stacked on
    their device and copied once; floating tensors as float32."""
    torch = sys.modules.get("torch")  # no tensor can exist unless torch is imported
    tensor = next((v for v in values if torch is not None and isinstance(v, torch.Tensor)), None)
    if tensor is None:
        return np.stack([np.asarray(v) for v in values])
    stacked = torch.stack([torch.as_tensor(v, device=tensor.device) for v in values]).detach()
    return (stacked.float() if stacked.is_floating_point() else stacked).cpu().numpy()


class RunInUse(RuntimeError):
    """Another process is training the run: its lock file is held."""


@contextlib.contextmanager
def run_lock(exp_dir: Path, run_ids: list[str]) -> Iterator[None]:
    """Hold each run's lock file (`exp_dir/locks/<run_id>.lock`) while it trains, so that no second process writes
    its group at once (a re-run of a sweep whose interrupted client left tasks training on a cluster; two `train
    --resume`): it is refused, not allowed to mix two trajectories in one run. The operating system releases a lock
    when its holder dies, so a killed run never blocks its resumption."""
    from filelock import Timeout

    for run_id in run_ids:
        check_run_id(run_id)
    (exp_dir / "locks").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        for run_id in run_ids:
            try:
                held.enter_context(take_lock(exp_dir / "locks" / f"{run_id}.lock"))
            except Timeout:
                raise RunInUse(f"run {run_id!r} is being trained by another process (on a dask cluster: a task of an "
                               "interrupted sweep, which trains on there until it ends); run again once it is done"
                               f"{held_where_no_flock(exp_dir / 'locks' / f'{run_id}.lock')}") from None
        yield


def take_lock(lock_file: Path) -> contextlib.AbstractContextManager:
    """`lock_file`'s lock, taken without waiting (filelock's `Timeout` where another process holds it), to be held
    as a context manager. A filesystem that refuses locks (an NFS mount whose lock service is down: ENOLCK) is an
    error naming the file and what to do, not only "[Errno 37] No locks available"."""
    from filelock import FileLock, Timeout

    try:
        return FileLock(lock_file).acquire(timeout=0)
    except Timeout:
        raise
    except OSError as err:
        if err.filename is not None:  # opening the file failed (a read-only directory): its words name it
            raise
        raise OSError(err.errno, f"the filesystem of {lock_file.parent} refused to lock {lock_file} ({err.strerror}), "
                                 "which gradtrace holds so that no two processes write one sweep or run at once: on "
                                 "NFS its lock service (lockd, rpc.statd) may be down; ask its administrators, or "
                                 "write to a filesystem that locks (a local disk; Lustre mounted with flock)") from err


def held_where_no_flock(lock_file: Path) -> str:
    """Words to add where `lock_file` is held, if its filesystem has no flock (a Lustre or NFS mount without it): the
    lock is then the file's existence (filelock's fallback), which outlives a holder killed on another machine."""
    try:
        import fcntl
    except ImportError:  # Windows: filelock locks otherwise
        return ""
    try:
        with tempfile.TemporaryFile(dir=lock_file.parent) as probe:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno == errno.ENOSYS:  # filelock falls back on ENOSYS only
            return (f". {lock_file.parent}'s filesystem has no flock (a Lustre or NFS mount without it), so a lock "
                    f"file there outlives a process killed on another machine: where none runs any more, delete "
                    f"{lock_file} and run again")
    return ""


def check_run_id(run_id: str) -> str:
    """`run_id`, refused where it would not name one run group and one lock file: empty, holding a path separator
    (`a/b` made nested groups no reader lists as a run), starting with a dot (`../x` put a lock file elsewhere)."""
    if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise ValueError(f"run id {run_id!r} must be a name without '/' or '\\' that does not start with '.' "
                         "(it names the run's group in the store and its lock file)")
    return run_id


def create_run(root: zarr.Group, run_id: str, attrs: dict[str, Any], overwrite: bool = False) -> zarr.Group:
    """A fresh run group with status `running` and the schema attributes, in one write: a group left without them
    (a full disk, a kill between two writes) was taken for the run, and an ensemble's resume failed on it for good."""
    check_run_id(run_id)
    if run_id in root and not overwrite:
        raise FileExistsError(f"run {run_id!r} already exists in the store; pass --resume to continue it "
                              "or choose another run id")
    return root.create_group(run_id, overwrite=True, attributes={
        "schema_version": SCHEMA_VERSION, "gradtrace_version": gradtrace.__version__, "status": "running",
        "last_durable_step": -1, "created": _now(), **attrs})


def truncate_to(group: zarr.Group, steps_done: int, trained: int | None = None) -> None:
    """Cut a run's rows past a resume point: step rows with step >= steps_done, probe rows past steps_done (optimizer
    steps), evaluation rows past `trained` (training steps, more where a GradScaler skipped steps; default
    steps_done); and the temporary files of writes a kill interrupted there."""
    trained = steps_done if trained is None else trained
    cuts = [("step", "", lambda s: s < steps_done), ("probe/step", "probe/", lambda s: s <= steps_done),
            ("evals/step", "evals/", lambda s: s <= trained)]
    arrays = _arrays(group)
    for index, prefix, keep_if in cuts:
        if index not in arrays:
            continue
        keep = _leading_rows(stored(arrays[index]), keep_if)
        for name, arr in arrays.items():
            in_axis = name.startswith(prefix) if prefix else "/" not in name
            if in_axis and arr.shape[0] > keep:
                arr.resize((keep, *arr.shape[1:]))
    _remove_partial_writes(group)


def _remove_partial_writes(group: zarr.Group) -> None:
    """Delete the temporary files (`*.partial`) of writes a kill interrupted under a run's folder (a local store):
    zarr writes each file beside its place and renames it there, so they hold nothing the run still needs."""
    folder = local_path(group)
    for leftover in folder.rglob("*.partial") if folder else []:
        leftover.unlink(missing_ok=True)


def _leading_rows(steps: np.ndarray, keep_if) -> int:
    """How many leading rows to keep: those whose steps pass `keep_if` and increase. A run killed between an
    array's resize and its chunk's write leaves rows of fill value (0) past the durable ones; they fail the test."""
    keep = keep_if(steps)
    keep[1:] &= np.diff(steps) > 0
    return len(keep) if keep.all() else int(np.argmin(keep))


def write_correct(group: zarr.Group, correct: dict[str, np.ndarray]) -> None:
    """Per-item exact-match correctness at the end of a run: `eval/correct` (split × item), splits in attrs."""
    data = np.stack(list(correct.values()))
    group.create_array("eval/correct", data=data, chunks=data.shape, dimension_names=("split", "item"),
                       attributes={"splits": list(correct)}, overwrite=True)


def set_status(group: zarr.Group, status: str, **extra: Any) -> None:
    """Record a run's status: running | complete | failed (numpy scalars among `extra` stored as Python numbers), in
    one metadata write: a kill never leaves a run marked complete without its accuracies (zarr's `attrs.update`
    writes once per key)."""
    plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in extra.items()}
    _update_attributes_synced(group, {"status": status, "updated": _now(), **plain})


def set_failed(group: zarr.Group, err: BaseException, **extra: Any) -> None:
    """Mark a run failed with `err`'s type and words. Where that write fails too (the disk still full) the run stays
    `running`, as a kill leaves it, and no error is raised: the caller raises its own, `err`."""
    with contextlib.suppress(OSError):
        set_status(group, "failed", error=f"{type(err).__name__}: {err}", **extra)


def train_loss_ends(group: zarr.Group) -> dict[str, float | str | None]:
    """The training loss of a run's first and last recorded rows, `{"first", "last"}` (null where none is recorded;
    NaN and Inf as zarr spells them in JSON, "NaN", "Infinity"): its `train_loss` attribute (`loss_ends`)."""
    loss = read(group, "loss") if has(group, "loss") else np.empty(0)
    return {"first": _json_loss(loss[0]), "last": _json_loss(loss[-1])} if len(loss) else {"first": None, "last": None}


def attached_loss_ends(group: zarr.Group, last: float | None) -> dict[str, float | str | None]:
    """`train_loss_ends` of a run recorded in a loop of one's own, whose rows hold a loss only where the loop gave one
    (NaN elsewhere, not told apart from a NaN loss): its first finite recorded loss and `last`, the last loss the loop
    gave (None: none since it was attached; then the last finite recorded loss, of the run before its resume)."""
    loss = read(group, "loss") if has(group, "loss") else np.empty(0)
    finite = loss[np.isfinite(loss)]
    if last is None:
        last = finite[-1] if len(finite) else None
    return {"first": _json_loss(finite[0]) if len(finite) else None, "last": None if last is None else _json_loss(last)}


def _json_loss(value: float) -> float | str:
    """A loss as strict JSON holds it: finite as a number, NaN and Inf as zarr spells them ("NaN", "Infinity")."""
    value = float(value)
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def loss_ends(attrs) -> tuple[float, float] | None:
    """A run's training loss at its first and last recorded rows, from its `train_loss` attribute; None where it has
    none (written before it was recorded, or a value of the user's own under that name)."""
    loss = attrs.get("train_loss")
    if not isinstance(loss, dict):
        return None
    try:
        first, last = float(loss["first"]), float(loss["last"])
    except (KeyError, TypeError, ValueError):
        return None
    return first, last


DIVERGED_RISE, DIVERGED_FROM = 10, 0.1  # a loss that ends at 10× where it began, counted from 0.1 at the least
DIVERGED_WORDS = (f"a training loss that ended non-finite or, begun above 0, at {DIVERGED_RISE}× or more where it "
                  f"began (and at {DIVERGED_RISE * DIVERGED_FROM:g} or more)")


def loss_diverged(attrs) -> bool:
    """Whether a run's training loss ended non-finite, or at `DIVERGED_RISE` times where it began or more, counted
    from `DIVERGED_FROM` at the least (a loss near 0 at the start rises tenfold on one batch's noise): it diverged
    (`DIVERGED_WORDS`). A loss that began at 0 or below (a policy-gradient loss such as GRPO's, 0 at its first step)
    has no scale to rise tenfold from: only a non-finite end says it diverged."""
    ends = loss_ends(attrs)
    if ends is None or not math.isfinite(ends[0]):
        return False
    first, last = ends
    return not math.isfinite(last) or (first > 0 and last >= DIVERGED_RISE * max(first, DIVERGED_FROM))


def nonfinite_steps(group: zarr.Group) -> int:
    """How many of a run's recorded steps had a NaN or Inf gradient, counted in its stored `nonfinite` flags (those
    before a resume too)."""
    return int(np.sum(read(group, "nonfinite"))) if has(group, "nonfinite") else 0


def run_group(run: zarr.Group | str | Path) -> zarr.Group:
    """A run group, given as one or as the path of its folder (`storage/default/store.zarr/run-000`); the store (or
    its experiment directory) given instead is refused naming its runs."""
    if isinstance(run, (str, os.PathLike)):
        path = Path(run)
        if _kind(path.parent) == EXPERIMENT:  # a run's folder, or a name the store lacks
            root = open_experiment(path.parent)
            if path.name not in root:
                raise KeyError(f"{path.parent} holds no run {path.name!r}; its runs: {_runs_named(root)}")
            run = root[path.name]
        elif inside := next((p for p in path.parents if _kind(p.parent) == EXPERIMENT), None):
            rel = path.relative_to(inside).as_posix()
            raise ValueError(f"{path} lies inside the run {inside}: give the run, and name an array by its path in it "
                             f"('{rel}' or '{rel}/…')")
        else:
            run = open_experiment(path / "store.zarr" if _kind(path / "store.zarr") == EXPERIMENT else path)
    if run.attrs.get("kind") == EXPERIMENT:
        raise ValueError(f"{local_path(run) or run.store_path} is the experiment store, not one of its runs: give a "
                         f"run group, store[run_id], or its folder (its runs: {_runs_named(run)})")
    return run


def _runs_named(root: zarr.Group) -> str:
    """A store's runs for an error's words: the first few, and how many more (`results.first_ids`)."""
    from gradtrace.results import first_ids  # it imports this module

    return first_ids(runs(root)) or "none"


def _run_and_array(run: zarr.Group | str | Path, name: str) -> tuple[zarr.Group, str]:
    """The run group and the array's name in it, the store's root given with the run's id before the name taken too
    (`read(root, "run-000/grad")`)."""
    first, _, rest = name.partition("/")
    if isinstance(run, zarr.Group) and run.attrs.get("kind") == EXPERIMENT and rest and first in run:
        return run_group(run[first]), rest
    return run_group(run), name


def read(group: zarr.Group | str | Path, name: str) -> np.ndarray:
    """Array `name` of a run group (or its folder's path) as float32/int numpy (bfloat16 and float16 decoded to
    float32)."""
    group, name = _run_and_array(group, name)
    if not has(group, name):
        raise KeyError(f"array {name!r} is not in run {group.name!r}; it holds: {', '.join(sorted(_arrays(group)))}")
    arr = group[name]
    return decode(stored(arr), arr.attrs.get("storage_dtype"))


def stored(arr: zarr.Array, rows: slice = slice(None)) -> np.ndarray:
    """Rows of a stored array as stored (not decoded), a chunk zarr cannot decode refused as a damaged store (zarr's
    codecs raise a RuntimeError or ValueError naming no array)."""
    try:
        return arr[rows]
    except (RuntimeError, ValueError, TypeError) as err:
        start, stop, _ = rows.indices(arr.shape[0])
        n = arr.chunks[0]
        bad = next((i for i in range(start // n, (stop - 1) // n + 1) if not _decodes(arr, i)), None)
        where = f"rows {start}–{stop - 1}"
        if bad is not None:
            where = f"rows {bad * n}–{min(stop, bad * n + n) - 1} (chunk file {arr.path}/{_chunk_key(arr, bad)})"
        raise ValueError(f"array {arr.path!r}: {where} cannot be decoded ({type(err).__name__}: {err}); the store is "
                         "damaged (a chunk file corrupt or truncated): restore it from a copy, or remove that run's "
                         "group and run the sweep again to retrain it") from err


def _decodes(arr: zarr.Array, index: int) -> bool:
    """Whether chunk `index` along an array's first axis reads back."""
    try:
        arr[index * arr.chunks[0]: (index + 1) * arr.chunks[0]]
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def _chunk_key(arr: zarr.Array, index: int) -> str:
    """The key (path in the array's folder) of chunk `index` along the first axis, the others held whole."""
    return arr.metadata.chunk_key_encoding.encode_chunk_key((index, *[0] * (arr.ndim - 1)))


def read_lazy(group: zarr.Group | str | Path, name: str):
    """Array `name` of a run group (or its folder's path) as a dask array chunked like the store (for trajectories
    larger than memory)."""
    group, name = _run_and_array(group, name)
    if not has(group, name):
        raise KeyError(f"array {name!r} is not in run {group.name!r}; it holds: {', '.join(sorted(_arrays(group)))}")
    return as_dask(group[name])


def as_dask(arr: zarr.Array):
    """A stored array as a dask array chunked like the store, decoded (`decode`), a chunk that cannot be decoded
    refused named when the dask array is computed."""
    import dask.array as da

    lazy = da.from_array(_NamingDamage(arr), chunks=arr.chunks, name=False)  # a fresh name: nothing hashed
    storage = arr.attrs.get("storage_dtype")
    return lazy.map_blocks(decode, storage, dtype=np.float32) if storage in (BF16, "float16") else lazy


class _NamingDamage:
    """A zarr array as dask reads it, a chunk that cannot be decoded refused as `stored` refuses it (named), not
    with zarr's bare codec error when the dask array is computed."""

    def __init__(self, arr: zarr.Array) -> None:
        self.arr, self.shape, self.dtype, self.ndim = arr, arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, key):
        try:
            return self.arr[key]
        except (RuntimeError, ValueError, TypeError):
            rows = key[0] if isinstance(key, tuple) else key
            if isinstance(rows, slice):
                stored(self.arr, rows)  # raises the named error where those rows do not decode
            raise


# the step-like axes and the arrays whose values label them
INDEX_ARRAYS = {"step": "step", "probe": "probe/step", "eval": "evals/step"}


def dataset(group: zarr.Group | str | Path):
    """A run (its group, or its folder's path) as an xarray.Dataset of lazy dask arrays: named dimensions, labelled
    coordinates (step, probe and eval steps; split, probe_loss, param and quantile names), the run's attributes.
    Variables keep the store's array names (`ds["probe/grad"].sel(split="ID")`)."""
    import xarray as xr

    group = run_group(group)
    arrays, a = _arrays(group), group.attrs
    labels = {"split": a.get("splits"), "probe_loss": a.get("probe_losses"), "quantile": a.get("v_quantiles"),
              "param": [p["name"] for p in a.get("layout", [])] or None}
    sizes = {d: n for arr in arrays.values() for d, n in zip(arr.metadata.dimension_names or (), arr.shape)}
    coords = {dim: (dim, stored(arrays[name])) for dim, name in INDEX_ARRAYS.items() if name in arrays}
    coords.update({dim: (dim, list(names)) for dim, names in labels.items()
                   if names is not None and sizes.get(dim) == len(names)})
    variables = {name: (arr.metadata.dimension_names, read_lazy(group, name), dict(arr.attrs))
                 for name, arr in arrays.items() if name not in INDEX_ARRAYS.values()}
    try:
        return xr.Dataset(variables, coords=coords, attrs=dict(a))
    except ValueError as err:  # arrays of one axis with different lengths
        raise ValueError(f"run {group.name!r} is inconsistent ({err}); the store may be truncated or corrupt: "
                         "`gradtrace info` lists each array's shape") from err


def _arrays(group: zarr.Group, prefix: str = "") -> dict[str, zarr.Array]:
    out = {}
    for name, member in _members(group):
        if isinstance(member, zarr.Array):
            out[prefix + name] = member
        else:
            out.update(_arrays(member, f"{prefix}{name}/"))
    return out


def runs(root: zarr.Group) -> list[str]:
    """Run ids in an experiment store, in run order (`run_order`)."""
    return list(run_groups(root))


def init_weights(attrs) -> str | None:
    """The weights file a run started from, as its config names them (`model.init_from`): None for a random init, or
    for a run of your own loop, which records no config."""
    return ((attrs.get("config") or {}).get("model") or {}).get("init_from")


def run_groups(root: zarr.Group) -> dict[str, zarr.Group]:
    """The run groups of an experiment store by run id, in run order, each read once (with its attributes)."""
    return dict(sorted(((name, m) for name, m in _members(root) if isinstance(m, zarr.Group)),
                       key=lambda item: run_order(item[0])))


def _members(group: zarr.Group) -> list[tuple[str, zarr.Group | zarr.Array]]:
    """A group's members, one whose metadata cannot be read refused as a damaged store, named (zarr names no file:
    a truncated zarr.json gave only "Unterminated string starting at: line 5 column 15"). zarr's warning for each
    entry that is no member is replaced: none for the temporary file of a write a kill interrupted (`*.partial`,
    removed when the run resumes), one that says what it means for a folder without zarr.json."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            members = list(group.members())
    except (ValueError, TypeError) as err:  # JSONDecodeError, MetadataValidationError, a field of the wrong kind
        folder = local_path(group)
        raise _damaged(group, sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder else [], err) from err
    for caught_warning in caught:
        _reword_stray_entry(group, caught_warning)
    return members


def _reword_stray_entry(group: zarr.Group, caught: warnings.WarningMessage) -> None:
    """Warn again of a warning caught while listing `group`, in the store's words where zarr's names an entry that
    is no member (`Object at NAME is not recognized as a component of a Zarr hierarchy`)."""
    found = re.fullmatch(r"Object at (.+) is not recognized as a component of a Zarr hierarchy\.", str(caught.message))
    if found is None:
        warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    elif not found[1].endswith(".partial"):
        _warn_stray_entry(f"{local_path(group) or group.store_path}/{found[1]}", stacklevel=4)


_STRAY_WARNED: set[str] = set()  # entries warned of in this process


def _warn_stray_entry(where: str, stacklevel: int) -> None:
    """Warn of an entry of a group's folder that is no member (no zarr.json of its own), once a process: every
    listing of the store meets it (a sweep run again said it four times; `catch_warnings`, which the listing uses,
    clears what Python's own once-a-place filter remembers)."""
    if where in _STRAY_WARNED:
        return
    _STRAY_WARNED.add(where)
    warnings.warn(f"{where} is left out: it is no Zarr group or array (a folder without its zarr.json: lost, or a "
                  "kill came while the group was created; a sweep run again trains that run anew)",
                  stacklevel=stacklevel)


def has(group: zarr.Group, name: str) -> bool:
    """Whether a group holds member `name` (`probe/grad`, say), metadata on the way that cannot be read refused as a
    damaged store, named."""
    try:
        return name in group
    except (ValueError, TypeError) as err:
        parts = name.split("/")
        raise _damaged(group, ["/".join(parts[:i + 1]) for i in range(len(parts))], err) from err


def _damaged(group: zarr.Group, names: list[str], err: Exception) -> ValueError:
    """The error for metadata that zarr could not read (`err`) under a group: the file of the first of `names` that
    does not open, where one is found."""
    bad = next((name for name in names if not _opens(group, name)), None)
    base = local_path(group) or group.store_path
    return ValueError(_damaged_words(f"{base}/{bad}/zarr.json" if bad else f"the metadata of a member of {base}", err))


def _damaged_words(where: str, err: Exception) -> str:
    """What to say of metadata (`where`) that could not be read."""
    return (f"{where} cannot be read ({type(err).__name__}: {err}): the store's metadata is damaged; restore the file "
            "from a copy, or remove that run's group and run the sweep again to retrain it")


def _opens(group: zarr.Group, name: str) -> bool:
    """Whether member `name` of a group opens (its metadata reads)."""
    try:
        group[name]
    except (ValueError, TypeError):
        return False
    except KeyError:  # a folder that is no member
        pass
    return True


READERS, WAITING, SAMPLE = 16, 2.0, 8  # `map_reads`: threads; wall time over CPU time past which; calls it first times


def map_reads(fn: Callable[[Any], Any], items: Any) -> list:
    """`fn` over `items` (calls that read files), the results in order: one call after another while they keep the
    CPU busy (a local disk), on `READERS` threads once, after `SAMPLE` calls or more, their wall time is over
    `WAITING` times the CPU time the process took meanwhile (a network filesystem, each read waiting on the file
    server; the process's, not the thread's: zarr reads in a thread of its own). Measured on a 2-vCPU VM, wall over
    CPU: a local disk 1.0-1.1 warm (1.6 cold), where threads took up to 4× as long, waiting on each other for the
    interpreter; sshfs 2.2 reading arrays through zarr, 7.2 listing files, where threads took a quarter to a half."""
    items, results, wall, cpu = iter(items), [], 0.0, 0.0
    for item in items:
        began, began_cpu = time.perf_counter(), time.process_time()
        results.append(fn(item))
        wall, cpu = wall + time.perf_counter() - began, cpu + time.process_time() - began_cpu
        if len(results) >= SAMPLE and wall > WAITING * cpu:
            with ThreadPoolExecutor(READERS) as pool:
                return results + list(pool.map(fn, items))
    return results


def run_order(run_id: str) -> tuple:
    """A run id's sort key, its numbers compared as numbers: run-999 before run-1000, base-2 before base-10."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", run_id)))


def summary(path: str | Path) -> str:
    """A human-readable summary of a store: runs, statuses, steps, sketch, arrays and sizes. Consecutive runs alike
    (the same status, steps, sketch and array shapes, as a sweep's runs are) are listed in full once, then counted."""
    root = open_experiment(path)
    groups = run_groups(root)
    lines = [f"{path}: gradtrace store, schema v{root.attrs.get('schema_version')}, {len(groups)} run(s)"]
    counts: dict[str, int] = {}
    for run in groups.values():
        status = run.attrs.get("status", "?")
        counts[status] = counts.get(status, 0) + 1
    lines.append("status: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no run recorded yet"))
    listings = map_reads(lambda item: _RunListing.of(item[1], item[0]), groups.items())
    for _, alike in itertools.groupby(listings, key=lambda r: r.kind):
        first, *rest = alike
        lines += first.lines
        if rest:
            span = rest[0].run_id if len(rest) == 1 else f"{rest[0].run_id} … {rest[-1].run_id}"
            lines.append(f"\n[{span}] {len(rest)} more run(s) like {first.run_id}: "
                         f"{sum(r.nbytes for r in rest) / 1e6:.2f} MB in all")
    return "\n".join(lines)


@dataclass
class _RunListing:
    """One run's lines in `summary`, what makes runs alike there, and its stored bytes."""

    run_id: str
    kind: tuple
    lines: list[str]
    nbytes: int

    @classmethod
    def of(cls, group: zarr.Group, run_id: str) -> "_RunListing":
        a, arrays = dict(group.attrs), _listed_arrays(group)
        sketched = {"grad", "update", "adam_m", "probe/grad"} & {array.name for array in arrays}
        sketch = a.get("sketch") if sketched else None  # a run recording scalars only has a sketch it never used
        head = (f"status={a.get('status')} last_durable_step={a.get('last_durable_step')} "
                f"steps={a.get('steps_done', '?')}/{a.get('steps', '?')} "
                + (f"sketch={sketch['kind']}:{sketch['dim']} seed={sketch['seed']}" if sketch else "sketch=none"))
        lines = [f"\n[{run_id}] {head}"]
        if a.get("status") == "failed" and a.get("error"):
            lines.append(f"  error: {a['error']}")
        if a.get("nonfinite_steps"):
            lines.append(f"  WARNING: non-finite gradients at {a['nonfinite_steps']} recorded step(s)")
        diverged = loss_diverged(a)
        if diverged:
            first, last = loss_ends(a)
            lines.append(f"  WARNING: diverged: training loss {first:.3g} at the start, {last:.3g} at the end")
        init_from = init_weights(a)
        digest = f" (sha256 {a['init_digest']}…)" if "init_digest" in a else ""
        trained_with = [f"  started from: {init_from}{digest}"] if init_from else []
        trained_with += [f"  trained with: {kernels.describe(a)}"] if "cpu_kernels" in a else []
        trained_with += [f"  resumed at step {r['step']} with: "
                         f"{kernels.describe_changes(a, {k: v for k, v in r.items() if k in kernels.RECORDED})}"
                         for r in a.get("resumed_with", [])]
        lines += trained_with
        for array in arrays:
            lines.append(f"  {array.name:<28} {str(array.shape):<18} {array.dtype:<9} "
                         f"{'×'.join(d or '?' for d in array.dims):<30} {array.nbytes / 1e6:8.2f} MB")
        kind = (head, a.get("error"), a.get("nonfinite_steps"), diverged, *trained_with,
                tuple((array.name, array.shape) for array in arrays))
        return cls(run_id, kind, lines, sum(array.nbytes for array in arrays))


@dataclass(frozen=True)
class _ListedArray:
    """One array of a run as `summary` lists it: its path in the run, shape, stored dtype (`storage_dtype` where its
    values are encoded), dimension names and the bytes it takes in the store."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str | None, ...]
    nbytes: int


def _listed_arrays(group: zarr.Group) -> list[_ListedArray]:
    """The arrays under a run group by path: in a local store read from their zarr.json files as JSON (zarr's building
    of ~39,000 array objects took 14 of the 16 s of `gradtrace info` at 3,000 runs), through zarr elsewhere."""
    folder = local_path(group)
    if folder is None:
        return [_ListedArray(name, tuple(arr.shape), str(arr.attrs.get("storage_dtype", arr.dtype)),
                             tuple(arr.metadata.dimension_names or ()), arr.nbytes_stored())
                for name, arr in sorted(_arrays(group).items())]
    listed, groups = [], [(str(folder), "")]  # paths as str, not Path, as in `_stored_bytes_in`
    while groups:
        here, prefix = groups.pop()
        with os.scandir(here) as entries:
            for entry in entries:
                if entry.name == "zarr.json" or entry.name.endswith(".partial"):  # a kill's half write: no warning
                    continue
                metadata = os.path.join(entry.path, "zarr.json")
                if not (entry.is_dir() and os.path.isfile(metadata)):
                    _warn_stray_entry(entry.path, stacklevel=5)
                    continue
                try:
                    with open(metadata, "rb") as file:
                        doc = json.loads(file.read())
                    if doc["node_type"] == "group":
                        groups.append((entry.path, f"{prefix}{entry.name}/"))
                        continue
                    shape = doc["shape"]
                    if doc["node_type"] != "array" or not all(isinstance(n, int) for n in shape):
                        raise ValueError(f"not a group's or an array's: node_type {doc['node_type']!r}, shape "
                                         f"{shape!r}")
                    listed.append(_ListedArray(f"{prefix}{entry.name}", tuple(shape),
                                               str(doc.get("attributes", {}).get("storage_dtype", doc["data_type"])),
                                               tuple(doc.get("dimension_names") or ()), _stored_bytes_in(entry.path)))
                except (ValueError, TypeError, KeyError, AttributeError) as err:  # not JSON, or not array metadata
                    raise ValueError(_damaged_words(metadata, err)) from err
    return sorted(listed, key=lambda array: array.name)


def _stored_bytes_in(folder: str) -> int:
    """The bytes of every file under a folder."""
    total, folders = 0, [folder]  # str, not Path: a Path made of each chunk folder took a fifth of the time
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_size
    return total


# HDF5 filters of `export_hdf5`: gzip (every HDF5 reader has it) at level 1 after a byte shuffle, 50 MB/s and 86% of
# the size on sketched trajectories, where h5py's default level 4 without shuffle gave 30 MB/s and 93%; or none
EXPORT_COMPRESSION = {"gzip": {"compression": "gzip", "compression_opts": 1, "shuffle": True}, "none": {}}


def export_hdf5(path: str | Path, out: str | Path, compression: str = "gzip", progress: bool = False) -> Path:
    """Copy every run's arrays and attributes into one HDF5 file (bfloat16 decoded to float32), a stored chunk
    at a time, so stores larger than memory export too. The file appears whole or not at all (it is written beside
    `out` and renamed); `out` may replace an earlier export but no other file. `compression`: a key of
    EXPORT_COMPRESSION (`none`: larger, faster on large stores; the demo's 17.8 MB against 14.5 MB); `progress`: a bar
    over the runs. HDF5 writes in a helper process (`_write_hdf5_apart`): a write that fails raises its OSError here."""
    import h5py

    if compression not in EXPORT_COMPRESSION:
        raise ValueError(f"compression {compression!r}: choose one of {', '.join(EXPORT_COMPRESSION)}")

    open_experiment(path)  # a path that is no store refused here, before the helper starts
    out = Path(out)
    if not out.parent.is_dir():  # refused up front, the folder named
        raise FileNotFoundError(f"{out.parent} is not a directory: export writes {out.name} into an existing folder; "
                                "create it or choose another path")
    if out.is_dir() or (out.exists() and not h5py.is_hdf5(out)):
        raise FileExistsError(f"{out} exists and is not an HDF5 file: export writes a new file (or replaces an "
                              "earlier export); choose another path")
    if out.exists() and not _an_export(out):
        raise FileExistsError(f"{out} is an HDF5 file but not a gradtrace export (no `gradtrace` attribute at its "
                              "root): export replaces only an earlier export; choose another path")
    with written_whole(out) as partial:
        _write_hdf5_apart(path, partial, compression, progress)
    return out


def _an_export(path: Path) -> bool:
    """Whether an HDF5 file is an earlier export: its root holds the store's attributes in `gradtrace`."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return "gradtrace" in h5.attrs
    except OSError:  # damaged, or not readable as HDF5 after all
        return False


_FAILED_WRITE = re.compile(r"errno = (\d+)")  # in HDF5's words for a failed system call, as h5py raises them


def _write_hdf5_apart(path: str | Path, out: Path, compression: str, progress: bool) -> None:
    """Write the export in a process of its own: HDF5, once one of its writes has failed (a disk full, a quota used
    up), can no longer close its file, and its process crashed as it exited (a segmentation fault, h5py/h5py#914; a
    notebook's kernel too). The helper tells its progress and outcome as JSON lines: the bar is drawn here (in a
    notebook too), its error raised here (an OSError with the errno HDF5 met), its warnings warned again here. Started
    as a new interpreter (not multiprocessing's spawn, which runs a script's top level again in its child: a script
    exporting without an `if __name__ == "__main__"` guard)."""
    from tqdm.auto import tqdm

    code = ("import json, sys; sys.path = json.loads(sys.argv[1]); from gradtrace.store import _write_hdf5_here; "
            "_write_hdf5_here(*sys.argv[2:])")  # this process's path: the same gradtrace, installed or not
    path_here = [entry for entry in sys.path if isinstance(entry, str)]  # the import system skips any other
    with subprocess.Popen([sys.executable, "-c", code, json.dumps(path_here), str(path), str(out), compression],
                          stdout=subprocess.PIPE, text=True) as helper, \
            tqdm(desc="export", unit="run", disable=None if progress else True) as bar:  # None: a terminal's
        try:
            outcome = _followed(helper.stdout, bar)
        except BaseException:  # Ctrl-C, SIGTERM: the helper stops too
            helper.kill()
            raise
    if outcome is None:
        raise OSError(f"the process writing {out} ended before it was done (exit status {helper.returncode})")
    for category, message in outcome["warnings"]:
        warnings.warn(message, getattr(builtins, category, UserWarning), stacklevel=3)
    if outcome.get("error"):
        raise getattr(builtins, outcome["error"])(*outcome["args"])


def _followed(lines: Iterator[str], bar) -> dict[str, Any] | None:
    """The outcome the export's helper tells (None if it ended first), its progress drawn on `bar`; a line that is
    not the helper's own (a library printing) is printed here, as it would have been."""
    outcome = None
    for line in lines:
        try:
            told = json.loads(line)
        except ValueError:
            told = None
        if not isinstance(told, dict):
            sys.stdout.write(line)
        elif "runs" in told:
            bar.reset(total=told["runs"])
        elif "done" in told:
            bar.update()
        else:
            outcome = told
    return outcome


def _write_hdf5_here(path: str, out: str, compression: str) -> None:
    """The helper process of `_write_hdf5_apart`: write the export, telling its progress as JSON lines (the number of
    runs, then each run done) and its outcome (an error raised, with the errno of a failed write HDF5 names in its
    words; the warnings), and end without closing HDF5 again."""
    import h5py

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")

        def failed(err: BaseException) -> NoReturn:  # told at once: HDF5 crashed on the failed file's next call
            _tell({**_in_words(err, out), "warnings": caught})

        # a write that failed inside HDF5 as one of h5py's objects was freed, which Cython prints through both hooks
        def unraisable(what) -> None:
            if _FAILED_WRITE.search(str(what.exc_value)):
                failed(what.exc_value)
            sys.__unraisablehook__(what)

        def printed(kind: type, err: BaseException, tb) -> None:
            if _FAILED_WRITE.search(str(err)):
                failed(err)
            sys.__excepthook__(kind, err, tb)

        sys.unraisablehook, sys.excepthook = unraisable, printed
        try:
            h5 = h5py.File(out, "w")
            _write_hdf5(open_experiment(path), h5, EXPORT_COMPRESSION[compression], _tell_line)
            h5.close()
        except BaseException as err:
            failed(err)
        _tell({"warnings": caught})


def _tell(outcome: dict[str, Any]) -> NoReturn:
    """End `_write_hdf5_here`'s process, its outcome printed as a JSON line, without Python's exit, where HDF5 that
    failed a write crashed closing its file."""
    outcome["warnings"] = [(w.category.__name__, str(w.message)) for w in outcome["warnings"]]
    _tell_line(outcome)
    sys.stderr.flush()
    os._exit(0)


def _tell_line(told: dict[str, Any]) -> None:
    """One JSON line to `_write_hdf5_apart`, at once."""
    print(json.dumps(told), flush=True)


def _in_words(err: BaseException, out: str) -> dict[str, Any]:
    """An error of `_write_hdf5_here` as its outcome says it: its nearest builtin exception class's name and its
    arguments, an OSError for the failed write (its errno) that HDF5 names only in words."""
    kind = next(c.__name__ for c in type(err).__mro__ if getattr(builtins, c.__name__, None) is c)
    found = _FAILED_WRITE.search(str(err))
    if found:
        return {"error": "OSError", "args": [int(found[1]), os.strerror(int(found[1])), out]}
    if isinstance(err, OSError) and err.errno:
        return {"error": kind, "args": [err.errno, err.strerror, err.filename or out]}
    return {"error": kind, "args": [err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)]}


def _write_hdf5(root: zarr.Group, h5, filters: dict, tell: Callable[[dict[str, Any]], None]) -> None:
    """Every run's arrays and attributes into the open HDF5 file `h5`, a stored chunk at a time, telling the number
    of runs and then each run done."""
    h5.attrs["gradtrace"] = json.dumps(dict(root.attrs))
    groups = run_groups(root)
    tell({"runs": len(groups)})
    for rid, g in groups.items():
        hg = h5.create_group(rid)
        hg.attrs["gradtrace"] = json.dumps(dict(g.attrs))
        for name, arr in _arrays(g).items():
            storage = arr.attrs.get("storage_dtype")
            # HDF5 chunks as the store's (h5py's own guess, from the whole shape, cut a long trajectory's
            # chunks into thin column strips that every written block re-compressed: 30 → 1 MB/s)
            chunks = tuple(max(1, min(c, n)) for c, n in zip(arr.chunks, arr.shape)) if arr.size else None
            ds = hg.create_dataset(name, shape=arr.shape, dtype=np.float32 if storage == BF16 else arr.dtype,
                                   chunks=chunks, **(filters if arr.size else {}))
            for lo in range(0, arr.shape[0], arr.chunks[0]):  # every array has a leading chunked axis
                ds[lo:lo + arr.chunks[0]] = decode(stored(arr, slice(lo, lo + arr.chunks[0])), storage)
            ds.attrs["gradtrace"] = json.dumps(dict(arr.attrs))  # e.g. eval/correct's splits, storage_dtype
            if arr.metadata.dimension_names:
                ds.attrs["dimension_names"] = json.dumps(list(arr.metadata.dimension_names))
        tell({"done": rid})
