"""The Recorder: optimizer step hooks that sketch each step's gradient, update and Adam moments into a store.

A training loop changes by at most three lines::

    rec = Recorder(model, optimizer, writer, CaptureConfig(), total_steps, probes=...)   # 1: attach
    rec.log(loss, grad_norm=norm)                                          # 2: optional, before optimizer.step()
    rec.close()                                                            # 3: flush at the end

The gradient is read in the optimizer's step pre-hook, so it is the gradient the optimizer uses: after clipping
(clip before `optimizer.step()`) and after unscaling under `torch.amp.GradScaler` (which unscales before calling
`step`, or, for a fused optimizer, hands it the scale: the Recorder divides by it). Steps the scaler skips on
inf/NaN are neither recorded nor counted; a fused optimizer, which the scaler still calls, drops what was logged for
such a step with it (a non-fused one is not called at all, so a loss logged for it joins the next step's average,
as a micro-batch's would). The norm before clipping is the loop's to give: `rec.log(loss,
grad_norm=clip_grad_norm_(...))` records it. Rows stay on the training device until the writer copies a whole chunk
to the host, so recording an ordinary step never waits for the device (probe steps copy their sketches at once).
Capture never changes the training result: it reads `.grad`, parameters and optimizer state, and computes probe
gradients with `torch.autograd.grad` on separate graphs.

Wrapped models and optimizers are unwrapped: hooks go on the optimizer whose step hooks see the whole step (under
accelerate's `AcceleratedOptimizer`, which skips it on gradient-accumulation micro-steps, so only sync steps are
recorded; a Lookahead's own; SAM's base optimizer: `gradtrace.capture.optimizers`), Adam's moments are read from the
optimizer whose state holds them, and the parameter layout is the bare model's (DDP's `module.` prefix would change
the layout hash).
"""
from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from gradtrace.capture.optimizers import (check_optimizer, count_held, moment_holders, moments_view,
                                          stepped_without_adam, unwrap_optimizer)
from gradtrace.capture.sketch import ParamLayout, flatten_into, make_sketch, tensor_norms
from gradtrace.config import CaptureConfig
from gradtrace.store import RunWriter

V_QUANTILES = (0.5, 0.9, 0.99)
V_SAMPLE = 4096  # coordinates per tensor sampled (fixed, seeded) for the quantiles of Adam's v; smaller: all
_OPEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its Recorders not yet closed


@contextlib.contextmanager
def _held_interrupt():
    """Hold off Ctrl-C (SIGINT) until the block ends, then raise it. In a notebook's interrupted loop it landed inside
    the step hooks, mostly in a chunk write: the step's rows were lost or its count not taken, and the loop, run again,
    recorded a duplicate step or a gap of fill-value rows."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # only the main thread receives signals; None: a handler not set from Python, left alone
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def uninterrupted(hook: Callable) -> Callable:
    """`hook` run with Ctrl-C held until it returns (`_held_interrupt`): a step's hooks, a recorder's writes."""
    @functools.wraps(hook)
    def held(*args, **kwargs):
        with _held_interrupt():
            return hook(*args, **kwargs)
    return held


@dataclass
class Probe:
    """A split's fixed probe batch: token ids (items, length) and the bool mask of their answer positions, which the
    probe losses score (`model(input_ids=tokens).logits`: a Hugging Face-style causal LM)."""

    split: str
    tokens: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:  # refused here, not at the first optimizer step, inside its hook
        if not (isinstance(self.split, str) and self.split):
            raise TypeError(f"probe split must be the split's name (text), got {self.split!r}")
        if self.tokens.is_floating_point() or self.tokens.is_complex() or self.tokens.dtype == torch.bool:
            raise TypeError(f"probe {self.split!r}: tokens must be integer token ids, got {self.tokens.dtype}")
        if self.tokens.ndim != 2 or self.mask.shape != self.tokens.shape:
            raise ValueError(f"probe {self.split!r}: tokens must be (items, length) and mask of the same shape; got "
                             f"{tuple(self.tokens.shape)} and {tuple(self.mask.shape)}")
        if self.mask.dtype != torch.bool:
            raise TypeError(f"probe {self.split!r}: mask must be a bool tensor of answer positions, got "
                            f"{self.mask.dtype}; pass mask.bool()")
        if not self.mask.any():
            raise ValueError(f"probe {self.split!r}: mask marks no answer position; its probe losses would be NaN")

    def to(self, device: torch.device) -> Probe:
        """This probe with its tensors on `device` (the model's), its tokens as int64 (the losses' targets must be)."""
        return Probe(self.split, self.tokens.to(device, torch.long), self.mask.to(device))


def _check_probe_losses(probe_losses: dict) -> None:
    """Refuse probe losses the probes cannot be taken under, at attach rather than in the first step's hook: none
    (nothing would be recorded), or a value that is no function."""
    if not isinstance(probe_losses, dict) or not probe_losses:
        raise ValueError(f"probe_losses must name at least one loss ({{name: function}}, or names of "
                         f"gradtrace.tasks.PROBE_LOSSES), got {probe_losses!r:.80}")
    not_callable = sorted(name for name, loss in probe_losses.items() if not callable(loss))
    if not_callable:
        raise TypeError(f"probe_losses {not_callable}: each must be a function (logits, tokens, mask) -> loss")


def _check_probe_tokens(model: torch.nn.Module, probes: list[Probe]) -> None:
    """Refuse probe tokens outside the model's vocabulary (its input embeddings'), here rather than as "index out of
    range in self" inside the first optimizer step's hook."""
    try:
        embeddings = model.get_input_embeddings()  # a Hugging Face model's
    except (AttributeError, NotImplementedError):  # another model, or one of Hugging Face's without them
        embeddings = None
    vocabulary = getattr(embeddings, "num_embeddings", None)
    for probe in probes if vocabulary is not None else []:
        low, high = int(probe.tokens.min()), int(probe.tokens.max())  # a probe has items: its mask marks some
        if not 0 <= low <= high < vocabulary:
            raise ValueError(f"probe {probe.split!r}: token ids from {low} to {high}, outside the model's vocabulary "
                             f"of {vocabulary}: tokenize the probe items with the model's tokenizer")


def _scalar(value: Any, name: str, what: str) -> torch.Tensor | float:
    """A value `rec.log` records once per step: a one-element tensor (detached, where it lies: no sync with a GPU
    here) or a number; anything else refused here, not as its row is written (a chunk later, far from the cause)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"rec.log: {name} must be one number ({what}), got a tensor of shape "
                             f"{tuple(value.shape)}")
        return value.detach().reshape(())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"rec.log: {name} must be one number ({what}), got {type(value).__name__} {value!r:.60}") \
            from None


class Schedule:
    """Which optimizer steps are recorded: every n-th, or log-spaced (dense early, sparse late)."""

    def __init__(self, kind: str, every: int, total: int) -> None:
        if kind not in ("every", "log"):
            raise ValueError(f"capture.schedule must be 'every' or 'log', got {kind!r}")
        if every < 1:
            raise ValueError(f"capture.every must be >= 1, got {every}")
        if kind == "every":
            self._steps = None
            self.every = every
        else:
            n = max(1, total // every)
            self._steps = set(np.unique(np.geomspace(1, max(total, 1), n).astype(int) - 1).tolist())

    @property
    def every_step(self) -> bool:
        """Whether every optimizer step is recorded."""
        return self._steps is None and self.every == 1

    def __contains__(self, step: int) -> bool:
        return step % self.every == 0 if self._steps is None else step in self._steps


class Recorder:
    """Sketches g_t, Δθ_t and Adam's m_t each recorded step, per-tensor statistics, and periodic probe gradients
    (of `probes` under `probe_losses`, by default `cfg.probe_losses` from `gradtrace.tasks.PROBE_LOSSES`)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, writer: RunWriter,
                 cfg: CaptureConfig, total_steps: int, probes: list[Probe] | None = None,
                 probe_losses: dict[str, Callable] | list[str] | None = None, start_step: int = 0) -> None:
        check_recordable(model, optimizer, cfg, probes or [], probe_losses)
        self.model, self.optimizer = unwrap_model(model), unwrap_optimizer(optimizer)
        self._holders = moment_holders(self.optimizer)  # whose states hold Adam's moments (a Lookahead's AdamW)
        self._views = [moments_view(o) for o in self._holders]  # each one's states under torch's names
        self.writer, self.cfg = writer, cfg
        self._all_params = list(self.model.parameters())  # walking the modules each step costs ~0.1 ms
        self.params = [p for p in self._all_params if p.requires_grad]
        held = count_held(self.params, self.optimizer)
        if held < len(self.params) and "update" in cfg.quantities:
            warnings.warn(f"the {type(self.optimizer).__name__} given holds {held} of the model's {len(self.params)} "
                          "trainable parameter tensors: `update` is the change across its step(), so it reads 0 "
                          "for the others even where another optimizer moves them (`grad` covers them all). Give "
                          "one optimizer every trainable parameter (several chained: gradtrace.capture."
                          "ChainedOptimizer(muon, adamw)), or freeze the others, for the whole Δθ",
                          UserWarning, stacklevel=caller_stacklevel())
        without = stepped_without_adam(self.params, self.optimizer)
        if without and "adam_m" in cfg.quantities:
            warnings.warn(f"{sum(without.values())} of the model's {len(self.params)} trainable parameter tensors "
                          f"are stepped without Adam's moments (by {', '.join(without)}): adam_m reads 0 for them, "
                          "and their v statistics NaN", UserWarning, stacklevel=caller_stacklevel())
        self.layout = ParamLayout.of(self.model)
        device = self.params[0].device
        self.sketch = make_sketch(cfg.sketch, self.layout, cfg.dim, cfg.seed, device)
        self.k = self.sketch.dim
        self.schedule = Schedule(cfg.schedule, cfg.every, total_steps)
        self.total_steps = total_steps
        self.step = start_step  # optimizer steps completed
        self.probes = [probe.to(device) for probe in probes or []]
        self.probe_losses = _probe_losses_by_name(cfg, probe_losses) if self.probes else {}  # probe_loss's labels
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        self._first_step_logged: bool | None = None  # whether a loss was given before the first step since attach
        self._last_loss: tuple[torch.Tensor | float, int] | None = None  # the last step's given: sum and count
        self._unclipped: torch.Tensor | float = float("nan")  # this step's norm before clipping, when given
        self._recording = False
        self._closure = False
        self._skipped = False
        self.closed = False
        self._all_grads = True
        self._unfrozen_warned = False
        self._projected_warned = False
        P = self.layout.size
        self._numels = self.layout.numels
        self._flat = torch.empty(P, device=device)   # scratch: flat copies of g, m, v and probe gradients
        self._theta_for: torch.dtype | None = None  # the first parameter's dtype when _theta was made for them
        self._theta = self._theta_views = None
        self._v_sample = VSample(self.layout, V_SAMPLE, V_QUANTILES, cfg.seed, device)
        self._lengths = torch.tensor(self._numels, device=device)
        declare_arrays(writer, cfg, self.k, len(self._numels), len(self.probes), len(self.probe_losses))
        self._m_sketch = self._stored_m_sketch()  # sketch(m) carried forward by linearity (see `_sketch_m`)
        probed = writer.group["probe/step"] if self.probes else None
        self._probed_at = int(probed[-1]) if probed is not None and probed.shape[0] else None  # resumed: kept rows
        # run eagerly inside a compiled optimizer step (torch.compile's recipe): traced, the chunk write into zarr
        # failed at the first full chunk ("Cannot generate resume function for generator")
        self._hooks = [self.optimizer.register_step_pre_hook(torch.compiler.disable(uninterrupted(self._pre_step))),
                       self.optimizer.register_step_post_hook(torch.compiler.disable(uninterrupted(self._post_step)))]
        _OPEN.setdefault(self.optimizer, weakref.WeakSet()).add(self)

    # -- set-up ---------------------------------------------------------------------------------------------
    def attrs(self) -> dict:
        """Run attributes describing what this recorder writes (for the store)."""
        group = next((g for g in self.optimizer.param_groups if "betas" in g), {})  # the first of Adam's groups
        adam = {"beta1": group["betas"][0], "beta2": group["betas"][1]} if group else {}
        if group and "eps" in group:  # not Lion's
            adam["eps"] = group["eps"]
        return capture_attrs(self.sketch, self.layout, self.cfg, [p.split for p in self.probes],
                             list(self.probe_losses), adam)

    # -- the user's one line ----------------------------------------------------------------------------------
    def log(self, loss: torch.Tensor | float | None = None, grad_norm: torch.Tensor | float | None = None) -> None:
        """Note the loss of the batch about to be stepped on (calls for several micro-batches are averaged) and,
        optionally, the gradient's total norm before clipping, as `clip_grad_norm_` returns it (the last given for a
        step is recorded as `grad_norm_unclipped`; NaN where the loop gives none). Either may come alone: with
        gradient accumulation, the norm after the last micro-batch's loss."""
        if loss is not None:
            value = _scalar(loss, "loss", "the batch's mean loss: loss.mean() of per-item losses")
            self._loss_sum = value if self._loss_count == 0 else self._loss_sum + value
            self._loss_count += 1
        if grad_norm is not None:
            self._unclipped = _scalar(grad_norm, "grad_norm", "the total norm clip_grad_norm_ returns")

    # -- hooks ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs) -> None:
        # GradScaler.step hands a fused optimizer found_inf (the fused step then skips itself) and, unless the loop
        # called scaler.unscale_ first, the scale its gradients still carry
        scale = getattr(optimizer, "grad_scale", None)
        self._skipped = bool(getattr(optimizer, "found_inf", 0))
        if self._skipped:
            return
        if self.step == 0:
            self.probe_once()
        if self.step == self.total_steps and (self.probes or self.cfg.schedule == "log"):
            warnings.warn(f"optimizer step {self.step + 1} is past total_steps={self.total_steps}: periodic probes "
                          "stop there and a log schedule records no more rows; give attach the run's real number "
                          "of optimizer steps", UserWarning, stacklevel=caller_stacklevel())
        self._recording = self.step in self.schedule
        if not self._recording:
            return
        self._row = {"step": self.step, "lr": float(optimizer.param_groups[0]["lr"]),
                     "layer_lr": self._learning_rates(optimizer)}
        # optimizer.step(closure): the closure computes the gradient inside the step, so it is read after it (the
        # hook's args start with the optimizer itself: its step's closure, where given, is args[1])
        self._closure = callable(args[1] if len(args) > 1 else kwargs.get("closure"))
        if not self._closure:
            self._record_gradient(scale)
        if "update" in self.cfg.quantities:
            if self.params[0].dtype != self._theta_for:  # first step, or the model was cast since
                self._make_theta()
            torch._foreach_copy_(self._theta_views, self.params)

    def _learning_rates(self, optimizer: torch.optim.Optimizer) -> np.ndarray:
        """The learning rate each recorded tensor steps with, its group's (groups may differ: layer-wise decay,
        LoRA+, Muon's beside AdamW's in a chain); NaN for a tensor no group holds."""
        groups = [g for g in optimizer.param_groups if "lr" in g]
        lr_of = {id(p): lr for g, lr in zip(groups, [float(g["lr"]) for g in groups]) for p in g["params"]}
        return np.array([lr_of.get(id(p), np.nan) for p in self.params], dtype=np.float32)

    def _record_gradient(self, scale: torch.Tensor | None) -> None:
        """Add the gradient's sketch and norms to this step's row (`scale`: a GradScaler's, still on the gradients)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self._all_grads = all(p.grad is not None for p in self.params)  # Adam skips parameters without one
        self._warn_if_unfrozen()
        row = self._row
        if "grad" in self.cfg.quantities:
            row["grad"], layer_grad = self.sketch.apply_with_norms(grads, scratch=self._flat)
        else:
            layer_grad = tensor_norms(grads)
        if scale is not None:  # sketch and norms are linear in g: unscale them instead of g
            layer_grad.div_(scale)
            if "grad" in row:
                row["grad"].div_(scale)
        grad_norm = layer_grad.norm()
        nonfinite = ~torch.isfinite(grad_norm)  # a NaN or Inf anywhere makes the norm non-finite
        row.update(nonfinite=nonfinite, layer_grad_norm=layer_grad, grad_norm=grad_norm)

    def _make_theta(self) -> None:
        """The buffer for θ_t before the step, in θ's precision (Δθ ≪ θ: a float64 θ snapshotted in float32 would
        leave only θ's rounding in θ_{t+1} − θ_t)."""
        wide = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self._theta = torch.empty(self.layout.size, device=self._flat.device, dtype=wide)
        self._theta_views = [v.view(s) for v, s in zip(self._theta.split(self._numels), self.layout.shapes)]
        self._theta_for = self.params[0].dtype

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._first_step_logged is None:
            self._first_step_logged = self._loss_count > 0
        if self._skipped:
            self._loss_count, self._unclipped = 0, float("nan")  # a skipped step's loss is not the next step's
            return
        if self._loss_count:  # a step not recorded too (every n-th, a log schedule): its loss may be the last
            self._last_loss = (self._loss_sum, self._loss_count)
        if self._recording:
            if self._closure:  # the gradient the closure left: the one the step used (LBFGS: its last evaluation's)
                self._record_gradient(None)
            row = self._row
            row["loss"] = self._loss_sum / self._loss_count if self._loss_count else float("nan")
            row["grad_norm_unclipped"] = self._unclipped
            if "update" in self.cfg.quantities:  # Δθ_t = θ_{t+1} − θ_t, θ_t snapshotted in the pre-step hook
                row["update"], row["layer_update_norm"] = self.sketch.apply_difference_with_norms(self.params,
                                                                                                  self._theta)
            else:
                row["layer_update_norm"] = torch.full((len(self._numels),), float("nan"), device=self._flat.device)
            if "adam_m" in self.cfg.quantities:
                m = self._adam_moment("exp_avg", 0.0)
                if m is None and any(self._state(p) or p.grad is not None for p in self.params):  # a step taken
                    names = ", ".join(type(o).__name__ for o in self._holders)
                    raise ValueError(f"capture.quantities has adam_m, but {names} keeps no exp_avg in its state "
                                     "(optimizer.state): drop adam_m from capture.quantities")
                if m is None:  # no parameter has had a gradient to step on yet: m is still 0
                    m = [torch.zeros_like(p) for p in self.params]
                row["adam_m"] = self._sketch_m(m, row.get("grad"))
            v = self._adam_moment("exp_avg_sq", float("nan")) if self.step % self.cfg.v_stats_every == 0 else None
            if v is not None:  # v: an EMA over ≥ 50 steps, moves slowly
                row["layer_v_mean"] = tensor_norms(v, 1) / self._lengths  # v ≥ 0: L1 = sum
                row["layer_v_quantile"] = self._v_sample.quantiles(v)
            else:
                row.update(no_v_statistics(len(self._numels)))
            self.writer.append(row)  # device tensors: the writer copies them to the host a chunk at a time
        self._loss_count, self._unclipped = 0, float("nan")
        self.step += 1
        if self.cfg.probe_every and self.step % self.cfg.probe_every == 0 and self.step < self.total_steps:
            self.probe_once()

    def _warn_if_unfrozen(self) -> None:
        """Warn (once) when parameters frozen at attach have since been unfrozen: the layout, fixed at attach,
        leaves them out of every recorded quantity."""
        if self._unfrozen_warned:
            return
        trainable = sum(p.requires_grad for p in self._all_params)
        if trainable > len(self.params):
            self._unfrozen_warned = True
            warnings.warn(f"{trainable - len(self.params)} parameter tensors were unfrozen after attach: the recorded "
                          "layout, fixed when attach was called, leaves them out of grad, update and adam_m. To "
                          "record them, have them trainable as attach is called and freeze them after (recorded "
                          "with a zero gradient while frozen), or attach a new run when unfreezing",
                          UserWarning, stacklevel=caller_stacklevel())

    def _sketch_m(self, m: list[torch.Tensor], grad_sketch: torch.Tensor | None) -> torch.Tensor:
        """sketch(m_t): sketched directly, or, once known and while exact, as the EMA of the gradient sketches.

        By linearity sketch(m_t) = β1·sketch(m_{t−1}) + (1−β1)·sketch(g_t) when every step's gradient is recorded
        and Adam's m is an EMA of exactly that gradient (see `_m_follows_gradient`); this saves a flatten and a
        sketch per step and matches the direct sketch to float rounding.
        """
        if self._m_sketch is not None and grad_sketch is not None and self._all_grads:
            beta1 = self.optimizer.param_groups[0]["betas"][0]
            self._m_sketch = torch.lerp(self._m_sketch, grad_sketch, 1 - beta1)
            return self._m_sketch
        direct = self.sketch.apply_tensors(m, scratch=self._flat)
        if self._m_follows_gradient():
            self._m_sketch = direct
        return direct

    def _stored_m_sketch(self) -> torch.Tensor | None:
        """On resume, the sketch of m the run carried at its last recorded step, read back from the store, so the
        resumed run carries it on exactly as an uninterrupted one (float32 rows only: a narrower row is not the
        value the run carried, and m is then sketched directly once, equal to float rounding)."""
        group = self.writer.group
        if (self.step == 0 or "adam_m" not in self.cfg.quantities or self.cfg.dtype != "float32"
                or not self._m_follows_gradient() or group["step"].shape[0] == 0
                or int(group["step"][-1]) != self.step - 1):
            return None
        return torch.from_numpy(group["adam_m"][-1]).to(self._flat.device)

    def _m_follows_gradient(self) -> bool:
        """Whether Adam's m is an EMA of exactly the recorded gradients (every step recorded, every recorded
        parameter in the optimizer, one β1, no L2 weight decay folded into the gradient, no maximize, m kept in
        float32 or wider: a bf16 m is rounded each step). A fused step under GradScaler unscales inside, by the
        scale the recorded gradient is divided by, so fused optimizers qualify too."""
        groups = self.optimizer.param_groups
        held = {id(p) for g in groups for p in g["params"]}  # m is 0 for a parameter the optimizer does not hold
        return ("grad" in self.cfg.quantities and self.schedule.every_step
                and all(id(p) in held for p in self.params)
                and all(torch.finfo(p.dtype).bits >= 32 for p in self.params)
                and isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))
                and len({float(g["betas"][0]) for g in groups}) == 1
                and all(not g.get("maximize")
                        and (g.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW))
                             or not g.get("weight_decay")) for g in groups))

    def _adam_moment(self, key: str, unkept: float) -> list[torch.Tensor] | None:
        """Adam's moment `key` (exp_avg: m, exp_avg_sq: v) per parameter, from its group's state where the group has
        Adam's betas (zeros for a parameter that never had a gradient, hence no state), `unkept` for a parameter
        stepped without them (Muon's beside AdamW's in a chain, or held by no group); None where no group keeps it
        (SGD keeps neither, Adamax no v; an optimizer without Adam's betas neither, though it names a state so:
        Adafactor's exp_avg_sq is of its unfactored tensors only). A moment kept in another shape than its
        parameter's (GaLore's low-rank projection) counts as not kept (`unkept`), with a warning, once."""
        adam = {id(p) for o in self._holders for g in o.param_groups if "betas" in g for p in g["params"]}
        states = [self._state(p) if id(p) in adam else None for p in self.params]
        if not any(key in state for state in states if state):
            return None
        projected = sum(key in state and state[key].shape != p.shape for state, p in zip(states, self.params) if state)
        if projected and not self._projected_warned:
            self._projected_warned = True
            warnings.warn(f"{projected} of the model's {len(self.params)} trainable parameter tensors keep Adam's "
                          "moments in another shape than theirs (a low-rank projection: GaLore's, say): adam_m reads 0 "
                          "for them, and their v statistics NaN", UserWarning, stacklevel=caller_stacklevel())
        return [torch.full_like(p, unkept) if state is None or key in state and state[key].shape != p.shape
                else state[key] if key in state else torch.zeros_like(p) for state, p in zip(states, self.params)]

    def _state(self, param: torch.Tensor) -> Mapping:
        """The parameter's optimizer state in the optimizer that steps it, under torch's names ({} before its first
        step)."""
        return next((view(o.state[param]) for o, view in zip(self._holders, self._views) if param in o.state), {})

    # -- probes -----------------------------------------------------------------------------------------------
    def probe(self) -> None:
        """Probe gradient of every split under every probe loss at the current parameters, plus g/(√v̂+ε)."""
        self.writer.append(probe_row(self.model, self.params, self.probes, self.probe_losses, self.sketch,
                                     self._preconditioner(), self._flat, self.step))
        self._probed_at = self.step

    @uninterrupted  # a Trainer's final probe runs outside the step hooks: Ctrl-C there lost probe rows
    def probe_once(self) -> None:
        """Probe, unless there are no probes or this step has its probe already (one row per step)."""
        if self.probes and self._probed_at != self.step:
            self.probe()

    @torch.no_grad()
    def _preconditioner(self) -> torch.Tensor:
        """1/(√v̂+ε) per coordinate, each parameter by its own Adam state and its group's β2 and ε (ones where it
        has no state: before its first step, or under an optimizer that keeps no Adam v, no ε or no step count). v
        is AMSGrad's running maximum where the group steps with it, as the optimizer divides by that."""
        group_of = {id(p): g for o in self._holders for g in o.param_groups for p in g["params"]}
        out = torch.ones_like(self._flat)
        for p, part in zip(self.params, out.split(self._numels)):
            state, group = self._state(p), group_of.get(id(p), {})
            v = state.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
            step = state.get("step", group.get("step"))  # torch's keeps it per tensor, others per group
            if v is not None and v.shape == p.shape and step is not None and "betas" in group and "eps" in group:
                part.copy_(adam_preconditioner(v.reshape(-1).float(), float(step), group["betas"][1], group["eps"]))
        return out

    def close(self, final_probe: bool = True) -> None:
        """Take the final probe (unless this step has one), write every buffered row and detach the hooks (once:
        closing again does nothing)."""
        if self.closed:
            return
        if self._loss_count and self._first_step_logged is False:
            warnings.warn("the first optimizer step had no loss and the last loss given to rec.log no step: the loop "
                          "seems to call rec.log after optimizer.step(), so each loss is recorded with the step after "
                          "its own; call rec.log(loss) before optimizer.step()", UserWarning, stacklevel=2)
        if self._loss_count and self._first_step_logged is None and final_probe:  # closed, not failed
            warnings.warn(f"rec.log was given {self._loss_count} losses, but no step of the "
                          f"{type(self.optimizer).__name__} attached ran since attach: nothing was recorded. Attach "
                          "the optimizer whose step() the loop calls", UserWarning, stacklevel=caller_stacklevel())
        if final_probe and self.step > 0:
            self.probe_once()
        self.writer.flush()
        self._unhook()

    @property
    def last_loss(self) -> float | None:
        """The loss of the last step taken that the loop gave one for (`log`) since attach, recorded or not (every
        n-th step recorded, say); None where none was given."""
        return None if self._last_loss is None else float(self._last_loss[0]) / self._last_loss[1]

    def _unhook(self) -> None:
        """Remove the optimizer hooks: nothing more is recorded."""
        for h in self._hooks:
            h.remove()
        _OPEN.get(self.optimizer, set()).discard(self)
        self.closed = True


def open_recorders(optimizer: torch.optim.Optimizer) -> list[Recorder]:
    """The Recorders hooked on `optimizer` and not yet closed (one left by a notebook cell that raised, say)."""
    return list(_OPEN.get(unwrap_optimizer(optimizer), ()))


_NOT_THE_CALLERS = ("gradtrace", "torch", "transformers", "accelerate")  # packages between a warning and its cause


def caller_stacklevel() -> int:
    """The `stacklevel` that points a warning at the user's line (`optimizer.step()` for one raised in a step hook,
    `attach(...)` for one at attach, `trainer.train()` under the Trainer): the first caller outside gradtrace, torch,
    transformers and accelerate, however many of their frames lie between."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _NOT_THE_CALLERS:
        frame, level = frame.f_back, level + 1
    return level


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameters train: DDP, DataParallel and DeepSpeed's engine hold it as `.module`, Lightning
    Fabric's `setup` as `._forward_module`, `torch.compile` as `._orig_mod` (whose prefixes would change the layout's
    names and hash)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel,
                *_classes_imported("deepspeed", "DeepSpeedEngine"))
    fabric = (*_classes_imported("lightning.fabric.wrappers", "_FabricModule"),
              *_classes_imported("lightning_fabric.wrappers", "_FabricModule"))  # lightning's, or the package alone
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(model, fabric):
            model = model._forward_module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _classes_imported(module: str, name: str) -> tuple[type, ...]:
    """(module.name,) where that module is imported by now and holds a class of that name, else (): a library
    gradtrace does not depend on, whose objects cannot exist before it is imported."""
    found = getattr(sys.modules.get(module), name, None)
    return (found,) if isinstance(found, type) else ()


def check_recordable(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: CaptureConfig,
                     probes: list[Probe], probe_losses: dict[str, Callable] | list[str] | str | None) -> None:
    """Refuse, from the arguments alone, what a Recorder cannot record. `attach` calls it before anything is written
    and on every rank of a distributed run, so that all refuse alike (none trains on, to wait in a collective for
    the one that refused). Refused: a model sharded by FSDP or with nothing to train; an optimizer whose steps or
    Adam moments cannot be recorded (`check_optimizer`); probes of one split twice or of tokens outside the model's
    vocabulary; probe losses that are none, unknown names or no functions."""
    model = unwrap_model(model)
    _check_unsharded(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True): there is nothing to record")
    check_optimizer(optimizer, params, "adam_m" in cfg.quantities)
    splits = [p.split for p in probes]
    repeated = sorted({s for s in splits if splits.count(s) > 1})
    if repeated:
        raise ValueError(f"probes {repeated} are given more than once: each names one split of the probe arrays")
    _check_probe_tokens(model, probes)
    if probes:
        _check_probe_losses(_probe_losses_by_name(cfg, probe_losses))


def _probe_losses_by_name(cfg: CaptureConfig, probe_losses: dict[str, Callable] | list[str] | str | None) -> dict:
    """The probe losses as {name: function}: a mapping as given, else gradtrace.tasks.PROBE_LOSSES' of the names
    given (by default `cfg.probe_losses`, as attach gives)."""
    if probe_losses is not None and not isinstance(probe_losses, (str, list, tuple)):
        return probe_losses
    from gradtrace.tasks import probe_loss_functions

    names = cfg.probe_losses if probe_losses is None else probe_losses
    return probe_loss_functions([names] if isinstance(names, str) else list(names))


def _check_unsharded(model: torch.nn.Module) -> None:
    """Refuse a model sharded by FSDP: each rank holds a shard of every parameter, gradient and Adam moment, which
    the Recorder recorded as the whole vector (FSDP1: rank 0's shard under a layout of shards) or failed on in the
    first step's hooks (FSDP2's DTensors)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):  # sharding needs a process group
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    params = list(model.parameters())
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()) or any(
            getattr(p, "_is_flat_param", False) for p in params):  # FSDP1's FlatParameter, wrapper or not
        how, gather = "FSDP (FullyShardedDataParallel)", "FullyShardedDataParallel.summon_full_params(with_grads=True)"
    # DTensors, known by what they have: torch 2.4 keeps their class in a private module
    elif any(hasattr(p, "placements") and hasattr(p, "to_local") for p in params):
        how, gather = "FSDP2 (fully_shard) or another DTensor sharding", "p.grad.full_tensor()"
    else:
        return
    raise ValueError(f"the model is sharded by {how}: each rank holds only a shard of every parameter and gradient, "
                     "and gradtrace records whole ones (attach works in one process and under DDP, accelerate's and "
                     "the Trainer's multi-process launches included). Under FSDP, sketch in a loop of your own: each "
                     "rank's gradient shard at its offset in the unsharded model's ParamLayout with "
                     "gradtrace.capture.sketch_sharded (which sums the ranks' sketches), or the gradient gathered "
                     f"whole ({gather})")


def declare_arrays(writer: RunWriter, cfg: CaptureConfig, k: int, n_tensors: int, n_splits: int,
                   n_probe_losses: int) -> None:
    """Declare every array a Recorder with `cfg` writes (storage/README.md): scalars, sketches, per-tensor
    statistics and, with splits to probe, the probe arrays."""
    for name in ("loss", "lr", "grad_norm", "grad_norm_unclipped"):
        writer.declare(name, (), "float32")
    writer.declare("step", (), "int64")
    writer.declare("nonfinite", (), "bool")
    for q in cfg.quantities:
        writer.declare(q, (k,), storage=cfg.dtype, dims=("sketch",))
    for name in ("layer_grad_norm", "layer_update_norm", "layer_v_mean", "layer_lr"):
        writer.declare(name, (n_tensors,), "float32", dims=("param",))
    writer.declare("layer_v_quantile", (n_tensors, len(V_QUANTILES)), "float32", dims=("param", "quantile"))
    if n_splits:
        every = cfg.probe_every or cfg.chunk  # 0: probes at the first and last steps only
        writer.declare("probe/step", (), "int64", every=every)
        writer.declare("probe/loss", (n_splits, n_probe_losses), "float32", dims=("split", "probe_loss"), every=every)
        writer.declare("probe/accuracy", (n_splits,), "float32", dims=("split",), every=every)
        for name in ("probe/grad", "probe/grad_adam"):
            writer.declare(name, (n_splits, n_probe_losses, k), storage=cfg.dtype,
                           dims=("split", "probe_loss", "sketch"), every=every)


CAPTURE_ATTRS = ("sketch", "layout", "grad_point", "quantities", "v_quantiles", "v_stats_every", "splits",
                 "probe_losses", "adam")  # the keys of `capture_attrs`


def capture_attrs(sketch, layout: ParamLayout, cfg: CaptureConfig, splits: list[str], probe_losses: list[str],
                  adam: dict) -> dict:
    """The run attributes that describe what a Recorder writes (`sketch` None where it sketches nothing)."""
    return {"sketch": sketch.spec() if cfg.quantities or splits else None, "layout": layout.to_json(),
            "grad_point": "after_clip",
            "quantities": list(cfg.quantities), "v_quantiles": list(V_QUANTILES), "v_stats_every": cfg.v_stats_every,
            "splits": splits, "probe_losses": probe_losses, "adam": adam}


def no_v_statistics(n_tensors: int) -> dict[str, np.ndarray]:
    """The per-tensor v statistics of a row between `v_stats_every` steps: NaN."""
    return {"layer_v_mean": np.full(n_tensors, np.nan, dtype=np.float32),
            "layer_v_quantile": np.full((n_tensors, len(V_QUANTILES)), np.nan, dtype=np.float32)}


def adam_preconditioner(v: torch.Tensor, step: float, beta2: float, eps: float) -> torch.Tensor:
    """1/(√v̂+ε) of Adam's flat second moment v after `step` steps (v̂ bias-corrected)."""
    return (v / (1 - beta2 ** step)).sqrt_().add_(eps).reciprocal_()


def probe_row(model: torch.nn.Module, params: list[torch.Tensor], probes: list[Probe],
              probe_losses: dict[str, Callable], sketch, precond: torch.Tensor, flat: torch.Tensor,
              step: int) -> dict[str, np.ndarray | int]:
    """One row of the probe arrays: each split's probe loss, accuracy, and sketched gradient g and g·precond
    under every probe loss, at the model's current parameters (`flat` is a P-sized scratch buffer)."""
    from gradtrace.evaluate import evaluating
    from gradtrace.tasks.losses import exact_match

    S, Lp, k = len(probes), len(probe_losses), sketch.dim
    grads, adam = torch.empty(S, Lp, k), torch.empty(S, Lp, k)
    losses, accuracy = torch.empty(S, Lp), torch.empty(S)
    with evaluating(model):
        for i, probe in enumerate(probes):
            with torch.enable_grad():
                logits = model(input_ids=probe.tokens).logits
                for j, loss_fn in enumerate(probe_losses.values()):
                    loss = loss_fn(logits, probe.tokens, probe.mask)
                    flatten_into(_gradients(loss, params, retain_graph=j < Lp - 1), flat)
                    grads[i, j] = sketch.apply(flat).cpu()
                    adam[i, j] = sketch.apply(flat * precond).cpu()
                    losses[i, j] = loss.detach()
            accuracy[i] = exact_match(logits.detach(), probe.tokens, probe.mask).float().mean()
    return {"probe/step": step, "probe/loss": losses.numpy(), "probe/accuracy": accuracy.numpy(),
            "probe/grad": grads.numpy(), "probe/grad_adam": adam.numpy()}


def _gradients(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool) -> list[torch.Tensor]:
    """d loss / d params, zeros for a tensor the loss does not reach or that no longer requires grad (frozen after
    attach: zeros, as its training gradient is recorded; autograd refuses to differentiate it)."""
    live = [p for p in params if p.requires_grad]
    got = iter(torch.autograd.grad(loss, live, retain_graph=retain_graph, allow_unused=True) if live else ())
    grads = [next(got) if p.requires_grad else None for p in params]
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


class VSample:
    """Per-tensor quantiles from a fixed seeded sample: every coordinate of a tensor with at most `size` of them,
    else `size` drawn at random (with replacement). Interpolates like `torch.quantile`."""

    def __init__(self, layout: ParamLayout, size: int, qs: tuple[float, ...], seed: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.picks = [None if n <= size else torch.randint(0, n, (size,), generator=gen).sort().values.to(device)
                      for n in layout.numels]  # None: the whole tensor
        counts = torch.tensor([min(n, size) for n in layout.numels])
        starts = counts.cumsum(0) - counts
        self.bounds = list(zip(starts.tolist(), (starts + counts).tolist()))
        pos = torch.tensor(qs, dtype=torch.float64) * (counts - 1).unsqueeze(1)  # (tensors, quantiles), in-segment
        self.lo = (starts.unsqueeze(1) + pos.floor().long()).to(device)
        self.hi = (starts.unsqueeze(1) + pos.ceil().long()).to(device)
        self.frac = (pos - pos.floor()).float().to(device)
        self.last = (starts + counts - 1).to(device)

    def sample(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The sampled coordinates of parameter-shaped tensors, concatenated tensor by tensor."""
        return torch.cat([t.reshape(-1) if i is None else t.reshape(-1).index_select(0, i)
                          for t, i in zip(tensors, self.picks)])

    def quantiles(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(tensors, quantiles) of the sampled coordinates in float32 (as stored, whatever v's dtype: numpy sorts
        no bf16); NaN where a tensor's sample holds a NaN."""
        x = self.sample(tensors).float()
        if x.device.type == "cpu":  # numpy's SIMD sort: ~40x torch.sort on one CPU thread
            values = x.numpy()
            for a, b in self.bounds:
                values[a:b].sort()
        else:
            for a, b in self.bounds:
                x[a:b] = x[a:b].sort().values
        out = torch.lerp(x[self.lo], x[self.hi], self.frac)
        return out.masked_fill_(x[self.last].isnan().unsqueeze(1), float("nan"))  # NaN sorts last
