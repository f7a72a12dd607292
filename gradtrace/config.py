"""Experiment configuration: dataclasses with defaults, loaded from YAML, overridden by dotted keys."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradtrace import kernels
from gradtrace.files import written_whole

SKETCH_KINDS = ("identity", "countsketch", "gaussian", "rademacher")  # gradtrace.capture.sketch.SKETCHES
PROBE_LOSS_NAMES = ("ce", "margin")  # gradtrace.tasks.losses.PROBE_LOSSES
MAX_DIGITS = 18  # operands are drawn as numpy int64s, below 2**63 ≈ 9.2e18: 19 digits would overflow
SEED_LIMIT = 2**63  # seeds are below it: numpy takes no negative seed, torch none from 2**64 on, and below 2**63 a
# seed stays an int64 in numpy and pandas (results.csv's seed columns); a sweep's own seeds (a seed plus run
# indices) are checked as its runs' configs are built, which a dry run does too


@dataclass
class ModelConfig:
    """Which network to train: an embedded tiny GPT-NeoX, `pythia-70m` (config only), or any HF name/path."""

    name: str = "tiny"
    attn_implementation: str = "eager"
    pretrained: bool = False  # load weights for a hub name/path instead of a random init from its config
    init_from: str | None = None  # start from these weights (safetensors), e.g. a captured base run's final weights


@dataclass
class TaskConfig:
    """The synthetic arithmetic task: ID format, which OOD shifts, how much of each training sees."""

    shifts: list[str] = field(default_factory=lambda: [
        "length", "carry", "zeropad", "base8", "space", "spaced_ops", "order"])
    max_digits: int = 3  # ID operands have 1..max_digits digits (at most MAX_DIGITS, 18)
    reverse_operands: bool = True  # operands written least-significant digit first (answers always are)
    digit_spaces: bool = False  # a space between digits, for BPE tokenizers that chunk digits
    n_test: int = 2000  # items per evaluation split
    n_probe: int = 256  # items per probe batch
    n_train_eval: int = 256  # training-pool items per split scored at a run's end: its train accuracy (0: none)
    pool_size: int = 65536  # training items drawn once per task; runs differ in which they sample and when
    train_share: float = 0.02  # share of each shift's (shorter) training form in the training mix
    order_share: float = 0.03  # share of a<b items in training (ID is mostly a>=b)
    seed: int = 1234  # fixes test and probe sets; training batches use train.data_seed
    modules: list[str] = field(default_factory=list)  # imported first: where your own splits (predictors) register

    def __post_init__(self) -> None:
        _refuse_out_of_range("task", self, dict(max_digits=1, n_test=1, n_probe=0, n_train_eval=0, pool_size=1,
                                                train_share=0, order_share=0), most=dict(train_share=1, order_share=1))
        _refuse_bad_seeds("task", self, "seed")
        if self.max_digits > MAX_DIGITS:
            raise ValueError(f"task.max_digits must be <= {MAX_DIGITS}, got {self.max_digits}: operands are drawn as "
                             f"64-bit integers, which hold {MAX_DIGITS} digits")
        repeated = sorted({s for s in self.shifts if self.shifts.count(s) > 1})
        if repeated:
            raise ValueError(f"task.shifts lists {repeated} more than once: each split is one column of the results")


@dataclass
class TrainConfig:
    """One fine-tuning run: optimiser, schedule and seeds (init and data order vary independently)."""

    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05  # AdamW's decoupled decay, of every parameter (norms, biases, embeddings too)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup: int = 100
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    seed: int = 0
    init_seed: int | None = None  # defaults to seed
    data_seed: int | None = None  # defaults to seed
    checkpoint_every: int = 256  # steps between resumable checkpoints (aligned with store flushes)
    eval_every: int = 0  # evaluate every split every n steps during training (0: only at the end)
    pack: bool = True  # several items to a row, each attending only to itself: same gradients, ~25% fewer tokens
    # (needs eager or sdpa attention, which take a 4D mask)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler) | auto (bf16 on CUDA, else fp32)
    threads: int = 0  # torch threads; 0 leaves torch's default
    cpu_kernels: str = "native"  # native (the best this CPU has) | avx2 (torch's, oneDNN's and MKL's kernels pinned
    # to AVX2 before a run computes: the same rounding on AMD x86 CPUs with AVX2, not Intel's; gradtrace/kernels.py)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda[:n] | mps; one torch lacks here is refused

    def __post_init__(self) -> None:
        _refuse_out_of_range("train", self, dict(steps=0, batch_size=1, lr=0, weight_decay=0, eps=0, warmup=0,
                                                 min_lr_ratio=0, checkpoint_every=1, eval_every=0, threads=0),
                             most=dict(min_lr_ratio=1))  # the schedule decays to it: above 1 it would rise
        _refuse_bad_seeds("train", self, "seed", "init_seed", "data_seed")
        if len(self.betas) != 2:
            raise ValueError(f"train.betas: expected two numbers in [0, 1) (Adam's beta1, beta2), "
                             f"got {list(self.betas)}")
        for index, beta in enumerate(self.betas):  # worded as torch's AdamW refuses it
            if not 0 <= beta < 1:
                raise ValueError(f"train.betas: Invalid beta parameter at index {index}: {beta}; "
                                 "each must be in [0, 1)")
        if not self.clip > 0:
            raise ValueError(f"train.clip must be > 0 (a large value, e.g. .inf, never clips), got {self.clip}")
        _refuse_unknown("train", self, precision=("fp32", "bf16", "fp16", "auto"), cpu_kernels=kernels.CHOICES)
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"train.device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")


@dataclass
class CaptureConfig:
    """What the Recorder writes per recorded step and how it is sketched and stored."""

    enabled: bool = True
    sketch: str = "countsketch"  # identity | countsketch | gaussian | rademacher
    dim: int = 4096
    seed: int = 0
    every: int = 1  # record every n-th optimizer step
    schedule: str = "every"  # every | log
    probe_every: int = 50  # 0: no probes in gradtrace's runs; a Recorder given probes takes them first and last
    v_stats_every: int = 10  # per-tensor mean/quantiles of Adam's v on recorded steps divisible by this (NaN between)
    quantities: list[str] = field(default_factory=lambda: ["grad", "update", "adam_m"])
    probe_losses: list[str] = field(default_factory=lambda: ["ce", "margin"])
    dtype: str = "float32"  # storage dtype of sketched rows: float32 | float16 | bfloat16
    chunk: int = 256  # rows per stored chunk along the step axis (each write costs ~2 ms per array, any size)
    save_weights: bool = True  # initial and final weights as safetensors beside the store (not by attach)
    writer_thread: bool | None = None  # write chunks from a background thread; None: on CUDA only

    def __post_init__(self) -> None:
        _refuse_out_of_range("capture", self, dict(dim=1, every=1, probe_every=0, v_stats_every=1, chunk=1))
        _refuse_bad_seeds("capture", self, "seed")
        _refuse_unknown("capture", self, sketch=SKETCH_KINDS, schedule=("every", "log"),
                        dtype=("float32", "float16", "bfloat16"))
        unknown = sorted(set(self.quantities) - {"grad", "update", "adam_m"})
        if unknown:
            raise ValueError(f"unknown capture.quantities {unknown}; choose from grad, update, adam_m")
        unknown = sorted(set(self.probe_losses) - set(PROBE_LOSS_NAMES))
        if unknown:
            raise ValueError(f"unknown capture.probe_losses {unknown}; choose from {', '.join(PROBE_LOSS_NAMES)}")

    def use_writer_thread(self, device) -> bool:
        """Whether rows are written from a background thread when training on `device` (it pays off on GPUs,
        where training would otherwise wait on the disk; on a CPU the thread competes for the cores)."""
        return device.type == "cuda" if self.writer_thread is None else self.writer_thread


@dataclass
class SweepConfig:
    """A sweep of runs: how many, which axes vary, which runs are captured as references."""

    runs: int = 32
    workers: int = 2  # single-thread worker processes
    ensemble: int = 1  # reference runs, and sweep runs, trained as vmap ensembles of this many per job (1: alone)
    search: str = "random"  # random: lr and weight decay drawn from their ranges; grid: every combination of values
    lr: list[float] = field(default_factory=lambda: [1.5e-3, 4e-3])  # random: [low, high], log-uniform; grid: values
    weight_decay: list[float] = field(default_factory=lambda: [0.0, 0.1])  # random: [low, high], uniform; grid: values
    vary: list[str] = field(default_factory=lambda: ["init", "data", "hparams"])
    seed: int = 0  # seeds the sampling of run settings
    reference_runs: int = 1  # runs with full capture, at the base config, for predictors
    capture_sweep: bool = False  # full capture on every sweep run too (large)
    pretrain_steps: int = 0  # > 0: first train a captured `base` run this long; every other run starts from it
    bases: int = 1  # with pretrain_steps: base runs `base-0`… (init seeds +0, +1, …), runs spread round-robin

    def __post_init__(self) -> None:
        _refuse_out_of_range("sweep", self, dict(runs=0, workers=1, ensemble=1, reference_runs=0, pretrain_steps=0,
                                                 bases=1))
        _refuse_bad_seeds("sweep", self, "seed")
        if not (all(v > 0 for v in self.lr) and all(v >= 0 for v in self.weight_decay)):  # NaN too
            raise ValueError(f"sweep.lr values must be > 0 and sweep.weight_decay values >= 0, got lr {self.lr}, "
                             f"weight_decay {self.weight_decay}")
        for name in ("lr", "weight_decay"):  # a random draw from an infinite range overflows; a grid run trains to NaN
            if math.inf in getattr(self, name):
                raise ValueError(f"sweep.{name} values must be finite, got {getattr(self, name)}")
        if not self.vary:
            raise ValueError("sweep.vary is empty, so every sweep run would train alike: list what varies across "
                             "runs, one or more of init, data, hparams")
        if self.search == "grid":
            for name in ("lr", "weight_decay"):
                values = getattr(self, name)
                repeated = sorted({v for v in values if values.count(v) > 1})
                if repeated:
                    raise ValueError(f"sweep.{name} lists {repeated} more than once: each value of a grid is a grid "
                                     "point, list it once")


@dataclass
class PredictConfig:
    """Predictors declared before the sweep is scored (pre-registration)."""

    preregistered: list[str] = field(default_factory=lambda: ["zero", "covariance"])
    exploratory: list[str] = field(default_factory=list)
    reference_role: str = "reference"  # runs whose stores feed the predictors (`base` for pretraining-log studies)


@dataclass
class Config:
    """A whole experiment: model, task, train, capture, sweep, predict."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def __post_init__(self) -> None:
        if self.capture.enabled and self.capture.probe_every and not self.task.n_probe:
            raise ValueError("task.n_probe=0 leaves the probes no items: set capture.probe_every=0 (no probe "
                             "gradients) or task.n_probe > 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe)."""
        return _plain(dataclasses.asdict(self))


def check_ensemble_precision(precision: str, device: str | None = None) -> None:
    """Refuse mixed precision for vmap ensembles, which train in fp32: bf16, fp16, and `auto` where it is bf16 (on
    a CUDA `device`; None where the device is not known yet, as in a dry run)."""
    if precision in ("bf16", "fp16") or (precision == "auto" and device == "cuda"):
        on = f" on {device}" if device else ""
        raise ValueError(f"ensembles train in fp32, got train.precision={precision!r}{on}; set train.precision=fp32, "
                         "or sweep.ensemble=1 to train mixed-precision runs standalone")


def dotted(cfg: Config) -> dict[str, Any]:
    """The config as one flat dict of dotted keys (`train.lr`: …)."""
    return _flat(cfg.to_dict())


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def keys_missing_from(resolved: dict[str, Any]) -> list[str]:
    """The dotted keys a config has today that a config written whole lacks (a sweep's config.yaml, a run's `config`
    attribute): written by an older gradtrace, which trained without them, where today's defaults may differ."""
    have = _flat(resolved)
    return [key for key in valid_keys() if key not in have]


def read_resolved(path: str | Path) -> dict[str, Any]:
    """A config file as written, nothing filled in (`load` fills today's defaults)."""
    return _parse_yaml(Path(path).read_text(encoding="utf-8"), f"config {path}") or {}


def changed_keys(old: Config, new: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old → new` for every dotted key whose value differs, but those in `ignore` (keys or whole sections)."""
    a, b = dotted(old), dotted(new)
    return [f"{key}: {a[key]!r} → {b[key]!r}" for key in a
            if a[key] != b[key] and not any(key == i or key.startswith(i + ".") for i in ignore)]


def _refuse_unknown(section: str, cfg: Any, **choices: tuple[str, ...]) -> None:
    """Refuse a string key outside its choices, naming its dotted key and the choices."""
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{section}.{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")


def _refuse_out_of_range(section: str, cfg: Any, least: dict[str, float], most: dict[str, float] | None = None):
    """Refuse a numeric key below its least meaningful value or above its greatest, infinite, or NaN, naming its
    dotted key."""
    for name, bound in least.items():
        if not getattr(cfg, name) >= bound:
            raise ValueError(f"{section}.{name} must be >= {bound}, got {getattr(cfg, name)}")
        if getattr(cfg, name) == math.inf:  # a run at lr or weight decay .inf trains to NaN
            raise ValueError(f"{section}.{name} must be finite, got {getattr(cfg, name)}")
    for name, bound in (most or {}).items():
        if not getattr(cfg, name) <= bound:
            raise ValueError(f"{section}.{name} must be <= {bound}, got {getattr(cfg, name)}")


def _refuse_bad_seeds(section: str, cfg: Any, *names: str) -> None:
    """Refuse a seed numpy or torch would refuse once a run starts, naming its dotted key (None: one that defaults to
    another)."""
    for name in names:
        seed = getattr(cfg, name)
        if seed is not None and not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"{section}.{name} must be a seed from 0 to 2**63 - 1, got {seed}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, but a key repeated within one mapping is an error (safe_load keeps the last silently), and
    so is a section or key that YAML reads as other than text."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_keys_not_text(node)
        return super().construct_document(node)

    def _refuse_keys_not_text(self, node: yaml.Node, section: str = "", depth: int = 2) -> None:
        """Refuse a key of the sections' mapping or of a section's that reads as a number, bool or null (`1`, and
        YAML 1.1's `on`, `no`, `null`), naming it as written: config keys are names, which such a key is not."""
        if not depth or not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag not in ("tag:yaml.org,2002:str",
                                                                              "tag:yaml.org,2002:merge"):
                where = f" in section {section}" if section else ""
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r}{where} reads as {self.construct_object(key_node)!r}, not "
                    f"as a name: quote it ('{key_node.value}') if it is one", key_node.start_mark)
            self._refuse_keys_not_text(value_node, key_node.value, depth - 1)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} repeated (first at line {first_line[key]})", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, source: str) -> Any:
    """`text` parsed as YAML, a repeated key refused; a YAML error is a ValueError naming `source` and line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        at = f" at line {err.context_mark.line + 1}" if err.context_mark is not None else ""  # the scanner's: none
        context = f" ({err.context}{at})" if err.context else ""
        raise ValueError(f"{source}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: "
                         f"{err.problem}{context}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. `train.lr`."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += valid_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{key}: None is not allowed; expected {hint}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, key) for v in value]
        return tuple(out) if origin is tuple else out
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):  # YAML's true/false where a number belongs: a mistake, not 1/0
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if hint is int and isinstance(value, int):  # as is: through a float, a seed above 2**53 would change
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if hint is int and not number.is_integer():
            raise ValueError(f"{key}: expected a whole number, got {value!r}")
        return number if hint is float else int(number)
    if hint is str:
        if isinstance(value, os.PathLike):  # a path given in Python (`model.init_from = Path(...)`)
            return os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected text, got {value!r} (quote it if it is a name)")
        return value
    return value


def _meant(prefix: str, name: str, names: list[str]) -> str:
    """A key that is no config key, with the one of its section's `names` it seems to misspell (`train.step (did you
    mean train.steps?)`)."""
    close = difflib.get_close_matches(name, names, 1)
    return f"{prefix}{name} (did you mean {prefix}{close[0]}?)" if close else f"{prefix}{name}"


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - names))  # a dict built in Python may have keys that are not text
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(_meant(prefix, u, sorted(names)) for u in unknown)}; "
            f"valid keys: {', '.join(valid_keys(cls, prefix))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name}: expected a mapping of keys, got {value!r}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted-key overrides as nested mappings; a key set whole and then a key inside it (`--set train=3 --set
    train.lr=0.1`) refused as the conflict it is."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        node = nested
        *parents, leaf = key.split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                outer = ".".join(parents[:depth + 1])
                raise ValueError(f"{key}: set inside {outer}, which is set whole to {node!r} (no mapping of keys): "
                                 f"set one or the other")
        node[leaf] = value
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-3", ...]` -> `{"train.lr": 1e-3}` (values parsed as YAML scalars)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}; e.g. --set train.steps=200")
        key, raw = pair.split("=", 1)
        out[key.strip()] = _parse_yaml(raw, f"--set {pair}")
    return out


def checked(cfg: Any) -> Any:
    """A Config, or one of its sections, validated again as loading validates it (types, ranges, choices, across
    sections): one changed in Python after it was built (`cfg.train.steps = -5` in a notebook) is refused naming the
    key before anything runs, not in each run, or never (a run of -5 steps completed with none). A validated copy."""
    sections = {hint: f"{name}." for name, hint in typing.get_type_hints(Config).items()}
    if not isinstance(cfg, (Config, *sections)):  # a config file's path, say (asdict raised a TypeError of its own)
        raise TypeError(f"expected a gradtrace.config.Config, got {type(cfg).__name__} {cfg!r:.80} (a config file "
                        "is read with gradtrace.config.load(path))")
    prefix = "" if isinstance(cfg, Config) else sections[type(cfg)]
    parts = [("", cfg), *((p, getattr(cfg, p[:-1])) for p in sections.values())] if not prefix else [(prefix, cfg)]
    misspelt = [_meant(p, name, [f.name for f in dataclasses.fields(part)]) for p, part in parts
                if dataclasses.is_dataclass(part)  # a section set whole to a mapping is built from it below
                for name in vars(part) if name not in {f.name for f in dataclasses.fields(part)}]
    if misspelt:  # `cfg.train.step = 500` made an attribute that no run reads
        raise ValueError(f"{', '.join(misspelt)} set in Python: no config key, so no run reads it; valid keys: "
                         f"{', '.join(valid_keys())}")
    return _build(type(cfg), _plain(dataclasses.asdict(cfg)), prefix)


def from_dict(data: dict[str, Any], overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Build a Config from a nested dict plus dotted-key overrides (`{"train.lr": 1e-3}`, or the command line's
    `["train.lr=1e-3"]`); unknown keys are an error."""
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, (list, tuple)):  # `--set` pairs (a list given for the dict raised AttributeError)
        overrides = parse_overrides(list(overrides))
    merged = _merge(data or {}, _nest(overrides or {}))
    return _build(Config, merged, "")


def load(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Load a YAML experiment config (or the defaults when path is None) with overrides, its file paths made
    absolute (`with_absolute_paths`)."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            path = _shipped_config(path)
        if path.is_dir():
            raise ValueError(f"config {path} is a directory; give a YAML file, e.g. experiments/default.yaml")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            line = err.object[:err.start].count(b"\n") + 1
            raise ValueError(f"config {path} is not UTF-8 text (byte {err.object[err.start]:#x} on line {line}): save "
                             "it as UTF-8") from None
        data = _parse_yaml(text, f"config {path}") or {}
        if not isinstance(data, dict):
            sections = ", ".join(f.name for f in dataclasses.fields(Config))
            raise ValueError(f"config {path}: expected a mapping of sections ({sections}), "
                             f"got a YAML {type(data).__name__}")
    return with_absolute_paths(from_dict(data, overrides))


def _shipped_folder() -> Path:
    """The experiments gradtrace ships: inside the installed package (gradtrace/experiments), or at the root of a
    checkout it runs from."""
    package = Path(__file__).resolve().parent
    folder = package / "experiments"
    if not folder.is_dir() and (package.parent / "pyproject.toml").is_file():
        folder = package.parent / "experiments"
    return folder


def shipped_configs() -> dict[str, Path]:
    """The experiment configs gradtrace ships, by name (`default`: experiments/default.yaml)."""
    return {p.stem: p for p in sorted(_shipped_folder().glob("*.yaml"))}


def shipped_weights() -> dict[str, Path]:
    """The base weights gradtrace ships, by file name (`default_base.safetensors`: the default study's base, which
    experiments/README.md says how to train)."""
    return {p.name: p for p in sorted(_shipped_folder().glob("*.safetensors"))}


def _weights_file(path: Path) -> Path:
    """A `model.init_from` made absolute: the file at the path (a file of one's own comes first), else the shipped
    weights it names (`default_base.safetensors`, `experiments/default_base.safetensors`), so the default runs
    outside the checkout too; else the path as given, which `sweep.check_config` refuses as missing."""
    shipped = shipped_weights()
    if not path.exists() and str(path.parent) in (".", "experiments") and path.name in shipped:
        return shipped[path.name]
    return path.resolve()


def _shipped_config(path: Path) -> Path:
    """The shipped config a path that is not there names (`default`, `default.yaml`, `experiments/default.yaml`), so
    the README's commands run outside the checkout too; else an error naming the shipped ones."""
    shipped = shipped_configs()
    if str(path.parent) in (".", "experiments") and path.suffix in ("", ".yaml") and path.stem in shipped:
        return shipped[path.stem]
    names = ", ".join(shipped) or "none found"
    raise FileNotFoundError(f"config {path} not found; give a YAML file, or the name of one gradtrace ships ({names}: "
                            "e.g. `gradtrace sweep default --dry-run`)")


def names_a_file(module: str) -> bool:
    """Whether a `task.modules` entry is a .py file's path (run as a file), not a module name on the Python path."""
    return module.endswith(".py")


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with a relative `model.init_from` and relative .py files of `task.modules` made absolute, against the
    directory the command runs in: the study's config.yaml then names the same files wherever it is resumed or
    extended from, and so do a dask cluster's workers, which run in folders of their own. A `model.init_from` that
    is not there but names weights gradtrace ships (`experiments/default_base.safetensors`) is those."""
    init_from = cfg.model.init_from and str(_weights_file(Path(cfg.model.init_from)))
    modules = [str(Path(m).resolve()) if names_a_file(m) else m for m in cfg.task.modules]
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=init_from),
                               task=dataclasses.replace(cfg.task, modules=modules))


def dump(cfg: Config, path: str | Path) -> None:
    """Write the full resolved config as YAML, atomically: a resumed sweep reads it back, and a kill mid-write
    must not leave half of it. Checked first (`checked`): a config changed in Python is written only if valid."""
    with written_whole(path) as tmp:
        tmp.write_text(yaml.safe_dump(checked(cfg).to_dict(), sort_keys=False), encoding="utf-8")
