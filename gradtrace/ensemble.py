"""Ensembles: E runs of one small model trained together in one process (torch.func vmap over stacked parameters).

Members may differ in init seed, data-order seed, learning rate and weight decay, and in nothing else. Each
follows the recipe of `gradtrace.train.train` step for step — the same init, batches, answer-only loss,
global-norm clipping per member, AdamW update and lr schedule — so a member's parameters equal those of a
standalone run of its config to float tolerance, and its run group holds what a standalone run with
`capture.enabled=false` writes: the scalars every 10th step (`step`, `loss`, `lr`, `grad_norm`,
`grad_norm_unclipped`, `nonfinite`, `layer_*`), `evals/*` when `train.eval_every` is set, `eval/correct`,
`accuracy`, `seeds`, `hparams`, `steps` — and, with `capture.enabled`, what its Recorder writes: sketches of g, Δθ
and Adam's m on the capture schedule, per-tensor update norms, probe gradients every `capture.probe_every` steps,
initial and final weights.
`wall_time_s` is the ensemble's wall time divided by E (attribute `wall_time_note` says so).

Use eager attention (the embedded models' default): CPU sdpa has no vmap batching rule, so torch loops over the
members inside attention (and warns). Every `train.checkpoint_every` steps the rows recorded so far are made
durable and the stacked parameters and Adam moments are checkpointed (safetensors + JSON): a killed ensemble
re-run with `resume=True` skips complete members and continues the others from their last checkpoint, with no
duplicate or missing row. Not done here: mixed precision (fp32 only).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from gradtrace import checkpoint, kernels, store
from gradtrace.capture.recorder import (V_QUANTILES, V_SAMPLE, Probe, Schedule, VSample, adam_preconditioner,
                                        capture_attrs, declare_arrays, no_v_statistics, probe_row)
from gradtrace.capture.sketch import ParamLayout, make_sketch
from gradtrace.config import CaptureConfig, Config, TrainConfig, check_ensemble_precision, checked, dotted
from gradtrace.evaluate import accuracy, correctness, train_accuracy
from gradtrace.models import build_model, start_attrs
from gradtrace.tasks import answer_cross_entropy, probe_loss_functions, task_for
from gradtrace.tasks.packing import stack
from gradtrace.train import (RunResult, callers_torch_state, check_packing, check_resumes_its_config, check_same_items,
                             declare_evals, finished_result, lr_lambda, record_resumed_arithmetic, recorded_capture,
                             resolve_device, seeds, use_threads)

MAY_DIFFER = ("train.lr", "train.weight_decay", "train.seed", "train.init_seed", "train.data_seed")
WALL_TIME_NOTE = "wall time of the whole ensemble (training and evaluation) divided by its number of members"


class StackedAdamW:
    """torch.optim.AdamW's update rule on E members' flat parameters (E, P), with per-member lr and weight decay.

    Learning rates and weight decays are best given in float64: the factors are formed in float64 and then cast,
    as torch does with Python floats, so each member's update matches AdamW's bit for bit.
    """

    def __init__(self, params: torch.Tensor, weight_decay: torch.Tensor, betas: tuple[float, float],
                 eps: float) -> None:
        self.params, self.weight_decay = params, weight_decay.reshape(-1, 1).double()
        self.betas, self.eps = betas, eps
        self.exp_avg = torch.zeros_like(params)
        self.exp_avg_sq = torch.zeros_like(params)
        self.steps = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor, lr: torch.Tensor) -> None:
        """Apply one step given each member's gradient (E, P) and learning rate (E,), as AdamW does per tensor."""
        beta1, beta2 = self.betas
        self.steps += 1
        lr = lr.reshape(-1, 1).double()
        self.params.mul_((1 - lr * self.weight_decay).to(self.params.dtype))
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = (lr / (1 - beta1 ** self.steps)).to(self.params.dtype)
        denom = (self.exp_avg_sq.sqrt() / (1 - beta2 ** self.steps) ** 0.5).add_(self.eps)
        self.params.sub_(self.exp_avg * step_size / denom)


def check_members(cfgs: list[Config]) -> None:
    """Raise unless the configs differ only in seeds, lr and weight decay, and train in fp32."""
    if not cfgs:
        raise ValueError("an ensemble needs at least one member config")
    first = _dotted(cfgs[0])
    differing = sorted({k for cfg in cfgs[1:] for k, v in _dotted(cfg).items()
                        if v != first[k] and k not in MAY_DIFFER})
    if differing:
        raise ValueError(f"ensemble members may differ only in {', '.join(MAY_DIFFER)}; these configs also "
                         f"differ in {', '.join(differing)}. Group runs that share those keys, or train standalone.")
    for cfg in cfgs:  # what torch's AdamW refuses in a standalone run (betas, eps out of range), refused here too
        c = cfg.train
        torch.optim.AdamW([torch.empty(0)], lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay)
    check_ensemble_precision(cfgs[0].train.precision, resolve_device(cfgs[0].train.device).type)


def _dotted(cfg: Config) -> dict:
    """The config's training-relevant keys (model, task, train, capture) as a flat dotted dict."""
    return {k: v for k, v in dotted(cfg).items() if k.split(".")[0] in ("model", "task", "train", "capture")}


def train_ensemble(cfgs: list[Config], exp_dir: str | Path, run_ids: list[str], roles: list[str] | None = None,
                   resume: bool = False, progress: bool = False,
                   on_step: Callable[[int, int, int], None] | None = None) -> list[RunResult]:
    """Train one run per config into `exp_dir/store.zarr/<run_id>` as one vectorised ensemble; returns results.
    `on_step(steps done, steps in all, members training)` is called after each training step (a sweep's bar counts
    them; members a resume finds complete are not trained)."""
    cfgs = [checked(cfg) for cfg in cfgs]
    check_members(cfgs)
    roles = roles or ["sweep"] * len(cfgs)
    if not len(cfgs) == len(run_ids) == len(roles) or len(set(run_ids)) != len(run_ids):
        raise ValueError(f"need one distinct run id and one role per config: got {len(cfgs)} configs, "
                         f"run ids {run_ids}, roles {roles}")
    with store.run_lock(Path(exp_dir), run_ids), callers_torch_state(cfgs[0].train.device):
        return _train_ensemble_locked(cfgs, Path(exp_dir), run_ids, roles, resume, progress, on_step)


def _train_ensemble_locked(cfgs: list[Config], exp_dir: Path, run_ids: list[str], roles: list[str], resume: bool,
                           progress: bool, on_step: Callable[[int, int, int], None] | None) -> list[RunResult]:
    """`train_ensemble` with every member's lock held."""
    t = cfgs[0].train
    use_threads(t.threads)
    root = store.open_experiment(exp_dir / "store.zarr", mode="a")
    for cfg, run_id in zip(cfgs, run_ids):
        # as `train`: its rows so far, or its results, are of the config it began with (a group that a full disk or a
        # kill left without attributes, as gradtrace wrote them after the group before, holds neither)
        if resume and run_id in root and "config" in root[run_id].attrs:
            check_resumes_its_config(root[run_id], cfg, run_id)
    done = {i: finished_result(root[r], r, roles[i], seeds(cfgs[i].train), _hparams(cfgs[i]))
            for i, r in enumerate(run_ids) if resume and r in root and root[r].attrs.get("status") == "complete"}
    together = all(r in root and root[r].attrs.get("ensemble", {}).get("members") == run_ids for r in run_ids)
    if done and len(done) < len(run_ids) and together:
        done = {}  # killed between members' statuses: all train on as this ensemble (a smaller one rounds differently),
        # from its checkpoint, or from the start where it had none (the complete members' groups come out the same)
    if len(done) == len(run_ids):
        checkpoint.remove(_checkpoint_root(exp_dir, run_ids))  # left by a kill between the statuses and its removal
    todo = [i for i in range(len(cfgs)) if i not in done]
    if todo:
        trained = _train([cfgs[i] for i in todo], exp_dir, root, [run_ids[i] for i in todo],
                         [roles[i] for i in todo], resume, progress, on_step)
        done.update(zip(todo, trained))
    return [done[i] for i in range(len(cfgs))]


def _hparams(cfg: Config) -> dict[str, float]:
    """The hyper-parameters a run reports (as `train.train` does)."""
    return {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}


def _train(cfgs: list[Config], exp_dir: Path, root: zarr.Group, run_ids: list[str], roles: list[str],
           overwrite: bool, progress: bool, on_step: Callable[[int, int, int], None] | None) -> list[RunResult]:
    """The training loop of `train.train`, vectorised over members; writes each member's run group."""
    cfg, t, E = cfgs[0], cfgs[0].train, len(cfgs)
    device = resolve_device(t.device)
    kernels.use(t.cpu_kernels, device)
    task = task_for(cfg.task, cfg.model)
    run_seeds = [seeds(c.train) for c in cfgs]
    vocab = task.tokenizer.vocab_size
    model = build_model(cfg.model, vocab, run_seeds[0]["init"]).to(device)  # the skeleton vmap calls; evaluates too
    model.train()
    check_packing(model, t)
    layout = ParamLayout.of(model)
    # theta (E, P) holds member i's parameters in row i; params are its (E, *shape) views, updated in place
    theta = torch.stack([_flat_parameters(build_model(cfg.model, vocab, s["init"])) for s in run_seeds]).to(device)
    params = {name: theta[:, off:off + n].view(E, *shape).requires_grad_()
              for name, shape, off, n in zip(layout.names, layout.shapes, layout.offsets, layout.numels)}
    weight_decay = torch.tensor([c.train.weight_decay for c in cfgs], dtype=torch.float64, device=device)
    optimizer = StackedAdamW(theta, weight_decay, tuple(t.betas), t.eps)
    peak_lr = torch.tensor([c.train.lr for c in cfgs], dtype=torch.float64, device=device)
    schedule = lr_lambda(t)

    def member_loss(member_params: dict, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, member_params, (), {**inputs, "use_cache": False}).logits
        return answer_cross_entropy(logits, inputs["input_ids"], mask)
    ensemble_loss = vmap(member_loss)

    capture = _MemberRecorders(cfg.capture, layout, task, model, optimizer, t.steps, device)
    ckpt_root = _checkpoint_root(exp_dir, run_ids)
    start, elapsed = _restore(ckpt_root, run_ids, optimizer) if overwrite else (0, 0.0)
    if start:
        groups = [root[r] for r in run_ids]
        for g, r in zip(groups, run_ids):
            check_same_items(g, task, r)
            record_resumed_arithmetic(g, device, r, start)
        for g in groups:
            store.truncate_to(g, start)
            store.set_status(g, "running")
    else:
        shared = {**capture.attrs(t), "items_digest": task.items_digest, **kernels.attrs(device)}
        groups = [store.create_run(root, r, {"config": c.to_dict(), "role": role, "seeds": s, "steps": t.steps,
                                             "steps_done": 0, "ensemble": {"members": run_ids, "index": i},
                                             **start_attrs(c.model), **shared}, overwrite=overwrite)
                  for i, (c, r, role, s) in enumerate(zip(cfgs, run_ids, roles, run_seeds))]
    writers = [store.RunWriter(g, cfg.capture.chunk, thread=cfg.capture.use_writer_thread(device)) for g in groups]
    began = time.perf_counter() - elapsed
    try:  # from here a failure marks every member failed, set-up included (a full disk as the weights are saved)
        for w in writers:
            capture.declare(w)
            declare_evals(w, task, t.eval_every)
        weights = [exp_dir / "weights" / r for r in run_ids] if cfg.capture.enabled and cfg.capture.save_weights else []
        for i, path in enumerate(weights if not start else []):
            _load_member(model, params, i)
            checkpoint.save_weights(model, path / "initial.safetensors")
        if not start:
            capture.probe(writers, params, step=0)
        for step in tqdm(range(start, t.steps), desc=f"ensemble of {E}", disable=not progress, initial=start,
                         total=t.steps, leave=False, mininterval=2):
            batch = stack(task.train_batches(step, [s["data"] for s in run_seeds], t.batch_size, device, t.pack))
            losses = ensemble_loss(params, batch.inputs(), batch.mask)
            grads = torch.autograd.grad(losses.sum(), list(params.values()))  # member i's loss reaches only its own
            grad = torch.cat([g.reshape(E, -1) for g in grads], dim=1)
            norm = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
            grad.mul_((t.clip / (norm + 1e-6)).clamp_(max=1.0))  # clip_grad_norm_, per member
            lr = peak_lr * schedule(step)
            recording = step in capture.schedule
            if recording:
                rows = capture.before_step(step, losses.detach(), lr, grad, norm.squeeze(1))
            optimizer.step(grad, lr)
            if recording:
                for w, row in zip(writers, capture.after_step(step, rows)):
                    w.append(row)
            if capture.probe_every and (step + 1) % capture.probe_every == 0 and step + 1 < t.steps:
                capture.probe(writers, params, step + 1)
            if t.eval_every and (step + 1) % t.eval_every == 0:
                for i, w in enumerate(writers):
                    _load_member(model, params, i)
                    w.append({"evals/step": step + 1, "evals/accuracy": np.array(
                        list(accuracy(correctness(model, task)).values()), dtype=np.float32)})
            done = step + 1
            if done % t.checkpoint_every == 0 and done < t.steps:  # rows, checkpoint, last durable step: in order
                for w in writers:
                    w.flush()
                checkpoint.save_tensors(ckpt_root, {"theta": theta, "exp_avg": optimizer.exp_avg,
                                                    "exp_avg_sq": optimizer.exp_avg_sq},
                                        {"members": run_ids, "steps_done": done, "adam_steps": optimizer.steps,
                                         "wall_time_s": time.perf_counter() - began})
                for w, g in zip(writers, groups):
                    w.checkpoint(done)
                    g.update_attributes({"steps_done": done})
            if on_step is not None:
                on_step(done, t.steps, E)
        if t.steps:
            capture.probe(writers, params, t.steps)
        correct, train_acc = [], []
        for i, w in enumerate(writers):
            _load_member(model, params, i)
            correct.append(correctness(model, task))
            train_acc.append(train_accuracy(model, task))
            w.close()
            store.write_correct(groups[i], correct[-1])
            if weights:
                checkpoint.save_weights(model, weights[i] / "final.safetensors")
    except BaseException as err:
        for w in writers:
            w.abort()
        for g in groups:
            store.set_failed(g, err)
        raise
    wall = (time.perf_counter() - began) / E
    results = []
    for i, g in enumerate(groups):
        acc = accuracy(correct[i])
        store.set_status(g, "complete", accuracy=acc, train_accuracy=train_acc[i], steps_done=t.steps,
                         last_durable_step=t.steps, wall_time_s=wall, wall_time_note=WALL_TIME_NOTE,
                         nonfinite_steps=store.nonfinite_steps(g), train_loss=store.train_loss_ends(g),
                         splits=task.splits, hparams=_hparams(cfgs[i]))
        results.append(RunResult(run_ids[i], roles[i], run_seeds[i], _hparams(cfgs[i]), acc, wall, t.steps,
                                 train_accuracy=train_acc[i]))
    checkpoint.remove(ckpt_root)  # only once every member is complete
    return results


def _checkpoint_root(exp_dir: Path, run_ids: list[str]) -> Path:
    """Where an ensemble of these members keeps its checkpoint."""
    return exp_dir / "checkpoints" / f"ensemble-{run_ids[0]}"


@torch.no_grad()
def _restore(ckpt_root: Path, run_ids: list[str], optimizer: StackedAdamW) -> tuple[int, float]:
    """Load the ensemble's last checkpoint into the stacked parameters and moments (when one exists for exactly
    these members); returns (steps done, wall seconds so far), (0, 0.0) without one."""
    found = checkpoint.checkpoint_dir(ckpt_root)
    if found is None:
        return 0, 0.0
    tensors, meta = checkpoint.load_tensors(found)
    if meta["members"] != run_ids:
        return 0, 0.0
    optimizer.params.copy_(tensors["theta"])
    optimizer.exp_avg.copy_(tensors["exp_avg"])
    optimizer.exp_avg_sq.copy_(tensors["exp_avg_sq"])
    optimizer.steps = int(meta["adam_steps"])
    return int(meta["steps_done"]), float(meta["wall_time_s"])


class _MemberRecorders:
    """What each member's Recorder would write (`train.recorded_capture`): gradient statistics and sketches of g
    before the step, of Δθ and Adam's m and per-tensor statistics of v after it, and probe gradients."""

    def __init__(self, capture: CaptureConfig, layout: ParamLayout, task, model: torch.nn.Module,
                 optimizer: StackedAdamW, steps: int, device: torch.device) -> None:
        self.cfg = recorded_capture(capture)
        self.layout, self.model, self.optimizer = layout, model, optimizer
        self.numels = layout.numels
        members = optimizer.params.shape[0]
        self.sketch = make_sketch(self.cfg.sketch, layout, self.cfg.dim, self.cfg.seed, device)
        self.schedule = Schedule(self.cfg.schedule, self.cfg.every, steps)
        self.probe_every = self.cfg.probe_every  # 0 when capture is disabled
        self.probes = [Probe(s, *task.probe_set(s).torch(device=device)) for s in task.splits] \
            if self.probe_every else []
        self.losses = probe_loss_functions(self.cfg.probe_losses) if self.probes else {}
        self.lengths = torch.tensor(self.numels, device=device).expand(members, -1)
        self.v_sample = VSample(layout, V_SAMPLE, V_QUANTILES, self.cfg.seed, device)  # the Recorder's
        self.flat = torch.empty(layout.size, device=device)
        self._theta_before: torch.Tensor | None = None

    def attrs(self, t: TrainConfig) -> dict:
        """The run attributes a standalone run's Recorder writes."""
        adam = {"beta1": t.betas[0], "beta2": t.betas[1], "eps": t.eps}
        return capture_attrs(self.sketch, self.layout, self.cfg, [p.split for p in self.probes], list(self.losses),
                             adam)

    def declare(self, writer: store.RunWriter) -> None:
        """Declare the Recorder's arrays in one member's run group."""
        declare_arrays(writer, self.cfg, self.sketch.dim, len(self.numels), len(self.probes), len(self.losses))

    def before_step(self, step: int, losses: torch.Tensor, lr: torch.Tensor, grad: torch.Tensor,
                    unclipped: torch.Tensor) -> list[dict]:
        """Each member's step, loss, lr, (clipped) gradient norms, norm before clipping and gradient sketch; θ kept
        for Δθ."""
        rows = []
        for i in range(grad.shape[0]):
            row = {"step": step, "loss": float(losses[i]), "lr": float(lr[i]),
                   "layer_lr": np.full(len(self.numels), float(lr[i]), dtype=np.float32),  # one group, as alone
                   "grad_norm_unclipped": float(unclipped[i])}
            if "grad" in self.cfg.quantities:  # sketch and per-tensor norms in one pass where the sketch allows
                sketch, norms = self.sketch.apply_with_norms(grad[i].split(self.numels))
                row["grad"] = sketch.numpy(force=True)
            else:
                norms = torch.stack([g.norm() for g in grad[i].split(self.numels)])
            grad_norm = float(norms.norm())
            finite = math.isfinite(grad_norm)  # a NaN or Inf anywhere makes the norm non-finite
            rows.append({**row, "nonfinite": not finite, "layer_grad_norm": norms.numpy(force=True),
                         "grad_norm": grad_norm})
        if "update" in self.cfg.quantities:
            self._theta_before = self.optimizer.params.clone()
        return rows

    def after_step(self, step: int, rows: list[dict]) -> list[dict]:
        """The rows completed with Δθ and m sketches, update norms and (every v_stats_every steps) v statistics."""
        L, v = len(self.numels), self.optimizer.exp_avg_sq
        if step % self.cfg.v_stats_every == 0:
            v_mean = torch.segment_reduce(v, "mean", lengths=self.lengths, axis=1)  # (E, L)
            v_stats = [{"layer_v_mean": v_mean[i].numpy(force=True),
                        "layer_v_quantile": self.v_sample.quantiles(v[i].split(self.numels)).numpy(force=True)}
                       for i in range(len(rows))]
        else:
            v_stats = [no_v_statistics(L)] * len(rows)
        before, self._theta_before = self._theta_before, None
        for i, row in enumerate(rows):
            row.update(v_stats[i])
            if before is None:
                row["layer_update_norm"] = np.full(L, np.nan, dtype=np.float32)
            else:  # Δθ_t = θ_{t+1} − θ_t, sketched with its per-tensor norms
                update, norms = self.sketch.apply_difference_with_norms(self.optimizer.params[i].split(self.numels),
                                                                         before[i])
                row["update"], row["layer_update_norm"] = update.numpy(force=True), norms.numpy(force=True)
            if "adam_m" in self.cfg.quantities:
                row["adam_m"] = self.sketch.apply(self.optimizer.exp_avg[i]).numpy(force=True)
        return rows

    def probe(self, writers: list[store.RunWriter], params: dict[str, torch.Tensor], step: int) -> None:
        """Each member's probe row at its current parameters (`step` optimizer steps done)."""
        if not self.probes:
            return
        opt = self.optimizer
        for i, w in enumerate(writers):
            _load_member(self.model, params, i)
            precond = (adam_preconditioner(opt.exp_avg_sq[i], opt.steps, opt.betas[1], opt.eps) if opt.steps
                       else torch.ones_like(self.flat))
            w.append(probe_row(self.model, list(self.model.parameters()), self.probes, self.losses, self.sketch,
                               precond, self.flat, step))


def _flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """A model's parameters concatenated in layout order (P,)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def _load_member(model: torch.nn.Module, params: dict[str, torch.Tensor], i: int) -> None:
    """Copy member i's parameters into `model` (for evaluation)."""
    for name, p in model.named_parameters():
        p.copy_(params[name][i])
