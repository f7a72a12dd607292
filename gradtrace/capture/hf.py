"""A Hugging Face `TrainerCallback` that records a `transformers.Trainer` run with a gradtrace Recorder.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[GradtraceCallback("runs/exp", run_id="r0", capture=CaptureConfig(dim=4096))])

The Recorder is attached in `on_train_begin` (the first event that receives the optimizer, already wrapped by
accelerate; the Recorder hooks the optimizer inside) and closed, marking the run complete, in `on_train_end`.
It records one row per optimizer step: with gradient accumulation, per sync step, after the Trainer's clipping.
The training loss of each step is the one the Trainer trains on and logs: what its `training_step` returns,
summed over the step's micro-batches, so a loss computed outside the model (`compute_loss_func`, label smoothing, a
`compute_loss` of a Trainer's own such as TRL's DPOTrainer, which also has the model return its language-model
loss) is recorded as trained on; under DDP it is the main process's (the Trainer logs the mean over processes). The
gradient's norm before clipping is what its accelerator's `clip_grad_norm_` returned in the step, as the Trainer
logs it (transformers 4 computes none where `max_grad_norm` is 0: NaN). Both methods are wrapped on the Trainer,
found up the call stack of `on_train_begin` (no event is given it), and unwrapped at the end. Only the main process
writes; the
rows are made durable before each Trainer checkpoint is written (a kill between the two leaves a store that
reaches past the checkpoint, which a resume cuts back), and resuming from one reopens the run there: in a new
process, or with the same Trainer after its train() raised (the run is marked failed, its hooks removed, when the
next train() of its model begins, in this Trainer or another, when its run is attached again, by a Trainer of a
model built afresh, or else as the process exits). The final probe is taken at the last step's parameters, before
a Trainer with `load_best_model_at_end` loads its best checkpoint; a run stopped early that loads it takes none.
Each trial of `Trainer.hyperparameter_search` (a train() from step 0 under the same callback) is a run of its own.
A resume, and `load_best_model_at_end`, get the tensors transformers 5's Trainer leaves out of a checkpoint it loads
because they are saved under other names (GPT-NeoX's output layer: `_restore_renamed_tensors`).
The Trainer's `global_step` counts the steps a GradScaler skipped, which the Recorder does not record (its `step`
counts the optimizer steps taken), so each checkpoint notes, in the run's `trainer_steps` attribute, how many steps
were recorded at its global step, and a resume starts from that count.
"""
from __future__ import annotations

import functools
import itertools
import json
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradtrace import store
from gradtrace.capture.integrations import IdleRecorder, RunRecorder, attach, check_own_attrs
from gradtrace.capture.recorder import Probe, caller_stacklevel, uninterrupted
from gradtrace.config import CaptureConfig, checked

# attributes the callback writes for its run besides attach's: a caller's trainer_steps was read back by a resume
TRAINER_ATTRS = ("trainer_args", "trainer_steps", "trial_params")
_RECORDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the callbacks recording it


def _resumed_from(args: TrainingArguments, global_step: int) -> Path | None:
    """The checkpoint a Trainer resumed from at `global_step`, where callbacks can tell: `args.resume_from_checkpoint`
    (scripts pass it to `train`) or the Trainer's own in `output_dir`, whichever saved that step."""
    for candidate in (args.resume_from_checkpoint, Path(args.output_dir) / f"checkpoint-{global_step}"):
        if isinstance(candidate, (str, Path)) and _saved_step(Path(candidate)) == global_step:
            return Path(candidate)
    return None


def _trainer_running(callback: TrainerCallback) -> Any | None:
    """The Trainer whose callback handler runs `callback`'s event, found up the call stack (the events are given
    the model and optimizer, never the Trainer); None where no caller is one."""
    frame = sys._getframe(1)
    while frame is not None:
        caller = frame.f_locals.get("self")
        if callback in getattr(getattr(caller, "callback_handler", None), "callbacks", ()) and callable(
                getattr(caller, "training_step", None)):
            return caller
        frame = frame.f_back
    return None


class _Noting:
    """`owner.name` (a method) wrapped as an attribute of the instance, over its class's, handing each result to
    `note` until `remove()`; a wrapper that something else has been laid over since is left in place, passing results
    through untouched (and goes where what lies over it is another `_Noting`'s, removed later: two callbacks')."""

    def __init__(self, owner: Any, name: str, note: Callable[[Any], None]) -> None:
        self.owner, self.name, self.before, self.active = owner, name, owner.__dict__.get(name), True
        method = getattr(owner, name)

        @functools.wraps(method)
        def noting(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if self.active:
                note(result)
            return result

        noting._gradtrace_noting = self
        self.wrapper = noting
        setattr(owner, name, noting)

    def remove(self) -> None:
        self.active = False
        if self.owner.__dict__.get(self.name) is self.wrapper:
            before = self.before
            while (under := getattr(before, "_gradtrace_noting", None)) is not None and under.wrapper is before \
                    and not under.active:  # (a wrapper made with functools.wraps over ours copies the attribute)
                before = under.before
            if before is None:
                delattr(self.owner, self.name)
            else:
                setattr(self.owner, self.name, before)


def _saved_step(checkpoint: Path) -> int | None:
    """The global step a Trainer checkpoint's `trainer_state.json` holds; None where there is none to read."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):  # no such file, not JSON, or JSON of another shape
        return None


def _restore_renamed_tensors(model: torch.nn.Module, checkpoint: Path, loaded: str, say: bool = True) -> None:
    """Load, with a warning where `say` (the main process), the tensors a Trainer that `loaded` `checkpoint` left as
    they were because the checkpoint names them otherwise: transformers 5 saves GPT-NeoX's output layer `lm_head` as
    `embed_out`, and the Trainer loads the checkpoint's names as saved (huggingface/transformers#43701), so a resumed
    run went on with the new model's initial output layer (or, resumed in the process that trained past the
    checkpoint, its later one), and `load_best_model_at_end` left the last step's. Only checkpoints of safetensors
    weights are looked at."""
    from safetensors import safe_open

    from gradtrace.models import in_this_release

    index = checkpoint / "model.safetensors.index.json"  # the weights in shards
    shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    own, restored, strays = model.state_dict(), {}, []
    for shard in sorted(shards):
        if not (checkpoint / shard).is_file():  # another kind of checkpoint (an adapter's, FSDP's), or none here
            return
        with safe_open(str(checkpoint / shard), "pt") as weights:
            for ours, saved in in_this_release({saved: saved for saved in weights.keys()}, model).items():
                if saved not in own and ours in own:
                    restored[ours] = weights.get_tensor(saved)
                elif saved not in own:
                    strays.append(saved)
    if restored:
        model.load_state_dict(restored, strict=False)
    if restored and say:
        warnings.warn(f"the Trainer {loaded} {checkpoint} without {', '.join(sorted(restored))}, which the "
                      "checkpoint names otherwise (huggingface/transformers#43701: they would train on from the "
                      "values the model had); GradtraceCallback loaded them from there", UserWarning,
                      stacklevel=caller_stacklevel())
    if strays and say:  # another model's renamed tensors, which only transformers' own loading renames back
        warnings.warn(f"the Trainer {loaded} {checkpoint}, which holds {len(strays)} tensor(s) under names the "
                      f"model lacks ({', '.join(sorted(strays)[:3])}{', …' if len(strays) > 3 else ''}; "
                      "huggingface/transformers#43701): the model's tensors they stand for kept the values it had "
                      "(from_pretrained of the checkpoint loads them under the model's names)", UserWarning,
                      stacklevel=caller_stacklevel())


class GradtraceCallback(TrainerCallback):
    """Records gradients, updates, Adam's moments and probes of a `transformers.Trainer` run into a gradtrace store."""

    def __init__(self, out_dir: str | Path, run_id: str = "run", capture: CaptureConfig | None = None,
                 probes: list[Probe] | None = None, probe_losses: dict[str, Callable] | list[str] | None = None,
                 attrs: dict[str, Any] | None = None) -> None:
        self.out_dir, self.run_id, self.capture = Path(out_dir), run_id, capture or CaptureConfig()
        self.probes, self.probe_losses, self.attrs = probes, probe_losses, attrs or {}
        store.check_run_id(run_id)  # refused here, as attach would refuse them once the Trainer has set up and begins
        checked(self.capture)
        check_own_attrs(self.attrs, also=TRAINER_ATTRS)
        self.recorder: RunRecorder | IdleRecorder | None = None
        self._losses: list[torch.Tensor] = []  # this step's micro-batch losses, as the Trainer's training_step gave
        self._norm: torch.Tensor | float | None = None  # this step's gradient norm before clipping, as it clipped
        self._noting: list[_Noting] = []
        self._warned_no_loss = False
        self._durable_at: int | None = None  # the global step whose rows were last made durable

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                       **kwargs: Any) -> None:
        """Attach the Recorder to the Trainer's optimizer (rank 0 only) and start collecting step losses."""
        if model is None or optimizer is None:
            raise ValueError("GradtraceCallback needs the model and optimizer in on_train_begin; this transformers "
                             "version passes neither. Use transformers>=4.46 or gradtrace.capture.attach directly.")
        self._detach("this Trainer's previous train() stopped before its end")  # it raised: on_train_end never ran
        trainer = _trainer_running(self)
        ours = trainer.callback_handler.callbacks if trainer is not None else [self]
        for earlier in [c for c in _RECORDING.get(model, []) if c not in ours]:  # another Trainer's train() of this
            earlier._detach("another Trainer's train() began on its model")  # model raised (a notebook's cell run
            # again): its recorder held its optimizer, never freed; a callback beside this one records as it does
        attrs = {"trainer_args": json.loads(args.to_json_string()), **self.attrs}
        if state.trial_params is not None:  # a trial of Trainer.hyperparameter_search: what it tries
            attrs["trial_params"] = state.trial_params
        self._durable_at = None
        resume = state.global_step > 0
        if resume and (checkpoint := _resumed_from(args, state.global_step)) is not None:
            _restore_renamed_tensors(model, checkpoint, "resumed from", say=state.is_world_process_zero)
        run_id = self._run_of(state)
        start = self._recorded_at(run_id, state.global_step) if resume and state.is_world_process_zero else 0
        try:
            self.recorder = attach(model, optimizer, self.out_dir, run_id, total_steps=state.max_steps,
                                   capture=self.capture, probes=self.probes, probe_losses=self.probe_losses,
                                   attrs=attrs, resume=resume, start_step=start, write=state.is_world_process_zero)
        except FileExistsError:
            raise FileExistsError(f"run {run_id!r} is already in {self.out_dir / 'store.zarr'}: this Trainer "
                                  "trains from step 0 (a second train(), or no resume_from_checkpoint), so give "
                                  "GradtraceCallback another run_id for it") from None
        if isinstance(self.recorder, RunRecorder):
            self._note_loss_and_norm(trainer)
            _RECORDING.setdefault(model, []).append(self)

    def _run_of(self, state: TrainerState) -> str:
        """The run this train() records: `run_id`; for a trial of `Trainer.hyperparameter_search` (each trains from
        step 0), `run_id-<trial name>` where the search names its trials (`hp_name`), else `run_id-trial-<k>`, the
        first k the store lacks (on the writing process; the others write nothing)."""
        if state.trial_params is None and state.trial_name is None:
            return self.run_id
        if state.trial_name is not None:
            return store.check_run_id(f"{self.run_id}-{state.trial_name}")
        root = self._store() if state.is_world_process_zero else {}
        return next(name for k in itertools.count() if (name := f"{self.run_id}-trial-{k}") not in root)

    def _store(self) -> Any:
        """The experiment store the runs are recorded in, as it is on disk now ({} before its first run)."""
        path = self.out_dir / "store.zarr"
        return store.open_experiment(path) if (path / "zarr.json").exists() else {}

    def _recorded_at(self, run_id: str, global_step: int) -> int:
        """Optimizer steps recorded when the Trainer saved its checkpoint at `global_step` (the global step itself
        for a run recorded before `trainer_steps` was kept, or none yet)."""
        root = self._store()
        recorded = root[run_id].attrs.get("trainer_steps", {}) if run_id in root else {}
        return int(recorded.get(str(global_step), global_step))

    def _note_loss_and_norm(self, trainer: Any | None) -> None:
        """Keep what the Trainer's `training_step` returns (each micro-batch's loss) and what its accelerator's
        `clip_grad_norm_` returns (the gradient's norm before clipping) while this run records."""
        if trainer is None:
            return
        self._noting = [_Noting(trainer, "training_step", self._note_loss)]
        if callable(getattr(getattr(trainer, "accelerator", None), "clip_grad_norm_", None)):
            self._noting.append(_Noting(trainer.accelerator, "clip_grad_norm_", self._note_norm))

    def _note_loss(self, loss: torch.Tensor | float) -> None:
        self._losses.append(torch.as_tensor(loss).detach())

    def _note_norm(self, norm: torch.Tensor | float | None) -> None:
        self._norm = norm

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        """Hand the step's training loss and gradient norm to the Recorder (its hooks run inside the coming optimizer
        step)."""
        loss = torch.stack(self._losses).sum() if self._losses else None  # each scaled by the accumulation summed
        norm, self._norm = self._norm, None
        self._losses.clear()
        if isinstance(self.recorder, RunRecorder):
            if loss is None and not self._warned_no_loss:
                warnings.warn("GradtraceCallback saw no training loss (it is run by no Trainer it found up the call "
                              "stack, or the Trainer's training_step was not called), so the recorded loss is NaN; "
                              "gradients, updates and probes are recorded as ever", UserWarning,
                              stacklevel=caller_stacklevel())
                self._warned_no_loss = True
            self.recorder.log(loss, grad_norm=norm)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """At the last step, take the final probe (before a Trainer with load_best_model_at_end loads another
        checkpoint); before the Trainer saves a checkpoint, make the rows durable."""
        if isinstance(self.recorder, RunRecorder) and state.global_step >= state.max_steps:
            self.recorder.probe_once()
        self._durable_before_saving(state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Before the Trainer saves an epoch's checkpoint, make the rows durable."""
        self._durable_before_saving(state, control)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """With `save_strategy="best"` the Trainer decides to save after evaluating, past every step callback:
        make the rows durable at each evaluation, before a save it may decide on."""
        if args.save_strategy == "best":
            self._make_durable(state)

    def _durable_before_saving(self, state: TrainerState, control: TrainerControl) -> None:
        """Make every recorded row durable, noting how many steps they hold at this global step, when the Trainer
        is about to save (its flow callback, which runs first, has set should_save): a kill while it saves then
        finds the store past its checkpoint, never short of it."""
        if control.should_save:
            self._make_durable(state)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Make every recorded row durable beside the Trainer's checkpoint (done already at the step's end unless a
        later callback asked for this save)."""
        self._make_durable(state)

    @uninterrupted  # Ctrl-C between the rows and the note left the checkpoint's step count unnoted
    def _make_durable(self, state: TrainerState) -> None:
        """Write every recorded row and mark it durable, noting how many steps it holds at this global step (once
        per global step)."""
        if isinstance(self.recorder, RunRecorder) and self._durable_at != state.global_step:
            self._durable_at = state.global_step
            self.recorder.checkpoint()
            trainer_steps = {**self.recorder.group.attrs.get("trainer_steps", {}),
                             str(state.global_step): self.recorder.step}
            self.recorder.group.update_attributes({"trainer_steps": trainer_steps})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        """Take the final probe, write everything and mark the run complete (and give the best checkpoint loaded at
        the end the tensors the Trainer left out of it: `_restore_renamed_tensors`)."""
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        if self.recorder is not None:  # a loaded best checkpoint is not the trained parameters: no probe of it
            self.recorder.close(final_probe=not best)
        self._detach()
        if best and model is not None:
            _restore_renamed_tensors(model, Path(best), "loaded its best checkpoint,", say=state.is_world_process_zero)

    def _detach(self, unfinished: str | None = None) -> None:
        """Unwrap the Trainer's methods and forget the Recorder; one still open (`unfinished` says why) writes
        what it recorded and marks the run failed, detaching its optimizer hooks, so a resumed train() records once."""
        for noting in self._noting:
            noting.remove()
        self._noting = []
        for callbacks in _RECORDING.values():
            if self in callbacks:
                callbacks.remove(self)
        if isinstance(self.recorder, RunRecorder) and not self.recorder.closed:
            self.recorder.fail(RuntimeError(unfinished))
        self.recorder = None
        self._losses.clear()
        self._norm = None
