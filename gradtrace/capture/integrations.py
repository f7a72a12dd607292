"""Attach a Recorder to any training loop (plain torch, accelerate, DDP) in one line, and sum sharded sketches.

A plain or accelerate loop changes by three lines::

    rec = attach(model, optimizer, "runs/exp", run_id="r0", total_steps=1000)   # 1: store + run group + hooks
    rec.log(loss, grad_norm=norm)                                               # 2: per (micro-)batch, optional
    rec.close()                                                                 # 3: flush, mark the run complete

`attach` opens (or creates) the experiment store `out_dir/store.zarr`, creates the run group with the Recorder's
attributes, and returns a `RunRecorder` whose `close()` marks the run `complete` (used as a context manager, an
exception marks it `failed`). Under `torch.distributed` (DDP, or accelerate's multi-process launch) gradients are
identical on every rank after the all-reduce, so one process writes (rank 0 unless `write` says otherwise); the
others get an `IdleRecorder` whose methods do nothing, so the same loop runs unchanged on every rank. Under accelerate's
gradient accumulation the wrapped optimizer skips the real `step()` on micro-steps, so only sync steps are
recorded. DeepSpeed's engine is unwrapped as DDP's is (ZeRO stage 0 in fp32). A model sharded by FSDP, or trained
by DeepSpeed's ZeRO or fp16/bf16 optimizers (which step flat copies of the parameters), is refused on every rank
(`check_recordable`); when a gradient is sharded across ranks (FSDP/ZeRO), `sketch_sharded` sketches each rank's
shard and sums the sketches (the sketch is linear), giving every rank the sketch of the whole vector.
"""
from __future__ import annotations

import concurrent.futures.thread
import contextlib
import dataclasses
import json
import numbers
import os
import sys
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

import torch
import torch.distributed as dist
import zarr

from gradtrace import store
from gradtrace.capture.optimizers import unwrap_optimizer
from gradtrace.capture.recorder import (CAPTURE_ATTRS, Probe, Recorder, caller_stacklevel, check_recordable,
                                       open_recorders, uninterrupted, unwrap_model)
from gradtrace.capture.sketch import ParamLayout, Sketch
from gradtrace.config import CaptureConfig, checked


_OPENED_HERE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # RunRecorder -> the process that opened it


class RunRecorder(Recorder):
    """A Recorder that owns its run group: `checkpoint()` makes rows durable, `close()` marks the run complete."""

    def __init__(self, group, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: CaptureConfig,
                 total_steps: int, probes: list[Probe] | None, probe_losses: dict[str, Callable] | list[str] | None,
                 start_step: int) -> None:
        device = next(model.parameters()).device
        writer = store.RunWriter(group, cfg.chunk, thread=cfg.use_writer_thread(device))
        super().__init__(model, optimizer, writer, cfg, total_steps, probes, probe_losses, start_step)
        self.group = group
        self._began = time.perf_counter() - group.attrs.get("wall_time_s", 0.0)
        self.attach_id = uuid.uuid4().hex[:16]  # the run's `attach_id` until it is attached again
        self.stepped_by = threading.current_thread()  # the thread of its loop: `_fail_unclosed` waits for it
        _OPENED_HERE[self] = os.getpid()  # for `_fail_unclosed`, in this process only (not in a fork of it)

    @property
    def where(self) -> str:
        """Where the run lies: its absolute folder in a local store, else its store path."""
        return _where(self.group)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "recording"
        return f"<RunRecorder {self.where}: step {self.step} of {self.total_steps}, {state}>"

    @uninterrupted  # Ctrl-C in a chunk's write lost rows counted as written: held until they are written
    def checkpoint(self) -> None:
        """Write every recorded row and mark this step durable (call it when you checkpoint the model)."""
        self.writer.checkpoint(self.step)
        self.group.update_attributes({"steps_done": self.step, "wall_time_s": time.perf_counter() - self._began})

    @uninterrupted
    def close(self, final_probe: bool = True) -> None:
        """Take the final probe, write every row, detach the hooks and mark the run complete (once)."""
        if self.closed:
            return
        try:
            super().close(final_probe)
        except BaseException as err:  # the final probe failed: the run says why, its hooks detached
            self.fail(err)
            raise
        self.writer.close()
        store.set_status(self.group, "complete", steps_done=self.step, last_durable_step=self.step,
                         nonfinite_steps=store.nonfinite_steps(self.group),
                         train_loss=store.attached_loss_ends(self.group, self.last_loss),
                         wall_time_s=time.perf_counter() - self._began)

    @uninterrupted
    def fail(self, error: BaseException) -> None:
        """Write what was recorded, detach the hooks and mark the run failed with the error, its rows durable once
        written (a run closed already stays complete)."""
        if self.closed:
            return
        super().close(final_probe=False)
        durable = {}
        try:
            self.writer.close()
            durable = {"last_durable_step": self.step}
        finally:
            store.set_failed(self.group, error, steps_done=self.step, **durable)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self.stepped_by = threading.current_thread()
        super()._pre_step(optimizer, args, kwargs)

    def detach(self) -> None:
        """Stop recording without writing to the store again: remove the hooks, drop the rows not yet written."""
        self._unhook()
        self.writer.abort()

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is None:
            self.close()
        else:
            self.fail(error)


def _open_here() -> list[RunRecorder]:
    """The RunRecorders this process opened and has not closed, on any optimizer."""
    return [r for r, pid in _OPENED_HERE.items() if pid == os.getpid() and not r.closed]


def _fail_unclosed() -> None:
    """As the process exits, mark each run whose recorder is still open failed, its rows written: a loop that never
    called `rec.close()`, a Trainer interrupted and not trained again. Its rows since the last full chunk were lost,
    and it said `running` for good (a process killed outright runs no exit handler: a resume cuts such a run back
    to its last durable step). A forked process (a DataLoader's worker) exits with copies of its parent's recorders,
    whose runs go on in the parent, and a run attached again since (resumed by another process) is another's: those
    are left alone. A loop in a thread of its own, which the interpreter waits for after this handler (when zarr's
    thread pools refuse its writes), is waited for here: it may yet close its run."""
    for thread in {recorder.stepped_by for recorder in _open_here()} - {threading.current_thread()}:
        if thread.daemon:
            continue
        if thread in concurrent.futures.thread._threads_queues:
            # a pool's worker, idle, waits for work until the pools' exit handler (after this one) stops it: it is
            # waited for only while it runs a task (the loop)
            while thread.is_alive() and _runs_a_task(thread):
                time.sleep(0.05)
        else:
            thread.join()
    for recorder in _open_here():
        try:
            group = recorder.group
            if zarr.open_group(group.store, path=group.path, mode="r").attrs.get("attach_id") != recorder.attach_id:
                recorder.detach()
                said = "left as it is, attached again since (resumed by another process)"
            else:
                recorder.fail(RuntimeError("the process ended with the run open: its recorder was never closed "
                                           "(rec.close(), or a `with attach(...)` block's end), or its training was "
                                           "interrupted and not resumed"))
                said = f"marked failed, its {recorder.step} recorded step(s) written"
        except Exception as err:  # one run's store gone (a deleted folder) stops no other's
            said = f"its rows could not be written ({type(err).__name__}: {err})"
        with contextlib.suppress(Exception):  # a closed stderr (its pipe's reader gone) stops no other run's
            print(f"gradtrace: run {recorder.group.basename!r} ({recorder.where}) was still open as the process "
                  f"ended: {said}", file=sys.stderr)


def _runs_a_task(worker: threading.Thread) -> bool:
    """Whether a thread pool's worker is running a task now, not waiting for one."""
    frame = sys._current_frames().get(worker.ident)
    while frame is not None and frame.f_code is not concurrent.futures.thread._WorkItem.run.__code__:
        frame = frame.f_back
    return frame is not None


# zarr writes through thread pools, which refuse work once their module's exit handler has run (before `atexit`'s
# handlers); threading's exit handlers run in reverse order, so one registered after theirs (the module is imported
# above) runs while they work
threading._register_atexit(_fail_unclosed)  # CPython's, since 3.9


class IdleRecorder:
    """Stands in for the Recorder on processes that do not write (all ranks but one under DDP): does nothing."""

    last_loss = None  # as a writing rank's recorder says when no loss was given
    where = None  # no run of its own

    def log(self, loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None = None) -> None:
        """Ignore the loss and norm."""

    def checkpoint(self) -> None:
        """Nothing to make durable."""

    def close(self, final_probe: bool = True) -> None:
        """Nothing to close."""

    def fail(self, error: BaseException) -> None:
        """No run to mark failed."""

    def detach(self) -> None:
        """No hooks to remove."""

    def __enter__(self) -> "IdleRecorder":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        return None


def is_writer(write: bool | None = None) -> bool:
    """Whether this process writes the store: `write` if given, else whether it is rank 0 (or not distributed)."""
    if write is not None:
        return write
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, out_dir: str | Path, run_id: str = "run", *,
           total_steps: int, capture: CaptureConfig | None = None, probes: list[Probe] | None = None,
           probe_losses: dict[str, Callable] | list[str] | None = None, attrs: dict[str, Any] | None = None,
           resume: bool = False, start_step: int = 0, write: bool | None = None) -> RunRecorder | IdleRecorder:
    """Record a training run into `out_dir/store.zarr/<run_id>` through the optimizer's step hooks.

    `total_steps` sizes the log schedule and skips a probe at the very end (the final probe is taken by
    `close()`); `probes` are evaluated under `probe_losses` ({name: function}, or names of
    `gradtrace.tasks.PROBE_LOSSES`; default: `capture.probe_losses`). `resume=True` reopens an existing run at
    `start_step` (optimizer steps already taken, as restored from your checkpoint), cutting rows recorded after it.
    `attrs`: attributes of your own for the run's group (JSON values; not the names gradtrace writes, `role`
    excepted). `write` overrides which process writes (default: rank 0 of torch.distributed, or the only process);
    the others get an `IdleRecorder`. What cannot be recorded is refused on every rank alike, before anything is
    written (`check_recordable`): a model sharded by FSDP, an optimizer that steps none of the model's parameters
    (DeepSpeed's ZeRO and fp16/bf16 optimizers step flat copies of them), probes that cannot be taken.
    """
    if not (isinstance(model, torch.nn.Module) and isinstance(unwrap_optimizer(optimizer), torch.optim.Optimizer)):
        raise TypeError(f"attach(model, optimizer, out_dir, ...) takes a torch.nn.Module and a torch.optim.Optimizer, "
                        f"got {type(model).__name__} and {type(optimizer).__name__}")
    capture = capture or CaptureConfig()
    if not isinstance(capture, CaptureConfig):
        raise TypeError(f"capture must be a gradtrace.config.CaptureConfig, got {type(capture).__name__}; e.g. "
                        "CaptureConfig(**settings)")
    capture = checked(capture)
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise ValueError(f"total_steps must be the run's number of optimizer steps, a whole number >= 1, got "
                         f"{total_steps!r}")
    total_steps = int(total_steps)
    check_own_attrs(attrs or {})
    check_recordable(model, optimizer, capture, probes or [], probe_losses)  # on every rank, which all raise alike
    if not is_writer(write):
        return IdleRecorder()
    root = store.open_experiment(Path(out_dir) / "store.zarr", mode="a")
    if resume and run_id in root:  # before a recorder left open is dealt with: a refused resume leaves it as it was
        _check_same_capture(root[run_id], dataclasses.asdict(capture), ParamLayout.of(unwrap_model(model)),
                            [probe.split for probe in probes or []])
    _check_open_recorders(optimizer, root, run_id, resume)
    group = _run_group(root, run_id, resume, start_step, {
        "config": {"capture": dataclasses.asdict(capture)}, "role": "reference", "steps": total_steps,
        "steps_done": start_step, **(attrs or {})})
    try:
        recorder = RunRecorder(group, model, optimizer, capture, total_steps, probes or None, probe_losses, start_step)
    except Exception as err:  # a model or optimizer that cannot be recorded: the run says why
        store.set_failed(group, err)
        raise
    try:
        group.update_attributes({**recorder.attrs(), "attach_id": recorder.attach_id})
    except Exception as err:  # its hooks detached, not left to record a run that says it failed
        recorder.fail(err)
        raise
    return recorder


# attributes of a run that gradtrace writes (`role` is the caller's to set: runs of your own of other roles)
_OWN_ATTRS = {"config", "steps", "steps_done", "attach_id", "status", "error", "last_durable_step", "schema_version",
              "gradtrace_version", "created", "updated", "train_loss", "nonfinite_steps", "wall_time_s",
              *CAPTURE_ATTRS}


def check_own_attrs(attrs: dict[str, Any], also: tuple[str, ...] = ()) -> None:
    """Refuse attributes of the caller's that would overwrite gradtrace's own (`config` held the capture settings a
    resume checks, `steps` the run's length), or those `also` names (an integration's), or that JSON cannot hold
    (refused before the run's group is made)."""
    taken = sorted(set(attrs) & {*_OWN_ATTRS, *also})
    if taken:
        raise ValueError(f"attrs {taken} are attributes gradtrace writes for the run: name yours otherwise (e.g. "
                         f"'my_{taken[0]}')")
    try:
        json.dumps(attrs)
    except (TypeError, ValueError) as err:
        raise TypeError(f"attrs must be JSON values (numbers, text, lists, mappings): {err}") from None


def _where(group) -> str:
    """Where a group lies: its absolute folder in a local store, else its store path."""
    folder = store.local_path(group)
    return str(folder.resolve()) if folder is not None else str(group.store_path)


def _check_open_recorders(optimizer: torch.optim.Optimizer, root, run_id: str, resume: bool) -> None:
    """Deal with recorders never closed (a notebook cell that raised before `rec.close()`, then ran again): refuse to
    write over the run of one still open in this process, attached to this optimizer or to another (the model and
    optimizer built again); mark its run failed, its rows written, when the run resumes (the resume cuts those it
    redoes); detach it where its run was deleted since (left open, it would write its stale rows into this run's
    arrays and mark the run failed as the process ends: `_fail_unclosed`). Warn of the recorders of other runs on
    this optimizer, which go on recording every step."""
    store_at = _where(root)
    where = f"{store_at.rstrip('/')}/{run_id}"
    optimizer = unwrap_optimizer(optimizer)
    same = [r for r in _open_here() if r.where == where]
    held = {r: "this optimizer" if r.optimizer is optimizer else "another optimizer" for r in same}
    if run_id in root and not resume:
        attached = f" Its recorder is still attached to {held[same[0]]}: close it first (rec.close())." if same else ""
        raise FileExistsError(f"run {run_id!r} already exists in {store_at}; pass resume=True (and start_step) "
                              f"to continue it from a checkpoint, or choose another run id.{attached}")
    for other in same:
        if run_id in root:
            other.fail(RuntimeError("attached again with resume=True"))
            warnings.warn(f"an earlier recorder of run {run_id!r}, never closed, was still attached to {held[other]}: "
                          f"marked failed, its rows written (up to step {other.step}) for the resume to keep those "
                          "before start_step", UserWarning, stacklevel=caller_stacklevel())
        else:
            other.detach()
            warnings.warn(f"an earlier recorder of run {run_id!r}, never closed, was still attached to {held[other]}: "
                          "detached, its unwritten rows dropped", UserWarning, stacklevel=caller_stacklevel())
    for other in open_recorders(optimizer):
        if isinstance(other, RunRecorder) and other.where != where:
            warnings.warn(f"run {other.group.basename!r} ({other.where}) is still attached to this optimizer, never "
                          f"closed: it records every step of run {run_id!r} too. Close it if that is a leftover "
                          "(gradtrace.capture.open_recorders(optimizer) lists the recorders attached)",
                          UserWarning, stacklevel=caller_stacklevel())


def _run_group(root, run_id: str, resume: bool, start_step: int, attrs: dict[str, Any]):
    """A fresh run group, or (resume) the existing one cut back to `start_step`, with these attributes."""
    if not (resume and run_id in root):
        return store.create_run(root, run_id, attrs)
    group = root[run_id]
    durable = group.attrs.get("last_durable_step", -1)
    if group.attrs.get("status") == "complete":
        raise ValueError(f"run {run_id!r} is already complete; choose another run id to record a new run")
    if start_step > max(durable, 0):
        raise ValueError(f"run {run_id!r} is durable only up to step {durable} but training resumes at step "
                         f"{start_step}: the rows in between were never written. Call recorder.checkpoint() "
                         "whenever you checkpoint the model, and resume from a checkpoint taken with it.")
    store.truncate_to(group, start_step)
    group.attrs.pop("error", None)  # a failed run's, which it no longer is
    group.update_attributes(attrs)
    store.set_status(group, "running", steps_done=start_step, last_durable_step=start_step)
    return group


RESUME_KEYS = ("sketch", "dim", "seed", "quantities", "probe_losses", "dtype")  # what the stored arrays hold


def _check_same_capture(group, capture: dict[str, Any], layout: ParamLayout, splits: list[str]) -> None:
    """Refuse to resume a run with another parameter layout, other probe splits (or their order) or another capture
    of what its arrays hold: its rows would join rows of another kind."""
    stored = group.attrs.get("config", {}).get("capture", {})
    changed = [f"capture.{key}: {stored[key]!r} → {capture[key]!r}" for key in RESUME_KEYS
               if key in stored and stored[key] != capture[key]]
    if "layout" in group.attrs and ParamLayout.from_json(group.attrs["layout"]).hash != layout.hash:
        said = _tensors_changed(group.attrs["layout"], layout)
        changed.append(f"the model's trainable parameters (layout hash{said})")
    if "splits" in group.attrs and list(group.attrs["splits"]) != splits:
        changed.append(f"probe splits: {list(group.attrs['splits'])} → {splits}")
    if changed:
        raise ValueError(f"run {group.basename!r} cannot resume with another capture than it was recorded with "
                         f"({'; '.join(changed)}): its arrays would mix two kinds of rows. Resume with the same "
                         "model, probes and CaptureConfig, or record a new run id.")


def _tensors_changed(stored: list[dict], layout: ParamLayout) -> str:
    """The tensors trainable now but not in a run's stored layout, and the reverse (a progressive unfreezing resumed
    with the tensors trainable at the step it resumes at), with the way on; nothing where only shapes differ."""
    before = [entry["name"] for entry in stored]
    said = [f"{len(names)} tensor(s) {what} ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
            for names, what in (([n for n in layout.names if n not in before], "trainable now, not at its attach"),
                                ([n for n in before if n not in layout.names], "trainable at its attach, not now"))
            if names]
    if not said:
        return ""
    return f": {'; '.join(said)}; attach with those trainable at the run's first attach, then freeze or unfreeze"


def sketch_sharded(sketch: Sketch, shard: torch.Tensor, start: int, group: Any = None) -> torch.Tensor:
    """The sketch of a vector sharded across ranks: this rank's coordinates [start, start+len) are sketched and the
    sketches summed over the process group (all_reduce), so every rank gets the sketch of the whole vector."""
    out = sketch.apply_range(shard, start)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
