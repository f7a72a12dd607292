"""Config loading refuses what it would otherwise misread: repeated keys, files that are not a YAML mapping, values
that would only fail (or silently do nothing) once a sweep runs."""
import re
from pathlib import Path

import pytest

from conftest import tiny_config
from gradtrace import config
from gradtrace.cli import main

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("train:\n  steps: 100\n  steps: 5\n", r"line 3, column 3: key 'steps' repeated \(first at line 2\)"),
    ("train:\n  steps: 5\nmodel:\n  name: micro\ntrain:\n  lr: 0.003\n",
     r"line 5, column 1: key 'train' repeated \(first at line 1\)"),
], ids=["key", "section"])
def test_a_repeated_key_is_refused_naming_it_and_its_lines(tmp_path, text, message):
    with pytest.raises(ValueError, match=f"exp.yaml: invalid YAML at {message}"):
        config.load(write(tmp_path, text))


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path):
    cfg = config.load(write(tmp_path, "train:\n  <<: {steps: 5, lr: 0.001}\n  steps: 7\n"))
    assert (cfg.train.steps, cfg.train.lr) == (7, 0.001)


@pytest.mark.parametrize("text, message", [
    ("model: [tiny\n", "exp.yaml: invalid YAML at line 2, column 1: expected ',' or ']'"),
    ("- a\n- b\n", r"exp.yaml: expected a mapping of sections \(model, task, .*\), got a YAML list"),
], ids=["unparsable", "list"])
def test_a_file_that_is_not_a_yaml_mapping_is_refused_naming_it(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        config.load(write(tmp_path, text))


def test_a_directory_is_refused_as_a_config(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"config {tmp_path} is a directory; give a YAML file")):
        config.load(tmp_path)


def test_an_override_that_is_not_yaml_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"--set model.name=\[tiny: invalid YAML at line 1, column 6"):
        config.parse_overrides(["model.name=[tiny"])


def test_a_key_set_whole_and_then_inside_is_refused_naming_both():
    """`--set train=3 --set train.lr=0.1` was a TypeError's traceback ('int' object does not support item
    assignment)."""
    with pytest.raises(ValueError, match=r"^train.lr: set inside train, which is set whole to 3 \(no mapping"):
        config.from_dict({}, config.parse_overrides(["train=3", "train.lr=0.1"]))


def test_a_character_that_starts_no_yaml_token_is_refused_naming_its_line():
    """YAML's scanner gives this error a context without a mark: the message crashed with an AttributeError."""
    with pytest.raises(ValueError, match=r"--set train.lr=@1: invalid YAML at line 1, column 1: found character "
                                         r"'@' that cannot start any token \(while scanning for the next token\)"):
        config.parse_overrides(["train.lr=@1"])


@pytest.mark.parametrize("betas, message", [
    ([0.9], r"train.betas: expected two numbers in \[0, 1\)"),
    ([0.9, 0.98, 0.99], r"train.betas: expected two numbers in \[0, 1\)"),
    ([0.9, 1.0], "train.betas: Invalid beta parameter at index 1: 1.0"),
    ([-0.1, 0.98], "train.betas: Invalid beta parameter at index 0: -0.1"),
])
def test_betas_must_be_two_numbers_in_0_1(betas, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(train__betas=betas)


def test_an_empty_sweep_vary_is_refused_saying_what_to_list():
    with pytest.raises(ValueError, match="sweep.vary is empty.*one or more of init, data, hparams"):
        tiny_config(sweep__vary=[])


@pytest.mark.parametrize("key, values, repeated", [
    ("lr", [1e-3, 0.001, 2e-3], r"\[0.001\]"),
    ("weight_decay", [0.0, 0.1, 0.0, 0.1], r"\[0.0, 0.1\]"),
])
def test_a_grid_value_listed_twice_is_refused_naming_it(key, values, repeated):
    with pytest.raises(ValueError, match=f"sweep.{key} lists {repeated} more than once"):
        tiny_config(sweep__search="grid", **{f"sweep__{key}": values})
    tiny_config(sweep__search="random", **{f"sweep__{key}": values[:1] * 2})  # a random range may be one point


@pytest.mark.parametrize("text", ["train:\n  steps: 1\n  steps: 2\n", "model: [tiny\n", "- a\n"],
                         ids=["repeated", "unparsable", "list"])
def test_a_bad_config_file_is_an_error_line_on_the_command_line(tmp_path, capsys, text):
    assert main(["sweep", str(write(tmp_path, text)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gradtrace sweep: error: config {tmp_path / 'exp.yaml'}") and err.count("\n") == 1


@pytest.mark.parametrize("data, message", [
    ({"sweep": {"runs": False}}, "sweep.runs: expected a number, got False"),  # was 0 runs
    ({"train": {"lr": True}}, "train.lr: expected a number, got True"),  # was lr 1.0
    ({"capture": {"enabled": 5}}, "capture.enabled: expected true/false, got 5"),
    ({"task": {"digit_spaces": [1]}}, "task.digit_spaces: expected true/false"),
    ({"task": {"shifts": ["length", 3]}}, "task.shifts: expected text, got 3"),
    ({"task": {"shifts": ["length", "carry", "length"]}}, r"task.shifts lists \['length'\] more than once"),
], ids=["bool-as-count", "bool-as-lr", "number-as-bool", "list-as-bool", "number-as-shift", "shift-twice"])
def test_a_value_of_the_wrong_kind_is_refused_not_converted(data, message):
    with pytest.raises(ValueError, match=message):
        config.from_dict(data)
    assert config.from_dict({"capture": {"enabled": 0}}).capture.enabled is False  # 0/1 still read as false/true


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_shipped_experiment_loads(path):
    assert config.load(path).sweep.vary


@pytest.mark.parametrize("key", ["train.lr", "train.weight_decay", "train.eps"])
def test_an_infinite_value_of_a_bounded_key_is_refused_naming_it(key):
    """train.lr=.inf passed the bounds (NaN did not): the run trained to NaN and was recorded complete."""
    with pytest.raises(ValueError, match=f"{key} must be finite, got inf"):
        config.load(None, config.parse_overrides([f"{key}=.inf"]))


@pytest.mark.parametrize("pair, message", [
    ("sweep.lr=[1e-3,.inf]", r"sweep.lr values must be finite, got \[0.001, inf\]"),
    ("sweep.weight_decay=[0,.inf]", "sweep.weight_decay values must be finite")])
def test_an_infinite_sweep_range_is_refused_naming_it(capsys, pair, message):
    """Its draw raised an OverflowError traceback, in a dry run too."""
    assert main(["sweep", "experiments/default.yaml", "--set", pair, "--dry-run"]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("text, message", [
    ("1: 2\n", r"line 1, column 1: key '1' reads as 1, not as a name: quote it \('1'\)"),
    ("train:\n  steps: 3\n  on: 2\n", "line 3, column 3: key 'on' in section train reads as True"),
    ("train:\n  null: 2\n", "line 2, column 3: key 'null' in section train reads as None"),
], ids=["number", "on", "null"])
def test_a_key_that_yaml_reads_as_no_name_is_refused_as_written(tmp_path, text, message):
    """Loading crashed with a TypeError, sorting it among the names."""
    with pytest.raises(ValueError, match=f"exp.yaml: invalid YAML at {message}"):
        config.load(write(tmp_path, text))


def test_a_key_that_is_no_text_in_a_dict_is_an_unknown_key():
    with pytest.raises(ValueError, match="unknown config key.* train.True; valid keys: train.steps"):
        config.from_dict({"train": {True: 2}})


def test_a_file_that_is_not_utf8_is_refused_naming_it(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes("train:\n  steps: 3  # café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"config {path} is not UTF-8 text (byte 0xe9 on line 2): save")):
        config.load(path)


@pytest.mark.parametrize("pair", ["train.seed=-1", "task.seed=-1", "train.seed=1e30", "sweep.seed=-1",
                                  "capture.seed=-1", "train.init_seed=-2", f"train.data_seed={2**63}"])
def test_a_seed_numpy_or_torch_would_refuse_is_refused_naming_its_key(capsys, pair):
    """It passed the dry run; the run failed with numpy's or torch's words ("expected non-negative integer"), naming
    no key, after its run group was made."""
    assert main(["sweep", "experiments/default.yaml", "--set", pair, "--dry-run"]) == 2
    key, value = pair.split("=")
    assert f"{key} must be a seed from 0 to 2**63 - 1, got {int(float(value))}" in capsys.readouterr().err
    assert config.dotted(config.load(None, {key: 2**63 - 1}))[key] == 2**63 - 1  # exactly: not through a float


def test_calibrating_bases_refuses_a_bad_seed_before_any_pilot_trains(tmp_path, monkeypatch):
    import gradtrace.calibrate

    def trained(*args):
        raise AssertionError("a pilot trained before every seed was checked")

    monkeypatch.setattr(gradtrace.calibrate, "calibrate", trained)
    with pytest.raises(ValueError, match="train.init_seed must be a seed from 0"):
        gradtrace.calibrate.calibrate_bases(tiny_config(sweep__pretrain_steps=2), tmp_path, [0, -1])


def test_a_device_torch_cannot_use_here_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    """train.device=mps without MPS gave torch's RuntimeError traceback, and cuda:N past the GPUs one of its own."""
    import torch

    from gradtrace.train import resolve_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main(["train", "experiments/scratch.yaml", "--out", str(tmp_path), "--set", "train.device=mps"]) == 2
    assert re.search(r"train.device=mps, but torch \S+ sees no MPS device here", capsys.readouterr().err)
    assert not (tmp_path / "store.zarr").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="train.device=cuda:2, but torch sees 2 CUDA devices here; use cuda:N with N "
                                         "below 2, cuda or auto"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("key, value, message", [
    ("train.steps", -5, r"train\.steps must be >= 0, got -5"),
    ("train.lr", "fast", r"train\.lr: expected a number, got 'fast'"),
    ("capture.sketch", "nope", r"capture\.sketch must be one of"),
    ("sweep.runs", -1, r"sweep\.runs must be >= 0"),
])
def test_a_config_changed_in_python_is_checked_before_anything_runs(tmp_path, key, value, message):
    """Loading checks a config; one changed in Python after (`cfg.train.steps = -5` in a notebook) was not: a run of
    -5 steps completed with none, a batch of 0 failed in numpy, and a sweep failed in each of its runs."""
    import torch

    from gradtrace.capture import attach
    from gradtrace.sweep import plan, run_sweep
    from gradtrace.train import train

    cfg = tiny_config(train__steps=2, sweep__runs=2, sweep__workers=1, sweep__reference_runs=0)
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    for trains in (lambda: train(cfg, tmp_path, "r", progress=False), lambda: run_sweep(cfg, tmp_path, progress=False),
                   lambda: plan(cfg)):
        with pytest.raises(ValueError, match=message):
            trains()
    if section == "capture":
        model = torch.nn.Linear(2, 2)
        with pytest.raises(ValueError, match=message):
            attach(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, "r", total_steps=2,
                   capture=cfg.capture)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_a_config_files_path_given_for_a_config_says_how_to_read_it(tmp_path):
    from gradtrace.sweep import run_sweep

    with pytest.raises(TypeError, match=r"expected a gradtrace.config.Config, got str .*gradtrace.config.load\(path\)"):
        run_sweep("experiments/default.yaml", tmp_path)  # was asdict's "should be called on dataclass instances"
    assert list(tmp_path.iterdir()) == []


def test_a_path_given_in_python_is_taken_as_text(tmp_path):
    """yaml could not write a pathlib.Path (`config.dump`: "cannot represent an object"), and loading refused one."""
    cfg = tiny_config()
    cfg.model.init_from, cfg.task.modules = Path("/studies/base.safetensors"), [Path("/studies/splits.py")]
    checked = config.checked(cfg)
    assert (checked.model.init_from, checked.task.modules) == ("/studies/base.safetensors", ["/studies/splits.py"])
    assert checked.train == cfg.train and checked is not cfg
    config.dump(cfg, tmp_path / "study.yaml")
    assert config.read_resolved(tmp_path / "study.yaml")["model"]["init_from"] == "/studies/base.safetensors"


def test_overrides_are_taken_as_the_command_lines_pairs_too():
    """`config.load(path, ["train.steps=100"])`, the `--set` form, raised AttributeError: 'list' object has no
    attribute 'items'."""
    pairs = config.load(None, ["train.steps=100", "capture.dim=512"])
    assert (pairs.train.steps, pairs.capture.dim) == (100, 512)
    assert config.load(None, "train.steps=100") == config.load(None, {"train.steps": 100})
    with pytest.raises(ValueError, match="expects key=value, got 'train.steps'"):
        config.load(None, ["train.steps"])


def test_a_misspelt_key_set_in_python_is_refused_with_the_key_meant(tmp_path):
    """`cfg.train.step = 500` (for steps) made an attribute that no run reads: the sweep trained as before, silently."""
    from gradtrace.sweep import run_sweep

    cfg = tiny_config(sweep__runs=2, sweep__workers=1, sweep__reference_runs=0)
    cfg.train.step, cfg.capture.dims = 500, 64
    with pytest.raises(ValueError, match=r"train\.step \(did you mean train\.steps\?\), capture\.dims \(did you mean "
                                         r"capture\.dim\?\) set in Python: no config key, so no run reads it"):
        run_sweep(cfg, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_key_names_the_key_it_seems_to_misspell():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) train\.step \(did you mean train\.steps\?\); "):
        config.load(None, {"train.step": 5})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) trian \(did you mean train\?\); "):
        config.from_dict({"trian": {"steps": 5}})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) train\.True; "):  # nothing near it: no guess
        config.load(None, {"train.True": 5})


def test_a_section_set_whole_in_python_is_checked_as_a_mapping_of_its_keys():
    """`cfg.train = {"steps": 5}` raised vars()'s TypeError in the check; a section set to what is no mapping is
    refused naming it."""
    cfg = tiny_config()
    cfg.train = {"steps": 5}
    assert config.checked(cfg).train == config.TrainConfig(steps=5)
    cfg.train = 5
    with pytest.raises(ValueError, match="train: expected a mapping of keys, got 5"):
        config.checked(cfg)
