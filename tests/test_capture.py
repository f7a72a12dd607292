"""The Recorder: leaves training unchanged, records exactly what the optimizer used, sums to θ_T − θ_0."""
import gc
import threading

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from conftest import DEVICES, tiny_config
from gradtrace import store
from gradtrace.capture import Probe, Recorder, attach
from gradtrace.config import CaptureConfig
from gradtrace.models import build_model
from gradtrace.tasks import PROBE_LOSSES, ArithmeticTask, answer_cross_entropy, probe_loss_functions
from gradtrace.train import train


def plain_loop(task, steps, recorder_factory=None, bad_at=None, device="cpu", bad=float("nan")):
    """A user's training loop; the Recorder is the only difference (three lines). Returns the gradients the
    optimizer used, on the CPU."""
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    rec = recorder_factory(model, opt) if recorder_factory else None  # line 1
    used = []
    for step in range(steps):
        x, m = (t.to(device) for t in task.train_batch(step, 0, 16))
        loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        if bad_at == step:
            next(model.parameters()).grad[0] = bad
        used.append(torch.cat([p.grad.reshape(-1).cpu() for p in model.parameters()]))
        if rec:
            rec.log(loss)  # line 2
        opt.step()
    if rec:
        rec.close()  # line 3
    return model, opt, used


def train_a_few(model, opt, task, steps):
    """A plain loop over a model and optimizer set up by the test."""
    for step in range(steps):
        x, m = task.train_batch(step, 0, 16)
        opt.zero_grad()
        answer_cross_entropy(model(input_ids=x).logits, x, m).backward()
        opt.step()


@pytest.fixture
def task():
    return ArithmeticTask(tiny_config().task)


def recorder_into(tmp_path, task, cfg: CaptureConfig, steps):
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    group = store.create_run(root, "r", {})
    probes = [Probe(s, *task.probe_set(s).torch()) for s in task.splits]

    def factory(model, opt):
        return Recorder(model, opt, store.RunWriter(group, 8), cfg, steps, probes, PROBE_LOSSES)
    return group, factory


def test_capture_leaves_training_unchanged(tmp_path, task):
    _, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="countsketch", dim=64, probe_every=5), 12)
    with_capture, _, _ = plain_loop(task, 12, factory)
    without, _, _ = plain_loop(task, 12)
    for a, b in zip(with_capture.parameters(), without.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_recorded_gradient_is_the_clipped_gradient_the_optimizer_used(tmp_path, task, device):
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="identity", probe_every=4, v_stats_every=1), 6)
    model, opt, used = plain_loop(task, 6, factory, device=device)
    recorded = store.read(group, "grad")
    for t in range(6):
        np.testing.assert_allclose(recorded[t], used[t].numpy(), rtol=1e-6, atol=1e-9)
    assert (np.linalg.norm(recorded, axis=1) <= 0.5 + 1e-5).all()  # after clipping to 0.5
    m_final = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    np.testing.assert_allclose(store.read(group, "adam_m")[-1], m_final.cpu().numpy(), rtol=1e-6, atol=1e-10)
    v = [opt.state[p]["exp_avg_sq"] for p in model.parameters()]
    np.testing.assert_allclose(store.read(group, "layer_v_mean")[-1], [x.mean().item() for x in v], rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_probe_gradient_matches_a_recomputed_gradient(tmp_path, task, device):
    """Probes made from CPU tensors are moved to the model's device; the recomputed reference is on the CPU."""
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="identity", probe_every=100), 3)
    plain_loop(task, 3, factory, device=device)
    fresh = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0)
    fresh.eval()
    x, m = task.probe_set("carry").torch()
    loss = PROBE_LOSSES["margin"](fresh(input_ids=x).logits, x, m)
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(fresh.parameters()))])
    stored = store.read(group, "probe/grad")  # probe × split × loss × k; row 0 is at initialisation
    split, loss_index = task.splits.index("carry"), list(PROBE_LOSSES).index("margin")
    tolerance = {"rtol": 1e-5, "atol": 1e-8} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-6}  # other sum orders
    np.testing.assert_allclose(stored[0, split, loss_index], ref.numpy(), **tolerance)
    assert group["probe/step"][:].tolist() == [0, 3]


def test_probes_precondition_each_tensor_by_its_own_adam_state_and_group(tmp_path, task):
    """probe/grad_adam = g/(√v̂+ε), each tensor by its own v and step count and its param group's β2 and ε; a
    tensor the optimizer does not hold is left as g. Probing leaves every submodule in the mode the loop set."""
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="identity", probe_every=2), 3)
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": params[1:8], "betas": (0.9, 0.95), "eps": 1e-6},
                             {"params": params[8:], "betas": (0.8, 0.999), "eps": 1e-8}], lr=3e-3)  # not params[0]
    frozen_mode = model.gpt_neox.layers[0]
    frozen_mode.eval()  # a part the user keeps in eval mode while the rest trains
    with pytest.warns(UserWarning, match="holds 27 of the model's 28"):
        rec = factory(model, opt)
    train_a_few(model, opt, task, 3)
    rec.close()  # after probes at steps 0, 2 and 3
    assert model.training and not any(module.training for module in frozen_mode.modules())
    g, adam = store.read(group, "probe/grad")[-1], store.read(group, "probe/grad_adam")[-1]  # at step 3
    precond = [torch.ones(params[0].numel())]
    for settings in opt.param_groups:
        beta2, eps = settings["betas"][1], settings["eps"]
        for p in settings["params"]:
            v_hat = opt.state[p]["exp_avg_sq"].reshape(-1) / (1 - beta2 ** float(opt.state[p]["step"]))
            precond.append(1 / (v_hat.sqrt() + eps))
    np.testing.assert_allclose(adam, g * torch.cat(precond).numpy(), rtol=1e-5, atol=1e-12)


def test_sketched_m_is_zero_where_the_optimizer_holds_no_parameter(tmp_path, task):
    """An optimizer over some of the parameters that get gradients: m is 0 for the rest, not their gradients' EMA."""
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="identity", probe_every=0), 4)
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0)
    head = list(model.get_output_embeddings().parameters())
    opt = torch.optim.AdamW(head, lr=3e-3)  # fine-tunes the output layer; the rest still gets gradients
    with pytest.warns(UserWarning, match="update` is the change across its step"):
        rec = factory(model, opt)
    train_a_few(model, opt, task, 4)
    rec.close()
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) if p in opt.state else torch.zeros(p.numel())
                   for p in model.parameters()])
    np.testing.assert_allclose(store.read(group, "adam_m")[-1], m.numpy(), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_countsketch_rows_are_the_sketches_of_the_exact_rows(tmp_path, task, device):
    """Two Recorders on one optimizer: the CountSketch one (CPU kernels, one pass per tensor; on a GPU its sparse
    matrices) writes exactly the sketches and norms of what the identity one (generic torch path) records, step by
    step: the same map, by its seed, on either device."""
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    exact, sketched = store.create_run(root, "exact", {}), store.create_run(root, "sketched", {})
    recorders = []

    def factory(model, opt):
        for group, cfg in ((exact, CaptureConfig(sketch="identity", probe_every=0, v_stats_every=1)),
                           (sketched, CaptureConfig(sketch="countsketch", dim=96, probe_every=0, v_stats_every=1))):
            recorders.append(Recorder(model, opt, store.RunWriter(group, 8), cfg, 5))
        return recorders[-1]
    plain_loop(task, 5, factory, device=device)
    recorders[0].close()
    used = recorders[1].sketch
    sketch = type(used)(used.layout, used.dim, seed=used.seed)  # its map rebuilt on the CPU
    for q in ("grad", "update", "adam_m"):
        expected = torch.stack([sketch.apply_csr(torch.from_numpy(row)) for row in store.read(exact, q)])
        np.testing.assert_allclose(store.read(sketched, q), expected.numpy(), rtol=1e-5, atol=1e-7)
    for name in ("layer_grad_norm", "layer_update_norm", "grad_norm", "layer_v_mean"):
        np.testing.assert_allclose(sketched[name][:], exact[name][:], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_recorded_and_flagged(tmp_path, task, bad):
    """A NaN or an Inf in the gradient the optimizer takes (after clipping) flags its step (an Inf alone went
    unflagged by an isnan test) and, reaching the weights, every step after it."""
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="countsketch", dim=32, probe_every=0), 4)
    plain_loop(task, 4, factory, bad_at=2, bad=bad)
    assert group["nonfinite"][:].tolist() == [False, False, True, True]  # NaN reaches the weights at step 2


def test_identity_updates_sum_to_final_minus_initial_weights(tmp_path):
    cfg = tiny_config(capture__sketch="identity", train__steps=24)
    train(cfg, tmp_path, "r0", progress=False)
    initial = load_file(str(tmp_path / "weights/r0/initial.safetensors"))
    final = load_file(str(tmp_path / "weights/r0/final.safetensors"))
    group = zarr.open_group(tmp_path / "store.zarr")["r0"]
    layout = group.attrs["layout"]
    delta = np.concatenate([(final[e["name"]] - initial[e["name"]]).reshape(-1).numpy() for e in layout])
    np.testing.assert_allclose(store.read(group, "update").sum(0), delta, atol=2e-6)


def test_a_run_steps_with_linear_warm_up_then_cosine_decay_to_its_floor(tmp_path):
    """`gradtrace train`'s schedule, as the run records it (`lr`): (t + 1)/W of the peak over W warm-up steps, then
    min_lr_ratio + (1 − min_lr_ratio)·(1 + cos(π (t − W)/(T − W)))/2 of it. No test read the values: a first step at
    lr 0 (t/W) trained every run without a complaint."""
    cfg = tiny_config(train__steps=12, train__warmup=4, train__lr=2e-3, train__min_lr_ratio=0.1)
    train(cfg, tmp_path, "r0", progress=False)
    t = np.arange(12)
    decay = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (t - 4) / 8))
    np.testing.assert_allclose(store.read(zarr.open_group(tmp_path / "store.zarr")["r0"], "lr"),
                               2e-3 * np.where(t < 4, (t + 1) / 4, decay), rtol=1e-6)


def test_log_schedule_records_fewer_steps_densely_early(tmp_path, task):
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="countsketch", dim=16, schedule="log",
                                                                 every=4, probe_every=0), 40)
    plain_loop(task, 40, factory)
    steps = group["step"][:].tolist()
    assert steps[0] == 0 and len(steps) < 40 and steps == sorted(set(steps))
    assert np.diff(steps)[0] <= np.diff(steps)[-1]


def test_probes_without_probe_losses_take_the_configs(tmp_path, task):
    """As the module's example writes it: Recorder(..., probes=...) alone (it recorded probe arrays of no loss)."""
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    group = store.create_run(root, "r", {})
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0)
    cfg = CaptureConfig(sketch="countsketch", dim=16, probe_every=0)
    optimizer = torch.optim.AdamW(model.parameters())
    probes = [Probe("ID", *task.probe_set("ID").torch())]
    rec = Recorder(model, optimizer, store.RunWriter(group, 8), cfg, 1, probes=probes)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the probe at step 0
    rec.close()
    assert rec.attrs()["probe_losses"] == list(cfg.probe_losses)
    assert store.read(group, "probe/grad").shape == (2, 1, len(cfg.probe_losses), 16)  # steps 0 and the end
    unprobed = Recorder(model, optimizer, store.RunWriter(store.create_run(root, "q", {}), 8), cfg, 1,
                        probe_losses=probe_loss_functions(cfg.probe_losses))  # as `gradtrace train` at probe_every 0
    assert unprobed.attrs()["probe_losses"] == []  # labels of a probe_loss axis the run has not (it listed two)
    unprobed.close()


def test_v_statistics_every_n_steps_nan_between(tmp_path, task):
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="countsketch", dim=16, probe_every=0,
                                                                 v_stats_every=3), 7)
    model, opt, _ = plain_loop(task, 7, factory)
    v_mean, v_q = store.read(group, "layer_v_mean"), store.read(group, "layer_v_quantile")
    has = [bool(np.isfinite(row).all()) for row in v_mean]
    assert has == [True, False, False, True, False, False, True]
    assert [bool(np.isfinite(q).all()) for q in v_q] == has
    v = [opt.state[p]["exp_avg_sq"] for p in model.parameters()]
    np.testing.assert_allclose(v_mean[6], [x.mean().item() for x in v], rtol=1e-5)
    again = Recorder(model, opt, store.RunWriter(group, 8), CaptureConfig(sketch="countsketch", dim=16,
                                                                          v_stats_every=3), 7)
    assert again.attrs()["v_stats_every"] == 3


class NesterovRewritingGrad(torch.optim.Optimizer):
    """Momentum with Nesterov's look-ahead written into `p.grad` inside the step, as the widely copied Muon code
    does (`grad.lerp_(buf, momentum)`) before orthogonalising."""

    def __init__(self, params, lr=1e-2, momentum=0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                p.add_(p.grad.lerp_(buf, group["momentum"]), alpha=-group["lr"])


def test_the_gradient_is_read_before_an_optimizer_that_rewrites_it_in_its_step(tmp_path, task):
    """The recorded gradient is the loop's, read in the step's pre-hook: the hook's arguments begin with the
    optimizer itself, which was taken for a closure, so every gradient was read after the step, and one that the
    optimizer rewrites there (Nesterov momentum mixed in) was recorded as the gradient (0.7–0.8 off, relative)."""
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="identity", quantities=["grad", "update"],
                                                                 probe_every=0), 4)
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0)
    opt = NesterovRewritingGrad(model.parameters())
    rec, used = factory(model, opt), []
    for step in range(4):
        x, m = task.train_batch(step, 0, 16)
        opt.zero_grad()
        answer_cross_entropy(model(input_ids=x).logits, x, m).backward()
        used.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        opt.step()
    rec.close()
    np.testing.assert_allclose(store.read(group, "grad"), torch.stack(used).numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unscale_first", [False, True])
def test_fused_optimizer_under_grad_scaler_records_the_unscaled_gradient(tmp_path, task, unscale_first, device):
    """GradScaler hands a fused optimizer still-scaled gradients plus the scale (or, after the loop's own
    `scaler.unscale_`, unscaled ones); the Recorder divides by the scale where there is one, and a step the scaler
    skips (inf) is neither recorded nor counted, nor does it reach the carried sketch of m."""
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="identity", probe_every=0, v_stats_every=1), 5)
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    rec = factory(model, opt)
    used = []
    for step in range(6):
        x, m = (t.to(device) for t in task.train_batch(step, 0, 16))
        opt.zero_grad()
        scaler.scale(answer_cross_entropy(model(input_ids=x).logits, x, m)).backward()
        if step == 2:
            next(model.parameters()).grad[0] = float("inf")  # the scaler skips this step
        if unscale_first:
            scaler.unscale_(opt)  # as a loop that clips does
        if step != 2:
            scale = 1.0 if unscale_first else scaler.get_scale()
            used.append(torch.cat([p.grad.reshape(-1).cpu() / scale for p in model.parameters()]))
        scaler.step(opt)
        scaler.update()
    rec.close()
    assert group["step"][:].tolist() == [0, 1, 2, 3, 4]  # 5 optimizer steps ran; the skipped one is not counted
    recorded = store.read(group, "grad")
    for t in range(5):
        np.testing.assert_allclose(recorded[t], used[t].numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(group["grad_norm"][:], np.linalg.norm(np.stack([u.numpy() for u in used]), axis=1),
                               rtol=1e-5)
    m_final = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    atol = 1e-10 if device == "cpu" else 1e-9  # the fused CUDA kernel rounds m's update its own way
    np.testing.assert_allclose(store.read(group, "adam_m")[-1], m_final.cpu().numpy(), rtol=1e-5, atol=atol)


def test_the_norm_before_clipping_is_recorded_when_the_loop_gives_it(tmp_path, task):
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="countsketch", dim=16, probe_every=0), 6)
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec, before, losses = factory(model, opt), [], []
    for step in range(6):
        x, m = task.train_batch(step, 0, 16)
        loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
        opt.zero_grad()
        loss.backward()
        before.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()))  # recomputed
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        rec.log(loss, grad_norm=norm if step != 4 else None)  # step 4: a loop that gives none
        losses.append(loss.item())
        opt.step()
    rec.close()
    unclipped = group["grad_norm_unclipped"][:]
    np.testing.assert_allclose(unclipped[[0, 1, 2, 3, 5]], np.array(before)[[0, 1, 2, 3, 5]], rtol=1e-5)
    assert np.isnan(unclipped[4]) and (unclipped[[0, 1, 2, 3, 5]] > 0.1).all()
    np.testing.assert_allclose(group["grad_norm"][:], 0.1, rtol=1e-4)  # what the optimizer used: clipped


def test_a_step_the_scaler_skips_leaves_no_loss_to_the_next(tmp_path, task):
    """A fused optimizer is still called on a step the scaler skips (with found_inf set): what was logged for that
    step is dropped with it, not averaged into the next step's loss."""
    group, factory = recorder_into(tmp_path, task, CaptureConfig(sketch="countsketch", dim=16, probe_every=0), 3)
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    rec, logged = factory(model, opt), []
    for step in range(4):
        x, m = task.train_batch(step, 0, 16)
        loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step == 1:
            next(model.parameters()).grad[0] = float("inf")  # the scaler skips this step
        else:
            logged.append(loss.item())
        rec.log(loss, grad_norm=float("inf") if step == 1 else 1.0)
        scaler.step(opt)
        scaler.update()
    rec.close()
    assert group["step"][:].tolist() == [0, 1, 2]
    np.testing.assert_allclose(group["loss"][:], logged, rtol=1e-6)  # not the skipped step's averaged in
    assert group["grad_norm_unclipped"][:].tolist() == [1.0, 1.0, 1.0]  # nor its norm


def test_a_run_that_fails_while_setting_up_is_marked_failed(tmp_path, monkeypatch):
    import gradtrace.train

    def failing_recorder(*args, **kwargs):  # as a probe set the model cannot take would fail
        raise ValueError("the probes cannot be built")

    monkeypatch.setattr(gradtrace.train, "_recorder", failing_recorder)
    with pytest.raises(ValueError, match="the probes cannot be built"):
        train(tiny_config(), tmp_path, "r", progress=False)
    attrs = zarr.open_group(tmp_path / "store.zarr")["r"].attrs
    assert attrs["status"] == "failed" and "the probes cannot be built" in attrs["error"]


def _live_writers() -> tuple[int, list[str]]:
    """RunWriters still alive once garbage is collected, and the writer threads running."""
    gc.collect()
    return (sum(type(o) is store.RunWriter for o in gc.get_objects()),  # type(): isinstance warns of torch stubs
            [t.name for t in threading.enumerate() if t.name.startswith("gradtrace writer")])


@pytest.mark.parametrize("ensembled", [False, True])
def test_a_failed_run_leaves_no_writer_thread_behind(tmp_path, monkeypatch, ensembled):
    """A sweep's worker trains on after a failed run: each failure left the writer's thread blocked on its queue,
    holding the writer and its rows, for the life of the process."""
    import gradtrace.ensemble
    import gradtrace.train

    def failing_step(*args, **kwargs):  # a failure mid-run, rows buffered (a NaN guard, an OOM, a full disk)
        raise RuntimeError("boom at the first step")

    before = _live_writers()
    cfg = tiny_config(capture__writer_thread=True, train__steps=20)
    if ensembled:
        monkeypatch.setattr(gradtrace.ensemble.StackedAdamW, "step", failing_step)
        with pytest.raises(RuntimeError, match="boom"):
            gradtrace.ensemble.train_ensemble([cfg, cfg], tmp_path, ["e0", "e1"], progress=False)
    else:
        monkeypatch.setattr(gradtrace.train, "answer_cross_entropy", failing_step)
        with pytest.raises(RuntimeError, match="boom"):
            train(cfg, tmp_path, "r0", progress=False)
    assert _live_writers() == before


def test_a_writer_whose_thread_failed_stops_it_on_close(tmp_path, monkeypatch):
    root = store.open_experiment(tmp_path / "s.zarr", mode="a")
    writer = store.RunWriter(store.create_run(root, "r", {}), chunk=2, thread=True)
    writer.declare("x", (3,), "float32")
    monkeypatch.setattr(writer, "_write", lambda job: (_ for _ in ()).throw(OSError("disk full")))
    writer.append({"x": np.zeros(3)})
    with pytest.raises(RuntimeError, match="the store writer failed: disk full"):
        writer.close()
    assert not writer._thread.is_alive()


def test_train_writes_from_a_background_thread_when_asked(tmp_path):
    assert not CaptureConfig().use_writer_thread(torch.device("cpu"))
    assert CaptureConfig().use_writer_thread(torch.device("cuda"))
    cfg = tiny_config(capture__writer_thread=True, train__steps=20)
    assert cfg.capture.use_writer_thread(torch.device("cpu"))
    train(cfg, tmp_path, "r0", progress=False)
    group = zarr.open_group(tmp_path / "store.zarr")["r0"]
    assert group["step"][:].tolist() == list(range(20)) and group.attrs["status"] == "complete"


def test_probes_are_checked_when_made_not_at_the_first_step(tmp_path, task):
    """A mask of 0/1 integers, a mask of another shape or with no answer position, or a split probed twice failed
    inside the first optimizer step's hook (or gave NaN losses, or mixed two probe sets under one label)."""
    tokens, mask = task.probe_set("ID").torch()
    with pytest.raises(TypeError, match="probe 'ID': mask must be a bool tensor.*torch.int64"):
        Probe("ID", tokens, mask.long())
    with pytest.raises(ValueError, match="mask of the same shape"):
        Probe("ID", tokens, mask[:, 1:])
    with pytest.raises(ValueError, match="marks no answer position"):
        Probe("ID", tokens, torch.zeros_like(mask))
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0)
    group = store.create_run(store.open_experiment(tmp_path / "s.zarr", mode="a"), "r", {})
    with pytest.raises(ValueError, match=r"probes \['ood'\] are given more than once"):
        Recorder(model, torch.optim.AdamW(model.parameters()), store.RunWriter(group), CaptureConfig(dim=64), 10,
                 [Probe("ood", tokens, mask), Probe("ood", tokens, mask), Probe("ID", tokens, mask)], PROBE_LOSSES)
    # float tokens and token ids past the vocabulary failed in the first step's hook (the embedding's "index out of
    # range in self"); a split named by a number was written as one
    with pytest.raises(TypeError, match="probe 'ID': tokens must be integer token ids, got torch.float32"):
        Probe("ID", tokens.float(), mask)
    with pytest.raises(TypeError, match="probe split must be the split's name"):
        Probe(3, tokens, mask)
    for losses, error, words in (({}, ValueError, "must name at least one loss"),  # recorded nothing
                                 ({"ce": "ce"}, TypeError, r"probe_losses \['ce'\]: each must be a function")):
        with pytest.raises(error, match=words):  # a list of names raised AttributeError, a name not called in the hook
            Recorder(model, torch.optim.AdamW(model.parameters()), store.RunWriter(group), CaptureConfig(dim=64), 10,
                     [Probe("ID", tokens, mask)], losses)
    named = Recorder(model, torch.optim.AdamW(model.parameters()), store.RunWriter(group), CaptureConfig(dim=64), 10,
                     [Probe("ID", tokens, mask)], ["margin"])
    assert list(named.probe_losses) == ["margin"] and named.probe_losses["margin"] is PROBE_LOSSES["margin"]
    vocabulary, past = task.tokenizer.vocab_size, tokens.clone()
    past[0, 0] = vocabulary
    with pytest.raises(ValueError, match=f"probe 'ID': token ids from .* to {vocabulary}, outside the model's "
                                         f"vocabulary of {vocabulary}"):
        Recorder(model, torch.optim.AdamW(model.parameters()), store.RunWriter(group), CaptureConfig(dim=64), 10,
                 [Probe("ID", past, mask)], PROBE_LOSSES)


def test_rec_log_refuses_what_is_not_one_number_at_the_call(tmp_path):
    """Per-item losses (`reduction="none"`) given to rec.log failed a chunk later, as the row was written: "could not
    broadcast input array from shape (3,2) into shape (3,)"."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.Adam(model.parameters())
    rec = attach(model, optimizer, tmp_path, "r", total_steps=2)
    losses = model(torch.randn(2, 4)).pow(2).mean(dim=1)
    with pytest.raises(ValueError, match=r"rec.log: loss must be one number .* got a tensor of shape \(2,\)"):
        rec.log(losses)
    with pytest.raises(TypeError, match=r"rec.log: grad_norm must be one number .* got list \[1.0, 2.0\]"):
        rec.log(grad_norm=[1.0, 2.0])
    losses.mean().backward()
    rec.log(losses.mean().reshape(1), grad_norm=torch.tensor([3.0]))  # one element, in any shape
    optimizer.step()
    rec.close()
    group = zarr.open_group(tmp_path / "store.zarr" / "r", mode="r")
    assert group["loss"][0] == pytest.approx(losses.mean().item()) and group["grad_norm_unclipped"][0] == 3.0


def test_probe_tokens_of_int32_are_probed_as_int64(tmp_path, task):
    """int32 token ids (as some tokenizers return them) failed in the probe losses: "expected target dtype to be Long
    or Byte, but got Int"."""
    tokens, mask = task.probe_set("ID").torch()
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    rec = attach(model, optimizer, tmp_path, "r", total_steps=1,
                 probes=[Probe("ID", tokens, mask), Probe("int32", tokens.int(), mask)])
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()  # probed before it and after it (the final probe)
    rec.close()
    grads = store.read(tmp_path / "store.zarr" / "r", "probe/grad")
    assert grads.shape[:2] == (2, 2) and np.abs(grads).sum() > 0
    np.testing.assert_array_equal(grads[:, 0], grads[:, 1])


def test_capture_attrs_names_every_key_it_writes():
    """CAPTURE_ATTRS is what attach refuses among the caller's own attributes: it names what capture_attrs writes."""
    from gradtrace.capture.recorder import CAPTURE_ATTRS, capture_attrs
    from gradtrace.capture.sketch import ParamLayout, make_sketch

    layout = ParamLayout(("w",), ((3,),))
    written = capture_attrs(make_sketch("identity", layout, 3, 0), layout, CaptureConfig(), ["ID"], ["ce"], {})
    assert tuple(written) == CAPTURE_ATTRS
