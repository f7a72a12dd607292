"""One fine-tuning run with capture and evaluation, resumable from its last durable step."""
from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gradtrace import checkpoint, kernels, store
from gradtrace.capture.recorder import Probe, Recorder
from gradtrace.config import (CaptureConfig, Config, TrainConfig, changed_keys, checked, from_dict, keys_missing_from,
                              with_absolute_paths)
from gradtrace.evaluate import accuracy, correctness, train_accuracy
from gradtrace.models import build_model, start_attrs
from gradtrace.results import accuracy_columns, first_ids
from gradtrace.tasks import ArithmeticTask, answer_cross_entropy, probe_loss_functions, task_for
from gradtrace.tasks.shifts import OWN_SPLIT_CHANGED


@dataclass
class RunResult:
    """What a finished run reports: its id, role, seeds, hyper-parameters and accuracy per split."""

    run_id: str
    role: str
    seeds: dict[str, int]
    hparams: dict[str, float]
    accuracy: dict[str, float]
    wall_time_s: float
    steps: int
    extra: dict = field(default_factory=dict)
    train_accuracy: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        """A flat results.csv row."""
        return {"run_id": self.run_id, "role": self.role, "init_seed": self.seeds["init"],
                "data_seed": self.seeds["data"], **self.hparams, "steps": self.steps,
                "wall_time_s": round(self.wall_time_s, 2), **self.extra,
                **accuracy_columns(self.accuracy, self.train_accuracy)}


def seeds(train: TrainConfig) -> dict[str, int]:
    """Init and data-order seeds (each defaults to train.seed)."""
    return {"init": train.seed if train.init_seed is None else train.init_seed,
            "data": train.seed if train.data_seed is None else train.data_seed}


def lr_lambda(train: TrainConfig):
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    def factor(step: int) -> float:
        if step < train.warmup:
            return (step + 1) / train.warmup
        progress = min(1.0, (step - train.warmup) / max(1, train.steps - train.warmup))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available; a device torch cannot use here (no CUDA, no `cuda:N`, no MPS) is refused."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name}, but torch {torch.__version__} sees no CUDA device here; use auto or "
                         "cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"train.device={name}, but torch sees {count} CUDA device{'s' if count > 1 else ''} here; use "
                         f"cuda:N with N below {count}, cuda or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device=mps, but torch {torch.__version__} sees no MPS device here (Apple silicon "
                         "with a torch built for it); use auto or cpu")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def adamw(params, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The run's AdamW; fused (one kernel over every parameter) on CPU and CUDA: 4.5% off a default-model step."""
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def check_packing(model: torch.nn.Module, t: TrainConfig) -> None:
    """Raise when packed batches (train.pack) meet an attention implementation that takes no 4D mask."""
    attention = getattr(model.config, "_attn_implementation", "eager")
    if t.pack and attention not in ("eager", "sdpa"):
        raise ValueError(f"train.pack feeds each packed row a 4D attention mask, which eager and sdpa attention take "
                         f"and {attention!r} does not; set train.pack=false or model.attn_implementation=sdpa")


def _autocast(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"train.precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# where and how a run trains, not what it computes: task.modules names where the splits' files lie (a moved study's
# anew), what they draw being held to the run's items digest (`check_same_items`)
RESUME_MAY_CHANGE = ("train.threads", "train.device", "train.checkpoint_every", "model.init_from", "task.modules",
                     "capture.chunk", "capture.writer_thread", "sweep", "predict")


@functools.cache
def default_threads() -> int:
    """torch's thread count in this process before its first run set one: what `train.threads: 0` trains on."""
    return torch.get_num_threads()


def use_threads(threads: int) -> None:
    """Train on `train.threads` threads; 0: torch's default, not what an earlier run of this process set."""
    default = default_threads()  # read before this process's first run sets any
    torch.set_num_threads(threads or default)


@contextlib.contextmanager
def callers_torch_state(device: str):
    """torch's thread count and random state as the caller had them, once a run that set its own (`train.threads`;
    the model's init seed, which seeds torch's global generators) returns: a notebook's `train(...)` left both."""
    before = torch.get_num_threads()
    run_on = resolve_device(device)
    # the run's GPU only: reading every GPU's generator opens a context on each, in every worker of a multi-GPU host
    gpus = [torch.cuda.current_device() if run_on.index is None else run_on.index] if run_on.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=gpus):
            yield
    finally:
        torch.set_num_threads(before)


def check_same_items(group, task: ArithmeticTask, run_id: str) -> None:
    """Refuse to go on with a run that was trained or scored on other items than `task` draws (a gradtrace whose
    task draws them otherwise); runs from before the digest was recorded are not checked."""
    theirs = group.attrs.get("items_digest")
    if theirs is not None and theirs != task.items_digest:
        raise ValueError(f"run {run_id!r} was trained on other items than this gradtrace draws for its config (items "
                         f"digest {theirs}, today {task.items_digest}): either this gradtrace draws them otherwise "
                         f"(finish it with the gradtrace that started it) {OWN_SPLIT_CHANGED}; or train a new run "
                         "(another --out or run id)")


def record_resumed_arithmetic(group, device: torch.device, run_id: str, step: int) -> None:
    """Warn where a run goes on from `step` with other code, releases, device, CPU, its kernels or threads than it
    started with, and record what changed in its `resumed_with` attribute: its steps from here round otherwise than an
    uninterrupted run's, so they may be of another realisation."""
    changed = kernels.changes(group.attrs, kernels.attrs(device))
    if not changed:
        return
    warnings.warn(f"run {run_id!r} resumes at step {step} with other arithmetic than it started with "
                  f"({kernels.describe_changes(group.attrs, changed)}): its steps from here round otherwise, so it "
                  "may not end as an uninterrupted run would; for that, resume it where it started (the same "
                  "gradtrace, torch, transformers, device, kind of CPU, train.cpu_kernels and train.threads)",
                  kernels.OtherArithmetic, stacklevel=2)
    group.update_attributes({"resumed_with": [*group.attrs.get("resumed_with", []), {"step": step, **changed}]})


def check_resumes_its_config(group, cfg: Config, run_id: str) -> None:
    """Refuse to resume a run with a config that would change what it computes (or records) from here on."""
    older = keys_missing_from(group.attrs["config"])
    if older:
        raise ValueError(f"run {run_id!r} was started by an older gradtrace, whose config had no {first_ids(older, 4)}"
                         ": resumed today it would go on under today's defaults for "
                         "them (and today's items and arrays); finish it with the gradtrace that started it, or "
                         "train a new run (another --out or run id)")
    started = with_absolute_paths(from_dict(group.attrs["config"]))  # a run of before kept relative paths as typed
    changed = changed_keys(started, cfg, RESUME_MAY_CHANGE)
    if changed:
        raise ValueError(f"run {run_id!r} was trained with another config ({'; '.join(changed)}); resume it with the "
                         "config it started with, or train a new run (another --out or run id)")


def train(cfg: Config, exp_dir: str | Path, run_id: str = "run", role: str = "reference",
          resume: bool = False, progress: bool = True, on_step: Callable[[int, int], None] | None = None) -> RunResult:
    """Train one run into `exp_dir/store.zarr/<run_id>`, capturing as `cfg.capture` says; returns its accuracies.
    `on_step(steps done, steps in all)` is called after each training step (a sweep's bar counts them)."""
    cfg = checked(cfg)
    with store.run_lock(Path(exp_dir), [run_id]), callers_torch_state(cfg.train.device):
        return _train_locked(cfg, Path(exp_dir), run_id, role, resume, progress, on_step)


def _train_locked(cfg: Config, exp_dir: Path, run_id: str, role: str, resume: bool, progress: bool,
                  on_step: Callable[[int, int], None] | None) -> RunResult:
    """`train` with the run's lock held."""
    t = cfg.train
    use_threads(t.threads)
    device = resolve_device(t.device)
    root = store.open_experiment(exp_dir / "store.zarr", mode="a")
    run_seeds = seeds(t)
    hparams = {"lr": t.lr, "weight_decay": t.weight_decay}
    if resume and run_id in root and root[run_id].attrs.get("status") == "complete":
        check_resumes_its_config(root[run_id], cfg, run_id)  # more steps, say, would not be trained
        checkpoint.remove(exp_dir / "checkpoints" / run_id)  # left by a kill between the status and its removal
        return finished_result(root[run_id], run_id, role, run_seeds, hparams)
    kernels.use(t.cpu_kernels, device)
    task = task_for(cfg.task, cfg.model)
    model = build_model(cfg.model, task.tokenizer.vocab_size, run_seeds["init"]).to(device)
    model.train()
    check_packing(model, t)
    optimizer = adamw(model.parameters(), t, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    ckpt_root = exp_dir / "checkpoints" / run_id
    start, taken = 0, 0  # training steps done; optimizer steps taken (fewer by the steps the scaler skipped)
    found = checkpoint.checkpoint_dir(ckpt_root) if resume and run_id in root else None
    if found is not None:
        group = root[run_id]
        check_resumes_its_config(group, cfg, run_id)
        check_same_items(group, task, run_id)
        start, taken = checkpoint.load_state(found, model, optimizer, scheduler, scaler)
        record_resumed_arithmetic(group, device, run_id, start)
        store.truncate_to(group, taken, start)
        store.set_status(group, "running")
    else:
        group = store.create_run(root, run_id, {"config": cfg.to_dict(), "role": role, "seeds": run_seeds,
                                                "steps": t.steps, "steps_done": 0, "items_digest": task.items_digest,
                                                **start_attrs(cfg.model), **kernels.attrs(device)}, overwrite=resume)
    began = time.perf_counter() - group.attrs.get("wall_time_s", 0.0)
    writer = store.RunWriter(group, cfg.capture.chunk, thread=cfg.capture.use_writer_thread(device))
    try:  # from here a run that raises is marked failed, set-up included
        recorder = _recorder(cfg.capture, model, optimizer, writer, task, device, t.steps, taken)
        group.update_attributes(recorder.attrs())
        if start == 0 and cfg.capture.enabled and cfg.capture.save_weights:
            checkpoint.save_weights(model, exp_dir / "weights" / run_id / "initial.safetensors")
        eval_rows = declare_evals(writer, task, t.eval_every)
        for step in tqdm(range(start, t.steps), desc=run_id, disable=not progress, initial=start, total=t.steps,
                         leave=False, mininterval=2):
            batch = task.train_batches(step, [run_seeds["data"]], t.batch_size, device, t.pack)[0]
            with _autocast(t.precision, device):
                loss = answer_cross_entropy(model(**batch.inputs(), use_cache=False).logits, batch.tokens, batch.mask)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            unclipped = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
            recorder.log(loss, grad_norm=unclipped)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            done = step + 1
            if eval_rows and done % t.eval_every == 0:
                writer.append({"evals/step": done, "evals/accuracy": np.array(list(
                    accuracy(correctness(model, task)).values()), dtype=np.float32)})
            if done % t.checkpoint_every == 0 and done < t.steps:
                writer.flush()
                checkpoint.save_state(ckpt_root, model, optimizer, scheduler, scaler, done, recorder.step)
                writer.checkpoint(recorder.step)
                group.update_attributes({"steps_done": done, "wall_time_s": time.perf_counter() - began})
            if on_step is not None:
                on_step(done, t.steps)
        recorder.close()
        correct, train_acc = correctness(model, task), train_accuracy(model, task)
        writer.close()
        store.write_correct(group, correct)
        if (cfg.capture.enabled and cfg.capture.save_weights) or role == "base":  # a sweep's runs start from a base's
            checkpoint.save_weights(model, exp_dir / "weights" / run_id / "final.safetensors")
    except BaseException as err:  # a full disk as the final weights are written, too: the run says why
        writer.abort()
        store.set_failed(group, err)
        raise
    acc = accuracy(correct)
    wall = time.perf_counter() - began
    store.set_status(group, "complete", accuracy=acc, train_accuracy=train_acc, steps_done=t.steps,
                     last_durable_step=recorder.step, wall_time_s=wall,
                     nonfinite_steps=store.nonfinite_steps(group), train_loss=store.train_loss_ends(group),
                     splits=task.splits, hparams=hparams)
    checkpoint.remove(ckpt_root)
    return RunResult(run_id, role, run_seeds, hparams, acc, wall, t.steps, train_accuracy=train_acc)


def recorded_capture(capture: CaptureConfig) -> CaptureConfig:
    """What a run records: `capture` as configured, or with capture disabled the scalars and per-tensor statistics
    every 10 steps (no sketches, no probes)."""
    return capture if capture.enabled else CaptureConfig(quantities=[], every=10, probe_every=0)


def _recorder(capture: CaptureConfig, model, optimizer, writer, task: ArithmeticTask, device, steps: int,
              start: int) -> Recorder:
    """The run's Recorder: full capture with probes, or (capture disabled) scalars every 10 steps."""
    if not capture.enabled:
        return Recorder(model, optimizer, writer, recorded_capture(capture), steps, start_step=start)
    probes = [Probe(split, *task.probe_set(split).torch(device=device)) for split in task.splits] \
        if capture.probe_every else None
    return Recorder(model, optimizer, writer, capture, steps, probes, probe_loss_functions(capture.probe_losses),
                    start_step=start)


def declare_evals(writer: store.RunWriter, task: ArithmeticTask, every: int) -> bool:
    """Declare `evals/*` when evaluating every `every` steps during training; whether it did."""
    if every:
        writer.declare("evals/step", (), "int64", every=every)
        writer.declare("evals/accuracy", (len(task.splits),), "float32", dims=("split",), every=every)
    return bool(every)


def finished_result(group, run_id: str, role: str, run_seeds: dict, hparams: dict) -> RunResult:
    """The result of a run that is already complete in the store."""
    a = group.attrs
    return RunResult(run_id, role, run_seeds, hparams, dict(a["accuracy"]), float(a.get("wall_time_s", 0.0)),
                     int(a["steps"]), train_accuracy=dict(a.get("train_accuracy", {})))
