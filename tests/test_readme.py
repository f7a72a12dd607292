"""The READMEs' Python examples run as printed: registering a split of your own, capture in your own loop, reading
a store and analysing a run (README.md), reading with plain zarr (storage/README.md) — each block executed from the
file itself, so the docs cannot drift from the code."""
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from gradtrace.models import build_model
from gradtrace.sweep import run_sweep
from gradtrace.tasks import ArithmeticTask

ROOT = Path(__file__).parents[1]


def python_blocks(readme: Path) -> dict[str, str]:
    """A README's ```python blocks, named by the heading they follow and their number under it."""
    blocks, heading, code, fence = {}, "", None, None
    for line in readme.read_text().splitlines(keepends=True):
        if fence is None and line.startswith("#"):
            heading, number = line.lstrip("# ").strip(), 0
        elif fence is None and line.startswith("```"):
            fence, code = line.strip(), []
        elif fence is not None and line.startswith("```"):
            if fence == "```python":
                blocks[f"{heading} {number}"] = "".join(code)
                number += 1
            fence = None
        elif fence is not None:
            code.append(line)
    return blocks


BLOCKS = python_blocks(ROOT / "README.md")
STORAGE_BLOCKS = python_blocks(ROOT / "storage" / "README.md")


def block(prefix: str, index: int = 0) -> str:
    return BLOCKS[f"{prefix} {index}"]


def test_the_readmes_have_the_blocks_this_file_runs():
    assert sorted(BLOCKS) == ["Capture in your own training loop 0", "Reading a store 0", "Reading a store 1",
                              "Reading a store 2", "The task 0"]
    assert sorted(STORAGE_BLOCKS) == ["Reading with plain zarr 0",
                                      "The sketch map: sketching a vector of your own as the run did 0"]


def test_a_split_of_your_own_registers_and_builds(split_registry):
    exec(compile(block("The task"), "README.md: my_splits.py", "exec"), {})
    task = ArithmeticTask(tiny_config(task__shifts=["double", "carry"]).task)
    a, b = task.test_set("double").prompts[0].rstrip("=").split("+")
    assert a == b and "double" in task.splits


def test_capture_in_your_own_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the block writes storage/mine
    task = ArithmeticTask(tiny_config().task)
    model = build_model(tiny_config().model, task.tokenizer.vocab_size, seed=0)
    batches = [task.train_batch(step, 0, 8)[0] for step in range(3)]
    namespace = {"torch": torch, "model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
                 "steps": len(batches), "loader": [{"input_ids": x, "labels": x} for x in batches]}
    exec(compile(block("Capture in your own training loop"), "README.md: capture", "exec"), namespace)
    import zarr

    run = zarr.open_group(tmp_path / "storage/mine/store.zarr", mode="r")["run-0"]
    assert run.attrs["status"] == "complete" and run["step"][:].tolist() == [0, 1, 2]
    assert np.isfinite(run["loss"][:]).all() and np.isfinite(run["grad_norm_unclipped"][:]).all()


def test_reading_a_store_and_analysing_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks read storage/default
    run_sweep(tiny_config(sweep__runs=0, sweep__reference_runs=1), tmp_path / "storage/default", progress=False)
    namespace: dict = {}
    exec(compile(block("Reading a store", 0), "README.md: reading a store", "exec"), namespace)
    run = namespace["run"]
    assert run.metadata.attributes["sketch"]["kind"] == "countsketch"
    exec(compile(block("Reading a store", 1), "README.md: analysing a run", "exec"), namespace)
    share = namespace["share"]
    assert share.shape == (run["probe/step"].shape[0], len(run.attrs["splits"]))
    assert ((share >= 0) & (share <= 1)).all()
    plain: dict = {}
    exec(compile(STORAGE_BLOCKS["Reading with plain zarr 0"], "storage/README.md", "exec"), plain)
    assert plain["updates"].shape == run["update"].shape and plain["probe"].ndim == 4
    exec(compile(STORAGE_BLOCKS["The sketch map: sketching a vector of your own as the run did 0"],
                 "storage/README.md: the sketch map", "exec"), plain)
    rebuilt, rows = plain["sketch"].apply(plain["moved"]).numpy(), plain["updates"].sum(axis=0)
    np.testing.assert_allclose(rebuilt, rows, atol=1e-4 * np.abs(rows).max())
    P, k = plain["layout"].size, plain["spec"]["dim"]  # the map as the text describes it
    gen = torch.Generator().manual_seed(int(hashlib.sha256(repr((plain["spec"]["seed"], 1, P, k)).encode())
                                            .hexdigest()[:15], 16))
    signs, shifts = torch.randint(0, 2, (P,), generator=gen) * 2 - 1, torch.randint(0, k, (-(-P // k),), generator=gen)
    np.testing.assert_array_equal(plain["sketch"].signs.numpy(), signs.numpy())
    np.testing.assert_array_equal(plain["sketch"].shifts.numpy(), shifts.numpy())
    x = torch.randn(P)
    buckets = (torch.arange(P) % k + shifts[torch.arange(P) // k]) % k
    by_hand = torch.zeros(k).index_add_(0, buckets, signs * x)
    torch.testing.assert_close(plain["sketch"].apply(x), by_hand, rtol=1e-5, atol=1e-5)


def test_a_predictor_of_your_own_is_scored_as_the_built_in_ones(tmp_path, monkeypatch):
    from gradtrace.predict import PREDICTORS, Predictor, register_predictor
    from test_predict import make_planted

    monkeypatch.setattr("gradtrace.predict.PREDICTORS", dict(PREDICTORS))  # the block's registration leaves with it
    planted = make_planted(tmp_path, n_sweep=60)
    (tmp_path / "storage").mkdir()
    planted.exp_dir.rename(tmp_path / "storage" / "default")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block("Reading a store", 2), "README.md: a predictor of your own", "exec"), namespace)
    rows = namespace["result"].scores.set_index("predictor")
    assert {"last_updates", "zero", "cosine", "covariance"} <= set(rows.index)  # beside every baseline
    assert rows.loc["last_updates", "group"] == "exploratory" and np.isfinite(rows.loc["last_updates", "spearman"])
    predicted = namespace["result"].predictions.query("predictor == 'last_updates'")["predicted"]
    assert len(predicted) and predicted.between(-1, 1).all()
    mine = namespace["LastUpdatesPredictor"]
    with pytest.raises(ValueError, match="predictor 'cosine' is built in"):
        register_predictor(type("Mine", (mine,), {"name": "cosine"}))
    with pytest.raises(ValueError, match="name must be a name of ASCII letters"):
        register_predictor(type("Mine", (mine,), {"name": "my predictor"}))
    with pytest.raises(TypeError, match="takes a subclass of gradtrace.predict.Predictor"):
        register_predictor(object)
    with pytest.raises(TypeError, match="defines no _matrix"):
        register_predictor(type("Unfinished", (Predictor,), {"name": "unfinished"}))


PREDICTOR_MODULE = """
import numpy as np
from gradtrace.predict import Predictor, register_predictor

@register_predictor
class Constant(Predictor):
    name = "constant_positive"

    def _matrix(self, reference):
        out = np.full((len(reference.shifts),) * 2, 0.2)
        np.fill_diagonal(out, np.nan)
        return out
"""


def test_a_predictor_of_your_own_in_a_module_of_the_study_is_preregistered_and_run_by_the_cli(tmp_path, monkeypatch,
                                                                                               capsys):
    from gradtrace import config
    from gradtrace.cli import main
    from gradtrace.predict import PREDICTORS
    from gradtrace.sweep import check_config
    from test_predict import make_planted

    monkeypatch.setattr("gradtrace.predict.PREDICTORS", dict(PREDICTORS))
    exp = make_planted(tmp_path, n_sweep=60).exp_dir
    (tmp_path / "mine.py").write_text(PREDICTOR_MODULE)
    cfg = config.from_dict({"task": {"modules": [str(tmp_path / "mine.py")]},
                            "predict": {"preregistered": ["constant_positive"]}})
    config.dump(cfg, exp / "config.yaml")
    assert main(["predict", str(exp)]) == 0
    assert re.search(r"^constant_positive +\S+", capsys.readouterr().out, re.M)
    rows = pd.read_csv(exp / "predict_scores.csv").set_index("predictor")
    assert rows.loc["constant_positive", "group"] == "preregistered"
    check_config(tiny_config(task__modules=[str(tmp_path / "mine.py")], predict__preregistered=["constant_positive"]),
                 contact_hub=False)  # a sweep takes it before any run trains


def test_each_study_predicts_with_its_own_modules_predictor_in_a_process_serving_both(tmp_path, monkeypatch,
                                                                                      split_registry):
    from gradtrace import config
    from gradtrace.predict import PREDICTORS, run_predict
    from test_predict import make_planted

    monkeypatch.setattr("gradtrace.predict.PREDICTORS", dict(PREDICTORS))
    first = make_planted(tmp_path, n_sweep=60).exp_dir
    studies = {"a": (first, 0.2), "b": (shutil.copytree(first, tmp_path / "b"), -0.2)}
    for module, (exp, value) in studies.items():  # two studies' modules, each with its own predictor named "mine"
        (tmp_path / f"{module}.py").write_text(PREDICTOR_MODULE.replace("constant_positive", "mine")
                                               .replace("0.2", str(value)))
        config.dump(config.from_dict({"task": {"modules": [str(tmp_path / f"{module}.py")]}}), exp / "config.yaml")
    for module in ("a", "b", "a"):  # a notebook predicting study after study
        exp, value = studies[module]
        predicted = run_predict(exp, predictors=["mine"], n_boot=0, n_splits=10, n_perm=20).predictions
        assert (predicted.query("predictor == 'mine'")["predicted"] == value).all(), module
    config.dump(config.from_dict({"task": {"modules": [str(tmp_path / "a.py"), str(tmp_path / "b.py")]}}),
                first / "config.yaml")
    with pytest.raises(ValueError, match=r"a\.py and .*b\.py both register predictor 'mine'"):
        run_predict(first, predictors=["mine"], n_boot=0, n_splits=10, n_perm=20)
    (tmp_path / "a.py").rename(tmp_path / "moved.py")  # a moved study: its module is not where it was
    with pytest.warns(UserWarning, match=r"no file .*a\.py.*: predicting with the predictors registered in this"):
        run_predict(first, predictors=["mine"], n_boot=0, n_splits=10, n_perm=20)
    with pytest.raises(ValueError, match=r"no file .*a\.py"):
        run_predict(first, predictors=["theirs"], n_boot=0, n_splits=10, n_perm=20)
