"""The command line end to end on a tiny study: tasks, train, sweep (resumable), stats, predict, report, info."""
import io
import os
import re
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import zarr

import gradtrace
from conftest import TINY, set_args
from gradtrace import config, store
from gradtrace.cli import main


def sets(extra=None):
    return set_args({**TINY, **(extra or {})})


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"gradtrace {gradtrace.__version__}"


def test_tasks_lists_every_split(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert sum(line.split()[0] in ("length", "carry", "zeropad", "base8", "space", "spaced_ops", "order",
                                   "three_operand", "subtract", "digit_spaced") for line in out.splitlines()[1:]) >= 8


def test_tasks_lists_splits_too_long_for_max_digits_as_such(capsys):
    assert main(["tasks", "--set", "task.max_digits=2", "--set", "task.shifts=[length]"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line}
    assert "(cannot be drawn: below)" in lines["carry"] and "'" in lines["length"]
    assert re.search(r"^carry: split 'carry' cannot be drawn at task.max_digits=2 .*raise task.max_digits to 3", out,
                     re.M)


def test_output_into_a_closed_pipe_stops_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that has stopped, as `| head` does
    done = subprocess.run([sys.executable, "-m", "gradtrace.cli", "sweep", "experiments/default.yaml", "--dry-run"],
                          stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert done.returncode == 1 and done.stderr == ""


def test_a_console_without_the_symbols_gets_plain_text_not_an_encoding_error():
    """On a Latin-1 locale or a Windows code page, printing "≥" or "−" ended every table and message in "'latin-1'
    codec can't encode character" and exit 2 (stdout) or printed "\\u2265" (stderr)."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    plan = subprocess.run([sys.executable, "-m", "gradtrace.cli", "sweep", "experiments/default.yaml", "--dry-run"],
                          capture_output=True, text=True, env=env)
    assert plan.returncode == 0 and plan.stdout.startswith("101 runs (1 reference, 100 sweep) x 150 steps")
    refused = subprocess.run([sys.executable, "-m", "gradtrace.cli", "sweep", "experiments/default.yaml", "--dry-run",
                              "--set", "task.train_share=0.2"], capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "(task.train_share x each split's share" in refused.stderr


@pytest.mark.parametrize("text, encoding, plain", [
    ("n ≥ 9 − 1 … — → √rel", "ascii", "n >= 9 - 1 ... -- -> sqrt rel"),
    ("r(a₁,a₂|ID) ᵀ ℓ ⁻¹", "ascii", "r(a1,a2|ID) T l -1"),
    ("/data/Bőd é", "cp1252", "/data/B\\u0151d é"),  # a path's letters are never made other letters
    ("Δθ ×2 ±1 ≤", "latin-1", "Deltatheta ×2 ±1 <="),  # what the encoding has stays
    ("ж", "ascii", "\\u0436")])
def test_unencodable_symbols_are_written_as_plain_text(text, encoding, plain):
    from gradtrace.console import plain_text_where_unencodable
    for stream_name in ("stdout", "stderr"):
        stream = io.TextIOWrapper(io.BytesIO(), encoding=encoding)
        saved = getattr(sys, stream_name)
        setattr(sys, stream_name, stream)
        try:
            with plain_text_where_unencodable():
                print(text, file=stream, end="")
                stream.flush()
            assert stream.errors == "strict"  # as it was
        finally:
            setattr(sys, stream_name, saved)
        assert stream.buffer.getvalue().decode(encoding) == plain


def test_a_sweeps_worker_writes_its_warnings_in_plain_text_too():
    """A sweep's worker processes print their own warnings: on a console without the symbols, as plain text as the
    command line does (Python's backslash escapes before: "\\u2265")."""
    code = ("import os, sys, warnings; from gradtrace.sweep import _start_worker; _start_worker(os.getppid(), []); "
            "warnings.warn('n \u2265 9 \u2212 1'); print('r(a\u2081,a\u2082)', file=sys.stderr)")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                         env={**os.environ, "PYTHONIOENCODING": "ascii"}).stderr.decode("ascii")
    assert "UserWarning: n >= 9 - 1" in err and "r(a1,a2)" in err


def test_an_os_error_is_one_line_not_a_traceback(tmp_path, capsys):
    """A full disk, a read-only directory, a path through a file: said in one line (a traceback before)."""
    (tmp_path / "afile").write_text("")
    assert main(["train", "experiments/default.yaml", "--out", str(tmp_path / "afile" / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"gradtrace train: error: [Errno 20] Not a directory: " \
                                               f"'{tmp_path / 'afile' / 'x'}'"


def test_a_full_disk_as_a_checkpoint_is_saved_is_one_line_naming_the_file_and_the_way_on(tmp_path, capsys,
                                                                                        monkeypatch):
    """safetensors' own error (no OSError) made it a traceback naming no file, and left the part written behind."""
    from safetensors import SafetensorError

    from gradtrace import checkpoint

    def no_space(tensors, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", no_space)
    out = tmp_path / "one"
    assert main(["train", os.devnull, "--out", str(out), *sets()]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"gradtrace train: error: [Errno 28] No space left on device: "
                   f"'{out / 'weights' / 'run' / 'initial.safetensors.tmp'}': the disk holding {out} is full (or your "
                   "quota on it is used up). What was written whole is kept: free some space and run the same command "
                   "with --resume to go on")
    assert not list(out.rglob("*.tmp"))  # the part written, removed
    monkeypatch.undo()  # space freed
    assert main(["train", os.devnull, "--out", str(out), "--resume", *sets()]) == 0
    assert zarr.open_group(out / "store.zarr", mode="r")["run"].attrs["status"] == "complete"


def test_a_full_disk_elsewhere_than_out_names_that_disk(tmp_path, capsys, monkeypatch):
    """A file written outside --out (a temporary file, a cache) on a full disk: the advice named --out's disk."""
    import errno

    import gradtrace.train

    elsewhere = tmp_path / "tmp" / "cache.bin"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(elsewhere))

    monkeypatch.setattr(gradtrace.train, "train", no_space)
    assert main(["train", os.devnull, "--out", str(tmp_path / "one"), *sets()]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f": the disk holding {elsewhere.parent} is full (or your quota on it is used up). What was written whole is "
        "kept: free some space and run the same command with --resume to go on")


def test_a_full_disk_error_naming_a_file_descriptor_names_the_out_disk():
    from gradtrace.files import full_disk_words

    assert full_disk_words(OSError(28, "No space left on device", 3), "out") == (
        "the disk holding out is full (or your quota on it is used up)")


def test_what_gradtrace_train_cannot_train_is_refused_before_anything_is_written(tmp_path, capsys):
    """`--run-id a/b` trained into nested groups no reader lists; `--out STUDY/store.zarr` nested a store in one."""
    for run_id in ("a/b", "../x", ""):
        assert main(["train", "experiments/default.yaml", "--out", str(tmp_path / "one"), "--run-id", run_id]) == 2
        assert f"run id {run_id!r} must be a name without '/'" in capsys.readouterr().err
    assert not (tmp_path / "one" / "x.lock").exists() and not (tmp_path / "one" / "store.zarr").exists()
    assert main(["train", "experiments/default.yaml", "--out", str(tmp_path / "one"),
                 "--set", "model.pretrained=true"]) == 2
    assert "the embedded 'tiny' is built from its config" in capsys.readouterr().err  # not a hub lookup's traceback
    store.open_experiment(tmp_path / "study" / "store.zarr", mode="a")
    (tmp_path / "afile").write_text("")
    for command in ("train", "sweep", "calibrate"):
        with pytest.raises(SystemExit):
            main([command, "experiments/default.yaml", "--out", str(tmp_path / "study" / "store.zarr")])
        assert "lies inside the Zarr store" in capsys.readouterr().err
        dry_run = ["--dry-run"] if command == "sweep" else []  # a dry run printed the plan; the sweep then failed
        with pytest.raises(SystemExit):
            main([command, "experiments/default.yaml", "--out", str(tmp_path / "afile"), *dry_run])
        assert "is a file, not a directory" in capsys.readouterr().err


def test_a_sigterm_landing_in_a_finalizer_still_stops_the_command(monkeypatch, tmp_path):
    """Python drops an exception raised inside `__del__` ("Exception ignored in"): a SIGTERM landing there was lost,
    and the sweep trained on to its end and exited 0."""
    import gc
    import signal
    import time

    import gradtrace.cli

    class Garbage:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside __del__

    def work(args):
        garbage = Garbage()
        garbage.cycle = garbage
        del garbage
        gc.collect()
        for _ in range(300):  # the rest of the sweep, which the signal stops
            time.sleep(0.01)
        raise AssertionError("the command ran to its end")

    monkeypatch.setattr(gradtrace.cli, "cmd_info", work)
    assert main(["info", str(tmp_path)]) == 143


def test_unknown_key_is_an_error_listing_valid_keys(capsys):
    assert main(["sweep", "experiments/default.yaml", "--set", "train.stepz=3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "train.steps" in err


@pytest.mark.parametrize("pair, message", [
    ("sweep.runs=-3", "sweep.runs must be >= 0, got -3"), ("sweep.workers=0", "sweep.workers must be >= 1"),
    ("train.steps=2.5", "train.steps: expected a whole number, got 2.5"), ("capture.dim=0", "capture.dim must be >= 1"),
    ("task.train_share=1.5", "task.train_share must be <= 1"), ("train.clip=0", "train.clip must be > 0"),
    ("capture.sketch=foo", "capture.sketch must be one of identity, countsketch"),
    ("capture.dtype=int8", "capture.dtype must be one of float32"), ("train.device=tpu", "train.device must be"),
    ("train.lr=-1", "train.lr must be >= 0"), ("sweep.weight_decay=[-0.05,0.1]", "sweep.weight_decay values >= 0"),
    # NaN passed every bound (a run of min_lr_ratio .nan trained to NaN and was complete), and so did eps < 0 and a
    # training share that leaves ID none of the mix (every run then failed, each asking to re-run the sweep)
    ("train.min_lr_ratio=.nan", "train.min_lr_ratio must be >= 0, got nan"), ("train.eps=-1", "train.eps must be >= 0"),
    ("sweep.lr=[.nan,0.01]", "sweep.lr values must be > 0"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio must be <= 1"),
    ("task.train_share=0.2", "training shares (task.train_share × each split's share, task.order_share for order) "
                             "sum to 1.53")])
def test_a_value_out_of_range_is_an_error_naming_its_key(capsys, pair, message):
    assert main(["sweep", "experiments/default.yaml", "--set", pair, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_set_overrides_dotted_keys():
    cfg = config.load("experiments/default.yaml", config.parse_overrides(
        ["train.steps=7", "train.lr=1e-4", "train.weight_decay=0", "train.seed=3", "capture.sketch=identity",
         "capture.dim=9", "capture.every=2", "capture.probe_every=4", "sweep.runs=5", "model.name=micro"]))
    assert (cfg.train.steps, cfg.train.lr, cfg.train.seed, cfg.capture.sketch, cfg.sweep.runs, cfg.model.name) == \
        (7, 1e-4, 3, "identity", 5, "micro")


def test_dry_run_prints_the_plan(capsys):
    assert main(["sweep", "experiments/default.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "runs" in out and "expected" in out
    assert main(["sweep", "experiments/default.yaml", "--dry-run", "--scheduler", "tcp://cluster:8786"]) == 0
    assert "its worker processes, not sweep.workers, set how many jobs train at once" in capsys.readouterr().out


def test_dry_run_loads_neither_torch_nor_transformers():
    code = ("import sys; from gradtrace.cli import main; assert main(['sweep', 'experiments/default.yaml', "
            "'--dry-run']) == 0; print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"  # a plan in a second, not after ~7 s of imports


@pytest.mark.parametrize("pair, message", [
    ("task.shifts=[length,lenght]", "unknown split 'lenght'; registered splits: ID, length"),
    ("task.max_digits=1", "split 'carry' cannot be drawn at task.max_digits=1"),
    ("predict.exploratory=[covarianse]", r"unknown predictor(s) ['covarianse']"),
    ("capture.probe_losses=[ce,hinge]", "unknown capture.probe_losses ['hinge']; choose from ce, margin"),
    ("sweep.ensemble=2 --set train.precision=bf16", "ensembles train in fp32, got train.precision='bf16'"),
    ("model.init_from=no/such.safetensors", "model.init_from: no file "),
    ("task.shifts=[space] --set task.max_digits=2 --set task.n_test=5000",  # every run failed alike
     "could not draw 5256 distinct test and probe items of split 'ID'"),
    ("sweep.runs=0 --set sweep.reference_runs=0 --set sweep.pretrain_steps=0",
     "the plan has no run: nothing to train")])
def test_a_dry_run_refuses_what_the_sweep_would_refuse_before_training(capsys, pair, message):
    """A plan printed for a misspelt shift: on a cluster the job then failed at its start, after its wait in the
    queue."""
    pairs = [arg for one in pair.split(" --set ") for arg in ("--set", one)]
    assert main(["sweep", "experiments/default.yaml", *pairs, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("shifts, warned", [("[space]", 1), ("[space,order]", 1), ("[space,order,carry]", 0)])
def test_a_plan_of_too_few_shifts_for_the_analyses_is_warned_of(shifts, warned):
    """A study of one shift trained to its end; stats then refused it, saying to add acc_<shift> columns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["sweep", "experiments/default.yaml", "--set", f"task.shifts={shifts}", "--dry-run"]) == 0
    assert sum("need at least two shifts that vary across runs, predict's scores at least three" in str(w.message)
               for w in caught) == warned


def test_a_dry_run_into_a_directory_refuses_what_the_sweep_would_there(tmp_path, capsys):
    settings = sets({"sweep.runs": 1, "sweep.workers": 1, "sweep.reference_runs": 0, "train.steps": 2})
    assert main(["sweep", "experiments/scratch.yaml", "--out", str(tmp_path), *settings]) == 0
    assert main(["sweep", "experiments/scratch.yaml", "--out", str(tmp_path), *settings, "--dry-run"]) == 0
    assert main(["sweep", "experiments/scratch.yaml", "--out", str(tmp_path), *settings, "--set", "task.n_test=9",
                 "--dry-run"]) == 2
    assert "holds a sweep with a different config (task.n_test" in capsys.readouterr().err


def test_a_dry_run_into_a_study_times_what_is_left_to_train(tmp_path, capsys):
    """A dry run of a study extended, resumed or finished gave the time of every planned run, as for a new one."""
    settings = sets({"sweep.runs": 2, "sweep.workers": 1, "sweep.reference_runs": 0, "train.steps": 2})
    study = ["sweep", "experiments/scratch.yaml", "--out", str(tmp_path), *settings]
    assert main(study) == 0
    capsys.readouterr()
    assert main([*study, "--dry-run"]) == 0
    assert f"{tmp_path} holds all 2 complete: nothing left to train" in capsys.readouterr().out
    assert main([*study, "--set", "sweep.runs=5", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " min for the 3 left (" in lines[1] and lines[2] == f"{tmp_path} holds 2 of them complete"
    zarr.open_group(tmp_path / "store.zarr")["run-001"].attrs["status"] = "running"  # as a killed sweep leaves it
    assert main([*study, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " min for the 1 left (" in lines[1]
    assert lines[2].startswith(f"{tmp_path} holds 1 of them complete, 1 begun and not finished (each resumes")
    assert main([*study, "--out", str(tmp_path / "new"), "--dry-run"]) == 0
    assert " min in all (" in capsys.readouterr().out


def test_a_dry_run_does_not_look_up_a_hub_model(capsys, monkeypatch):
    """Offline, the hub's lookup retries for ~25 s before it fails: a dry run says it did not look instead."""
    import gradtrace.models

    def looked_up(cfg):
        raise AssertionError("a dry run contacted the hub")

    monkeypatch.setattr(gradtrace.models, "_hub_config", looked_up)
    assert main(["sweep", "experiments/seed_recipe.yaml", "--dry-run"]) == 0
    assert "'EleutherAI/pythia-70m' comes from the Hugging Face hub" in capsys.readouterr().out
    assert main(["sweep", "experiments/default.yaml", "--dry-run"]) == 0  # embedded: nothing to look up, no note
    assert "Hugging Face" not in capsys.readouterr().out
    assert main(["sweep", "experiments/default.yaml", "--dry-run", "--set", "model.name=micr0"]) == 0  # a typo, surely
    assert "'micr0' comes from the Hugging Face hub (not embedded: did you mean 'micro'?)" in capsys.readouterr().out


@pytest.mark.slow
def test_end_to_end_sweep_stats_predict_report(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["sweep", "experiments/scratch.yaml", "--out", str(out),
            *sets({"sweep.runs": 9, "sweep.workers": 1, "sweep.reference_runs": 2, "train.steps": 60,
                   "train.batch_size": 32, "task.n_test": 200, "sweep.lr": "[5e-3,3e-2]",
                   "task.shifts": "[space,order,zeropad,spaced_ops]"})]
    assert main(args) == 0
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 11 and table["run_id"].is_unique
    assert {"acc_ID", "acc_space", "lr", "weight_decay", "init_seed", "data_seed"} <= set(table.columns)
    assert {"train_acc_ID", "train_acc_space"} <= set(table.columns)  # every split has a share of the mix
    assert main(args) == 0  # re-running a finished sweep records nothing twice
    assert len(pd.read_csv(out / "results.csv")) == 11

    assert main(["stats", str(out), "--shifts", "space", "order", "--residualize", "linear"]) == 0
    assert set(pd.read_csv(out / "stats.csv")[["a", "b"]].itertuples(index=False)) == {("space", "order")}
    assert main(["stats", str(out)]) == 0
    assert (out / "stats.csv").exists()
    assert pd.read_csv(out / "gap.csv")["gap_pts"].notna().all()  # train accuracies: the report's gap has its data
    assert main(["predict", str(out)]) == 0
    assert (out / "predict_scores.csv").exists() and (out / "predictions.csv").exists()
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "index.html").exists()
    assert main(["info", str(out)]) == 0
    assert "run-008" in capsys.readouterr().out
    assert zarr.open_group(out / "store.zarr")["ref-000"].attrs["role"] == "reference"
    # every text file read and written as UTF-8, whatever the locale's encoding (before: the locale's, for five)
    one = ["train", "experiments/scratch.yaml", "--out", str(tmp_path / "one"),
           *sets({"train.steps": 4, "train.checkpoint_every": 2})]  # a checkpoint's state.json too
    for command in (args, one, ["report", str(out), "--out", str(tmp_path / "mine")], ["info", str(out)]):
        subprocess.run([sys.executable, "-X", "warn_default_encoding", "-c", "import sys, warnings; "
                        "warnings.filterwarnings('error', category=EncodingWarning, module='gradtrace'); "
                        "from gradtrace.cli import main; sys.exit(main(sys.argv[1:]))", *command], check=True)


def test_stats_refuses_too_few_runs(tmp_path, capsys):
    out = tmp_path / "few"
    assert main(["sweep", "experiments/default.yaml", "--out", str(out),
                 *sets({"sweep.runs": 2, "sweep.workers": 1, "sweep.reference_runs": 0, "train.steps": 4,
                        "sweep.pretrain_steps": 4, "train.threads": 0,
                        "train.cpu_kernels": "native"})]) == 0  # pytest's own threads and kernels: later tests compare
    assert main(["stats", str(out)]) == 2
    assert "82" in capsys.readouterr().err


def test_train_refuses_a_sweeps_directory_and_leaves_its_config(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["sweep", "experiments/scratch.yaml", "--out", str(out),
                 *sets({"sweep.runs": 1, "sweep.workers": 1, "sweep.reference_runs": 0, "train.steps": 2})]) == 0
    before = (out / "config.yaml").read_text()
    assert main(["train", "experiments/scratch.yaml", "--out", str(out), "--run-id", "run-000", "--resume",
                 *sets({"train.steps": 2, "train.lr": 0.05})]) == 2
    assert "holds a sweep (plan.json)" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == before  # the sweep still resumes with its own config


def test_a_sweep_refuses_a_directory_of_runs_it_did_not_plan(tmp_path, capsys):
    """A run `gradtrace train` left under a sweep's run id (its own role, seeds and learning rate) was taken for
    the sweep's, and its results joined the study's."""
    settings = sets({"sweep.runs": 1, "sweep.workers": 1, "sweep.reference_runs": 0, "train.steps": 2})
    assert main(["train", "experiments/scratch.yaml", "--out", str(tmp_path), "--run-id", "run-000", *settings]) == 0
    assert main(["sweep", "experiments/scratch.yaml", "--out", str(tmp_path), *settings]) == 2
    assert "holds runs trained outside a sweep" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()


def test_train_resume_of_a_complete_run_refuses_another_config(tmp_path, capsys):
    assert main(["train", "experiments/scratch.yaml", "--out", str(tmp_path), "--resume", *sets({"train.steps": 2})
                 ]) == 0  # nothing to resume: a mistyped --out trained anew without a word
    assert f"--resume: {tmp_path / 'store.zarr'} holds no run 'run'; training it from the start" in (
        capsys.readouterr().err)
    assert main(["train", "experiments/scratch.yaml", "--out", str(tmp_path), "--resume",
                 *sets({"train.steps": 3})]) == 2  # was: "2 steps", as if the 3 had been trained
    assert "trained with another config (train.steps: 2 → 3)" in capsys.readouterr().err


def _read_only(path, monkeypatch) -> dict:
    """`path` made read-only (as shared project storage often is), for root too, which ignores permission bits and
    is told so by `os.access`; returns each of its files' size and time of change, to check nothing wrote there."""
    for each in [path, *path.rglob("*")]:
        each.chmod(each.stat().st_mode & ~0o222)
    access = os.access
    monkeypatch.setattr(os, "access", lambda where, mode, **kw: access(where, mode, **kw) and not (
        mode & os.W_OK and os.path.realpath(where).startswith(os.path.realpath(path))))
    return {each: (each.stat().st_size, each.stat().st_mtime_ns) for each in path.rglob("*")}


def test_a_read_only_study_is_analysed_into_a_directory_of_ones_own(tmp_path, monkeypatch, capsys):
    from test_predict import make_planted

    study = make_planted(tmp_path, n_sweep=12).exp_dir
    files = _read_only(study, monkeypatch)
    for command in ("stats", "predict", "report"):  # refused before anything is computed, saying what to do
        assert main([command, str(study)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"gradtrace {command}: error: {study} is not writable (read-only storage, or another user's): write the "
            "analysis to a directory of your own with --out DIR (the study is only read)")
    mine = tmp_path / "my analysis"
    for command in ("stats", "predict", "report"):
        assert main([command, str(study), "--out", str(mine)]) == 0
    assert "running `gradtrace" not in capsys.readouterr().err  # the report read the tables written there
    assert {"stats.csv", "stats.json", "gap.csv", "predictions.csv", "predict_scores.csv", "report"} <= {
        each.name for each in mine.iterdir()}
    page = (mine / "report" / "index.html").read_text(encoding="utf-8")
    assert "Summary per residualisation" in page and "Predictor scores" in page
    assert {each: (each.stat().st_size, each.stat().st_mtime_ns) for each in study.rglob("*")} == files


def test_the_python_api_on_a_read_only_study_names_the_file_and_says_what_to_do(tmp_path, monkeypatch):
    from gradtrace.files import written_whole

    _read_only(tmp_path, monkeypatch)
    with pytest.raises(PermissionError, match=rf"^cannot write {tmp_path / 'stats.csv'}: {tmp_path} is not writable "
                                              r"\(read-only storage, or another user's\); write it into a directory of "
                                              r"your own \(the analyses' out=DIR"):
        with written_whole(tmp_path / "stats.csv") as tmp:  # as a writer opening it there fails (root is not refused)
            raise PermissionError(13, "Permission denied", str(tmp))


def test_a_read_only_study_is_neither_resumed_nor_extended(tmp_path, monkeypatch, capsys):
    files = _read_only(tmp_path, monkeypatch)
    tiny = set_args({**TINY, "sweep.runs": 1, "sweep.reference_runs": 0, "train.steps": 2})
    for command in ("sweep", "train"):
        assert main([command, "experiments/default.yaml", "--out", str(tmp_path), *tiny]) == 2
        assert "copy it to a directory you can write to (`cp -a`, `rsync -a`) and run this there" in (
            capsys.readouterr().err)
    assert {each: (each.stat().st_size, each.stat().st_mtime_ns) for each in tmp_path.rglob("*")} == files


def test_an_interrupted_command_says_how_to_go_on(monkeypatch, capsys):
    import gradtrace.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_sweep", interrupted)
    assert main(["sweep", "experiments/default.yaml", "--scheduler", "tcp://h:8786"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; what was complete is kept: run the same command to go on" in err
    assert "train on there until they end" in err


def test_gradtraces_warnings_are_printed_in_its_words(tmp_path):
    """Each warning printed as Python's `/…/gradtrace/store.py:481: UserWarning: …` with the line of source after it
    (a process of its own: pytest records warnings, where the command line prints them)."""
    root = store.open_experiment(tmp_path / "store.zarr", mode="a")
    store.set_status(store.create_run(root, "r0", {}), "complete")
    (tmp_path / "store.zarr" / "r1").mkdir()  # a run folder whose zarr.json is lost
    done = subprocess.run([sys.executable, "-m", "gradtrace.cli", "info", str(tmp_path)], capture_output=True,
                          text=True, check=True)
    assert f"gradtrace info: warning: {tmp_path / 'store.zarr' / 'r1'} is left out" in done.stderr
    assert "UserWarning" not in done.stderr
    with warnings.catch_warnings(record=True) as caught:  # a caller recording them still does
        warnings.simplefilter("always")
        assert main(["info", str(tmp_path)]) == 0
    assert any("is left out" in str(w.message) for w in caught)
    assert warnings.formatwarning.__module__ == "warnings"  # restored
