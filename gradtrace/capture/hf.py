"""A Hugging Face `TrainerCallback` that records a `transformers.Trainer` run with a gradtrace Recorder.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[GradtraceCallback("runs/exp", run_id="r0", capture=CaptureConfig(dim=4096))])

The Recorder is attached in `on_train_begin` (the first event that receives the optimizer, already wrapped by
accelerate; the Recorder hooks the optimizer inside) and closed, marking the run complete, in `on_train_end`.
It records one row per optimizer step: with gradient accumulation, per sync step, after the Trainer's clipping.
The training loss of each step is taken from the model's own `loss` output in training-mode forwards (summed
over micro-batches when the Trainer normalises by the token count of the whole accumulated batch, else
averaged), so it equals the loss the Trainer logs; where the Trainer computes the loss outside the model
(`compute_loss_func`, label smoothing) the model returns none, and the stored loss is NaN (warned once). Only the
main process writes; `on_save` makes the rows durable beside each Trainer checkpoint, and resuming from one reopens
the run there. The Trainer's `global_step` counts the steps a GradScaler skipped, which the Recorder does not
record (its `step` counts the optimizer steps taken), so `on_save` notes, in the run's `trainer_steps` attribute,
how many steps were recorded at each checkpoint's global step, and a resume starts from that count.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradtrace import store
from gradtrace.capture.integrations import IdleRecorder, RunRecorder, attach
from gradtrace.capture.recorder import Probe
from gradtrace.config import CaptureConfig


class GradtraceCallback(TrainerCallback):
    """Records gradients, updates, Adam's moments and probes of a `transformers.Trainer` run into a gradtrace store."""

    def __init__(self, out_dir: str | Path, run_id: str = "run", capture: CaptureConfig | None = None,
                 probes: list[Probe] | None = None, probe_losses: dict[str, Callable] | None = None,
                 attrs: dict[str, Any] | None = None) -> None:
        self.out_dir, self.run_id, self.capture = Path(out_dir), run_id, capture or CaptureConfig()
        self.probes, self.probe_losses, self.attrs = probes, probe_losses, attrs or {}
        self.recorder: RunRecorder | IdleRecorder | None = None
        self._losses: list[torch.Tensor] = []
        self._summed = False  # the model normalised each micro-batch loss by the whole batch's token count
        self._scale = 1  # the Trainer's factor on such losses when it averages tokens across processes
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._warned_no_loss = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                       **kwargs: Any) -> None:
        """Attach the Recorder to the Trainer's optimizer (rank 0 only) and start collecting step losses."""
        if model is None or optimizer is None:
            raise ValueError("GradtraceCallback needs the model and optimizer in on_train_begin; this transformers "
                             "version passes neither. Use transformers>=4.46 or gradtrace.capture.attach directly.")
        attrs = {"trainer_args": json.loads(args.to_json_string()), **self.attrs}
        resume = state.global_step > 0
        start = self._recorded_at(state.global_step) if resume and state.is_world_process_zero else 0
        self.recorder = attach(model, optimizer, self.out_dir, self.run_id, total_steps=state.max_steps,
                               capture=self.capture, probes=self.probes, probe_losses=self.probe_losses, attrs=attrs,
                               resume=resume, start_step=start, write=state.is_world_process_zero)
        if isinstance(self.recorder, RunRecorder):
            self._hook = model.register_forward_hook(self._note_loss, with_kwargs=True)
            self._scale = args.world_size if args.average_tokens_across_devices else 1

    def _recorded_at(self, global_step: int) -> int:
        """Optimizer steps recorded when the Trainer saved its checkpoint at `global_step` (the global step itself
        for a run recorded before `trainer_steps` was kept, or none yet)."""
        path = self.out_dir / "store.zarr"
        root = store.open_experiment(path) if (path / "zarr.json").exists() else {}
        recorded = root[self.run_id].attrs.get("trainer_steps", {}) if self.run_id in root else {}
        return int(recorded.get(str(global_step), global_step))

    def _note_loss(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if module.training and torch.is_grad_enabled() and loss is not None:
            self._losses.append(loss.detach())
            self._summed = kwargs.get("num_items_in_batch") is not None

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        """Hand the step's training loss to the Recorder (its hooks run inside the coming optimizer step)."""
        if self._losses:
            total = torch.stack(self._losses).sum()
            self.recorder.log(total * self._scale if self._summed else total / len(self._losses))
            self._losses.clear()
        elif isinstance(self.recorder, RunRecorder) and not self._warned_no_loss:
            warnings.warn("the model returned no loss (the Trainer computes it outside the model: compute_loss_func "
                          "or label smoothing), so the recorded loss is NaN; gradients, updates and probes are "
                          "recorded as ever", UserWarning, stacklevel=2)
            self._warned_no_loss = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Make every recorded row durable beside the Trainer's checkpoint, noting how many steps it holds."""
        if isinstance(self.recorder, RunRecorder):
            self.recorder.checkpoint()
            attrs = self.recorder.group.attrs
            attrs["trainer_steps"] = {**attrs.get("trainer_steps", {}), str(state.global_step): self.recorder.step}

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Take the final probe, write everything and mark the run complete."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
