"""Integrations: `attach` in plain loops, accelerate (accumulation, DDP on 2 gloo processes, sharded sketches),
and the Hugging Face Trainer callback — each records one row per optimizer step and never changes training."""
import contextlib
import copy
import functools
import importlib.metadata
import importlib.util
import math
import os
import re
import socket
import sys
import types
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from conftest import tiny_config
from gradtrace import store
from gradtrace.capture import (ChainedOptimizer, GradtraceCallback, IdleRecorder, Probe, attach, make_sketch,
                               open_recorders, sketch_sharded)
from gradtrace.capture.integrations import RunRecorder
from gradtrace.capture.recorder import Recorder, unwrap_model
from gradtrace.capture.sketch import ParamLayout
from gradtrace.config import CaptureConfig
from gradtrace.models import build_model, in_this_release
from gradtrace.tasks import ArithmeticTask, answer_cross_entropy

IDENTITY = CaptureConfig(sketch="identity", probe_every=0, chunk=4)
TRANSFORMERS_MAJOR = int(importlib.metadata.version("transformers").split(".")[0])


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(tiny_config().task)


def micro(task, seed=0):
    return build_model(tiny_config().model, task.tokenizer.vocab_size, seed)


def flat_params(model) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def run_group(out_dir, run_id="r"):
    return zarr.open_group(out_dir / "store.zarr", mode="r")[run_id]


def train_steps(model, opt, task, steps, rec=None, start=0):
    """A user's plain loop; with `rec` it differs by `rec.log(loss, grad_norm=norm)` only."""
    for step in range(start, steps):
        x, m = task.train_batch(step, 0, 16)
        loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if rec is not None:
            rec.log(loss, grad_norm=norm)
        opt.step()


# -- plain loops -------------------------------------------------------------------------------------------------
def test_attach_records_every_step_and_marks_the_run_complete(tmp_path, task):
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    probes = [Probe(s, *task.probe_set(s).torch()) for s in task.splits[:2]]
    rec = attach(model, opt, tmp_path, "r", total_steps=6, probes=probes,
                 capture=CaptureConfig(sketch="countsketch", dim=64, probe_every=3, chunk=4))
    train_steps(model, opt, task, 6, rec)
    rec.close()
    group = run_group(tmp_path)
    a = dict(group.attrs)
    assert a["status"] == "complete" and a["steps_done"] == 6 and a["last_durable_step"] == 6
    assert a["sketch"]["kind"] == "countsketch" and a["splits"] == task.splits[:2] and a["steps"] == 6
    assert group["step"][:].tolist() == list(range(6)) and group["grad"].shape == (6, 64)
    assert group["probe/step"][:].tolist() == [0, 3, 6]
    assert np.isfinite(group["loss"][:]).all()


@pytest.mark.parametrize("shape", ["gpt2-tied", "llama-tied"])
def test_other_architectures_with_tied_embeddings_record_what_their_optimizer_steps_with(tmp_path, shape):
    """One tensor under two names is recorded once, with both uses' gradient; Llama's RMSNorm and bias-free layers
    and AdamW's usual groups (no decay on biases and norms) change nothing."""
    import transformers

    torch.manual_seed(0)
    if shape == "gpt2-tied":
        config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}], lr=3e-3)
    theta_0, grads = flat_params(model), []
    tokens = torch.randint(0, 40, (4, 10))
    rec = attach(model, opt, tmp_path, "r", total_steps=3, capture=IDENTITY)
    for _ in range(3):
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        rec.log(loss)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
        opt.step()
    rec.close()
    group = run_group(tmp_path)
    layout = [entry["name"] for entry in group.attrs["layout"]]
    assert layout == [n for n, _ in named] and len(layout) == len(set(map(id, model.parameters())))  # once
    np.testing.assert_allclose(group["grad"][:], np.stack(grads), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(group["update"][:].sum(axis=0), flat_params(model) - theta_0, rtol=1e-4, atol=1e-7)


def test_attach_marks_a_crashed_run_failed(tmp_path, task):
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with pytest.raises(RuntimeError, match="boom"):
        with attach(model, opt, tmp_path, "r", total_steps=4, capture=IDENTITY) as rec:
            train_steps(model, opt, task, 2, rec)
            raise RuntimeError("boom")
    a = dict(run_group(tmp_path).attrs)
    assert a["status"] == "failed" and "boom" in a["error"]
    assert run_group(tmp_path)["step"][:].tolist() == [0, 1]
    assert a["last_durable_step"] == 2  # its rows are written: a reader trusting the attribute keeps them


def test_a_failure_writing_the_runs_attributes_at_attach_detaches_the_recorder_and_marks_the_run_failed(
        tmp_path, task, monkeypatch):
    """Lion (betas, no eps) failed in the attributes written after the Recorder was built: its hooks stayed on the
    optimizer, recording into a run left 'running', which the process's end then called resumed elsewhere."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def attrs(self):
        raise KeyError("eps")  # as Lion's group, read for Adam's eps

    monkeypatch.setattr(RunRecorder, "attrs", attrs)
    with pytest.raises(KeyError):
        attach(model, opt, tmp_path, "r", total_steps=4, capture=IDENTITY)
    assert open_recorders(opt) == []
    a = dict(run_group(tmp_path).attrs)
    assert a["status"] == "failed" and "KeyError" in a["error"]
    train_steps(model, opt, task, 1)
    assert run_group(tmp_path)["step"].shape == (0,)


def test_a_recorder_left_attached_by_a_cell_that_raised_is_named_and_cannot_write_into_a_new_run(tmp_path, task):
    """A notebook: the loop cell raises before `rec.close()`, so its recorder stays on the optimizer. Re-running the
    cell asks for the old recorder to be closed; after deleting the half-run, the old recorder is detached (its rows
    went into the new run's arrays: a complete 4-step run read back 6 rows); under another run id it is named."""
    import shutil

    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stale = attach(model, opt, tmp_path, "r", total_steps=4, capture=IDENTITY)
    train_steps(model, opt, task, 2, stale)  # then the cell raises: no close
    with pytest.raises(FileExistsError, match=r"resume=True.*still attached to this optimizer"):
        attach(model, opt, tmp_path, "r", total_steps=4, capture=IDENTITY)
    shutil.rmtree(tmp_path / "store.zarr" / "r")
    with pytest.warns(UserWarning, match="an earlier recorder of run 'r'.*detached"):
        rec = attach(model, opt, tmp_path, "r", total_steps=4, capture=IDENTITY)
    train_steps(model, opt, task, 4, rec)
    rec.close()
    assert run_group(tmp_path)["step"][:].tolist() == [0, 1, 2, 3] and stale.closed
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    leftover = attach(model, opt, tmp_path, "r1", total_steps=4, capture=IDENTITY)
    with pytest.warns(UserWarning, match="run 'r1' .* is still attached to this optimizer"):
        rec = attach(model, opt, tmp_path, "r2", total_steps=4, capture=IDENTITY)

    assert set(open_recorders(opt)) == {leftover, rec}
    assert repr(leftover) == f"<RunRecorder {(tmp_path / 'store.zarr' / 'r1').resolve()}: step 0 of 4, recording>"


def test_resuming_the_run_a_cell_left_attached_keeps_its_recorded_rows(tmp_path, task):
    """A notebook: the loop cell stopped before `rec.close()`, and the run is resumed in place (resume=True at the
    step the loop reached). The old recorder was detached with its unwritten rows dropped, and the resume refused as
    durable only up to step -1: the run could only start again from step 0."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stale = attach(model, opt, tmp_path, "r", total_steps=8, capture=IDENTITY)
    train_steps(model, opt, task, 6, stale)  # rows 4 and 5 still buffered (chunks of 4), then the cell raised
    with pytest.warns(UserWarning, match="an earlier recorder of run 'r'.*marked failed, its rows written"):
        rec = attach(model, opt, tmp_path, "r", total_steps=8, capture=IDENTITY, resume=True, start_step=stale.step)
    train_steps(model, opt, task, 8, rec, start=6)
    rec.close()
    group = run_group(tmp_path)
    assert group["step"][:].tolist() == list(range(8)) and np.isfinite(group["grad"][:]).all()
    assert group.attrs["status"] == "complete" and stale.closed and not opt._optimizer_step_pre_hooks


def test_a_run_resumed_by_a_rebuilt_loop_is_not_marked_failed_by_the_recorder_left_open(tmp_path, task):
    """A notebook: the loop cell raised, and the cells that build the model and optimizer ran again to resume. The old
    recorder, on the old optimizer, stayed open: as the process ended it wrote its buffered rows over the resumed
    run's and marked the complete run failed."""
    from gradtrace.capture import integrations

    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stale = attach(model, opt, tmp_path, "r", total_steps=8, capture=IDENTITY)
    train_steps(model, opt, task, 4, stale)
    stale.checkpoint()
    train_steps(model, opt, task, 6, stale, start=4)  # rows 4 and 5 still buffered (chunks of 4), then the cell raised
    model = micro(task, seed=1)  # rebuilt (from the checkpoint at step 4: other weights stand in for it)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with pytest.raises(FileExistsError, match="still attached to another optimizer"):
        attach(model, opt, tmp_path, "r", total_steps=8, capture=IDENTITY)
    with pytest.warns(UserWarning, match="an earlier recorder of run 'r'.*another optimizer: marked failed"):
        rec = attach(model, opt, tmp_path, "r", total_steps=8, capture=IDENTITY, resume=True, start_step=4)
    theta_4 = flat_params(model)
    train_steps(model, opt, task, 8, rec, start=4)
    rec.close()
    integrations._fail_unclosed()  # as the process ends
    group = run_group(tmp_path)
    assert stale.closed and group.attrs["status"] == "complete" and group.attrs["steps_done"] == 8
    assert group["step"][:].tolist() == list(range(8))
    np.testing.assert_allclose(group["update"][4:].sum(0), flat_params(model) - theta_4, atol=1e-6)


def test_hf_a_new_trainer_and_model_resuming_after_an_interruption_leave_the_run_complete(tmp_path, task):
    """A notebook: train() interrupted, then the model, Trainer and callback built afresh to resume from the last
    checkpoint. The first callback's recorder stayed open and marked the complete run failed as the process ended."""
    from transformers import Trainer

    from gradtrace.capture import integrations

    def run(resume: bool):
        args = hf_args(tmp_path, max_steps=6, learning_rate=3e-3, save_strategy="steps", save_steps=2,
                       save_total_limit=1)
        callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="identity", probe_every=0, chunk=8))
        trainer = Trainer(model=micro(task), args=args, train_dataset=hf_dataset(task),
                          callbacks=[callback, *([] if resume else [kill_at("on_step_end", 5)])])
        trainer.train(resume_from_checkpoint=True if resume else None)
        return trainer

    with pytest.raises(_Killed):
        run(resume=False)
    with pytest.warns(UserWarning, match="an earlier recorder of run 'hf'.*marked failed"):
        run(resume=True)
    integrations._fail_unclosed()  # as the process ends
    group = run_group(tmp_path, "hf")
    assert group.attrs["status"] == "complete" and group.attrs["steps_done"] == 6
    assert group["step"][:].tolist() == list(range(6))


RUN_LEFT_OPEN = """
import multiprocessing, subprocess, sys, torch
from gradtrace.capture import attach
from gradtrace.config import CaptureConfig
model = torch.nn.Linear(4, 3)
opt = torch.optim.Adam(model.parameters(), lr=0.1)
steps, resume = (8, True) if sys.argv[2] == "resume" else (6, False)
rec = attach(model, opt, sys.argv[1], "r", total_steps=8, capture=CaptureConfig(sketch="identity", chunk=4),
             resume=resume)
for step in range(steps):
    opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
    if step == 1:
        child = multiprocessing.get_context("fork").Process(target=len, args=("",)); child.start(); child.join()
if sys.argv[2] in ("close", "resume"):
    rec.close()
if sys.argv[2] == "resumed elsewhere":  # another process resumes the run from step 0 to its end
    subprocess.run([sys.executable, "-c", sys.argv[3], sys.argv[1], "resume"], check=True)
"""


@pytest.mark.parametrize("then", ["exit", "close", "resumed elsewhere"])
def test_a_run_still_open_as_its_process_ends_is_marked_failed_with_its_rows_written(tmp_path, then):
    """A loop that never called `rec.close()` (or a Trainer interrupted and never trained again) kept its run
    `running` for good and lost its buffered rows (here steps 4 and 5) as the process ended. A forked child of the
    process (a DataLoader worker) exits with a copy of the recorder, and a run resumed by another process since is
    that one's: both must leave the run alone."""
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", RUN_LEFT_OPEN, str(tmp_path), then, RUN_LEFT_OPEN],
                           capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    group = run_group(tmp_path)
    steps = 8 if then == "resumed elsewhere" else 6
    assert group["step"][:].tolist() == list(range(steps)) and np.isfinite(group["grad"][:]).all()
    assert group.attrs["last_durable_step"] == steps
    said = [line.split("process ended: ")[-1] for line in ended.stderr.splitlines()
            if line.startswith(f"gradtrace: run 'r' ({(tmp_path / 'store.zarr' / 'r').resolve()}) was still open")]
    if then == "exit":
        assert group.attrs["status"] == "failed" and "never closed" in group.attrs["error"]
        assert said == ["marked failed, its 6 recorded step(s) written"]
    else:
        assert group.attrs["status"] == "complete" and "error" not in group.attrs
        assert said == ([] if then == "close" else ["left as it is, attached again since (resumed by another process)"])


RUN_IN_A_THREAD = """
import sys, threading, time, torch
from gradtrace.capture import attach
from gradtrace.config import CaptureConfig
model = torch.nn.Linear(4, 3)
opt = torch.optim.Adam(model.parameters(), lr=0.1)
rec = attach(model, opt, sys.argv[1], "r", total_steps=12, capture=CaptureConfig(sketch="identity", chunk=4))
stepped = threading.Event()
def loop():
    for step in range(12):
        opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
        stepped.set()
        time.sleep(0.05)  # the main thread ends meanwhile
    if sys.argv[2] == "close":
        rec.close()
if sys.argv[3] == "pool":  # a thread pool's worker, which the pool's exit handler waits for after gradtrace's
    from concurrent.futures import ThreadPoolExecutor
    ThreadPoolExecutor(2).submit(loop)
else:
    threading.Thread(target=loop).start()  # not a daemon: the interpreter waits for it
stepped.wait()
"""


@pytest.mark.parametrize("then", ["close", "exit"])
@pytest.mark.parametrize("thread", ["thread", "pool"])
def test_a_loop_in_a_thread_of_its_own_is_recorded_to_its_end_after_the_main_thread_ends(tmp_path, then, thread):
    """The exit handler runs before the interpreter waits for its threads: it marked the run of a loop still training
    in a thread of its own (or a thread pool's worker) failed at the step the main thread ended, and the loop trained
    on unrecorded."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", RUN_IN_A_THREAD, str(tmp_path), then, thread], capture_output=True,
                   text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    group = run_group(tmp_path)
    assert group["step"][:].tolist() == list(range(12)) and group.attrs["last_durable_step"] == 12
    assert group.attrs["status"] == ("complete" if then == "close" else "failed")


RUNS_LEFT_OPEN = """
import sys, torch
from gradtrace.capture import attach
from gradtrace.config import CaptureConfig
model = torch.nn.Linear(4, 3)
opt = torch.optim.Adam(model.parameters(), lr=0.1)
recs = [attach(model, opt, sys.argv[1], r, total_steps=8, capture=CaptureConfig(sketch="identity", chunk=4))
        for r in ("a", "b")]
for step in range(6):
    opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
sys.stderr.close()  # its pipe's reader gone, say
"""


def test_a_closed_stderr_stops_no_run_left_open_from_being_marked_failed(tmp_path):
    """The exit handler's line on stderr raised where stderr was closed: the runs after the first were left
    `running`, their buffered rows lost."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", RUNS_LEFT_OPEN, str(tmp_path)], capture_output=True, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    for run_id in ("a", "b"):
        group = run_group(tmp_path, run_id)
        assert group.attrs["status"] == "failed" and group["step"][:].tolist() == list(range(6))


def test_ctrl_c_in_a_step_hook_lands_once_the_steps_row_is_recorded(tmp_path, task):
    """A notebook's loop interrupted (SIGINT) while a hook wrote a chunk lost the chunk's rows but counted them, and
    its step too: run on, the loop left a gap of fill-value rows and then a step recorded twice. The interrupt is
    raised once the step is recorded, so the loop goes on where it stopped."""
    import signal

    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=8, capture=CaptureConfig(sketch="identity", probe_every=0,
                                                                                 chunk=2))
    write = rec.writer._write

    def interrupted(job):  # Ctrl-C arrives as the second chunk is being written
        if job[0][1] == 2:
            signal.raise_signal(signal.SIGINT)
        write(job)
    rec.writer._write = interrupted
    with pytest.raises(KeyboardInterrupt):
        train_steps(model, opt, task, 8, rec)
    assert rec.step == opt.state[next(model.parameters())]["step"] == 4
    train_steps(model, opt, task, 8, rec, start=4)  # the cell run again, from where it stopped
    rec.close()
    assert run_group(tmp_path)["step"][:].tolist() == list(range(8))
    assert np.isfinite(run_group(tmp_path)["grad"][:]).all()


def interrupt_next_write(rec) -> None:
    """Ctrl-C (SIGINT) raised as `rec` writes its next chunk, once."""
    import signal

    write = rec.writer._write

    def interrupted(job):
        rec.writer._write = write
        signal.raise_signal(signal.SIGINT)
        write(job)
    rec.writer._write = interrupted


@pytest.mark.parametrize("call", ["checkpoint", "close"])
def test_ctrl_c_while_the_recorder_writes_its_rows_loses_none(tmp_path, task, call):
    """Ctrl-C landing in `rec.checkpoint()` or `rec.close()` while they wrote the buffered rows lost those rows: a loop
    run on after an interrupted checkpoint closed a complete run whose steps read [0, 0, 2, ...] with NaN gradients,
    and an interrupted close marked 4 of 6 rows durable. The interrupt is raised once the rows are written."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=6, capture=IDENTITY)
    train_steps(model, opt, task, 2 if call == "checkpoint" else 6, rec)
    interrupt_next_write(rec)
    with pytest.raises(KeyboardInterrupt):
        getattr(rec, call)()
    train_steps(model, opt, task, 6, rec, start=rec.step)  # the cell run again, from where it stopped
    rec.close()
    group = run_group(tmp_path)
    assert group["step"][:].tolist() == list(range(6)) and np.isfinite(group["grad"][:]).all()
    assert group.attrs["status"] == "complete" and group.attrs["last_durable_step"] == 6


def test_probe_rows_reach_the_disk_as_often_as_step_rows(tmp_path, task):
    """Probe arrays were chunked like per-step ones (`capture.chunk` rows): probed every 5 steps with chunks of 20,
    a run killed without a checkpoint had written no probe row in 100 steps; now one in 20 steps, as the steps."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    probes = [Probe(s, *task.probe_set(s).torch()) for s in task.splits[:2]]
    rec = attach(model, opt, tmp_path, "r", total_steps=100, probes=probes,
                 capture=CaptureConfig(sketch="countsketch", dim=64, probe_every=5, chunk=20))
    train_steps(model, opt, task, 42, rec)  # no checkpoint, no close: what a kill would leave on disk
    on_disk = run_group(tmp_path)
    assert on_disk["step"].shape[0] == 40 and on_disk["probe/grad"].chunks[0] == 4
    assert on_disk["probe/step"][:].tolist() == list(range(0, 40, 5))
    rec.close()


def test_attach_resumes_at_a_checkpoint_without_duplicate_or_missing_rows(tmp_path, task):
    """Record 6 steps with a checkpoint at 3, 'crash' after 5, resume from the checkpoint: rows equal a clean run."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=6, capture=CaptureConfig(sketch="identity", probe_every=0,
                                                                                chunk=1))
    train_steps(model, opt, task, 3, rec)
    rec.checkpoint()
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_steps(model, opt, task, 5, rec, start=3)  # killed here: rows 3 and 4 are on disk, past the checkpoint
    rec.detach()  # as the kill leaves it: nothing more written
    fresh = micro(task)
    with pytest.raises(ValueError, match="durable only up to step 3"):
        attach(fresh, torch.optim.AdamW(fresh.parameters()), tmp_path, "r", total_steps=6, capture=IDENTITY,
               resume=True, start_step=5)

    model = micro(task)
    model.load_state_dict(saved[0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt.load_state_dict(saved[1])
    rec = attach(model, opt, tmp_path, "r", total_steps=6, capture=IDENTITY, resume=True, start_step=3)
    train_steps(model, opt, task, 6, rec, start=3)
    rec.close()

    clean = micro(task)
    clean_opt = torch.optim.AdamW(clean.parameters(), lr=3e-3)
    rec = attach(clean, clean_opt, tmp_path, "clean", total_steps=6, capture=IDENTITY)
    train_steps(clean, clean_opt, task, 6, rec)
    rec.close()
    resumed, reference = run_group(tmp_path), run_group(tmp_path, "clean")
    assert resumed["step"][:].tolist() == list(range(6)) and resumed.attrs["status"] == "complete"
    for name in ("grad", "update", "adam_m"):
        np.testing.assert_array_equal(resumed[name][:], reference[name][:])  # exact: m carried on from the store
    assert resumed.attrs["train_loss"] == reference.attrs["train_loss"]  # its first loss recorded before the resume


def test_a_wrapped_model_resumes_as_it_was_attached(tmp_path):
    """attach unwraps the model (DataParallel here; DDP and torch.compile alike) for a resume's check of its trainable
    tensors too: checked by the wrapper's names (`module.0.weight`), a wrapped run's resume was refused."""
    def two_steps(resume: bool, start: int):
        torch.manual_seed(start)
        model = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 1)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        rec = attach(model, opt, tmp_path, "r", total_steps=4, capture=CaptureConfig(dim=16, probe_every=0),
                     resume=resume, start_step=start)
        for _ in range(2):
            opt.zero_grad()
            loss = model(torch.randn(5, 8)).pow(2).mean()
            loss.backward()
            rec.log(loss)
            opt.step()
        return rec

    first = two_steps(False, 0)
    first.checkpoint()
    first.detach()
    two_steps(True, 2).close()
    assert run_group(tmp_path)["step"][:].tolist() == [0, 1, 2, 3]


def test_a_failed_run_resumed_to_its_end_carries_no_error(tmp_path, task):
    """A notebook's loop in `with attach(...)` interrupted (the run marked failed), then resumed in place to the end:
    the complete run still held the interrupt's `error` attribute, which storage/README gives failed runs only."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with pytest.raises(KeyboardInterrupt), attach(model, opt, tmp_path, "r", total_steps=4, capture=IDENTITY) as rec:
        train_steps(model, opt, task, 2, rec)
        raise KeyboardInterrupt
    assert run_group(tmp_path).attrs["error"] == "KeyboardInterrupt: "
    with attach(model, opt, tmp_path, "r", total_steps=4, capture=IDENTITY, resume=True, start_step=rec.step) as rec:
        assert "error" not in run_group(tmp_path).attrs
        train_steps(model, opt, task, 4, rec, start=2)
    group = run_group(tmp_path)
    assert group.attrs["status"] == "complete" and "error" not in group.attrs and group["step"].shape == (4,)


def test_ctrl_c_in_a_final_probe_outside_the_step_hooks_loses_no_probe_row(tmp_path, task):
    """A Trainer's final probe (`probe_once` at the last step) runs outside the step hooks: Ctrl-C landing in its
    row's write lost the row but counted it."""
    probes = [Probe(s, *task.probe_set(s).torch()) for s in task.splits[:1]]
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=3, probes=probes,
                 capture=CaptureConfig(sketch="countsketch", dim=16, probe_every=2, chunk=1))
    train_steps(model, opt, task, 3, rec)
    interrupt_next_write(rec)
    with pytest.raises(KeyboardInterrupt):
        rec.probe_once()
    rec.close()
    group = run_group(tmp_path)
    assert group["probe/step"][:].tolist() == [0, 2, 3] and np.isfinite(group["probe/grad"][:]).all()


def test_each_probed_step_has_one_probe_row_when_closed_early_twice_or_resumed_at_0(tmp_path, task):
    probes = [Probe(s, *task.probe_set(s).torch()) for s in task.splits[:1]]
    capture = CaptureConfig(sketch="countsketch", dim=16, probe_every=2)
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with attach(model, opt, tmp_path, "early", total_steps=100, probes=probes, capture=capture) as rec:
        train_steps(model, opt, task, 4, rec)  # stopped at a probed step, long before total_steps
        rec.close()  # and closed inside the block that closes it again
    assert run_group(tmp_path, "early")["probe/step"][:].tolist() == [0, 2, 4]
    assert run_group(tmp_path, "early").attrs["status"] == "complete"

    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=4, probes=probes, capture=capture)
    train_steps(model, opt, task, 1, rec)  # killed before any checkpoint: resumed from the start, in a new process
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=4, probes=probes, capture=capture, resume=True)
    train_steps(model, opt, task, 4, rec)
    rec.close()
    assert run_group(tmp_path)["probe/step"][:].tolist() == [0, 2, 4]


def test_a_run_longer_than_its_total_steps_is_warned_about(tmp_path, task):
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    probes = [Probe(s, *task.probe_set(s).torch()) for s in task.splits[:1]]
    rec = attach(model, opt, tmp_path, "r", total_steps=2, probes=probes, capture=CaptureConfig(dim=16))
    with pytest.warns(UserWarning, match="optimizer step 3 is past total_steps=2") as caught:
        train_steps(model, opt, task, 3, rec)
    rec.close()
    assert caught[0].filename == __file__  # the loop's line (opt.step()), not torch's wrapper of the hook


def recorded_with(model, forward, tmp_path, run_id, task):
    """The run group of 4 steps of `model` trained through `forward` (the model itself, compiled, ...), probed."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    rec = attach(forward, opt, tmp_path, run_id, total_steps=4, probes=[Probe("ID", *task.probe_set("ID").torch())],
                 capture=CaptureConfig(sketch="identity", probe_every=2, chunk=4))
    for step in range(4):
        x, m = task.train_batch(step, 0, 16)
        loss = answer_cross_entropy(forward(input_ids=x).logits, x, m)
        opt.zero_grad()
        loss.backward()
        rec.log(loss)
        opt.step()
    rec.close()
    return run_group(tmp_path, run_id)


ARRAYS = ("loss", "grad", "update", "adam_m", "probe/grad", "probe/grad_adam")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # transformers 5
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_records_the_run_without_it(tmp_path, task, reentrant):
    """Recomputed activations change no gradient, and probes (eval mode: no checkpointing) run as ever."""
    plain = recorded_with(model := micro(task), model, tmp_path, "plain", task)
    model = micro(task)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    checkpointed = recorded_with(model, model, tmp_path, "checkpointed", task)
    assert model.training and all(m.training for m in model.modules())
    for name in ARRAYS:
        np.testing.assert_array_equal(checkpointed[name][:], plain[name][:])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's imports, not gradtrace
@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="transformers 4.47's GPT-NeoX attention views a non-contiguous "
                    "tensor, which inductor (torch 2.13) refuses to compile, gradtrace or not")
def test_a_compiled_model_records_what_its_optimizer_steps_with(tmp_path, task):
    """Attached to `torch.compile(model)`: the compiled forward's gradients, its updates, and probes of the bare
    model at its parameters (recomputed here), to float rounding of the eager run."""
    model = micro(task)
    compiled = recorded_with(model, torch.compile(model), tmp_path, "compiled", task)
    eager = recorded_with(eager_model := micro(task), eager_model, tmp_path, "eager", task)
    probe = Probe("ID", *task.probe_set("ID").torch())
    from gradtrace.evaluate import evaluating

    with evaluating(model):
        loss = answer_cross_entropy(model(input_ids=probe.tokens).logits, probe.tokens, probe.mask)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    np.testing.assert_allclose(compiled["probe/grad"][-1, 0, 0], torch.cat([g.reshape(-1) for g in grads]).numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(compiled["update"][:].sum(0), flat_params(model) - flat_params(micro(task)), atol=1e-6)
    for name in ("loss", "grad", "probe/grad"):
        np.testing.assert_allclose(compiled[name][:], eager[name][:], rtol=1e-3, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's imports, not gradtrace
def test_a_compiled_model_is_recorded_in_the_bare_models_layout():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    assert ParamLayout.of(unwrap_model(torch.compile(model))).hash == ParamLayout.of(model).hash


def test_resuming_with_another_capture_or_model_is_refused(tmp_path, task):
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=4, capture=CaptureConfig(dim=64, probe_every=0))
    train_steps(model, opt, task, 2, rec)
    rec.checkpoint()
    same = CaptureConfig(dim=64, probe_every=0)
    for capture, other, changed in [(CaptureConfig(dim=32, probe_every=0), model, "capture.dim: 64 → 32"),
                                    (CaptureConfig(dim=64, probe_every=0, seed=1), model, "capture.seed: 0 → 1"),
                                    (same, torch.nn.Linear(3, 3), "the model's trainable parameters")]:
        with pytest.raises(ValueError, match=f"cannot resume with another capture.*{changed}"):
            attach(other, torch.optim.AdamW(other.parameters()), tmp_path, "r", total_steps=4, capture=capture,
                   resume=True, start_step=2)
    with pytest.warns(UserWarning, match="never closed"):  # the recorder of the 'crashed' run, detached
        rec = attach(model, opt, tmp_path, "r", total_steps=6, capture=CaptureConfig(dim=64, probe_every=0, chunk=8),
                     resume=True, start_step=2)  # a longer run, written in other chunks: the same rows
    train_steps(model, opt, task, 6, rec, start=2)
    rec.close()
    assert run_group(tmp_path).attrs["steps"] == 6 and run_group(tmp_path)["step"][:].tolist() == list(range(6))

    # a run that sketches nothing still refuses another model (its per-tensor columns would shift), and probes of
    # other splits, or the same in another order (their rows would be labelled with the wrong splits)
    two = [Probe(s, *task.probe_set(s).torch()) for s in task.splits[:2]]
    bare = CaptureConfig(sketch="identity", quantities=[], probe_every=2)
    rec = attach(model, opt, tmp_path, "bare", total_steps=4, capture=bare, probes=two)
    train_steps(model, opt, task, 2, rec)
    rec.checkpoint()
    frozen = copy.deepcopy(model)
    frozen.get_output_embeddings().weight.requires_grad_(False)
    swapped = rf"probe splits: \['ID', '{two[1].split}'\] → \['{two[1].split}', 'ID'\]"
    for other, probes, changed in [(frozen, two, "the model's trainable parameters"), (model, two[::-1], swapped),
                                   (model, two[:1], "probe splits")]:
        with pytest.raises(ValueError, match=f"cannot resume with another capture.*{changed}"):
            attach(other, torch.optim.AdamW(other.parameters()), tmp_path, "bare", total_steps=4, capture=bare,
                   probes=probes, resume=True, start_step=2)


def recorded_probed(model, opt, task, out_dir, steps=4):
    """A plain loop recorded at every step (identity sketch, v statistics every step, ID probes every 2 steps): the
    run's group, its rows' update checked to sum to the parameters' change."""
    rec = attach(model, opt, out_dir, "r", total_steps=steps, capture=CaptureConfig(
        sketch="identity", probe_every=2, v_stats_every=1), probes=[Probe("ID", *task.probe_set("ID").torch())])
    before = flat_params(model)
    train_steps(model, opt, task, steps, rec)
    rec.close()
    group = run_group(out_dir)
    np.testing.assert_allclose(group["update"][:].sum(0), flat_params(model) - before, atol=1e-6)
    return group


class _StandIn(torch.optim.Optimizer):
    """Another library's optimizer as it keeps its state, for the tests: `update` steps one tensor."""

    def __init__(self, params, lr=3e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                self.update(p, group, self.state[p], *group["betas"])

    def update(self, p, group, state, beta1, beta2):
        raise NotImplementedError


class _BitsAndBytesAdamW32bit(_StandIn):
    """bitsandbytes' 32-bit AdamW as it keeps its state (its module's name, Adam's moments as state1 and state2)."""

    __module__ = "bitsandbytes.optim.adamw"

    def update(self, p, group, state, beta1, beta2):
        state["step"] = state.get("step", 0) + 1
        m = state.setdefault("state1", torch.zeros_like(p)).lerp_(p.grad, 1 - beta1)
        v = state.setdefault("state2", torch.zeros_like(p)).mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])


def _bitsandbytes_adamw(params):
    """bitsandbytes' AdamW8bit where installed (its moments 8-bit, quantized in blocks), else a stand-in keeping them
    as its 32-bit optimizers do."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes

        # every tensor 8-bit (by default only those of 4096 coordinates or more)
        return bitsandbytes.optim.AdamW8bit(params, lr=3e-3, min_8bit_size=0)
    return _BitsAndBytesAdamW32bit(params)


def test_bitsandbytes_adam_moments_are_read_under_their_names_dequantized(tmp_path, task):
    """bitsandbytes' Adam optimizers keep Adam's moments as state1 and state2, 8-bit ones quantized in blocks of 256:
    adam_m was refused at attach (and before that, at the first step). They are read, dequantized by bitsandbytes
    where 8-bit (AdamW8bit where bitsandbytes is installed; its 32-bit state otherwise): m as state1, v statistics
    and the probes' preconditioning from state2."""
    model = micro(task)
    opt = _bitsandbytes_adamw(model.parameters())
    group = recorded_probed(model, opt, task, tmp_path)
    m, quantized = [], 0
    for p in model.parameters():
        state = opt.state[p]
        if state["state1"].dtype == torch.uint8:
            from bitsandbytes.functional import dequantize_blockwise

            quantized += 1
            m.append(dequantize_blockwise(state["state1"], absmax=state["absmax1"], code=state["qmap1"], blocksize=256))
        else:
            m.append(state["state1"])
    np.testing.assert_array_equal(group["adam_m"][-1], torch.cat([t.reshape(-1) for t in m]).numpy())
    assert quantized == len(m) or importlib.util.find_spec("bitsandbytes") is None
    assert np.isfinite(group["layer_v_mean"][:]).all() and (group["layer_v_mean"][:] > 0).all()
    grads, adam = group["probe/grad"][:], group["probe/grad_adam"][:]
    assert np.isfinite(adam).all() and (np.abs(adam[1:]) > np.abs(grads[1:])).mean() > 0.9  # divided by √v̂ + ε


class _Lion(_StandIn):
    """Lion (Chen et al. 2023) as lion-pytorch keeps it: Adam's betas but no eps, one moment `exp_avg`."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99)):
        torch.optim.Optimizer.__init__(self, params, {"lr": lr, "betas": betas})

    def update(self, p, group, state, beta1, beta2):
        m = state.setdefault("exp_avg", torch.zeros_like(p))
        p.add_(torch.lerp(m, p.grad, 1 - beta1).sign_(), alpha=-group["lr"])
        m.lerp_(p.grad, 1 - beta2)


class _GroupStepAdam(_StandIn):
    """Adam as pytorch_optimizer's Adam-like optimizers keep it: the step count in the group, not in each tensor's
    state."""

    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
        super().step()

    def update(self, p, group, state, beta1, beta2):
        t = group["step"]
        m = state.setdefault("exp_avg", torch.zeros_like(p)).lerp_(p.grad, 1 - beta1)
        v = state.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        p.addcdiv_(m / (1 - beta1 ** t), (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"]), value=-group["lr"])


class _Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) as pytorch_optimizer wraps an optimizer: held as `.optimizer`, its groups
    shared, step hooks of its own, and every k-th step the parameters pulled toward slow copies after the base
    optimizer's step."""

    def __init__(self, optimizer, k=2, alpha=0.5):
        self.optimizer, self.k, self.alpha, self.steps = optimizer, k, alpha, 0
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = OrderedDict(), OrderedDict()
        self._patch_step_function()
        self.defaults, self.state = dict(optimizer.defaults), {}
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.k == 0:
            for p, slow in zip((p for g in self.param_groups for p in g["params"]), self.slow):
                p.copy_(slow.lerp_(p, self.alpha))


class _GaLoreAdamW(_StandIn):
    """GaLore (Zhao et al. 2024) as galore-torch's GaLoreAdamW keeps it: a group with a `rank` steps its matrices with
    Adam in a low-rank projection of their gradients, its moments of the projection's shape."""

    def update(self, p, group, state, beta1, beta2):
        g = p.grad
        if "rank" in group:
            state.setdefault("proj", torch.linalg.svd(g, full_matrices=False)[0][:, :group["rank"]])
            g = state["proj"].T @ g
        m = state.setdefault("exp_avg", torch.zeros_like(g)).lerp_(g, 1 - beta1)
        v = state.setdefault("exp_avg_sq", torch.zeros_like(g)).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["step"] = state.get("step", 0) + 1
        update = m / (v.sqrt() + group["eps"])
        p.add_(state["proj"] @ update if "rank" in group else update, alpha=-group["lr"])


def test_adam_moments_kept_in_a_low_rank_projection_are_read_as_not_kept(tmp_path, task):
    """GaLore (galore-torch's GaLoreAdamW, by hand) keeps its projected matrices' moments in the projection's shape:
    the first step failed with "expected a flat vector of 18304 parameters, got shape (3072,)". Those tensors read
    as stepped without Adam's moments (m 0, v statistics NaN, probes not preconditioned), with a warning, once."""
    model = micro(task)
    params = list(model.parameters())
    projected = [p.ndim == 2 and min(p.shape) > 4 for p in params]
    opt = _GaLoreAdamW([{"params": [p for p, low in zip(params, projected) if not low]},
                        {"params": [p for p, low in zip(params, projected) if low], "rank": 4}])
    with pytest.warns(UserWarning, match=rf"{sum(projected)} of the model's {len(params)} trainable .* keep Adam's "
                      "moments in another shape than theirs") as caught:
        group = recorded_probed(model, opt, task, tmp_path)
    assert [w.filename for w in caught if "another shape" in str(w.message)] == [__file__]
    m = [torch.zeros_like(p) if low else opt.state[p]["exp_avg"] for p, low in zip(params, projected)]
    np.testing.assert_array_equal(group["adam_m"][-1], torch.cat([t.reshape(-1) for t in m]).numpy())
    np.testing.assert_array_equal(np.isnan(group["layer_v_mean"][-1]), projected)
    assert group["probe/step"][:].tolist() == [0, 2, 4] and np.isfinite(group["probe/grad_adam"][:]).all()


def test_an_adam_like_optimizer_keeping_its_moments_outside_its_state_is_refused_adam_m_at_its_first_step(
        tmp_path, task):
    """grokadamw's GrokAdamW (by hand) keeps its moments in its param groups, its optimizer.state empty: adam_m was
    recorded as zeros at every step, as before a first step, without a word."""
    class StateElsewhere(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3, "betas": (0.9, 0.999)})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                moments = group.setdefault("moments", {})
                for p in (p for p in group["params"] if p.grad is not None):
                    p.add_(moments.setdefault(p, torch.zeros_like(p)).lerp_(p.grad, 0.1), alpha=-group["lr"])

    model = micro(task)
    opt = StateElsewhere(model.parameters())
    rec = attach(model, opt, tmp_path, "r", total_steps=2, capture=IDENTITY)
    with pytest.raises(ValueError, match=r"StateElsewhere keeps no exp_avg in its state \(optimizer.state\): drop "
                       "adam_m"):
        train_steps(model, opt, task, 1, rec)


@pytest.mark.parametrize("kind", ["Lion", "step per group", "Lookahead"])
def test_adam_like_optimizers_of_other_libraries_record_their_moments_and_whole_steps(tmp_path, task, kind):
    """Stand-ins for what failed with other libraries' optimizers (each run by hand too): lion-pytorch's Lion (no
    eps) at attach, with a KeyError; pytorch_optimizer's Adam-likes (their step count in the group) at the first
    probe, with a KeyError; pytorch_optimizer's Lookahead recorded its base AdamW's steps alone, missing the pull
    toward the slow weights (rows 0.006 off the parameters' change). Now the whole step, the base's m, and probes
    preconditioned by its v where it keeps one."""
    model = micro(task)
    base = {"Lion": _Lion, "step per group": _GroupStepAdam, "Lookahead": torch.optim.AdamW}[kind](model.parameters())
    opt = _Lookahead(base) if kind == "Lookahead" else base
    group = recorded_probed(model, opt, task, tmp_path)
    m = torch.cat([base.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    np.testing.assert_array_equal(group["adam_m"][-1], m.numpy())
    grads, adam = group["probe/grad"][:], group["probe/grad_adam"][:]
    assert group["probe/step"][:].tolist() == [0, 2, 4] and np.isfinite(adam).all()
    assert (np.abs(adam[1:]) > np.abs(grads[1:])).mean() > 0.9 if kind != "Lion" else np.array_equal(adam, grads)
    assert group.attrs["adam"] == ({"beta1": 0.9, "beta2": 0.99} if kind == "Lion" else
                                   {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8})


class _SAM(torch.optim.Optimizer):
    """SAM (Foret et al. 2021) as its reference implementation (and pytorch_optimizer's) builds it: the optimizer
    that steps held as `.base_optimizer`, stepped by `second_step` once the parameters `first_step` moved are put
    back."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, {"rho": rho, **kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        scale = self.param_groups[0]["rho"] / torch.stack([p.grad.norm() for p in params]).norm()
        for p in params:
            self.state[p]["old_p"] = p.clone()
            p.add_(p.grad * scale)

    @torch.no_grad()
    def second_step(self):
        for p in (p for g in self.param_groups for p in g["params"] if p.grad is not None):
            p.copy_(self.state[p]["old_p"])
        self.base_optimizer.step()

    def step(self, closure):
        self.first_step()
        self.zero_grad()
        torch.enable_grad()(closure)()
        self.second_step()


@pytest.mark.parametrize("usage", ["first_step and second_step", "step(closure)"])
def test_sam_records_its_base_optimizers_steps_with_the_gradient_at_the_perturbed_point(tmp_path, task, usage):
    """Loops with SAM call its first_step and second_step, never its step: attached to SAM, nothing was recorded and
    the run closed complete with no rows (pytorch_optimizer's SAM, by hand). Its base optimizer's steps are: the
    gradient taken at the perturbed parameters (the one it steps with), the whole Δθ, its Adam moments."""
    model = micro(task)
    opt = _SAM(model.parameters(), torch.optim.AdamW, lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=3, capture=CaptureConfig(sketch="identity", probe_every=0))
    before, first, used = flat_params(model), [], []
    for step in range(3):
        x, m = task.train_batch(step, 0, 16)

        def closure():
            loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
            loss.backward()
            return loss

        opt.zero_grad()
        rec.log(closure())
        first.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
        if usage == "step(closure)":
            opt.step(closure)
        else:
            opt.first_step()
            opt.zero_grad()
            closure()
            opt.second_step()
        used.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
    rec.close()
    group = run_group(tmp_path)
    assert group.attrs["status"] == "complete" and group["step"][:].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(group["grad"][:], np.stack(used))
    assert not np.allclose(group["grad"][:], np.stack(first), atol=1e-4)
    np.testing.assert_allclose(group["update"][:].sum(0), flat_params(model) - before, atol=1e-6)
    m = torch.cat([opt.base_optimizer.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    np.testing.assert_array_equal(group["adam_m"][-1], m.numpy())


def test_closing_a_run_whose_loop_stepped_another_optimizer_warns_that_nothing_was_recorded(tmp_path, task):
    """Losses logged, but the optimizer attached never stepped: the run closed complete with no rows, saying
    nothing."""
    model = micro(task)
    rec = attach(model, torch.optim.AdamW(model.parameters()), tmp_path, "r", total_steps=2, capture=IDENTITY)
    train_steps(model, torch.optim.AdamW(model.parameters()), task, 2, rec)
    with pytest.warns(UserWarning, match="rec.log was given 2 losses, but no step of the AdamW attached ran") as caught:
        rec.close()
    assert caught[0].filename == __file__


@pytest.mark.parametrize("kind", ["SGD", "schedule-free", "bitsandbytes per tensor", "Muon and SGD chained",
                                  "Muon and schedule-free chained"])
def test_an_optimizer_without_adam_moments_is_recorded_without_them(tmp_path, task, kind):
    """adam_m is refused at attach, on every rank (an idle one trained on, into DDP's all-reduce), for SGD and for
    schedule-free optimizers (schedulefree's, pytorch_optimizer's: z and exp_avg_sq, no exp_avg), which were
    refused at the first step, in the writing rank's hook only, and bitsandbytes' 8-bit state quantized per tensor
    (block_wise=False: not read). So for a chain of optimizers none of which keeps
    Adam's moments, or one of which keeps them otherwise. The rest is recorded."""
    model = micro(task)
    muon = muon_and_adamw(model)[0]
    rest = [p for p in model.parameters() if not any(p is q for q in muon.param_groups[0]["params"])]
    opt, refusal = {
        "SGD": (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "SGD keeps no Adam moments"),
        "schedule-free": (type("AdamWScheduleFree", (torch.optim.AdamW,), {})(model.parameters()),  # its name
                          r"AdamWScheduleFree keeps no Adam m \(schedule-free"),
        "bitsandbytes per tensor": (type("AdamW8bit", (_BitsAndBytesAdamW32bit,), {
            "__module__": "bitsandbytes.optim.adamw", "args": types.SimpleNamespace(block_wise=False)})(
            model.parameters()), r"AdamW8bit keeps 8-bit Adam moments quantized per tensor"),
        "Muon and SGD chained": (ChainedOptimizer(muon, torch.optim.SGD(rest, lr=0.1)),
                                 r"ChainedOptimizer\(Muon, SGD\) keeps no Adam moments"),
        "Muon and schedule-free chained": (ChainedOptimizer(muon, type("AdamWScheduleFree", (torch.optim.AdamW,), {})(
            rest)), r"AdamWScheduleFree keeps no Adam m \(schedule-free")}[kind]
    for write in (True, False):
        with pytest.raises(ValueError, match=f"{refusal}.*: drop it"):
            attach(model, opt, tmp_path, "r", total_steps=3, write=write)
    assert not (tmp_path / "store.zarr").exists()
    rec = attach(model, opt, tmp_path, "run", total_steps=3, capture=CaptureConfig(
        sketch="identity", quantities=["grad", "update"], probe_every=0, v_stats_every=1))
    before = flat_params(model)
    train_steps(model, opt, task, 3, rec)
    rec.close()
    group = run_group(tmp_path, "run")
    assert group["step"][:].tolist() == [0, 1, 2]
    if kind == "SGD":
        assert group.attrs["adam"] == {} and np.isnan(group["layer_v_mean"][:]).all()  # SGD keeps no v
    np.testing.assert_allclose(group["update"][:].sum(0), flat_params(model) - before, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["SGD", "LBFGS"])
def test_a_step_given_a_closure_records_the_gradient_the_closure_computed(tmp_path, task, optimizer):
    """`optimizer.step(closure)` computes the gradient inside the step: it was read before, so each row held the
    previous step's gradient (row 0 zeros). LBFGS records its last evaluation's, the one it leaves in `.grad`."""
    model = micro(task)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer == "SGD"
           else torch.optim.LBFGS(model.parameters(), lr=0.05, max_iter=3))
    rec = attach(model, opt, tmp_path, "r", total_steps=4, capture=CaptureConfig(
        sketch="identity", quantities=["grad", "update"], probe_every=0))
    used, losses, start = [], [], flat_params(model)
    for step in range(4):
        x, m = task.train_batch(step, 0, 16)

        def closure():
            opt.zero_grad()
            loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
            loss.backward()
            rec.log(loss)  # each evaluation's: LBFGS's several are averaged
            losses.append(loss.item())
            return loss
        opt.step(closure) if step % 2 else opt.step(closure=closure)
        used.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
    rec.close()
    group = run_group(tmp_path)
    np.testing.assert_allclose(group["grad"][:], np.stack(used), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(group["grad_norm"][:], np.linalg.norm(np.stack(used), axis=1), rtol=1e-5)
    np.testing.assert_allclose(group["update"][:].sum(0), flat_params(model) - start, atol=1e-6)
    if optimizer == "SGD":  # one evaluation a step
        np.testing.assert_allclose(group["loss"][:], losses, rtol=1e-6)


def test_a_compiled_optimizer_step_is_recorded(tmp_path, task):
    """torch.compile's recipe for a fast optimizer step traced into the hooks and down into zarr's writer: the
    run died at its first full chunk."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = torch.compile(opt.step, backend="eager")  # traced by dynamo as inductor would be, compiled by nothing
    rec = attach(model, opt, tmp_path, "r", total_steps=6, capture=CaptureConfig(sketch="identity", probe_every=0,
                                                                                  chunk=2))
    used, moved = [], []
    for i in range(6):
        x, m = task.train_batch(i, 0, 16)
        opt.zero_grad()
        answer_cross_entropy(model(input_ids=x).logits, x, m).backward()
        used.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
        before = flat_params(model)
        step()
        moved.append(flat_params(model) - before)
    rec.close()
    group = run_group(tmp_path)
    assert group["step"][:].tolist() == list(range(6))
    np.testing.assert_allclose(group["grad"][:], np.stack(used), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(group["update"][:], np.stack(moved), rtol=1e-5, atol=1e-9)
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    np.testing.assert_allclose(group["adam_m"][-1], m.numpy(), rtol=1e-5, atol=1e-10)


def test_probes_and_v_statistics_under_an_optimizer_of_other_moments(tmp_path, task):
    """Adafactor (transformers) names its second moment exp_avg_sq, for its unfactored tensors only: probes raised
    KeyError 'betas' inside its first step, and v statistics read 0 for the factored tensors."""
    from transformers.optimization import Adafactor

    model = micro(task)
    opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
    rec = attach(model, opt, tmp_path, "r", total_steps=3, probes=[Probe("ID", *task.probe_set("ID").torch())],
                 capture=CaptureConfig(sketch="identity", quantities=["grad", "update"], probe_every=1,
                                       v_stats_every=1))
    train_steps(model, opt, task, 3, rec)
    rec.close()
    group = run_group(tmp_path)
    assert group.attrs["status"] == "complete" and np.isnan(group["layer_v_mean"][:]).all()
    np.testing.assert_array_equal(group["probe/grad_adam"][:], group["probe/grad"][:])  # no Adam v: unpreconditioned


def test_amsgrad_probes_are_preconditioned_by_the_running_maximum_of_v(tmp_path, task):
    """AMSGrad divides by √max v̂: probe/grad_adam used v (25% off its norm once the gradient scale fell)."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), amsgrad=True)
    rec = attach(model, opt, tmp_path, "r", total_steps=8, probes=[Probe("ID", *task.probe_set("ID").torch())],
                 capture=CaptureConfig(sketch="identity", probe_every=4))
    for step in range(8):
        x, m = task.train_batch(step, 0, 16)
        opt.zero_grad()
        (answer_cross_entropy(model(input_ids=x).logits, x, m) * (1.0 if step < 4 else 0.05)).backward()
        opt.step()
    rec.close()
    group = run_group(tmp_path)
    v_hat = torch.cat([opt.state[p]["max_exp_avg_sq"].reshape(-1) / (1 - 0.99 ** float(opt.state[p]["step"]))
                       for p in model.parameters()])
    assert not torch.equal(v_hat, torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()]))
    g, adam = group["probe/grad"][-1, 0, 0], group["probe/grad_adam"][-1, 0, 0]
    np.testing.assert_allclose(adam, g / (v_hat.sqrt() + opt.defaults["eps"]).numpy(), rtol=1e-5, atol=1e-12)


def test_the_norm_before_clipping_can_be_logged_without_a_loss(tmp_path, task):
    """With gradient accumulation the norm exists only after the last micro-batch's loss: it had to come with a
    loss, which then joined the step's average twice."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=2, capture=IDENTITY)
    losses, norms = [], []
    for step in range(2):
        opt.zero_grad()
        for micro_batch in range(2):
            x, m = task.train_batch(2 * step + micro_batch, 0, 8)
            loss = answer_cross_entropy(model(input_ids=x).logits, x, m) / 2
            loss.backward()
            rec.log(loss)
            losses.append(loss.item())
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1).item())
        rec.log(grad_norm=norms[-1])
        opt.step()
    rec.close()
    group = run_group(tmp_path)
    np.testing.assert_allclose(group["loss"][:], np.reshape(losses, (2, 2)).mean(1), rtol=1e-6)
    np.testing.assert_allclose(group["grad_norm_unclipped"][:], norms, rtol=1e-6)


def test_an_optimizer_holding_some_of_the_parameters_is_warned_about(tmp_path, task):
    """Two optimizers (e.g. embeddings apart): `update` sees only the attached one's step, and says so."""
    model = micro(task)
    embedding = [p for n, p in model.named_parameters() if "embed" in n]
    rest = [p for n, p in model.named_parameters() if "embed" not in n]
    with pytest.warns(UserWarning, match=f"holds {len(rest)} of the model's {len(rest) + len(embedding)} trainable"
                      r".*ChainedOptimizer\(muon, adamw\)") as caught:
        attach(model, torch.optim.AdamW(rest, lr=3e-3), tmp_path, "two", total_steps=2, capture=IDENTITY)
    assert caught[0].filename == __file__  # the caller's attach, not gradtrace's Recorder
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach(model, torch.optim.AdamW(model.parameters(), lr=3e-3), tmp_path, "one", total_steps=2,
               capture=IDENTITY)
        attach(model, torch.optim.AdamW(rest, lr=3e-3), tmp_path, "grad", total_steps=2,
               capture=CaptureConfig(sketch="identity", probe_every=0, quantities=["grad", "adam_m"]))


def muon_and_adamw(model) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """torch's Muon recipe: Muon for the blocks' matrices, AdamW for the rest (embeddings, norms, biases)."""
    muon = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    return torch.optim.Muon(muon, lr=0.02), torch.optim.AdamW(rest, lr=3e-3)


@pytest.mark.parametrize("lookahead", [False, True])
def test_a_model_trained_by_muon_and_adamw_chained_is_recorded_whole(tmp_path, task, lookahead):
    """Attached to either of two optimizers, `update` read 0 for the other's tensors. Chained, one step steps both as
    the loop stepping each did, and the rows hold the whole Δθ, AdamW's m (0 for Muon's tensors, which keep none)
    and v statistics (NaN for Muon's), the run's `adam` attributes AdamW's; AdamW's m too where a Lookahead wraps
    it in the chain (the chain's state is the Lookahead's)."""
    def wrapped(optimizers):
        return (optimizers[0], _Lookahead(optimizers[1])) if lookahead else optimizers

    apart, chained = micro(task), micro(task)
    optimizers = wrapped(muon_and_adamw(apart))
    for step in range(3):
        x, m = task.train_batch(step, 0, 16)
        loss = answer_cross_entropy(apart(input_ids=x).logits, x, m)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(apart.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
    muon, adamw = muon_and_adamw(chained)
    opt = ChainedOptimizer(*wrapped((muon, adamw)))
    n_muon = len(muon.param_groups[0]["params"])
    with pytest.warns(UserWarning, match=rf"{n_muon} of the model's \d+ trainable .* \(by Muon\): adam_m reads 0 "
                      "for them, and their v statistics NaN") as caught:
        rec = attach(chained, opt, tmp_path, "r", total_steps=3, capture=CaptureConfig(
            sketch="identity", probe_every=0, v_stats_every=1))
    assert [w.filename for w in caught] == [__file__]
    before = flat_params(chained)
    train_steps(chained, opt, task, 3, rec)
    rec.close()
    np.testing.assert_array_equal(flat_params(chained), flat_params(apart))
    group = run_group(tmp_path)
    np.testing.assert_allclose(group["update"][:].sum(0), flat_params(chained) - before, atol=1e-6)
    held_by_muon = [any(p is q for q in muon.param_groups[0]["params"]) for p in chained.parameters()]
    m = [torch.zeros_like(p) if by_muon else adamw.state[p]["exp_avg"]
         for p, by_muon in zip(chained.parameters(), held_by_muon)]
    np.testing.assert_array_equal(group["adam_m"][-1], torch.cat([t.reshape(-1) for t in m]).numpy())
    np.testing.assert_array_equal(np.isnan(group["layer_v_mean"][:]).all(0), held_by_muon)
    assert not np.isnan(group["layer_v_mean"][:][:, ~np.array(held_by_muon)]).any()
    assert group.attrs["adam"] == {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def llrd_groups(model, embeddings_lr: float, rest_lr: float) -> list[dict]:
    """Layer-wise learning rates: the embeddings' group first."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if "embed" in n], "lr": embeddings_lr},
            {"params": [p for n, p in named if "embed" not in n], "lr": rest_lr}]


def test_parameter_groups_of_other_learning_rates_record_each_tensors_and_refuse_adam_update(tmp_path, task):
    """`lr` is the first group's; `layer_lr` each tensor's, as its scheduler moves it. −Δθ/lr (`adam_update`)
    divided every tensor's update by the first group's rate: 10× Adam's direction for the others, silently; it is
    refused where moving tensors' rates differ, and divides by the moving ones' where the first group's is 0 (a group
    frozen by its learning rate, which was refused as 'zero throughout')."""
    from gradtrace.subspace import run_span

    for run_id, rates in (("llrd", (1e-3, 1e-2)), ("frozen", (0.0, 3e-3))):
        model = micro(task)
        opt = torch.optim.AdamW(llrd_groups(model, *rates))
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (step + 1))
        rec = attach(model, opt, tmp_path, run_id, total_steps=4, capture=CaptureConfig(
            sketch="countsketch", dim=64, probe_every=0))
        for step in range(4):
            train_steps(model, opt, task, step + 1, rec, start=step)
            scheduler.step()
        rec.close()
        group = run_group(tmp_path, run_id)
        in_embeddings = np.array(["embed" in n for n, _ in model.named_parameters()])
        expected = np.array([[rates[0] if e else rates[1] for e in in_embeddings] for _ in range(4)], np.float32)
        expected /= np.arange(1, 5, dtype=np.float32)[:, None]
        np.testing.assert_allclose(group["layer_lr"][:], expected, rtol=1e-6)
        np.testing.assert_allclose(group["lr"][:], expected[:, 0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"groups of run 'llrd' stepped with different ones \(0.001, 0.01 at step 0, "
                                         r"and so in 4 of the selected steps\).*take quantity='update'"):
        run_span(run_group(tmp_path, "llrd"), "adam_update", rank=2)
    assert run_span(run_group(tmp_path, "llrd"), "update", rank=2).rank == 2
    frozen = run_group(tmp_path, "frozen")
    moving = np.flatnonzero(~in_embeddings)[:1]  # a tensor of the group that moves (transformers 4 names the output
    rows = -frozen["update"][:].astype(np.float64) / frozen["layer_lr"][:, moving]  # layer embed_out: in the other)
    np.testing.assert_allclose(run_span(frozen, "adam_update", rank=2).singular_values,
                               np.linalg.svd(rows, compute_uv=False)[:2], rtol=1e-4)


def test_a_run_recorded_without_learning_rates_per_tensor_resumes_with_them_unrecorded(tmp_path, task):
    """A run an older gradtrace recorded (no `layer_lr`), resumed: its earlier rows read NaN there, not the new
    rows shifted onto them, and `adam_update` divides those by `lr`."""
    from gradtrace.subspace import run_span

    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=6, capture=IDENTITY)
    train_steps(model, opt, task, 4, rec)
    rec.checkpoint()
    rec.detach()
    del zarr.open_group(tmp_path / "store.zarr", mode="a")["r"]["layer_lr"]
    rec = attach(model, opt, tmp_path, "r", total_steps=6, capture=IDENTITY, resume=True, start_step=4)
    train_steps(model, opt, task, 6, rec, start=4)
    rec.close()
    group = run_group(tmp_path)
    assert group["step"][:].tolist() == list(range(6))
    layer_lr = group["layer_lr"][:]
    assert layer_lr.shape == (6, len(list(model.parameters()))) and np.isnan(layer_lr[:4]).all()
    np.testing.assert_array_equal(layer_lr[4:], np.float32(3e-3))
    rows = -group["update"][:].astype(np.float64) / 3e-3
    np.testing.assert_allclose(run_span(group, "adam_update", rank=2).singular_values,
                               np.linalg.svd(rows, compute_uv=False)[:2], rtol=1e-4)


def test_a_chain_steps_saves_resumes_and_schedules_its_optimizers_as_one(task):
    """A chain resumed from its state_dict (and its scheduler's) trains on as the chain never stopped; one scheduler
    schedules both optimizers' groups; what would split a parameter's optimizer, or add a group the chain would not
    step, is refused."""
    def trained(model, opt, sched, steps, start=0):
        for step in range(start, steps):
            train_steps(model, opt, task, step + 1, start=step)
            sched.step()

    def chain_of(model):
        opt = ChainedOptimizer(*muon_and_adamw(model))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)

    uninterrupted = micro(task)
    opt, sched = chain_of(uninterrupted)
    trained(uninterrupted, opt, sched, 4)
    assert [g["lr"] for g in opt.param_groups] == [0.02 / 16, 3e-3 / 16]
    assert [g["lr"] for o in opt.optimizers for g in o.param_groups] == [0.02 / 16, 3e-3 / 16]

    model = micro(task)
    opt, sched = chain_of(model)
    trained(model, opt, sched, 2)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    model = micro(task, seed=1)
    model.load_state_dict(saved[0])
    opt, sched = chain_of(model)
    opt.load_state_dict(saved[1])
    sched.load_state_dict(saved[2])
    trained(model, opt, sched, 4, start=2)
    np.testing.assert_array_equal(flat_params(model), flat_params(uninterrupted))
    assert len(copy.deepcopy(opt).state) == len(opt.state) == len(list(model.parameters()))
    for inner in opt.optimizers:  # each tensor's state is its own optimizer's (Muon's momentum, AdamW's moments)
        for p in (p for group in inner.param_groups for p in group["params"]):
            assert sorted(opt.state[p]) == sorted(inner.state[p]) != []

    with pytest.raises(ValueError, match="not the state of a chain of 2 optimizers"):
        opt.load_state_dict(opt.optimizers[0].state_dict())
    with pytest.raises(TypeError, match="add the group to the chained optimizer that is to step it"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(ValueError, match="a parameter is held by both SGD and AdamW"):
        ChainedOptimizer(torch.optim.SGD(list(model.parameters())[:1], lr=0.1), torch.optim.AdamW(model.parameters()))
    with pytest.raises(TypeError, match=r"takes torch.optim.Optimizer instances, got \['Linear'\]"):
        ChainedOptimizer(torch.nn.Linear(2, 2))
    prepared = type("AcceleratedOptimizer", (torch.optim.AdamW,), {"__module__": "accelerate.optimizer"})  # its name
    with pytest.raises(TypeError, match="then prepare the chain .* not accelerate's AcceleratedOptimizer"):
        ChainedOptimizer(prepared(model.parameters()))  # which steps only at the end of an accumulation


def test_a_chains_own_state_dict_hooks_run_as_an_optimizers_do(task):
    """Hooks registered on the chain (`register_state_dict_post_hook` and its kin) were not run: its state_dict and
    load_state_dict skipped torch's Optimizer's. They run in torch's order; the post-hooks of saving and the pre-hooks
    of loading may give another state dict."""
    opt = ChainedOptimizer(*muon_and_adamw(micro(task)))
    ran = []
    opt.register_state_dict_pre_hook(lambda o: ran.append(("save pre", o)))
    opt.register_state_dict_post_hook(lambda o, state: {**state, "note": "mine"})
    opt.register_load_state_dict_pre_hook(lambda o, state: {k: v for k, v in state.items() if k != "note"})
    opt.register_load_state_dict_post_hook(lambda o: ran.append(("load post", o)))
    state = opt.state_dict()
    assert state["note"] == "mine" and len(state["optimizers"]) == 2
    opt.load_state_dict(state)
    assert ran == [("save pre", opt), ("load post", opt)] and "note" in state  # the caller's dict is left as given


def test_parameters_unfrozen_after_attach_are_warned_about(tmp_path, task):
    """Gradual unfreezing after attach: the layout fixed at attach leaves the unfrozen tensors out, and says so."""
    model = micro(task)
    embedding = [p for n, p in model.named_parameters() if "embed_in" in n]
    for p in embedding:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=4, capture=IDENTITY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, opt, task, 2, rec)
    for p in embedding:
        p.requires_grad_(True)
    with pytest.warns(UserWarning, match=f"{len(embedding)} parameter tensors were unfrozen after attach") as caught:
        train_steps(model, opt, task, 4, rec, start=2)
    assert sum("unfrozen" in str(w.message) for w in caught) == 1  # once, not every step
    assert [w.filename for w in caught if "unfrozen" in str(w.message)] == [__file__]
    rec.close()


def test_progressive_unfreezing_resumes_from_a_checkpoint_attached_as_at_its_start(tmp_path, task):
    """Layers unfrozen partway: a run whose tensors were frozen at attach, resumed with them trainable (as at the step
    it resumes at), is refused naming them and the way on (it said only "layout hash"); attached with every tensor
    trainable and frozen after, the run resumes to the rows of an uninterrupted one."""
    def frozen(model, step):
        for name, p in model.named_parameters():
            p.requires_grad_(step >= 3 or "embed_in" not in name)

    def run(run_id, stop=None, start=0, state=None):
        model = micro(task)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        if state:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        rec = attach(model, opt, tmp_path, run_id, total_steps=6, capture=IDENTITY, resume=start > 0,
                     start_step=start)
        for step in range(start, stop or 6):
            frozen(model, step)
            train_steps(model, opt, task, step + 1, rec, start=step)
        rec.checkpoint()
        return model, opt, rec

    run("whole")[2].close()
    model, opt, rec = run("resumed", stop=4)
    state = copy.deepcopy((model.state_dict(), opt.state_dict()))
    rec.detach()
    run("resumed", start=4, state=state)[2].close()
    whole, resumed = run_group(tmp_path, "whole"), run_group(tmp_path, "resumed")
    assert resumed.attrs["status"] == "complete" and resumed["step"][:].tolist() == list(range(6))
    for name in ("grad", "update", "adam_m", "loss"):
        np.testing.assert_array_equal(resumed[name][:], whole[name][:])

    model = micro(task)
    frozen(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "late", total_steps=6, capture=IDENTITY)
    with pytest.warns(UserWarning, match="unfrozen after attach"):
        for step in range(4):
            frozen(model, step)
            train_steps(model, opt, task, step + 1, rec, start=step)
    rec.checkpoint()
    rec.detach()
    with pytest.raises(ValueError, match=r"1 tensor\(s\) trainable now, not at its attach \(gpt_neox.embed_in.weight\)"
                                         r"; attach with those trainable at the run's first attach"):
        attach(model, torch.optim.AdamW(model.parameters()), tmp_path, "late", total_steps=6, capture=IDENTITY,
               resume=True, start_step=4)


def test_a_tensor_frozen_after_attach_is_probed_with_a_zero_gradient(tmp_path, task):
    """Freezing embeddings after a warm-up (or PEFT's set_adapter): the next probe raised autograd's bare
    "One of the differentiated Tensors does not require grad" out of optimizer.step() and close()."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    probe = Probe("ID", *task.probe_set("ID").torch())
    rec = attach(model, opt, tmp_path, "r", total_steps=4, probes=[probe],
                 capture=CaptureConfig(sketch="identity", probe_every=2))
    train_steps(model, opt, task, 1, rec)
    frozen = model.get_input_embeddings().weight.requires_grad_(False)
    train_steps(model, opt, task, 4, rec, start=1)
    rec.close()
    group = run_group(tmp_path)
    assert group.attrs["status"] == "complete" and group["probe/step"][:].tolist() == [0, 2, 4]
    model.zero_grad()
    answer_cross_entropy(model(input_ids=probe.tokens).logits, probe.tokens, probe.mask).backward()
    expected = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                          for p in model.parameters()])  # the frozen tensor: none, recorded as zeros
    assert not frozen.requires_grad and frozen.grad is None
    np.testing.assert_allclose(group["probe/grad"][-1, 0, 0], expected.numpy(), rtol=1e-4, atol=1e-7)


def test_a_final_probe_that_fails_marks_the_run_failed_and_detaches(tmp_path, task):
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=2, probes=[Probe("ID", *task.probe_set("ID").torch())],
                 capture=CaptureConfig(sketch="identity", probe_every=0))
    train_steps(model, opt, task, 2, rec)
    rec.probe_losses = {"broken": lambda *args: (_ for _ in ()).throw(RuntimeError("no loss today"))}
    with pytest.raises(RuntimeError, match="no loss today"):
        rec.close()
    group = run_group(tmp_path)
    assert group.attrs["status"] == "failed" and "no loss today" in group.attrs["error"]  # it stayed "running"
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # and kept its hooks


def test_a_first_step_without_gradients_records_m_as_zero(tmp_path, task):
    """A step on which no parameter has a gradient yet (Adam creates no state): m is 0, not an optimizer without m."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=3, capture=IDENTITY)
    opt.step()  # every .grad is None: Adam skips every parameter
    train_steps(model, opt, task, 3, rec, start=1)
    rec.close()
    group = run_group(tmp_path)
    assert group["step"][:].tolist() == [0, 1, 2] and not group["adam_m"][0].any()
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    np.testing.assert_allclose(group["adam_m"][-1], m.numpy(), rtol=1e-5, atol=1e-8)


def test_attach_on_a_non_writing_rank_is_idle(tmp_path, task):
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=2, write=False)
    assert isinstance(rec, IdleRecorder)
    train_steps(model, opt, task, 2, rec)
    rec.close()
    rec.fail(RuntimeError("a loop's own handler"))  # what a loop calls on the writing rank's recorder, it may here
    rec.detach()
    assert not (tmp_path / "store.zarr").exists()
    public = {name for name in dir(RunRecorder) if not name.startswith("_")}
    assert public - set(dir(IdleRecorder)) == {"attrs", "probe", "probe_once"}  # the Recorder's, not the loop's


# -- the Recorder's fast paths (linearity for m, numpy quantiles of v), checked against the optimizer's state -------
@pytest.mark.parametrize("fused", [False, True])
def test_sketched_adam_state_matches_the_optimizer(tmp_path, task, fused):
    """sketch(m) carried by linearity (unfused and fused AdamW) equals the sketch of the real m;
    per-tensor v quantiles equal torch.quantile of the same coordinates."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, fused=fused)
    rec = attach(model, opt, tmp_path, "r", total_steps=12,
                 capture=CaptureConfig(dim=256, probe_every=0, v_stats_every=1))
    train_steps(model, opt, task, 12, rec)
    rec.close()
    group = run_group(tmp_path)
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    np.testing.assert_allclose(group["adam_m"][-1], rec.sketch.apply(m).numpy(), rtol=1e-4, atol=1e-7)
    sample = rec._v_sample.sample([opt.state[p]["exp_avg_sq"] for p in model.parameters()])
    expected = [torch.quantile(sample[a:b], torch.tensor([0.5, 0.9, 0.99])) for a, b in rec._v_sample.bounds]
    np.testing.assert_allclose(group["layer_v_quantile"][-1], torch.stack(expected).numpy(), rtol=1e-5)


def test_sketched_m_under_adams_l2_weight_decay_is_the_optimizers(tmp_path, task):
    """torch.optim.Adam's weight_decay adds wd·θ to the gradient before m takes it: m is then no EMA of the recorded
    gradients, so its sketch is taken from m itself, not carried by linearity (carried, it was 7% off after 20 steps
    and unrelated to the real m's after 200; no test had Adam with L2 decay)."""
    model = micro(task)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
    rec = attach(model, opt, tmp_path, "r", total_steps=20, capture=CaptureConfig(dim=256, probe_every=0))
    train_steps(model, opt, task, 20, rec)
    rec.close()
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    np.testing.assert_allclose(run_group(tmp_path)["adam_m"][-1], rec.sketch.apply(m).numpy(), rtol=1e-4, atol=1e-7)


def attached_in(dtype, task, tmp_path, steps: int, lr: float = 3e-3, **capture):
    """A micro model in `dtype`, its AdamW and a Recorder on them (k = 256, no probes, `capture` besides)."""
    model = micro(task).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rec = attach(model, opt, tmp_path, "r", total_steps=steps, capture=CaptureConfig(dim=256, probe_every=0,
                                                                                    **capture))
    return model, opt, rec


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_in_another_dtype_is_recorded_in_float32(tmp_path, task, dtype):
    """Parameters (hence g, m, v) in float64 or bf16: every row is stored in float32, v's mean and quantiles as
    above (float64 norms took their own path, where an L2 norm for v's L1 passed)."""
    model, opt, rec = attached_in(dtype, task, tmp_path, 4, v_stats_every=1)
    train_steps(model, opt, task, 4, rec)
    rec.close()
    group = run_group(tmp_path)
    assert group["grad"].dtype == np.float32 and np.isfinite(group["adam_m"][:]).all()
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()]).float()
    np.testing.assert_allclose(group["adam_m"][-1], rec.sketch.apply(m).numpy(), rtol=1e-4, atol=1e-7)
    v_mean = [opt.state[p]["exp_avg_sq"].double().mean().item() for p in model.parameters()]
    np.testing.assert_allclose(group["layer_v_mean"][-1], v_mean, rtol=1e-4 if dtype == torch.float64 else 1e-2)
    sample = rec._v_sample.sample([opt.state[p]["exp_avg_sq"] for p in model.parameters()]).float()
    expected = [torch.quantile(sample[a:b], torch.tensor([0.5, 0.9, 0.99])) for a, b in rec._v_sample.bounds]
    np.testing.assert_allclose(group["layer_v_quantile"][-1], torch.stack(expected).numpy(), rtol=1e-5)


@pytest.mark.parametrize("sketch", ["countsketch", "identity"])
def test_a_float64_models_update_is_formed_in_float64(tmp_path, task, sketch):
    """Δθ ≪ θ at a small lr: θ_t snapshotted in float32 would leave only rounding of θ in θ_{t+1} − θ_t."""
    model, opt, rec = attached_in(torch.float64, task, tmp_path, 2, lr=1e-7, sketch=sketch)
    deltas = []
    for step in range(2):
        before = flat_params(model)
        train_steps(model, opt, task, step + 1, rec, start=step)
        deltas.append(flat_params(model) - before)
    rec.close()
    expected = torch.stack([rec.sketch.apply(torch.from_numpy(d)) for d in deltas])
    np.testing.assert_allclose(store.read(run_group(tmp_path), "update"), expected.numpy(), rtol=1e-5, atol=1e-14)


def test_a_model_cast_to_float64_after_attach_has_its_update_formed_in_float64(tmp_path, task):
    model, opt, rec = attached_in(torch.float32, task, tmp_path, 2, lr=1e-7, sketch="identity")
    model.double()  # after attach: the snapshot of θ must follow, or Δθ is θ's float32 rounding
    train_steps(model, opt, task, 1, rec)  # θ now holds float64 values float32 cannot
    before = flat_params(model)
    train_steps(model, opt, task, 2, rec, start=1)
    delta = flat_params(model) - before
    rec.close()
    np.testing.assert_allclose(store.read(run_group(tmp_path), "update")[1], delta, rtol=1e-5, atol=1e-14)


def test_parameters_without_gradients_keep_the_sketched_moment_exact(tmp_path, task):
    """Adam skips a parameter whose .grad is None (its m is not decayed, or never created): sketch(m) still matches."""
    model = micro(task)
    extra = torch.nn.Parameter(torch.ones(7))
    model.register_parameter("extra", extra)
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(5)))  # never has a gradient, nor Adam state
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=5, capture=CaptureConfig(dim=128, probe_every=0))
    for step in range(5):
        x, m = task.train_batch(step, 0, 16)
        loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
        if step < 2:  # `extra` gets gradients on the first steps only, then has .grad None
            loss = loss + extra.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rec.close()
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) if p in opt.state else torch.zeros(p.numel())
                   for p in model.parameters()])
    np.testing.assert_allclose(run_group(tmp_path)["adam_m"][-1], rec.sketch.apply(m).numpy(), rtol=1e-4, atol=1e-7)


# -- accelerate ----------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons: start and leave each test with clean ones."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerate_accumulation_records_sync_steps_only(tmp_path, task, fresh_accelerate):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = micro(task)
    initial = flat_params(model)
    model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    rec = attach(model, opt, tmp_path, "r", total_steps=3, capture=IDENTITY)
    micro_losses = []
    for i in range(6):  # 6 micro-batches, 3 optimizer steps
        x, m = task.train_batch(i, 0, 8)
        with accelerator.accumulate(model):
            loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            rec.log(loss)
            opt.step()
            opt.zero_grad()
        micro_losses.append(loss.item())
    rec.close()
    group = run_group(tmp_path)
    assert group["step"][:].tolist() == [0, 1, 2]
    np.testing.assert_allclose(group["loss"][:], np.reshape(micro_losses, (3, 2)).mean(1), rtol=1e-6)
    np.testing.assert_allclose(store.read(group, "update").sum(0), flat_params(model) - initial, atol=2e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: DDP training recorded by rank 0, then a sharded sketch summed across ranks."""
    from accelerate import Accelerator

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    task = ArithmeticTask(tiny_config().task)
    model = micro(task)
    initial = flat_params(model)
    model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    probes = [Probe("ID", *task.probe_set("ID").torch())]
    rec = attach(model, opt, out_dir, "ddp", total_steps=4, probes=probes,
                 capture=CaptureConfig(sketch="identity", probe_every=2, chunk=4))
    for step in range(4):
        x, m = task.train_batch(step, rank, 8)  # each rank its own data
        loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
        opt.zero_grad()
        accelerator.backward(loss)
        rec.log(loss)
        opt.step()
    rec.close()

    sketch = make_sketch("countsketch", ParamLayout(("w",), ((1000,),)), 64, seed=5)
    full = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    lo, hi = (0, 380) if rank == 0 else (380, 1000)  # disjoint, unequal shards
    summed = sketch_sharded(sketch, full[lo:hi], lo)
    torch.save({"idle": isinstance(rec, IdleRecorder), "initial": initial, "final": flat_params(model),
                "sharded": summed, "whole": sketch.apply(full)}, f"{out_dir}/rank{rank}.pt")
    accelerator.end_training()


def test_ddp_two_processes_rank0_writes_once_and_sharded_sketches_sum(tmp_path):
    torch.multiprocessing.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")  # fork can inherit a lock held by another thread
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert not r0["idle"] and r1["idle"]
    np.testing.assert_array_equal(r0["final"], r1["final"])  # DDP kept the replicas identical
    root = zarr.open_group(tmp_path / "store.zarr", mode="r")
    assert store.runs(root) == ["ddp"]
    group = root["ddp"]
    assert group["step"][:].tolist() == [0, 1, 2, 3] and group.attrs["status"] == "complete"
    assert group["probe/step"][:].tolist() == [0, 2, 4]
    np.testing.assert_allclose(store.read(group, "update").sum(0), r0["final"] - r0["initial"], atol=2e-6)
    for r in (r0, r1):  # linearity: the all-reduced shard sketches are the sketch of the whole vector
        torch.testing.assert_close(r["sharded"], r["whole"], rtol=1e-5, atol=1e-5)


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: attach (and a Recorder made directly) to the model sharded by FSDP2 and by FSDP1
    (flat and original parameters), saving what each gave or raised on this rank; then the sketch of FSDP2's
    gradient shards, each at its offset (fully_shard splits dim 0 as torch.chunk does) and summed by
    `sketch_sharded`, and the sketch of the gathered gradient."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    task = ArithmeticTask(tiny_config().task)
    shardings = {"fsdp2": fully_shard, **{f"fsdp1_{kind}": functools.partial(
        FullyShardedDataParallel, use_orig_params=kind == "orig", device_id=torch.device("cpu"))  # on the CPU if told
        for kind in ("flat", "orig")}}

    def outcome(make) -> str:
        try:
            return type(make()).__name__
        except Exception as err:  # the refusal, or (unrefused) what failed
            return f"{type(err).__name__}: {err}"

    outcomes = {}
    for name, shard in shardings.items():
        model = shard(micro(task))
        opt = torch.optim.AdamW(model.parameters())
        outcomes[name] = outcome(lambda: attach(model, opt, out_dir, name, total_steps=2, capture=IDENTITY))
        outcomes[f"{name} Recorder"] = outcome(lambda: Recorder(model, opt, None, IDENTITY, 2))  # before its writer
    model = fully_shard(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)))
    model(torch.randn(4, 5, generator=torch.Generator().manual_seed(rank))).square().sum().backward()
    layout = ParamLayout.of(model)  # 3 rows: shards of 2 and 1; 1 row: of 1 and 0
    sketch = make_sketch("countsketch", layout, 64, seed=5)
    grads = [p.grad for p in model.parameters()]
    first_rows = [-(-len(g) // dist.get_world_size()) * rank for g in grads]  # torch.chunk's
    sharded = sum(sketch_sharded(sketch, g.to_local(), offset + row * math.prod(g.shape[1:]))
                  for g, offset, row in zip(grads, layout.offsets, first_rows))
    whole = sketch.apply_tensors([g.full_tensor() for g in grads])
    torch.save({"outcomes": outcomes, "sharded": sharded, "whole": whole}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_fsdp_refused_on_every_rank_and_its_shards_sketched_by_sketch_sharded(tmp_path):
    """FSDP shards every parameter, gradient and Adam moment: rank 0 recorded its shards as if whole (FSDP1's flat
    parameter: half the gradient under a layout of one `_flat_param`, the run marked complete) or failed in the first
    step's hooks (FSDP2's DTensors, FSDP1's original parameters). Every rank refuses at attach, before writing, saying
    what works; what it advises, FSDP2's shards sketched at their offsets and summed, gives the gathered sketch."""
    torch.multiprocessing.start_processes(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got["outcomes"]) == 6
        for name, said in got["outcomes"].items():
            assert said.startswith("ValueError") and all(w in said for w in ("FSDP", "DDP", "sketch_sharded")), (
                rank, name, said)
        torch.testing.assert_close(got["sharded"], got["whole"], rtol=1e-5, atol=1e-5)  # what the refusal advises
    assert not (tmp_path / "store.zarr").exists()


def _zero_redundancy_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: DDP with torch's ZeroRedundancyOptimizer over AdamW, attached with the default
    capture (refused: Adam's moments are sharded) and without adam_m (recorded by rank 0)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    task = ArithmeticTask(tiny_config().task)
    model = torch.nn.parallel.DistributedDataParallel(micro(task))
    refused = []
    for betas in ({}, {"betas": (0.9, 0.99)}):  # betas given join its defaults (and were taken for Adam's whole)
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=3e-3, **betas)
        try:
            attach(model, opt, out_dir, "default", total_steps=3)
            refused.append("")
        except ValueError as err:
            refused.append(str(err))
    initial = flat_params(model)
    rec = attach(model, opt, out_dir, "zero", total_steps=3, capture=CaptureConfig(
        sketch="identity", quantities=["grad", "update"], probe_every=0, v_stats_every=1))
    for step in range(3):
        x, m = task.train_batch(step, rank, 8)
        loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
        opt.zero_grad()
        loss.backward()
        rec.log(loss)
        opt.step()
    rec.close()
    torch.save({"refused": refused, "update": flat_params(model) - initial}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_zero_redundancy_optimizer_records_grad_and_update_and_refuses_adam_m_on_every_rank(tmp_path):
    """torch's ZeroRedundancyOptimizer keeps each rank's share of AdamW's state: adam_m was refused as "keeps no Adam
    moments", and accepted where betas were given (they join its defaults). The gradient (DDP's, all-reduced) and
    the update (after its parameters are broadcast) are whole."""
    torch.multiprocessing.start_processes(_zero_redundancy_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        for refused in r["refused"]:
            assert "ZeroRedundancyOptimizer keeps AdamW's moments sharded across ranks" in refused, refused
    root = zarr.open_group(tmp_path / "store.zarr", mode="r")
    assert store.runs(root) == ["zero"]
    group = root["zero"]
    assert group.attrs["status"] == "complete" and group["step"][:].tolist() == [0, 1, 2]
    np.testing.assert_allclose(store.read(group, "update").sum(0), r0["update"], atol=2e-6)
    np.testing.assert_array_equal(r0["update"], r1["update"])
    assert np.isnan(group["layer_v_mean"][:]).all()  # no rank holds every parameter's v


def test_deepspeed_engine_unwrapped_and_its_flat_optimizers_refused_on_every_rank(tmp_path, task, monkeypatch):
    """DeepSpeed's engine holds the model as `.module` (whose prefix renamed every tensor of the layout), and its ZeRO
    and fp16/bf16 optimizers step flat copies of the parameters: the torch optimizer inside holds none of the model's,
    which rank 0 refused with "pass the optimizer that trains this model" while every other rank trained on, to wait
    in a collective for rank 0. Stand-ins named as DeepSpeed's; DeepSpeed itself in the test below, where installed."""

    class DeepSpeedEngine(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(DeepSpeedEngine=DeepSpeedEngine))
    model = micro(task)
    attach(DeepSpeedEngine(model), torch.optim.AdamW(model.parameters()), tmp_path, "zero0", total_steps=1,
           capture=IDENTITY).close()
    assert run_group(tmp_path, "zero0").attrs["layout"] == ParamLayout.of(model).to_json()

    zero = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"})()
    zero.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.cat([p.detach().reshape(-1)
                                                                      for p in model.parameters()]))])
    for write in (True, False):
        with pytest.raises(ValueError, match=r"^DeepSpeed's DeepSpeedZeroOptimizer steps flat copies .*ZeRO stage 0 "
                                             r"in fp32.*safe_get_full_grad"):
            attach(DeepSpeedEngine(model), zero, tmp_path, "zero2", total_steps=1, capture=IDENTITY, write=write)
    assert store.runs(zarr.open_group(tmp_path / "store.zarr", mode="r")) == ["zero0"]


@pytest.mark.parametrize("package", ["lightning.fabric.wrappers", "lightning_fabric.wrappers"])
def test_lightning_fabrics_module_is_unwrapped(tmp_path, task, monkeypatch, package):
    """Lightning Fabric's `setup` holds the model as `._forward_module`, whose prefix renamed every tensor of the
    layout (`_forward_module.gpt_neox.…`, Lightning 2.6.6 by hand): another layout than the bare model's. A stand-in
    named as Fabric's (its optimizer wrapper, which holds the optimizer as `.optimizer`, was unwrapped already)."""

    class _FabricModule(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self._forward_module = module

        def forward(self, *args, **kwargs):
            return self._forward_module(*args, **kwargs)

    monkeypatch.setitem(sys.modules, package, types.SimpleNamespace(_FabricModule=_FabricModule))
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = attach(_FabricModule(model), opt, tmp_path, "fabric", total_steps=2, capture=IDENTITY)
    initial = flat_params(model)
    train_steps(model, opt, task, 2, rec)
    rec.close()
    group = run_group(tmp_path, "fabric")
    assert group.attrs["layout"] == ParamLayout.of(model).to_json()
    np.testing.assert_allclose(store.read(group, "update").sum(0), flat_params(model) - initial, atol=2e-6)


def _deepspeed_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes training under DeepSpeed (its CPU accelerator): ZeRO stage 0 in fp32 recorded by rank
    0; stages 1-3, and stage 0 in bf16, refused on this rank or (unrefused) what became of it."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    import deepspeed

    task = ArithmeticTask(tiny_config().task)
    saved = {}
    for name, stage, bf16 in (("zero0", 0, False), ("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False),
                              ("zero0_bf16", 0, True)):
        model = micro(task)
        config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "bf16": {"enabled": bf16},
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), config=config)
        try:
            rec = attach(engine, optimizer, out_dir, name, total_steps=3, capture=IDENTITY)
        except ValueError as err:
            saved[name] = f"ValueError: {err}"
            continue
        initial = flat_params(engine.module)
        for step in range(3):
            x, m = task.train_batch(step, rank, 8)
            loss = answer_cross_entropy(engine(input_ids=x).logits, x, m)
            rec.log(loss)
            engine.backward(loss)
            engine.step()
        rec.close()
        saved[name] = {"idle": isinstance(rec, IdleRecorder), "update": flat_params(engine.module) - initial,
                       "layout": ParamLayout.of(model).to_json()}
    torch.save(saved, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero_stage_0_recorded_and_other_stages_refused_on_every_rank(tmp_path):
    torch.multiprocessing.start_processes(_deepspeed_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        for name in ("zero1", "zero2", "zero3", "zero0_bf16"):
            assert r[name].startswith("ValueError: DeepSpeed's") and "safe_get_full_grad" in r[name], r[name]
    assert not r0["zero0"]["idle"] and r1["zero0"]["idle"]
    root = zarr.open_group(tmp_path / "store.zarr", mode="r")
    assert store.runs(root) == ["zero0"]
    group = root["zero0"]
    assert group.attrs["status"] == "complete" and group["step"][:].tolist() == [0, 1, 2]
    assert group.attrs["layout"] == r0["zero0"]["layout"]  # the model's names, not the engine's `module.` ones
    np.testing.assert_allclose(store.read(group, "update").sum(0), r0["zero0"]["update"], atol=2e-6)


# -- Hugging Face Trainer ----------------------------------------------------------------------------------------
def warns_of_43701(match: str):
    """pytest.warns of the output layer the Trainer left out of a checkpoint it loaded (transformers 5 saves
    GPT-NeoX's as `embed_out`, huggingface/transformers#43701); transformers 4 saves it as `lm_head`: no warning, a
    list left empty."""
    if TRANSFORMERS_MAJOR >= 5:
        return pytest.warns(UserWarning, match=match)
    return contextlib.nullcontext([])


def hf_dataset(task, n=32):
    """Tokenised arithmetic items with loss on answer tokens only (HF shifts the labels inside the model)."""
    tokens, mask = task.train_batch(0, 0, n)
    labels = tokens.masked_fill(~mask, -100)
    return [{"input_ids": t, "labels": y} for t, y in zip(tokens, labels)]


def hf_args(out_dir, **settings):
    """TrainingArguments of a small CPU Trainer run in out_dir/hf, with `settings` besides."""
    from transformers import TrainingArguments

    return TrainingArguments(**{"output_dir": str(out_dir / "hf"), "per_device_train_batch_size": 4,
                                "report_to": "none", "use_cpu": True, "seed": 0, "disable_tqdm": True,
                                "dataloader_num_workers": 0, **settings})


def hf_train(task, out_dir, callback=None, accumulation=1, steps=4):
    from transformers import Trainer

    args = hf_args(out_dir, max_steps=steps, gradient_accumulation_steps=accumulation, learning_rate=3e-3,
                   weight_decay=0.1, logging_steps=1, save_strategy="no")
    model = micro(task)
    initial = flat_params(model)
    callbacks = callback if isinstance(callback, list) else [callback] if callback else None
    trainer = Trainer(model=model, args=args, train_dataset=hf_dataset(task), callbacks=callbacks)
    trainer.train()
    assert "training_step" not in vars(trainer) and "clip_grad_norm_" not in vars(trainer.accelerator)  # unwrapped
    return model, initial, [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_hf_callback_records_each_optimizer_step(tmp_path, task, accumulation):
    callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="identity", probe_every=2, chunk=4),
                                 probes=[Probe("ID", *task.probe_set("ID").torch())])
    model, initial, logs = hf_train(task, tmp_path, callback, accumulation)
    group = run_group(tmp_path, "hf")
    assert group.attrs["status"] == "complete"
    assert group.attrs["trainer_args"]["gradient_accumulation_steps"] == accumulation
    assert group["step"][:].tolist() == [0, 1, 2, 3]  # optimizer steps, not micro-batches
    assert group["probe/step"][:].tolist() == [0, 2, 4]
    logged = [h["loss"] for h in logs]
    np.testing.assert_allclose(group["loss"][:], logged, rtol=1e-5, atol=5e-5)  # as logged (transformers 4: 4 decimals)
    assert group.attrs["train_loss"] == {"first": float(group["loss"][0]), "last": float(group["loss"][-1])}
    np.testing.assert_allclose(store.read(group, "update").sum(0), flat_params(model) - initial, atol=2e-6)
    assert (store.read(group, "grad_norm") <= 1.0 + 1e-5).all()  # after the Trainer's clipping (max_grad_norm 1)
    unclipped = store.read(group, "grad_norm_unclipped")  # before it, as the Trainer logs it (it was NaN: no event
    np.testing.assert_allclose(unclipped, [h["grad_norm"] for h in logs], rtol=1e-5, atol=5e-5)  # is given it)
    assert (unclipped > 1.0).any()  # clipped


def test_hf_callback_leaves_training_unchanged(tmp_path, task):
    callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="countsketch", dim=64, probe_every=2),
                                 probes=[Probe("ID", *task.probe_set("ID").torch())])
    with_capture, _, _ = hf_train(task, tmp_path, callback, accumulation=2)
    without, _, _ = hf_train(task, tmp_path, accumulation=2)
    np.testing.assert_array_equal(flat_params(with_capture), flat_params(without))


class _Killed(Exception):
    """Stands in for a kill mid-run."""


def kill_at(event: str, global_step: int):
    """A TrainerCallback raising _Killed in `event` (e.g. on_save) at `global_step`."""
    from transformers import TrainerCallback

    def handler(self, args, state, control, **kwargs):
        if state.global_step == global_step:
            raise _Killed
    return type("Kill", (TrainerCallback,), {event: handler})()


def test_hf_resume_after_steps_the_gradient_scaler_skipped(tmp_path, task):
    from transformers import Trainer, TrainerCallback

    class Overflow(TrainerCallback):  # an fp16 overflow in the backward of the Trainer's steps 1 and 2
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step in (1, 2):
                next(model.parameters()).grad[0, 0] = float("inf")

    def run(resume: bool):
        args = hf_args(tmp_path, max_steps=8, learning_rate=3e-3, save_strategy="steps", save_steps=4,
                       logging_steps=1)
        callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="identity", probe_every=0, chunk=2))
        trainer = Trainer(model=micro(task), args=args, train_dataset=hf_dataset(task),
                          callbacks=[callback, Overflow(), *([] if resume else [kill_at("on_step_end", 6)])])
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # as accelerate's for fp16 on a GPU
        trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-4") if resume else None)

    with pytest.raises(_Killed):
        run(resume=False)
    assert run_group(tmp_path, "hf").attrs["trainer_steps"] == {"4": 2}  # global step 4: 2 steps taken, 2 skipped
    run(resume=True)
    group = run_group(tmp_path, "hf")
    assert group.attrs["status"] == "complete" and group.attrs["trainer_steps"] == {"4": 2, "8": 6}
    assert group["step"][:].tolist() == list(range(6))  # each step taken recorded once, none skipped, no gap


def test_hf_resume_after_a_kill_between_the_trainers_checkpoint_and_on_save(tmp_path, task):
    """The rows are durable before the Trainer writes its checkpoint (and rotates the older ones away), so a kill
    before on_save still resumes, each step recorded once."""
    from transformers import Trainer

    def run(kill: bool):
        args = hf_args(tmp_path, max_steps=6, learning_rate=3e-3, save_strategy="steps", save_steps=2,
                       save_total_limit=1)
        callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="identity", probe_every=0, chunk=8))
        trainer = Trainer(model=micro(task), args=args, train_dataset=hf_dataset(task),
                          callbacks=[*([kill_at("on_save", 4)] if kill else []), callback])  # ahead of ours
        trainer.train(resume_from_checkpoint=None if kill else True)
        return trainer

    with pytest.raises(_Killed):
        run(kill=True)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["checkpoint-4"]
    assert run_group(tmp_path, "hf").attrs["last_durable_step"] == 4
    run(kill=False)
    group = run_group(tmp_path, "hf")
    assert group.attrs["status"] == "complete" and group["step"][:].tolist() == list(range(6))


@pytest.mark.parametrize("how", ["new model", "same model", "moved checkpoint"])
def test_hf_resume_loads_the_output_layer_the_trainer_leaves_out(tmp_path, task, how):
    """transformers 5.25's Trainer resumed GPT-NeoX without its output layer, saved as `embed_out` (#43701): it trained
    on from the new model's initial layer (or the interrupted one's later layer), and the run and its rows departed
    from the uninterrupted run's. The callback loads it from the checkpoint (in the Trainer's output_dir, or where
    `TrainingArguments.resume_from_checkpoint` says), saying so; the run is then as if never stopped."""
    import shutil

    from transformers import Trainer

    def run(out_dir, model, kill: bool = False, resume: str | bool | None = None):
        args = hf_args(out_dir, max_steps=6, learning_rate=3e-3, save_strategy="steps", save_steps=2,
                       resume_from_checkpoint=resume if isinstance(resume, str) else None)
        callback = GradtraceCallback(out_dir, "hf", capture=CaptureConfig(sketch="identity", probe_every=0, chunk=2))
        trainer = Trainer(model=model, args=args, train_dataset=hf_dataset(task),
                          callbacks=[callback, *([kill_at("on_step_end", 3)] if kill else [])])
        trainer.train(resume_from_checkpoint=resume)

    interrupted = micro(task)
    with pytest.raises(_Killed):
        run(tmp_path / "a", interrupted, kill=True)
    resume: str | bool = True
    if how == "moved checkpoint":  # copied elsewhere, as from a cluster's scratch space
        resume = str(shutil.move(tmp_path / "a" / "hf" / "checkpoint-2", tmp_path / "checkpoint-2"))
        shutil.rmtree(tmp_path / "a" / "hf")
    resumed = interrupted if how == "same model" else micro(task)
    with warns_of_43701(r"resumed from .*checkpoint-2 without lm_head.weight, which the checkpoint names otherwise "
                        ".*GradtraceCallback loaded them from there") as caught:
        run(tmp_path / "a", resumed, resume=resume)
    assert not caught or __file__ in [w.filename for w in caught if "43701" in str(w.message)]
    clean = micro(task)
    run(tmp_path / "b", clean)
    np.testing.assert_array_equal(flat_params(resumed), flat_params(clean))
    resumed_rows = run_group(tmp_path / "a", "hf")["update"][:]
    np.testing.assert_array_equal(resumed_rows, run_group(tmp_path / "b", "hf")["update"][:])


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="transformers 4 names GPT-NeoX's output layer embed_out, as saved")
def test_tensors_a_checkpoint_names_otherwise_are_loaded_or_warned_about(tmp_path, task):
    """What the Trainer loaded by name left out: GPT-NeoX's output layer saved as `embed_out` is loaded as `lm_head`;
    a tensor under a name no renaming known here maps to the model's is named in a warning, the model's own kept."""
    from safetensors.torch import save_file

    from gradtrace.capture.hf import _restore_renamed_tensors

    saved, model = micro(task, seed=1), micro(task)
    weights = {n: t.contiguous() for n, t in saved.state_dict().items()}
    weights["embed_out.weight"] = weights.pop("lm_head.weight")
    weights["gpt_neox.final_norm.weight"] = weights.pop("gpt_neox.final_layer_norm.weight")
    save_file(weights, str(tmp_path / "model.safetensors"))
    kept = model.gpt_neox.final_layer_norm.weight.detach().clone()
    with pytest.warns(UserWarning) as caught:
        _restore_renamed_tensors(model, tmp_path, "resumed from")
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and "without lm_head.weight" in said[0]
    assert "holds 1 tensor(s) under names the model lacks (gpt_neox.final_norm.weight;" in said[1]
    torch.testing.assert_close(model.lm_head.weight, saved.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.gpt_neox.final_layer_norm.weight, kept, rtol=0, atol=0)
    other = micro(task)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the other ranks of a DDP run load alike and leave the saying to the main one
        _restore_renamed_tensors(other, tmp_path, "resumed from", say=False)
    torch.testing.assert_close(other.lm_head.weight, saved.lm_head.weight, rtol=0, atol=0)


def test_the_checkpoint_a_resume_loaded_is_the_one_that_saved_its_step(tmp_path):
    """`TrainingArguments.resume_from_checkpoint` first, then the Trainer's own in output_dir, each only where its
    trainer_state holds the resumed step (one of another step, or unreadable, is not taken)."""
    from gradtrace.capture.hf import _resumed_from

    def checkpoint(path, state: str):
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(state)
        return path

    moved = checkpoint(tmp_path / "moved" / "checkpoint-4", '{"global_step": 4}')
    own = checkpoint(tmp_path / "out" / "checkpoint-4", '{"global_step": 4}')
    args = hf_args(tmp_path, output_dir=str(tmp_path / "out"), resume_from_checkpoint=str(moved))
    assert _resumed_from(args, 4) == moved and _resumed_from(args, 6) is None
    (moved / "trainer_state.json").write_text('{"global_step": 4')  # cut short
    assert _resumed_from(args, 4) == own


def test_hf_resume_with_the_same_trainer_after_its_train_raised(tmp_path, task):
    """The notebook's way after an interruption: train() again on the same Trainer. The first train() never reached
    on_train_end, so its Recorder still hooked the optimizer: every row and loss was recorded twice."""
    from transformers import Trainer

    args = hf_args(tmp_path, max_steps=8, learning_rate=3e-3, save_strategy="steps", save_steps=4, logging_steps=1,
                   gradient_accumulation_steps=2)
    callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="identity", probe_every=0, chunk=2))
    kill = kill_at("on_step_end", 6)
    trainer = Trainer(model=micro(task), args=args, train_dataset=hf_dataset(task, 64), callbacks=[callback, kill])
    with pytest.raises(_Killed):
        trainer.train()
    trainer.remove_callback(kill)  # killed once
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-4"))
    group = run_group(tmp_path, "hf")
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert group.attrs["status"] == "complete" and group["step"][:].tolist() == list(range(8))
    np.testing.assert_allclose(group["loss"][4:], logged[-4:], rtol=1e-5, atol=5e-5)  # once each, as logged
    assert "training_step" not in vars(trainer)  # unwrapped: the class's again
    for name in set(group.attrs) - {"role"}:  # each attribute the run holds is gradtrace's, a caller's refused: a
        with pytest.raises(ValueError, match=rf"attrs \['{name}'\] are attributes gradtrace writes"):  # caller's
            GradtraceCallback(tmp_path, attrs={name: 1})  # trainer_steps was not, and a resume read it as its own


def test_ctrl_c_as_the_callback_makes_the_rows_durable_lands_once_the_step_count_is_noted(tmp_path, task):
    """Ctrl-C landing in the rows' write before a Trainer checkpoint was raised once they were written but before the
    run noted how many steps they hold at that global step (`trainer_steps`, which a resume from it reads)."""
    from transformers import Trainer

    callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="identity", probe_every=0, chunk=8))
    trainer = Trainer(model=micro(task), args=hf_args(tmp_path, max_steps=8, save_strategy="steps", save_steps=4),
                      train_dataset=hf_dataset(task, 64), callbacks=[callback])
    callback.on_train_begin = functools.partial(_interrupt_first_write, callback.on_train_begin, callback)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    group = run_group(tmp_path, "hf")
    assert group.attrs["trainer_steps"] == {"4": 4} and group["step"][:].tolist() == [0, 1, 2, 3]


def _interrupt_first_write(on_train_begin, callback, *args, **kwargs):
    """`on_train_begin`, then Ctrl-C raised as the recorder writes its first chunk."""
    on_train_begin(*args, **kwargs)
    interrupt_next_write(callback.recorder)


def test_hf_a_new_trainer_of_the_model_an_interrupted_trainer_trained_releases_its_run(tmp_path, task):
    """A notebook: train() interrupted (Ctrl-C), then the cell run again with a new Trainer and callback of the same
    model. The first callback's loss hook (then on the model) stayed for good, holding its recorder and optimizer
    (Adam's state) and collecting every later forward's loss, and its run read `running` with none of its rows
    written."""
    from transformers import Trainer, TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    model = micro(task)
    first = GradtraceCallback(tmp_path, "r1", capture=IDENTITY)
    interrupted = Trainer(model=model, args=hf_args(tmp_path, max_steps=6, save_strategy="no"),
                          train_dataset=hf_dataset(task), callbacks=[first, Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    trainer = Trainer(model=model, args=hf_args(tmp_path, max_steps=6, save_strategy="no"),
                      train_dataset=hf_dataset(task), callbacks=[GradtraceCallback(tmp_path, "r2", capture=IDENTITY)])
    trainer.train()
    assert "training_step" not in vars(interrupted) and first.recorder is None and not first._losses
    interrupted = run_group(tmp_path, "r1")
    assert interrupted.attrs["status"] == "failed" and interrupted["step"][:].tolist() == [0, 1, 2]
    assert run_group(tmp_path, "r2")["step"][:].tolist() == list(range(6))


def test_hf_resume_after_a_kill_while_saving_the_best_checkpoint(tmp_path, task):
    """save_strategy="best" decides to save after evaluating, past the step callbacks: the rows are durable by then."""
    from transformers import Trainer

    def run(kill: bool):
        args = hf_args(tmp_path, max_steps=6, learning_rate=3e-3, eval_strategy="steps", eval_steps=2,
                       save_strategy="best", metric_for_best_model="loss", greater_is_better=False)
        callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="identity", probe_every=0, chunk=8))
        trainer = Trainer(model=micro(task), args=args, train_dataset=hf_dataset(task),
                          eval_dataset=hf_dataset(task, 8), callbacks=[*([kill_at("on_save", 4)] if kill else []),
                                                                       callback])
        trainer.train(resume_from_checkpoint=None if kill else True)

    with pytest.raises(_Killed):
        run(kill=True)
    assert "checkpoint-4" in {p.name for p in (tmp_path / "hf").iterdir()}
    run(kill=False)
    group = run_group(tmp_path, "hf")
    assert group.attrs["status"] == "complete" and group["step"][:].tolist() == list(range(6))


def test_hf_a_run_stopped_early_that_loads_its_best_checkpoint_takes_no_final_probe(tmp_path, task):
    """Stopped at step 3 of 4 (a callback's early stop) and loading its best checkpoint at the end, the run's last
    parameters are gone by `on_train_end`: no probe of the loaded ones is added as step 3's (the only test ran to
    max_steps, whose probe `on_step_end` takes, so a final probe always taken passed)."""
    from transformers import Trainer, TrainerCallback

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    args = hf_args(tmp_path, max_steps=4, learning_rate=3e-3, eval_strategy="steps", eval_steps=1,
                   save_strategy="steps", save_steps=1, load_best_model_at_end=True, metric_for_best_model="loss",
                   greater_is_better=True)
    callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="identity", probe_every=2),
                                 probes=[Probe("ID", *task.probe_set("ID").torch())])
    trainer = Trainer(model=micro(task), args=args, train_dataset=hf_dataset(task), eval_dataset=hf_dataset(task, 8),
                      callbacks=[callback, StopAt3()])
    with warns_of_43701("loaded its best checkpoint"):
        trainer.train()
    group = run_group(tmp_path, "hf")
    assert group["step"][:].tolist() == [0, 1, 2] and group["probe/step"][:].tolist() == [0, 2]


def test_hf_a_run_first_recorded_at_its_resume_numbers_its_rows_from_the_checkpoints_step(tmp_path, task):
    """A Trainer run resumed from checkpoint-2 with the callback added only then (or recorded before the run kept
    `trainer_steps`) records its steps as 2 and 3, the Trainer's, not from 0."""
    from transformers import Trainer

    args = hf_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    Trainer(model=micro(task), args=args, train_dataset=hf_dataset(task)).train()  # checkpoints 2 and 4, unrecorded
    callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="identity"))
    with warns_of_43701("resumed from .*checkpoint-2 without lm_head.weight"):
        Trainer(model=micro(task), args=args, train_dataset=hf_dataset(task), callbacks=[callback]).train(
            resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))
    group = run_group(tmp_path, "hf")
    assert group["step"][:].tolist() == [2, 3] and group.attrs["steps_done"] == 4


def test_hf_final_probe_is_of_the_trained_parameters_not_the_best_checkpoint(tmp_path, task):
    from transformers import Trainer

    probes = [Probe("ID", *task.probe_set("ID").torch())]
    args = hf_args(tmp_path, max_steps=4, learning_rate=3e-3, eval_strategy="steps", eval_steps=2,
                   save_strategy="steps", save_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                   greater_is_better=True)  # best = the highest eval loss: step 2's checkpoint

    class Final(GradtraceCallback):  # the parameters the last step left, before the Trainer loads its best
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == state.max_steps:
                self.trained = flat_params(model)
            super().on_step_end(args, state, control, **kwargs)

    callback = Final(tmp_path, "hf", capture=CaptureConfig(sketch="identity", probe_every=2), probes=probes)
    trainer = Trainer(model=micro(task), args=args, train_dataset=hf_dataset(task), eval_dataset=hf_dataset(task, 8),
                      callbacks=[callback])
    with warns_of_43701("loaded its best checkpoint, .*checkpoint-2 without lm_head.weight"):
        trainer.train()  # which the Trainer left at the last step's (transformers #43701)
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = in_this_release(load_file(tmp_path / "hf" / "checkpoint-2" / "model.safetensors"), trainer.model)
    assert best.keys() == trainer.model.state_dict().keys()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, best[name], rtol=0, atol=0, msg=name)
    group = run_group(tmp_path, "hf")
    assert group["probe/step"][:].tolist() == [0, 2, 4]
    final = copy.deepcopy(trainer.model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.from_numpy(callback.trained), final.parameters())
    final.eval()
    loss = answer_cross_entropy(final(input_ids=probes[0].tokens).logits, probes[0].tokens, probes[0].mask)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(final.parameters()))]).numpy()
    np.testing.assert_allclose(group["probe/grad"][-1, 0, 0], expected, rtol=1e-4, atol=1e-7)  # probe_losses[0]: ce


def test_hf_trainer_given_a_chain_of_muon_and_adamw_records_and_resumes_it(tmp_path, task):
    """The Trainer takes a chain as its optimizer: it schedules, steps, saves and reloads it as one (AdamW's step
    count goes on from the checkpoint's), and the run is recorded whole, each step once. The warnings (Muon's
    tensors; the recorder the killed train() left open) name the caller's trainer.train()."""
    from transformers import Trainer

    def run(kill: bool):
        model = micro(task)
        trainer = Trainer(model=model, args=hf_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
                          train_dataset=hf_dataset(task), optimizers=(ChainedOptimizer(*muon_and_adamw(model)), None),
                          callbacks=[GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(
                              sketch="identity", probe_every=0)), *([kill_at("on_save", 2)] if kill else [])])
        with pytest.warns(UserWarning) as caught:
            trainer.train(resume_from_checkpoint=None if kill else True)
        assert any("stepped without Adam's moments (by Muon)" in str(w.message) for w in caught)
        assert {w.filename for w in caught} == {__file__}  # trainer.train(), not transformers' callback handler
        return trainer

    with pytest.raises(_Killed):
        run(kill=True)
    trainer = run(kill=False)
    adamw = trainer.optimizer.optimizer.optimizers[1]
    assert {int(adamw.state[p]["step"]) for g in adamw.param_groups for p in g["params"]} == {4}
    group = run_group(tmp_path, "hf")
    assert group.attrs["status"] == "complete" and group["step"][:].tolist() == [0, 1, 2, 3]
    assert not np.isnan(group["adam_m"][:]).any() and (group["adam_m"][:] != 0).any()


def test_hf_a_second_train_from_step_0_asks_for_another_run_id(tmp_path, task):
    from transformers import Trainer

    args = hf_args(tmp_path, max_steps=2, save_strategy="no")
    trainer = Trainer(model=micro(task), args=args, train_dataset=hf_dataset(task),
                      callbacks=[GradtraceCallback(tmp_path, "hf", capture=IDENTITY)])
    trainer.train()
    with pytest.raises(FileExistsError, match="give GradtraceCallback another run_id"):
        trainer.train()


@pytest.mark.parametrize("named", [False, True])
def test_hf_each_trial_of_a_hyperparameter_search_is_a_run_of_its_own(tmp_path, task, monkeypatch, named):
    """`Trainer.hyperparameter_search` trains each trial from step 0 under the same callback: the second trial was
    refused as a run already recorded, ending the search. Each trial is now its run, named by the search's `hp_name`
    where it has one, with the parameters it tries (trials given as dicts, as Ray Tune and W&B sweeps give them;
    without a search backend installed the Trainer does not apply them, which the callback does not need)."""
    from transformers import Trainer

    for where in ("transformers.integrations", "transformers.trainer"):  # its backends' dict trials (4: imported)
        monkeypatch.setattr(f"{where}.hp_params", lambda trial: trial, raising=where == "transformers.integrations")
    callback = GradtraceCallback(tmp_path, "hf", capture=CaptureConfig(sketch="identity", probe_every=0, chunk=4))
    trainer = Trainer(model_init=lambda: micro(task), args=hf_args(tmp_path, max_steps=2, save_strategy="no"),
                      train_dataset=hf_dataset(task), callbacks=[callback])
    if named:
        trainer.hp_name = lambda trial: f"lr-{trial['learning_rate']:g}"
    trials = [{"learning_rate": 1e-3}, {"learning_rate": 3e-3}]
    for trial in trials:
        trainer.train(trial=trial)
    runs = [f"hf-lr-{t['learning_rate']:g}" for t in trials] if named else ["hf-trial-0", "hf-trial-1"]
    assert sorted(zarr.open_group(tmp_path / "store.zarr", mode="r").group_keys()) == runs
    for run_id, trial in zip(runs, trials):
        group = run_group(tmp_path, run_id)
        assert group.attrs["status"] == "complete" and group.attrs["trial_params"] == trial
        assert group["step"][:].tolist() == [0, 1]


def test_hf_callback_records_a_loss_the_trainer_computes_outside_the_model(tmp_path, task):
    """The loss the Trainer trains on, computed by `compute_loss_func` (the model then returns none: it was NaN) or by
    a `compute_loss` of its own beside the model's language-model loss (as TRL's DPOTrainer: the model's was
    recorded, 2.7 against DPO's 0.69 logged, silently), is recorded as logged."""
    from transformers import Trainer

    def loss_func(outputs, labels, num_items_in_batch=None):  # the Trainer pops the labels: the model has no loss
        return torch.nn.functional.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    class OwnLoss(Trainer):  # trains on a loss other than the one the model returns
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return 0.5 * model(**inputs).loss + 1.0

    for name, trainer_class, settings in (("func", Trainer, {"compute_loss_func": loss_func}),
                                          ("own", OwnLoss, {})):
        callback = GradtraceCallback(tmp_path, name, capture=IDENTITY)
        args = hf_args(tmp_path, max_steps=3, save_strategy="no", logging_steps=1)
        trainer = trainer_class(model=micro(task), args=args, train_dataset=hf_dataset(task), callbacks=[callback],
                                **settings)
        model_losses = []  # the model's own, in each training forward
        trainer.model.register_forward_hook(lambda module, inputs, out: model_losses.append(out.loss))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning of a loss not seen
            trainer.train()
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        recorded = run_group(tmp_path, name)["loss"][:]
        np.testing.assert_allclose(recorded, logged, rtol=1e-5, atol=5e-5)
        if name == "own":  # 0.5·(the model's loss) + 1, not the model's loss (recorded before)
            np.testing.assert_allclose(recorded, 0.5 * np.array([float(x) for x in model_losses]) + 1.0, rtol=1e-6)
        else:
            assert model_losses == [None] * 3
        assert "training_step" not in vars(trainer)


def test_hf_callback_run_by_no_trainer_records_a_nan_loss_and_says_so(tmp_path, task):
    """Events sent by something other than a Trainer (none up the call stack): no loss seen, NaN, warned once."""
    from transformers import TrainerControl, TrainerState

    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback = GradtraceCallback(tmp_path, "bare", capture=IDENTITY)
    args, state, control = hf_args(tmp_path), TrainerState(max_steps=2), TrainerControl()
    callback.on_train_begin(args, state, control, model=model, optimizer=opt)
    with pytest.warns(UserWarning, match="saw no training loss") as caught:
        for _ in range(2):
            callback.on_pre_optimizer_step(args, state, control)
            train_steps(model, opt, task, 1)
            state.global_step += 1
    assert len(caught) == 1
    callback.on_train_end(args, state, control, model=model)
    group = run_group(tmp_path, "bare")
    assert group.attrs["status"] == "complete" and np.isnan(group["loss"][:]).all() and group["step"].shape == (2,)


def test_two_callbacks_on_one_trainer_each_record_the_run(tmp_path, task):
    """Two GradtraceCallbacks of one Trainer (two stores, or two sketches): the second took the first for one a
    Trainer interrupted before and marked its run failed ("another Trainer's train() began on its model")."""
    first, second = (GradtraceCallback(tmp_path / name, name, capture=IDENTITY) for name in ("a", "b"))
    with pytest.warns(UserWarning, match="run 'a' .* it records every step of run 'b' too"):  # one optimizer's two
        _, _, logs = hf_train(task, tmp_path, [first, second], steps=3)
    for name in ("a", "b"):
        group = run_group(tmp_path / name, name)
        assert group.attrs["status"] == "complete" and group["step"][:].tolist() == [0, 1, 2]
        np.testing.assert_allclose(group["loss"][:], [h["loss"] for h in logs], rtol=1e-5, atol=5e-5)
    assert not first._noting and not second._noting


def test_a_training_step_wrapped_over_the_callbacks_is_left_and_passes_losses_through(tmp_path, task):
    """Another wrapper of training_step laid over the callback's stays after the run ends (the callback's, inside
    it, then passes each loss through untouched), and a later run's callback counts each loss once."""
    from transformers import Trainer, TrainerCallback

    laid = []

    class Timing(TrainerCallback):  # a user's wrapper, laid once over what is there at its first train()
        def on_train_begin(self, args, state, control, **kwargs):
            if not laid:
                inner = trainer.training_step
                laid.append(lambda *args, **kwargs: inner(*args, **kwargs))
                trainer.training_step = laid[0]

    first = GradtraceCallback(tmp_path, "r1", capture=IDENTITY)
    trainer = Trainer(model=micro(task), args=hf_args(tmp_path, max_steps=2, save_strategy="no", logging_steps=1),
                      train_dataset=hf_dataset(task), callbacks=[first, Timing()])
    trainer.train()
    trainer.remove_callback(first)
    trainer.add_callback(second := GradtraceCallback(tmp_path, "r2", capture=IDENTITY))
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_allclose(run_group(tmp_path, "r2")["loss"][:], logged, rtol=1e-5, atol=5e-5)  # once each
    assert trainer.training_step is laid[0] and not first._losses and not second._noting


@pytest.mark.parametrize("sketch", ["identity", "countsketch"])
def test_a_bf16_models_gradient_norms_are_summed_in_float32(tmp_path, task, sketch):
    model, opt, rec = attached_in(torch.bfloat16, task, tmp_path, 2, sketch=sketch)
    train_steps(model, opt, task, 2, rec)
    rec.close()
    expected = np.array([p.grad.double().norm().item() for p in model.parameters()])  # the last step's, clipped
    group = run_group(tmp_path)
    np.testing.assert_allclose(group["layer_grad_norm"][-1], expected, rtol=1e-5)
    np.testing.assert_allclose(group["grad_norm"][-1], np.linalg.norm(expected), rtol=1e-5)


def test_what_cannot_be_recorded_is_refused_before_anything_is_written(tmp_path, task):
    model = micro(task)
    with pytest.raises(TypeError, match="CaptureConfig"):
        attach(model, torch.optim.AdamW(model.parameters()), tmp_path, "a", total_steps=2, capture={"dim": 64})
    with pytest.raises(TypeError, match="takes a torch.nn.Module and a torch.optim.Optimizer, got AdamW and"):
        attach(torch.optim.AdamW(model.parameters()), model, tmp_path, "a", total_steps=2)  # an AttributeError before
    for attrs, error, words in (({"config": {"lr": 1e-3}}, ValueError, r"attrs \['config'\] are attributes gradtrace "
                                 r"writes for the run: name yours otherwise \(e.g. 'my_config'\)"),  # a resume failed
                                ({"when": object()}, TypeError, "attrs must be JSON values")):
        with pytest.raises(error, match=words):
            attach(model, torch.optim.AdamW(model.parameters()), tmp_path, "a", total_steps=2, attrs=attrs)
    assert not (tmp_path / "store.zarr").exists()
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(NotADirectoryError, match="notes/store.zarr"):  # was "the store may be truncated or corrupt"
        attach(model, torch.optim.AdamW(model.parameters()), tmp_path / "notes", "a", total_steps=2)
    (tmp_path / "notes").unlink()
    for steps in (0, -1, 2.5, None, "10", True):  # were recorded as the run's steps (info: "steps=3/10")
        with pytest.raises(ValueError, match=f"total_steps must be .* whole number >= 1, got {re.escape(repr(steps))}"):
            attach(model, torch.optim.AdamW(model.parameters()), tmp_path, "a", total_steps=steps, capture=IDENTITY)
    assert not (tmp_path / "store.zarr").exists()
    optimizer = torch.optim.AdamW(model.parameters())
    attach(model, optimizer, tmp_path, "a", total_steps=np.int64(2), capture=IDENTITY).close()
    assert run_group(tmp_path, "a").attrs["steps"] == 2
    other = torch.optim.AdamW(micro(task, seed=1).parameters())
    for write in (True, False):  # refused on every rank, before anything is written
        with pytest.raises(ValueError, match="holds none of the model's trainable parameters"):
            attach(model, other, tmp_path, "b", total_steps=2, capture=IDENTITY, write=write)
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer  # the Trainer's under optim="..._layerwise"

    with pytest.raises(ValueError, match="layer-wise optimizers .* step each tensor inside backward"):
        attach(model, LayerWiseDummyOptimizer(), tmp_path, "b", total_steps=2, capture=IDENTITY)

    class Averaging(torch.optim.Optimizer):  # as torch's PostLocalSGDOptimizer: no Optimizer.__init__, no hooks
        def __init__(self, optim):
            self.optim, self.param_groups, self.state = optim, optim.param_groups, optim.state

        def step(self, closure=None):
            self.optim.step()  # then averages the parameters across ranks

    for quantities in (["grad"], ["grad", "adam_m"]):  # an AttributeError; "AdamW's moments sharded across ranks"
        with pytest.raises(ValueError, match=r"the Averaging given runs no step hooks .* attach its local AdamW "
                           r"\(.optim\) to record the local steps alone"):
            attach(model, Averaging(torch.optim.AdamW(model.parameters())), tmp_path, "b", total_steps=2,
                   capture=CaptureConfig(sketch="identity", quantities=quantities, probe_every=0))
    assert store.runs(zarr.open_group(tmp_path / "store.zarr", mode="r")) == ["a"]
    frozen = micro(task).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        attach(frozen, torch.optim.AdamW(model.parameters()), tmp_path, "c", total_steps=2, capture=IDENTITY)
    twice = [Probe("ID", *task.probe_set("ID").torch())] * 2
    for write in (True, False):
        with pytest.raises(ValueError, match=r"probes \['ID'\] are given more than once"):
            attach(model, optimizer, tmp_path, "d", total_steps=2, probes=twice, write=write)
    assert store.runs(zarr.open_group(tmp_path / "store.zarr", mode="r")) == ["a"]


def test_a_loss_logged_after_the_optimizer_step_is_warned_of(tmp_path, task):
    """Logged after `optimizer.step()`, each loss went silently into the next step's row (the first row NaN)."""
    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = attach(model, opt, tmp_path, "r", total_steps=3, capture=IDENTITY)
    x, m = task.train_batch(0, 0, 16)
    for _ in range(3):
        loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.log(loss)
    with pytest.warns(UserWarning, match="seems to call rec.log after optimizer.step"):
        rec.close()


def test_an_attached_runs_training_loss_is_that_of_the_first_and_last_rows_its_loop_gave_one_for(tmp_path, task):
    """A loop of one's own gives a loss when it likes (every step, some steps, none, after the step): rows without one
    hold NaN, which must not read as a loss gone NaN, so `train_loss` takes the first finite row and the last given."""
    from gradtrace.results import diverged_run

    def record(run_id, logged, after=False):
        model = micro(task)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        with warnings.catch_warnings(), attach(model, opt, tmp_path, run_id, total_steps=4, capture=IDENTITY) as rec:
            warnings.simplefilter("ignore")  # the loss logged after the step, warned of at close
            for step in range(4):
                x, m = task.train_batch(step, 0, 16)
                loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
                opt.zero_grad()
                loss.backward()
                if step in logged and not after:
                    rec.log(loss)
                opt.step()
                if step in logged and after:
                    rec.log(loss)
        group = run_group(tmp_path, run_id)
        return dict(group.attrs), group["loss"][:].tolist()

    attrs, loss = record("every", range(4))
    assert attrs["train_loss"] == {"first": loss[0], "last": loss[3]} and not diverged_run(attrs)
    attrs, loss = record("some", {0, 2})
    assert math.isnan(loss[3]) and attrs["train_loss"] == {"first": loss[0], "last": loss[2]}
    assert not diverged_run(attrs)
    attrs, loss = record("none", ())
    assert attrs["train_loss"] == {"first": None, "last": None} and not diverged_run(attrs)
    attrs, loss = record("after", range(4), after=True)  # each loss in the next step's row: the first row NaN
    assert math.isnan(loss[0]) and attrs["train_loss"] == {"first": loss[1], "last": loss[3]}
    assert not diverged_run(attrs)


@pytest.mark.parametrize("last, said", [(50.0, 50.0), (float("nan"), "NaN"), (float("inf"), "Infinity")])
def test_an_attached_run_whose_loss_blew_up_is_said_to_have_diverged(tmp_path, task, last, said):
    """Clipping keeps a blown-up run's gradients finite: its loss says it diverged, as for gradtrace's own runs."""
    from gradtrace.results import diverged_run

    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with attach(model, opt, tmp_path, "r", total_steps=3, capture=IDENTITY) as rec:
        for step, given in enumerate([0.5, 2.0, last]):
            x, m = task.train_batch(step, 0, 16)
            opt.zero_grad()
            answer_cross_entropy(model(input_ids=x).logits, x, m).backward()
            rec.log(torch.tensor(given))
            opt.step()
    attrs = dict(run_group(tmp_path).attrs)
    assert attrs["train_loss"] == {"first": 0.5, "last": said} and attrs["nonfinite_steps"] == 0
    assert diverged_run(attrs)
    assert "WARNING: diverged: training loss 0.5 at the start" in store.summary(tmp_path / "store.zarr")


def test_an_attached_runs_last_loss_is_the_last_given_on_a_step_not_recorded_or_before_a_resume(tmp_path, task):
    """Recording every n-th step, the loss of a step between rows is the last given; a run resumed by a loop that
    gives none keeps the last loss recorded before."""
    from gradtrace.results import diverged_run

    def steps(model, opt, rec, given):
        for step, loss in enumerate(given):
            x, m = task.train_batch(step, 0, 16)
            opt.zero_grad()
            answer_cross_entropy(model(input_ids=x).logits, x, m).backward()
            if loss is not None:
                rec.log(torch.tensor(loss))
            opt.step()

    model = micro(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    every_2nd = CaptureConfig(sketch="identity", probe_every=0, chunk=4, every=2)
    with attach(model, opt, tmp_path, "sparse", total_steps=4, capture=every_2nd) as rec:
        steps(model, opt, rec, [0.5, 0.6, 0.7, 80.0])
    group = run_group(tmp_path, "sparse")
    assert group["step"][:].tolist() == [0, 2] and group.attrs["train_loss"] == {"first": 0.5, "last": 80.0}
    assert diverged_run(dict(group.attrs))

    rec = attach(model, opt, tmp_path, "resumed", total_steps=6, capture=IDENTITY)
    steps(model, opt, rec, [1.0, 1.0, 50.0, 80.0])
    rec.checkpoint()
    rec.detach()  # killed after the checkpoint
    with attach(model, opt, tmp_path, "resumed", total_steps=6, capture=IDENTITY, resume=True, start_step=4) as rec:
        steps(model, opt, rec, [None, None])
    attrs = dict(run_group(tmp_path, "resumed").attrs)
    assert attrs["train_loss"] == {"first": 1.0, "last": 80.0} and diverged_run(attrs)


def test_runs_of_your_own_loop_go_through_stats_and_predict_with_a_table_of_your_own(tmp_path, task):
    """README "Analysing runs of your own": attached runs (two with probes, ID's last) and a results.csv of your own
    beside the store; stats and predict take the directory, predict's cosine from the probed runs by hand."""
    import pandas as pd

    from gradtrace.predict import run_predict
    from gradtrace.stats import stats_report

    splits = [*task.splits[1:3], "ID"]
    probes = [Probe(s, *task.probe_set(s).torch()) for s in splits]
    rng = np.random.default_rng(0)
    for i in range(8):
        model = micro(task, seed=i)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3 * (1 + i))
        with attach(model, opt, tmp_path, f"run-{i}", total_steps=3, capture=CaptureConfig(dim=64),
                    probes=probes if i < 2 else None) as rec:
            train_steps(model, opt, task, 3, rec)
    pd.DataFrame({"run_id": [f"run-{i}" for i in range(8)], "role": "sweep",
                  **{f"acc_{s}": rng.uniform(0.2, 0.8, 8) for s in splits}}).to_csv(tmp_path / "results.csv",
                                                                                   index=False)
    assert len(stats_report(tmp_path, residualize="probit", n_boot=0, n_perm=0).stats) == 1
    with pytest.warns(UserWarning, match="left out 6 reference run"):
        predictions = run_predict(tmp_path, predictors=[], n_boot=0, n_splits=10, n_perm=100).predictions
    cosine = predictions[predictions.predictor == "cosine"].iloc[0]
    assert (cosine.a, cosine.b) == tuple(splits[:2])
    final = [store.read(run_group(tmp_path, f"run-{i}"), "probe/grad")[-1, :2, 0] for i in range(2)]
    by_hand = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in final])
    assert cosine.predicted == pytest.approx(by_hand, rel=1e-5)


def test_the_trainer_callback_refuses_what_attach_would_when_it_is_made(tmp_path):
    """A run id, capture settings or attributes attach refuses were refused only once the Trainer had set up and
    began to train."""
    with pytest.raises(ValueError, match="run id 'a/b'"):
        GradtraceCallback(tmp_path, "a/b")
    settings = CaptureConfig()
    settings.dim = 0
    with pytest.raises(ValueError, match="capture.dim must be >= 1"):
        GradtraceCallback(tmp_path, capture=settings)
    with pytest.raises(ValueError, match=r"attrs \['steps'\] are attributes gradtrace writes"):
        GradtraceCallback(tmp_path, attrs={"steps": 10})
    assert not tmp_path.joinpath("store.zarr").exists()
