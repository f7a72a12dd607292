"""A run killed with SIGKILL resumes from its last durable step and ends exactly like an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from conftest import TINY, set_args
from gradtrace import config
from gradtrace.train import train

SETTINGS = {**TINY, "train.steps": 96, "train.checkpoint_every": 16, "capture.chunk": 8, "capture.sketch": "identity"}


def _cli(out, run_id, *extra):
    return [sys.executable, "-m", "gradtrace.cli", "train", os.devnull, "--out", str(out), "--run-id", run_id,
            *set_args(SETTINGS), *extra]


def _durable(path) -> int:
    try:
        return int(zarr.open_group(path, mode="r").attrs.get("last_durable_step", -1))
    except Exception:
        return -1


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    train(config.load(None, SETTINGS), reference, "r", progress=False)

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(killed, "r"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _durable(killed / "store.zarr" / "r") < 32 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    group = zarr.open_group(killed / "store.zarr" / "r", mode="r")
    assert group.attrs["status"] == "running" and group.attrs["last_durable_step"] < 96

    other = subprocess.run(_cli(killed, "r", "--resume", "--set", "train.lr=0.01"), env=env, capture_output=True,
                           text=True)  # a resume that would change what the run computes from here on
    assert other.returncode == 2 and "another config (train.lr: 0.002 → 0.01)" in other.stderr
    subprocess.run(_cli(killed, "r", "--resume"), env=env, check=True, capture_output=True)

    a = load_file(str(reference / "weights/r/final.safetensors"))
    b = load_file(str(killed / "weights/r/final.safetensors"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    ga, gb = zarr.open_group(reference / "store.zarr")["r"], zarr.open_group(killed / "store.zarr")["r"]
    assert gb["step"][:].tolist() == list(range(96))  # no duplicate or missing recorded step
    for name in ("grad", "update", "adam_m", "loss", "probe/step", "probe/grad"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:])
    assert gb.attrs["status"] == "complete"
    assert not (killed / "checkpoints" / "r").exists()


def test_a_checkpoint_saves_over_what_a_kill_after_its_last_rename_left(tmp_path):
    import torch

    from gradtrace import checkpoint

    root = tmp_path / "checkpoints" / "r"
    checkpoint.save_tensors(root, {"x": torch.zeros(2)}, {"steps_done": 1})
    checkpoint.save_tensors(root.with_name("r.old"), {"x": torch.zeros(2)}, {"steps_done": 0})  # not yet removed
    checkpoint.save_tensors(root, {"x": torch.ones(2)}, {"steps_done": 2})
    tensors, meta = checkpoint.load_tensors(checkpoint.checkpoint_dir(root))
    assert meta["steps_done"] == 2 and tensors["x"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in root.parent.iterdir()) == ["r"]


@pytest.fixture
def umask_027():
    """The process's umask 027 (a group that shares the study reads it) for the test, restored after."""
    before = os.umask(0o027)
    yield
    os.umask(before)


def test_every_file_of_a_study_checkpoints_and_weights_too_has_the_mode_the_umask_gives(tmp_path, umask_027):
    """safetensors 0.8 writes 0600 whatever the umask (safetensors/safetensors#782): a colleague sharing the study
    could read every file of it but its weights and checkpoints."""
    import stat

    from conftest import tiny_config
    from gradtrace import checkpoint
    from gradtrace.sweep import run_sweep

    run_sweep(tiny_config(sweep__runs=1, sweep__workers=1, sweep__reference_runs=1, train__steps=4), tmp_path,
              progress=False)
    checkpoint.save_tensors(tmp_path / "checkpoints" / "r", {"x": torch.zeros(2)}, {"steps_done": 1})
    modes = {f.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(f.stat().st_mode))
             for f in tmp_path.rglob("*") if f.is_file()}
    assert {"weights/ref-000/final.safetensors", "checkpoints/r/state.safetensors"} <= set(modes)
    assert {name: mode for name, mode in modes.items() if mode != "0o640"} == {}


def test_a_model_with_tied_embeddings_checkpoints_and_resumes(tmp_path):
    """Many hub models tie their output layer to the embeddings (one tensor, two names), which safetensors refuses
    to save twice: every checkpoint of such a run failed."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from gradtrace import checkpoint

    def tied_model(seed):
        torch.manual_seed(seed)
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32, tie_word_embeddings=True))

    def state(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
        optimizer.step()
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    trained = tied_model(0)
    off = torch.amp.GradScaler("cpu", enabled=False)
    checkpoint.save_state(tmp_path / "ckpt", trained, *state(trained), off, steps_done=1, optimizer_steps=1)
    resumed = tied_model(1)
    optimizer, scheduler = state(resumed)
    assert checkpoint.load_state(tmp_path / "ckpt", resumed, optimizer, scheduler, off) == (1, 1)
    for (name, want), got in zip(trained.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert resumed.get_output_embeddings().weight is resumed.get_input_embeddings().weight  # still one tensor
    with pytest.raises(ValueError, match="another model's parameters"):
        checkpoint.load_state(tmp_path / "ckpt", torch.nn.Linear(2, 2), optimizer, scheduler, off)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names synced files through /proc")
def test_checkpoints_and_weights_are_synced_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """A rename is durable only once what it names is: a power loss must not leave a checkpoint or a base's weights
    that exist but are empty."""
    import torch

    from gradtrace import checkpoint

    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))) or
                        fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(a))) or replace(a, b))
    checkpoint.save_tensors(tmp_path / "ckpt", {"x": torch.ones(3)}, {"steps_done": 1})
    checkpoint.save_weights(torch.nn.Linear(2, 2), tmp_path / "w" / "final.safetensors")
    renamed = [path for kind, path in events if kind == "rename"]
    assert renamed == [str(tmp_path / "ckpt.tmp"), str(tmp_path / "w" / "final.safetensors.tmp")]
    ckpt, weights = tmp_path / "ckpt.tmp", tmp_path / "w" / "final.safetensors.tmp"
    for synced, renamed in ((ckpt / "state.safetensors", ckpt), (ckpt / "state.json", ckpt), (weights, weights)):
        assert events.index(("sync", str(synced))) < events.index(("rename", str(renamed)))
    assert ("sync", str(tmp_path)) in events  # the folder the checkpoint was renamed into


@pytest.mark.parametrize("members", [1, 2])
def test_a_run_resumed_with_other_arithmetic_is_warned_of_and_records_it(tmp_path, monkeypatch, members):
    """A run resumed under another torch or on another CPU (or threads, kernels, device, code) went on with other
    float rounding and kept saying it trained with the first throughout; a run resumed alike says nothing."""
    from gradtrace import kernels

    ids, run = _stopped_at_its_first_checkpoint(tmp_path, monkeypatch, members)
    groups = [zarr.open_group(tmp_path / "store.zarr")[r] for r in ids]
    intel = "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (GenuineIntel family 6 model 143)"
    for group in groups:
        assert group.attrs["cpu"] == kernels.cpu_name()
        group.update_attributes({"torch_version": "2.12.0", "cpu": intel})
    with pytest.warns(kernels.OtherArithmetic, match=r"run 'run-\d' resumes at step 4 with other arithmetic than it "
                                                     r"started with \(torch_version 2.12.0 → .*; cpu Intel"):
        run()
    for group in (zarr.open_group(tmp_path / "store.zarr")[r] for r in ids):  # read anew: attributes are cached
        assert group.attrs["status"] == "complete"
        assert group.attrs["resumed_with"] == [{"step": 4, "torch_version": torch.__version__,
                                                "cpu": kernels.cpu_name()}]


@pytest.mark.parametrize("members", [1, 2])
def test_a_resumed_run_counts_the_nonfinite_steps_before_its_resume(tmp_path, monkeypatch, members):
    """A standalone run resumed after a step with a NaN gradient said `nonfinite_steps: 0` (only the steps after the
    resume were counted), so it was not known to have diverged."""
    ids, run = _stopped_at_its_first_checkpoint(tmp_path, monkeypatch, members)
    for rid in ids:
        zarr.open_group(tmp_path / "store.zarr", mode="a")[rid]["nonfinite"][1] = True  # as a NaN gradient flags it
    run()
    for rid in ids:
        assert zarr.open_group(tmp_path / "store.zarr")[rid].attrs["nonfinite_steps"] == 1


def _stopped_at_its_first_checkpoint(tmp_path, monkeypatch, members: int):
    """Tiny runs (an ensemble of `members` > 1) stopped as their first checkpoint is saved, at step 4 of 8: their ids,
    and a function resuming them."""
    from gradtrace import checkpoint
    from gradtrace.ensemble import train_ensemble

    cfgs = [config.load(None, {**TINY, "train.steps": 8, "train.checkpoint_every": 4, "train.data_seed": i})
            for i in range(members)]
    ids = [f"run-{i}" for i in range(members)]

    def run() -> None:
        if members == 1:
            train(cfgs[0], tmp_path, ids[0], resume=True, progress=False)
        else:
            train_ensemble(cfgs, tmp_path, ids, resume=True)

    def stop_after_the_first(save):
        def saved(*args, **kwargs):
            save(*args, **kwargs)
            raise KeyboardInterrupt
        return saved

    for name in ("save_state", "save_tensors"):
        monkeypatch.setattr(checkpoint, name, stop_after_the_first(getattr(checkpoint, name)))
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    return ids, run
