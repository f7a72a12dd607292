"""A run killed at each point where its store and its checkpoint disagree resumes to exactly the uninterrupted run.

SIGKILL at a random moment (test_resume.py) rarely lands in the narrow windows between two writes; here a child
process exits (os._exit, no cleanup) at a chosen call of a chosen function, then `--resume` finishes the run here.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from safetensors.torch import load_file

from conftest import TINY, set_args
from gradtrace import config
from gradtrace.cli import main
from gradtrace.sweep import run_sweep
from gradtrace.train import train

SETTINGS = {**TINY, "train.steps": 40, "train.checkpoint_every": 16, "capture.chunk": 8}
ENSEMBLE = {**SETTINGS, "sweep.runs": 0, "sweep.reference_runs": 2, "sweep.ensemble": 2, "sweep.workers": 1}

# Patches the child applies before running the CLI: exit at the nth call of `where` that matches (before the call,
# or after it returns), so the store, the checkpoint and the status are left as a kill at that instant leaves them.
HARNESS = r"""
import os, sys
import zarr
from gradtrace import checkpoint, store
from gradtrace.cli import main

where, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]

def die_at(owner, name, matches, after):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        hit = matches(*args, **kwargs)
        calls[0] += hit
        if hit and calls[0] == nth and not after:
            os._exit(9)
        out = original(*args, **kwargs)
        if hit and calls[0] == nth and after:
            os._exit(9)
        return out
    setattr(owner, name, wrapper)

points = {
    # the step array resized for a chunk whose rows are not yet written: rows of fill value past the durable ones
    "step-resized": (zarr.Array, "resize",
                     lambda self, shape: self.path.count("/") == 1 and self.path.endswith("/step"), True),
    # rows flushed, the model's checkpoint not yet saved: the store runs ahead of the checkpoint
    "before-save-state": (checkpoint, "save_state", lambda *a, **k: True, False),
    "before-save-tensors": (checkpoint, "save_tensors", lambda *a, **k: True, False),
    # the old checkpoint renamed aside, the new one not yet in place
    "between-renames": (os, "replace", lambda src, dst: str(dst).endswith(".old"), True),
    # the checkpoint saved, the store's last durable step not yet updated
    "after-save-state": (checkpoint, "save_state", lambda *a, **k: True, True),
    "after-save-tensors": (checkpoint, "save_tensors", lambda *a, **k: True, True),
    # everything written but the status
    "before-complete": (store, "set_status", lambda group, status, **kw: status == "complete", False),
}
if where == "status-written":  # the complete status's first metadata write done: all of it, or a torn status
    import zarr.core.group as zarr_group

    completing, set_status, save = [False], store.set_status, zarr_group.AsyncGroup._save_metadata

    def marking(group, status, **extra):
        completing[0] = status == "complete"
        return set_status(group, status, **extra)

    async def save_then_exit(self, *args, **kwargs):
        await save(self, *args, **kwargs)
        calls[0] += completing[0]
        if completing[0] and calls[0] == nth:
            os._exit(9)

    store.set_status, zarr_group.AsyncGroup._save_metadata = marking, save_then_exit
else:
    die_at(*points[where])
sys.exit(main(argv))
"""


def _crash(where: str, nth: int, argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    crashed = subprocess.run([sys.executable, "-c", HARNESS, where, str(nth), *argv], env=env, capture_output=True,
                             text=True)
    assert crashed.returncode == 9, f"the child did not stop at {where} #{nth}: {crashed.stderr[-2000:]}"


def _crash_then_resume(where: str, nth: int, argv: list[str]) -> None:
    _crash(where, nth, argv)
    assert main(argv) == 0  # the resume, in this process


def _assert_same_run(expected: zarr.Group, got: zarr.Group) -> None:
    assert got.attrs["status"] == "complete"
    names = sorted(name for name, _ in expected.members(max_depth=None) if isinstance(expected[name], zarr.Array))
    assert names == sorted(name for name, _ in got.members(max_depth=None) if isinstance(got[name], zarr.Array))
    assert got["step"][:].tolist() == expected["step"][:].tolist()  # no step recorded twice or left out
    for name in names:
        np.testing.assert_array_equal(expected[name][...], got[name][...], err_msg=name)


def _assert_same_weights(expected_dir, got_dir, run_id: str) -> None:
    a = load_file(str(expected_dir / "weights" / run_id / "final.safetensors"))
    b = load_file(str(got_dir / "weights" / run_id / "final.safetensors"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(config.load(None, SETTINGS), out, "r", progress=False)
    return out


@pytest.fixture(scope="module")
def uninterrupted_ensemble(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted-ensemble")
    run_sweep(config.load(None, ENSEMBLE), out, progress=False)
    return out


@pytest.mark.slow
def test_an_ensemble_killed_between_its_members_statuses_before_any_checkpoint_trains_on_whole(tmp_path):
    """Killed after one member was marked complete, with no checkpoint yet (runs no longer than
    train.checkpoint_every, as the default's): the other member trains again in the same ensemble, not alone."""
    settings = {**ENSEMBLE, "train.steps": 8}
    expected = tmp_path / "uninterrupted"
    run_sweep(config.load(None, settings), expected, progress=False)
    _crash_then_resume("before-complete", 2, ["sweep", os.devnull, "--out", str(tmp_path / "killed"),
                                              *set_args(settings)])
    got = zarr.open_group(tmp_path / "killed" / "store.zarr")
    for run_id in ("ref-000", "ref-001"):
        _assert_same_run(zarr.open_group(expected / "store.zarr")[run_id], got[run_id])
        assert got[run_id].attrs["ensemble"] == {"members": ["ref-000", "ref-001"], "index": int(run_id[-1])}
    left = tmp_path / "killed" / "checkpoints"
    assert not left.exists() or not any(left.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("where, nth", [("step-resized", 3), ("before-save-state", 2), ("between-renames", 1),
                                        ("after-save-state", 1), ("before-complete", 1), ("status-written", 1)])
def test_a_run_killed_between_two_writes_resumes_exactly(uninterrupted, tmp_path, where, nth):
    _crash_then_resume(where, nth, ["train", os.devnull, "--out", str(tmp_path), "--run-id", "r", *set_args(SETTINGS),
                                    "--resume"])
    _assert_same_run(zarr.open_group(uninterrupted / "store.zarr")["r"], zarr.open_group(tmp_path / "store.zarr")["r"])
    _assert_same_weights(uninterrupted, tmp_path, "r")
    assert not (tmp_path / "checkpoints" / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where, nth", [("step-resized", 5), ("before-save-tensors", 2), ("between-renames", 1),
                                        ("after-save-tensors", 1), ("before-complete", 1), ("before-complete", 2)])
def test_an_ensemble_killed_between_two_writes_resumes_exactly(uninterrupted_ensemble, tmp_path, where, nth):
    _crash_then_resume(where, nth, ["sweep", os.devnull, "--out", str(tmp_path), *set_args(ENSEMBLE)])
    expected, got = zarr.open_group(uninterrupted_ensemble / "store.zarr"), zarr.open_group(tmp_path / "store.zarr")
    for run_id in ("ref-000", "ref-001"):
        _assert_same_run(expected[run_id], got[run_id])
        _assert_same_weights(uninterrupted_ensemble, tmp_path, run_id)


@pytest.mark.slow
def test_an_ensembles_last_durable_step_is_never_ahead_of_its_checkpoint(tmp_path):
    """Killed with its rows of step 16 written and its checkpoint not yet saved, an ensemble's members say no step is
    durable yet, as a single run's store does (storage/README: rows, checkpoint, last durable step, in that order)."""
    _crash("before-save-tensors", 1, ["sweep", os.devnull, "--out", str(tmp_path), *set_args(ENSEMBLE)])
    got = zarr.open_group(tmp_path / "store.zarr", mode="r")
    assert [got[run_id].attrs["last_durable_step"] for run_id in ("ref-000", "ref-001")] == [-1, -1]


@pytest.mark.slow
def test_an_fp16_run_whose_scaler_skipped_steps_resumes_exactly(tmp_path, monkeypatch):
    """A GradScaler that skips steps (a scale too large for fp16's range, as at a GPU run's start) leaves fewer
    optimizer steps, and so recorded rows, than training steps: the resume takes the scaler's state and the
    optimizer steps from the checkpoint (it restarted the scaler at its initial scale and the rows at the
    training step: skipped steps again, other weights, a gap in the rows), and evaluations, which count training
    steps, are cut at the training step (at the optimizer step, the evaluation before the kill was lost)."""
    import functools

    import torch

    from gradtrace import checkpoint

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 19))
    settings = config.load(None, {**SETTINGS, "train.steps": 12, "train.checkpoint_every": 6, "train.eval_every": 4,
                                  "train.precision": "fp16", "capture.probe_every": 4, "capture.chunk": 4})
    train(settings, tmp_path / "uninterrupted", "r", progress=False)
    expected = zarr.open_group(tmp_path / "uninterrupted" / "store.zarr")["r"]
    taken = expected["step"].shape[0]
    assert 6 < taken < 12 and expected.attrs["last_durable_step"] == taken  # a few steps skipped, not all

    def save_then_die(*args, **kwargs):
        save_state(*args, **kwargs)
        raise KeyboardInterrupt

    save_state = checkpoint.save_state
    monkeypatch.setattr(checkpoint, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(settings, tmp_path / "killed", "r", progress=False)
    monkeypatch.setattr(checkpoint, "save_state", save_state)
    train(settings, tmp_path / "killed", "r", resume=True, progress=False)
    _assert_same_run(expected, zarr.open_group(tmp_path / "killed" / "store.zarr")["r"])
    _assert_same_weights(tmp_path / "uninterrupted", tmp_path / "killed", "r")
