"""Ensembles: every member trains exactly like a standalone run and lands in the store like one."""
import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

import gradtrace.ensemble as ensemble_module
import gradtrace.train as train_module
from conftest import tiny_config
from gradtrace.ensemble import WALL_TIME_NOTE, StackedAdamW, check_members, train_ensemble
from gradtrace.train import train

MEMBERS = {"a": {"train__init_seed": 1, "train__data_seed": 2, "train__lr": 2e-3, "train__weight_decay": 0.0},
           "b": {"train__init_seed": 3, "train__data_seed": 4, "train__lr": 1e-2, "train__weight_decay": 0.1},
           "c": {"train__init_seed": 5, "train__data_seed": 6, "train__lr": 1e-3, "train__weight_decay": 0.05}}
SCALARS = ["step", "loss", "lr", "layer_lr", "grad_norm", "grad_norm_unclipped", "nonfinite", "layer_grad_norm",
           "layer_update_norm", "layer_v_mean", "layer_v_quantile", "evals/step", "evals/accuracy"]


def member_config(**overrides):
    return tiny_config(**{"train__steps": 30, "train__eval_every": 15, "capture__enabled": False, **overrides})


def evaluated_parameters(monkeypatch, module) -> list[dict[str, torch.Tensor]]:
    """Spy on `module.correctness`: the parameters of every model it evaluates, in call order."""
    seen, real = [], module.correctness

    def spy(model, task, *args, **kwargs):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return real(model, task, *args, **kwargs)
    monkeypatch.setattr(module, "correctness", spy)
    return seen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The three members trained as one ensemble and standalone, with the parameters each finished with."""
    out = tmp_path_factory.mktemp("ensemble")
    cfgs = [member_config(**m) for m in MEMBERS.values()]
    with pytest.MonkeyPatch.context() as mp:
        seen = evaluated_parameters(mp, ensemble_module)
        results = train_ensemble(cfgs, out / "ensemble", list(MEMBERS), ["sweep"] * 3)
        ensemble_final = seen[-3:]  # one final evaluation per member, after those during training
    standalone, standalone_final = [], []
    for cfg, run_id in zip(cfgs, MEMBERS):
        with pytest.MonkeyPatch.context() as mp:
            seen = evaluated_parameters(mp, train_module)
            standalone.append(train(cfg, out / "standalone", run_id, role="sweep", progress=False))
            standalone_final.append(seen[-1])
    return {"out": out, "results": results, "standalone": standalone, "ensemble_final": ensemble_final,
            "standalone_final": standalone_final}


def test_members_end_with_the_parameters_of_standalone_runs(trained):
    for ens, solo in zip(trained["ensemble_final"], trained["standalone_final"]):
        assert ens.keys() == solo.keys()
        for name in ens:
            # The key bias has a gradient that is zero but for rounding (softmax ignores a per-query constant); Adam
            # turns that noise into updates, so any reordering of float sums moves it by up to ~1e-4 in 30 steps.
            atol = 1e-4 if name.endswith("query_key_value.bias") else 1e-5
            torch.testing.assert_close(ens[name], solo[name], atol=atol, rtol=0, msg=name)
    # the members really differ (seeds, lr, weight decay), so equality is not trivial
    a, b = trained["ensemble_final"][:2]
    assert not torch.allclose(*(torch.cat([p.flatten() for p in member.values()]) for member in (a, b)))


def test_members_are_stored_like_standalone_runs(trained):
    ens = zarr.open_group(trained["out"] / "ensemble" / "store.zarr", mode="r")
    solo = zarr.open_group(trained["out"] / "standalone" / "store.zarr", mode="r")
    for run_id, result, reference in zip(MEMBERS, trained["results"], trained["standalone"]):
        e, s = dict(ens[run_id].attrs), dict(solo[run_id].attrs)
        assert e["status"] == "complete" and e["wall_time_note"] == WALL_TIME_NOTE
        for key in ("accuracy", "train_accuracy", "seeds", "hparams", "steps", "steps_done", "role", "config", "splits",
                    "layout", "adam", "nonfinite_steps", "last_durable_step", "probe_losses", "sketch", "quantities"):
            assert e[key] == s[key], key
        assert result.accuracy == reference.accuracy and result.hparams == reference.hparams
        assert result.train_accuracy == reference.train_accuracy and result.train_accuracy.keys() == set(e["splits"])
        assert result.seeds == reference.seeds and result.row().keys() == reference.row().keys()
        np.testing.assert_array_equal(ens[run_id]["eval/correct"][:], solo[run_id]["eval/correct"][:])
        for name in SCALARS:
            a, b = ens[run_id][name], solo[run_id][name]
            assert a.shape == b.shape and a.metadata.dimension_names == b.metadata.dimension_names, name
            np.testing.assert_allclose(a[:], b[:], rtol=1e-4, atol=1e-6, err_msg=name)
        assert e["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
        assert e["train_loss"] == {"first": float(ens[run_id]["loss"][0]), "last": float(ens[run_id]["loss"][-1])}
    assert any(a > 0 for r in trained["results"] for a in r.accuracy.values())  # accuracies are not all zero


def test_stacked_adamw_matches_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    lr = torch.tensor([1e-3, 3e-3, 1e-2], dtype=torch.float64)
    wd = torch.tensor([0.0, 0.05, 0.1], dtype=torch.float64)
    start = torch.randn(3, 50, generator=gen)
    grads = [torch.randn(3, 50, generator=gen) for _ in range(20)]
    stacked = StackedAdamW(start.clone(), wd, (0.9, 0.98), 1e-8)
    for step, g in enumerate(grads):
        stacked.step(g, lr * (step + 1) / 20)
    for i in range(3):
        p = torch.nn.Parameter(start[i].clone())
        opt = torch.optim.AdamW([p], lr=lr[i].item(), betas=(0.9, 0.98), eps=1e-8, weight_decay=wd[i].item())
        for step, g in enumerate(grads):
            opt.param_groups[0]["lr"] = lr[i].item() * (step + 1) / 20
            p.grad = g[i].clone()
            opt.step()
        torch.testing.assert_close(stacked.params[i], p.detach(), atol=0, rtol=0)  # the same float operations


def test_members_must_share_everything_but_seeds_and_hparams():
    with pytest.raises(ValueError, match="model.name, train.steps"):
        check_members([member_config(), member_config(model__name="tiny", train__steps=10, train__lr=1e-3)])
    with pytest.raises(ValueError, match="one distinct run id"):
        train_ensemble([member_config()] * 2, "unused", ["x", "x"])
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.5"):  # as a standalone run is refused
        check_members([member_config(train__betas=[0.9, 1.5])] * 2)


CAPTURED = ["step", "loss", "lr", "layer_lr", "grad_norm", "grad_norm_unclipped", "grad", "update", "adam_m",
            "layer_grad_norm", "layer_update_norm", "layer_v_mean", "layer_v_quantile", "probe/step", "probe/loss",
            "probe/accuracy", "probe/grad", "probe/grad_adam"]


def test_captured_members_record_what_standalone_recorders_do(tmp_path):
    """With capture enabled, each member's run group holds what a standalone run's Recorder writes: sketches of
    g, Δθ and m, per-tensor statistics, probe gradients and initial/final weights."""
    capture = {"capture__enabled": True, "capture__dim": 64, "capture__probe_every": 5, "capture__v_stats_every": 2,
               "train__steps": 12, "train__eval_every": 0}
    cfgs = [member_config(**capture, **m) for m in list(MEMBERS.values())[:2]]
    train_ensemble(cfgs, tmp_path / "ensemble", ["a", "b"])
    for cfg, run_id in zip(cfgs, "ab"):
        train(cfg, tmp_path / "standalone", run_id, role="sweep", progress=False)
    ens = zarr.open_group(tmp_path / "ensemble" / "store.zarr", mode="r")
    solo = zarr.open_group(tmp_path / "standalone" / "store.zarr", mode="r")
    for run_id in "ab":
        e, s = ens[run_id], solo[run_id]
        for key in ("sketch", "layout", "quantities", "splits", "probe_losses", "v_stats_every", "adam"):
            assert e.attrs[key] == s.attrs[key], key
        assert e["probe/step"][:].tolist() == [0, 5, 10, 12]
        for name in CAPTURED:
            assert e[name].shape == s[name].shape, name
            if name == "probe/grad_adam":  # g/(√v̂+ε) divides the key bias's rounding noise (see above) by its
                error = np.linalg.norm(e[name][:] - s[name][:], axis=-1)  # tiny v: a few coordinates amplified
                assert (error <= 1e-2 * np.linalg.norm(s[name][:], axis=-1)).all(), name
            else:
                np.testing.assert_allclose(e[name][:], s[name][:], rtol=1e-3, atol=1e-5, err_msg=name)
        for which in ("initial", "final"):
            a = load_file(str(tmp_path / "ensemble" / "weights" / run_id / f"{which}.safetensors"))
            b = load_file(str(tmp_path / "standalone" / "weights" / run_id / f"{which}.safetensors"))
            for name in a:
                torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=0, msg=name)
    assert not np.allclose(ens["a"]["grad"][:], ens["b"]["grad"][:])  # members differ: equality is not trivial


def test_rerun_trains_a_partial_ensemble_whole_and_keeps_members_completed_elsewhere(tmp_path):
    """Killed before b was complete, the ensemble [a, b] trains again whole (a smaller one would round otherwise),
    a coming out the same; a member completed in another ensemble (a sweep extended since) is kept as it is."""
    cfgs = [member_config(train__steps=6, train__eval_every=0, **m) for m in list(MEMBERS.values())[:3]]
    first = train_ensemble(cfgs[:2], tmp_path, ["a", "b"])
    root = zarr.open_group(tmp_path / "store.zarr", mode="a")
    loss_a = root["a"]["loss"][...]
    root["b"].attrs["status"] = "running"  # as if the ensemble had been killed before b was complete
    with pytest.raises(FileExistsError):
        train_ensemble(cfgs[:2], tmp_path, ["a", "b"])
    longer = [member_config(train__steps=8, train__eval_every=0, **m) for m in list(MEMBERS.values())[:2]]
    with pytest.raises(ValueError, match=r"run 'a' was trained with another config \(train.steps: 6 → 8\)"):
        train_ensemble(longer, tmp_path, ["a", "b"], resume=True)  # as `train` refuses: it mixed two schedules
    training = []  # the members each step trains, as a sweep's bar counts them
    again = train_ensemble(cfgs[:2], tmp_path, ["a", "b"], resume=True, on_step=lambda *a: training.append(a[2]))
    assert [r.accuracy for r in again] == [r.accuracy for r in first] and set(training) == {2}
    assert root["b"].attrs["status"] == "complete"
    assert root["b"].attrs["ensemble"] == {"members": ["a", "b"], "index": 1}
    np.testing.assert_array_equal(root["a"]["loss"][...], loss_a)
    created_a = root["a"].attrs["created"]
    training.clear()
    train_ensemble([cfgs[0], cfgs[2]], tmp_path, ["a", "c"], resume=True,  # a: of the ensemble [a, b]
                   on_step=lambda *a: training.append(a[2]))
    assert set(training) == {1}  # c alone: a sweep's bar counted a in flight too
    assert root["a"].attrs["created"] == created_a and root["c"].attrs["ensemble"] == {"members": ["c"], "index": 0}


def test_killed_ensemble_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Interrupted after step 13 (checkpoint at 8), re-run with resume: rows exactly once, final weights and
    recorded sketches identical to an uninterrupted ensemble."""
    capture = {"capture__enabled": True, "capture__dim": 32, "capture__probe_every": 5, "train__steps": 16,
               "train__checkpoint_every": 8, "train__eval_every": 0}
    cfgs = [member_config(**capture, **m) for m in list(MEMBERS.values())[:2]]
    train_ensemble(cfgs, tmp_path / "whole", ["a", "b"])

    real_step, calls = StackedAdamW.step, []

    def dying_step(self, grad, lr):
        calls.append(1)
        if len(calls) == 14:
            raise KeyboardInterrupt("killed")
        real_step(self, grad, lr)
    monkeypatch.setattr(StackedAdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_ensemble(cfgs, tmp_path / "killed", ["a", "b"])
    root = zarr.open_group(tmp_path / "killed" / "store.zarr", mode="r")
    assert root["a"].attrs["status"] == "failed" and root["a"].attrs["last_durable_step"] == 8
    resumed = []
    monkeypatch.setattr(StackedAdamW, "step", lambda self, grad, lr: resumed.append(1) or real_step(self, grad, lr))
    train_ensemble(cfgs, tmp_path / "killed", ["a", "b"], resume=True)
    assert len(resumed) == 8  # continued from the checkpoint at step 8, not retrained from scratch

    whole = zarr.open_group(tmp_path / "whole" / "store.zarr", mode="r")
    for run_id in "ab":
        assert root[run_id].attrs["status"] == "complete"
        assert root[run_id]["step"][:].tolist() == list(range(16))
        assert root[run_id]["probe/step"][:].tolist() == [0, 5, 10, 15, 16]
        for name in ("loss", "grad", "update", "adam_m", "probe/grad"):
            np.testing.assert_array_equal(root[run_id][name][:], whole[run_id][name][:], err_msg=name)
        a = load_file(str(tmp_path / "killed" / "weights" / run_id / "final.safetensors"))
        b = load_file(str(tmp_path / "whole" / "weights" / run_id / "final.safetensors"))
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert not (tmp_path / "killed" / "checkpoints" / "ensemble-a").exists()  # removed once complete


def test_a_full_disk_as_a_members_group_is_created_leaves_the_ensemble_resumable(tmp_path, monkeypatch):
    """A member's group was created bare and its attributes written next: a full disk (or a kill) between the two
    left a group without `config`, on which every re-run of the ensemble failed (KeyError: 'config')."""
    update, calls = zarr.Group.update_attributes, []

    def full_once(self, new_attributes):
        calls.append(self.path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return update(self, new_attributes)

    monkeypatch.setattr(zarr.Group, "update_attributes", full_once)
    cfgs = [member_config(**m) for m in list(MEMBERS.values())[:2]]
    with pytest.raises(OSError, match="No space left"):
        train_ensemble(cfgs, tmp_path, ["a", "b"])
    monkeypatch.setattr(zarr.Group, "update_attributes", update)  # space freed
    train_ensemble(cfgs, tmp_path, ["a", "b"], resume=True)
    root = zarr.open_group(tmp_path / "store.zarr", mode="r")
    assert [root[r].attrs["status"] for r in ("a", "b")] == ["complete", "complete"]


def test_an_ensemble_that_fails_while_setting_up_marks_its_members_failed(tmp_path, monkeypatch):
    """Its arrays declared and initial weights saved before its `try`: a failure there (a full disk) left every member
    `running`, as if another process trained it."""
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ensemble_module, "declare_evals", no_space)
    cfgs = [member_config(**m) for m in list(MEMBERS.values())[:2]]
    with pytest.raises(OSError, match="No space left"):
        train_ensemble(cfgs, tmp_path, ["a", "b"])
    root = zarr.open_group(tmp_path / "store.zarr", mode="r")
    assert [root[r].attrs["status"] for r in ("a", "b")] == ["failed", "failed"]
    assert "No space left on device" in root["a"].attrs["error"]
