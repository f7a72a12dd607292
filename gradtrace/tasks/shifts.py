"""The split registry: the ID split and named OOD shifts, each a test form and a shorter training form.

Every split draws `Problem`s from a numpy Generator. `test` draws the evaluation distribution; `train` draws
the few-shot form that the training mix holds a small share of (shorter, or the same format at ID length),
which is what lands a shift mid-range instead of at 0% (DESIGN.md §2).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import numpy as np

from gradtrace.config import MAX_DIGITS, names_a_file

T = TypeVar("T")

if TYPE_CHECKING:
    from gradtrace.config import TaskConfig


OPS = ("+", "-")  # what the task's vocabulary writes and `Problem.answer` computes
BASE_MARKS = {10: "", 8: "#"}  # the bases a prompt tells apart, by the mark it starts with


class ModuleNotThere(ValueError):
    """A module of task.modules that is not where the config names it (a moved study, another machine)."""


class ProblemError(ValueError):
    """A `Problem` the task cannot write or answer (an operator or base of its own)."""


@dataclass(frozen=True)
class Problem:
    """One arithmetic item before rendering: operands, operator (`OPS`), base (10, or 8: `BASE_MARKS`) and
    surface-format flags."""

    operands: tuple[int, ...]
    op: str = "+"
    base: int = 10
    pad_to: int = 0  # zero-pad operands to this many digits
    leading_space: bool = False
    spaced_ops: bool = False
    digit_spaces: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ProblemError(f"Problem(op={self.op!r}): op must be one of {', '.join(map(repr, OPS))}, the "
                               "operators the task's vocabulary writes and its answers are computed for")
        if self.base not in BASE_MARKS:
            raise ProblemError(f"Problem(base={self.base!r}): base must be 10 or 8 (marked '#' in the prompt); another "
                               "base's prompts would read as base 10, the same prompt with two answers")

    @property
    def answer(self) -> int:
        """The exact result."""
        a, *rest = self.operands
        return a - sum(rest) if self.op == "-" else a + sum(rest)

    def render(self, reverse_operands: bool = True, digit_spaces: bool = False) -> tuple[str, str]:
        """(prompt, answer) strings; the answer is always least-significant digit first."""
        spaced = digit_spaces or self.digit_spaces

        def digits(n: int, pad: int, reverse: bool) -> str:
            s = (str(n) if self.base == 10 else np.base_repr(n, self.base)).rjust(pad, "0")
            s = s[::-1] if reverse else s
            return " ".join(s) if spaced else s

        op = f" {self.op} " if self.spaced_ops else self.op
        eq = " = " if self.spaced_ops else "="
        body = op.join(digits(n, self.pad_to, reverse_operands) for n in self.operands)
        prompt = (" " if self.leading_space else "") + BASE_MARKS[self.base] + body + eq
        return prompt, digits(self.answer, 0, True)


def _number(rng: np.random.Generator, n_digits: int, base: int = 10) -> int:
    lo = 0 if n_digits == 1 else base ** (n_digits - 1)
    return int(rng.integers(lo, base ** n_digits))


def _carries(a: int, b: int, base: int = 10) -> tuple[int, int]:
    """(number of carry columns, number of columns) of a + b."""
    carry, count, cols = 0, 0, 0
    while a or b:
        carry = int((a % base + b % base + carry) >= base)
        count += carry
        cols += 1
        a, b = a // base, b // base
    return count, cols


def _pair(rng: np.random.Generator, lo: int, hi: int, base: int = 10, ordered: bool = True) -> tuple[int, int]:
    """Two operands of lo..hi digits; a >= b when ordered."""
    la = int(rng.integers(lo, hi + 1))
    lb = int(rng.integers(lo, la + 1)) if ordered else int(rng.integers(lo, hi + 1))
    a, b = _number(rng, la, base), _number(rng, lb, base)
    return (max(a, b), min(a, b)) if ordered else (a, b)


def _all_carry(rng: np.random.Generator, n: int) -> tuple[int, int]:
    """Two n-digit operands whose every column carries (column 0 sums to >= 10, later ones to >= 9)."""
    a = b = 0
    for i in range(n):
        need, top = (10 if i == 0 else 9), int(i == n - 1)  # top: leading digits are nonzero
        da = int(rng.integers(max(need - 9, top), 10))
        db = int(rng.integers(max(need - da, top), 10))
        a, b = a + da * 10**i, b + db * 10**i
    return max(a, b), min(a, b)


@dataclass(frozen=True)
class Split:
    """A named split: a one-line description and samplers for its test and training forms.

    Samplers take (rng, d) with d = task.max_digits; the description's {d}, {d1}, {dm} stand for d, d+1, d-1.
    """

    name: str
    description: str
    test: Callable[[np.random.Generator, int], Problem]
    train: Callable[[np.random.Generator, int], Problem]
    share: float = 1.0  # multiplier of task.train_share: a new algorithm (base 8) needs more examples

    def __post_init__(self) -> None:
        if not (isinstance(self.share, (int, float)) and 0 <= self.share < float("inf")):
            raise ValueError(f"split {self.name!r}: share must be a number >= 0 (its multiplier of task.train_share), "
                             f"got {self.share!r}")
        try:
            self.describe(3)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"split {self.name!r}: its description {self.description!r} does not format ("
                             f"{type(err).__name__}: {err}): it may name {{d}}, {{d1}} and {{dm}}; write other braces "
                             "twice ({{ and }})") from None

    def describe(self, max_digits: int) -> str:
        """The description for a task whose ID operands have up to `max_digits` digits."""
        return self.description.format(d=max_digits, d1=max_digits + 1, dm=max_digits - 1)


def _id(rng: np.random.Generator, d: int) -> Problem:
    """ID: a >= b, 1..d digits, carries under-sampled (items with >= 2 carries kept with p=0.3)."""
    while True:
        a, b = _pair(rng, 1, d)
        if _carries(a, b)[0] < 2 or rng.random() < 0.3:
            return Problem((a, b))


REGISTRY: dict[str, Split] = {s.name: s for s in [
    Split("ID", "in-distribution: a+b with a>=b, 1-{d} digits, multi-carry sums under-sampled as in training",
          test=_id, train=_id),
    Split("length", "first operand one digit longer than the ID range ({d1} digits); few-shot in training",
          test=lambda r, d: Problem((_number(r, d + 1), _number(r, int(r.integers(1, d + 1))))),
          train=lambda r, d: Problem((_number(r, d + 1), _number(r, int(r.integers(1, d + 1)))))),
    Split("carry",
          "every column carries, 3-{d} digits; training under-samples carries, all-carry only at 2-{dm} digits",
          test=lambda r, d: Problem(_all_carry(r, int(r.integers(3, d + 1)))),
          train=lambda r, d: Problem(_all_carry(r, int(r.integers(2, d))))),
    Split("zeropad", "operands zero-padded to {d1} digits; training pads shorter ({dm}-digit at most) operands",
          test=lambda r, d: Problem(_pair(r, 1, d), pad_to=d + 1),
          train=lambda r, d: Problem(_pair(r, 1, d - 1), pad_to=d + 1)),
    Split("base8", "base-8 sums marked '#', 3-{d} digits; training sees base 8 at 1-2 digits",
          test=lambda r, d: Problem(_pair(r, 3, d, base=8), base=8),
          train=lambda r, d: Problem(_pair(r, 1, 2, base=8), base=8), share=2.5),
    Split("space", "an irrelevant leading space, 1-{d} digits; training sees it at 1-2 digits",
          test=lambda r, d: Problem(_pair(r, 1, d), leading_space=True),
          train=lambda r, d: Problem(_pair(r, 1, 2), leading_space=True)),
    Split("spaced_ops", "spaces around '+' and '=', 1-{d} digits; training sees it at 1-2 digits",
          test=lambda r, d: Problem(_pair(r, 1, d), spaced_ops=True),
          train=lambda r, d: Problem(_pair(r, 1, 2), spaced_ops=True)),
    Split("order", "operand order a<b (ID is a>=b); training holds a small share of a<b",
          test=lambda r, d: Problem(tuple(sorted(_pair(r, 1, d, ordered=False)))),
          train=lambda r, d: Problem(tuple(sorted(_pair(r, 1, d, ordered=False))))),
    Split("three_operand", "three-operand sums a+b+c, 1-{dm} digits; training sees them at 1-2 digits",
          test=lambda r, d: Problem(_pair(r, 1, d - 1) + (_number(r, int(r.integers(1, d))),)),
          train=lambda r, d: Problem(_pair(r, 1, 2) + (_number(r, int(r.integers(1, 3))),))),
    Split("subtract", "subtraction a-b with a>=b, 3-{d} digits; training sees it at 1-2 digits",
          test=lambda r, d: Problem(_pair(r, 3, d), op="-"),
          train=lambda r, d: Problem(_pair(r, 1, 2), op="-")),
    Split("digit_spaced", "a space between every digit, 1-{d} digits; training sees it at 1-2 digits",
          test=lambda r, d: Problem(_pair(r, 1, d), digit_spaces=True),
          train=lambda r, d: Problem(_pair(r, 1, 2), digit_spaces=True)),
]}


BUILT_IN = tuple(REGISTRY)  # in registry order: the order in which their items are drawn
# a split names a results column (acc_<name>), an axis label and a figure's ticks: ASCII, at most 40 characters (a
# 143-character name covered half of the correlation heatmap)
SPLIT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
# names pandas reads back from stats.csv's `a` and `b` as other than text: NaN, a bool or a float
READ_AS_OTHER = {"na", "nan", "null", "none", "true", "false", "inf", "infinity"}


def register_split(split: Split) -> Split:
    """Add a split of your own to the registry and return it. Registering one of yours again replaces it (a notebook
    cell run twice); a built-in name is refused. Register it in a module that `task.modules` names: every process
    that trains (a sweep's workers, a dask cluster's) imports that module before it builds the task."""
    if not isinstance(split, Split):
        raise TypeError(f"register_split takes a gradtrace.tasks.Split, got {type(split).__name__}")
    if split.name in BUILT_IN:
        raise ValueError(f"split {split.name!r} is built in; give yours another name")
    if not SPLIT_NAME.fullmatch(split.name):
        raise ValueError(f"split name {split.name!r} must start with an ASCII letter and hold only ASCII letters, "
                         "digits and _, 40 characters at most (it names the results column acc_<name> and the "
                         "figures' labels)")
    if split.name.lower() in READ_AS_OTHER:
        raise ValueError(f"split name {split.name!r} reads as a missing value, a bool or a number in the CSV tables "
                         "that name splits (stats.csv, read back by the report and the paper): give it another name")
    remember(REGISTRY, "split", split.name, split, registering_module())
    return split


# what the modules of task.modules registered (splits here, predictors in gradtrace.predict), so that a process
# serving study after study (a notebook, a dask worker) holds each study's own
REGISTERED_BY: dict[tuple[str, str], str] = {}  # (kind, name) of yours: the module that registered it (`__main__`)
_REGISTERED: dict[str, dict[tuple[str, str], tuple[dict, object]]] = {}  # each module: what it registered, where
_IMPORTING: list[str] = []  # the modules of task.modules being imported, the innermost last


def registering_module() -> str:
    """Who owns what registers now: a module of task.modules being imported (and so its package's submodules, a
    helper it calls), else the module calling the register function's caller (`__main__`: a script or notebook)."""
    return _IMPORTING[-1] if _IMPORTING else sys._getframe(2).f_globals.get("__name__", "")


def remember(registry: dict, kind: str, name: str, value: object, by: str) -> None:
    """Put `value` in `registry` under `name`, registered by module `by` (a `kind` of thing: split, predictor)."""
    registry[name] = value
    REGISTERED_BY[kind, name] = by
    _REGISTERED.setdefault(by, {})[kind, name] = (registry, value)


def registered_by_a_script(names: list[str]) -> list[str]:
    """The splits of `names` that the running script or notebook registered (`__main__`; `__mp_main__` in a pool's
    worker), not a module of `task.modules`: a study's config.yaml cannot rebuild them."""
    return [n for n in names if REGISTERED_BY.get(("split", n)) in ("__main__", "__mp_main__")]


def import_split_modules(modules: list[str]) -> tuple[str, ...]:
    """Import each module named (a dotted name on the Python path, or a .py file's path, relative to the directory
    the command runs in): the modules where your own splits and predictors are registered; the names they run under
    (a file's holds a digest of its text). A file runs once per process and again once edited; a module imported
    before takes back the splits and predictors it registered where another module has since registered over them (a
    notebook or dask worker that served another study), so they are those of `modules`. Two of `modules` registering
    one name are refused: the last imported would win, silently."""
    loaded = tuple(_run_file(module) if names_a_file(module) else _import(module) for module in modules)
    registers: dict[tuple[str, str], tuple[str, str]] = {}  # what a module of `modules` registers: it, as run and named
    for module, ran in zip(modules, loaded):
        for (kind, name), (registry, value) in _REGISTERED.get(ran, {}).items():
            registry[name], REGISTERED_BY[kind, name] = value, ran
            if registers.setdefault((kind, name), (ran, module))[0] != ran:
                raise ValueError(f"task.modules: {registers[kind, name][1]} and {module} both register {kind} {name!r} "
                                 "(the one imported last would replace the other's, silently): give one of them "
                                 "another name")
    return loaded


@contextlib.contextmanager
def _running(module: str) -> Iterator[None]:
    """While module `module` of task.modules runs: what registers owns to it, what its last run registered forgotten."""
    _REGISTERED.pop(module, None)
    _IMPORTING.append(module)
    try:
        yield
    finally:
        _IMPORTING.pop()


def _import(module: str) -> str:
    """Import a module by its dotted name, once per process; its name."""
    if module in sys.modules:
        return module
    try:
        with _running(module):
            importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ModuleNotThere(f"task.modules: cannot import {module!r} ({err}); name a module on the Python path or "
                             "a .py file") from None
    return module


def _run_file(module: str) -> str:
    """Run a .py file as a module of its own, once per process and again once edited; the name it runs under."""
    path = Path(module).resolve()
    if not path.is_file():
        typed = "" if Path(module).is_absolute() else f" ({module!r}, relative to the directory the command runs in)"
        raise ModuleNotThere(f"task.modules: no file {path}{typed}; name the file where it lies now (--set "
                             "task.modules=[PATH]: a moved study's config.yaml names it where it was)")
    digest = hashlib.sha1(str(path).encode() + b"\0" + path.read_bytes()).hexdigest()[:8]
    name = f"gradtrace_splits_{path.stem}_{digest}"
    if name in sys.modules:
        return name
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    try:
        with _running(name):
            spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[name]  # a file that failed is run again next time, not taken as imported
        raise
    return name


def drawing_order(names: list[str]) -> list[str]:
    """`names` in the order a task draws their items: built-in splits in registry order, then your own by name, so
    that a task lists its shifts in any order and draws the same items."""
    return sorted(names, key=lambda n: (BUILT_IN.index(n), "") if n in BUILT_IN else (len(BUILT_IN), n))


def get_split(name: str) -> Split:
    """The registered split called `name`, or a clear error listing the registry."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown split {name!r}; registered splits: {', '.join(REGISTRY)} (a split of your own is "
                         "registered by a module that task.modules names)") from None


def train_mix(cfg: TaskConfig) -> dict[str, float]:
    """Share of each split's training form in the training mix: `task.order_share` for `order`, `task.train_share`
    times the split's own `share` for the other shifts, and ID the rest (refused when none is left)."""
    shares = {s: cfg.order_share if s == "order" else cfg.train_share * get_split(s).share for s in cfg.shifts}
    total = sum(shares.values())
    if not total < 1:
        raise ValueError(f"the shifts' training shares (task.train_share × each split's share, task.order_share for "
                         f"order) sum to {total:.2f}, leaving ID none of the training mix: lower task.train_share")
    return {"ID": 1 - total, **shares}


def check_splits(cfg: TaskConfig) -> None:
    """Refuse a task config whose splits cannot be drawn: `ID` among the shifts, a name no module of `task.modules`
    registered, a split that cannot be drawn at `task.max_digits` (too short or too long for it: the advice names the
    nearest it draws at), a sampler that returns no `Problem`, shares of the training mix that leave ID none
    (torch-free: a dry run checks them too). A split still drawing after `SLOW_SAMPLER_S` is warned of."""
    import_split_modules(cfg.modules)
    if "ID" in cfg.shifts:
        raise ValueError("task.shifts lists OOD shifts only; 'ID' is always included")
    train_mix(cfg)
    for name in ["ID", *cfg.shifts]:
        with warned_if_slow(name, cfg.max_digits, "the few items the task's check asks for"):
            _check_split(get_split(name), cfg.max_digits)


def _check_split(split: Split, max_digits: int) -> None:
    """`check_splits` of one split."""
    name = split.name
    try:
        drawn = _draw(split, max_digits)
    except ProblemError as err:
        raise ValueError(f"split {name!r}: {err}") from None
    except Exception as err:  # a sampler of your own may raise anything
        raise ValueError(f"split {name!r} cannot be drawn at task.max_digits={max_digits} ({type(err).__name__}: "
                         f"{err}): {_where_it_draws(split, max_digits)}") from None
    for form, problem in drawn.items():
        if not isinstance(problem, Problem):
            raise ValueError(f"split {name!r}: its {form} sampler returned {type(problem).__name__}; a sampler returns "
                             "a gradtrace.tasks.Problem")
    if name not in BUILT_IN:
        first, again = (sampled(name, lambda: _draws(split, max_digits, REDRAWN)) for _ in range(2))
        if first != again:
            raise ValueError(f"split {name!r} draws other problems each time from the same rng: {OWN_RANDOMNESS}")


SLOW_SAMPLER_S = 30.0  # seconds a split may draw without returning what was asked before it is warned of


@contextlib.contextmanager
def warned_if_slow(name: str | Callable[[], str], max_digits: int, asked: str,
                   drawn: Callable[[], int] = lambda: 0) -> Iterator[None]:
    """Warn where split `name` has drawn for `SLOW_SAMPLER_S` seconds without returning what was `asked` (or,
    where `drawn()` counts the items drawn so far, without returning another; `name()`: the split drawing now, of a
    pool drawing several): a sampler that loops until a condition no item at `task.max_digits` meets (or one only
    rare draws meet) hung the command, saying nothing."""
    stop = threading.Event()

    def watch() -> None:
        seen = drawn()
        while not stop.wait(SLOW_SAMPLER_S):
            if (now := drawn()) != seen:
                seen = now
                continue
            warnings.warn(f"split {name() if callable(name) else name!r}: its samplers have drawn for "
                          f"{SLOW_SAMPLER_S:g} s without returning {asked} at task.max_digits={max_digits}: one that "
                          "draws until a condition no item there meets (or only rare draws meet) may never return "
                          "(stop with Ctrl-C and mend it, or change task.max_digits)", stacklevel=1)
            return

    threading.Thread(target=watch, name="gradtrace-slow-sampler", daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def sampled(name: str, draw: Callable[[], T]) -> T:
    """`draw()` of split `name`'s sampler, whatever it raises said as the split's failure (a sampler of your own
    that raised now and then came out as numpy's "low >= high", no split named, or as a traceback)."""
    try:
        return draw()
    except Exception as err:
        raise ValueError(f"split {name!r}: its sampler failed ({type(err).__name__}: {err}); a sampler must draw "
                         "every item it is asked for, at task.max_digits") from err


# why a run or study's items differ from what this process draws, besides another gradtrace
OWN_SPLIT_CHANGED = ("or a split of your own draws otherwise: its file (task.modules) edited since, its samplers or "
                     "shares (put it back as it was), or a sampler that draws otherwise in each process (it must "
                     "draw only from the rng it is given)")
REDRAWN = 8  # items of each form a split of your own draws twice, alike, to be taken
# why a split's items can differ between processes, and what to do
OWN_RANDOMNESS = ("a sampler must draw only from the rng it is given, not from Python's random module, numpy's global "
                  "generator or the order of a set of strings (which changes from process to process): otherwise "
                  "each process that trains (a sweep's workers) draws test items of its own, and runs scored on "
                  "different items are compared as one study")


def draw_held_out(cfg: TaskConfig) -> tuple[dict[str, tuple[list[Problem], list[Problem]]], set[str]]:
    """Per split, (test problems, probe problems) drawn from the task seed in `drawing_order`, each split's prompts
    distinct and none a prompt of a split drawn before it; and every prompt drawn, which training never sees.
    Torch-free: a dry run draws them too, so a task whose held-out sets cannot be drawn is refused before any run."""
    out, used = {}, set()
    for i, name in enumerate(drawing_order(["ID", *cfg.shifts])):
        rng = np.random.default_rng([cfg.seed, i])
        n = cfg.n_test + cfg.n_probe
        with warned_if_slow(name, cfg.max_digits, f"its {n} test and probe items"):
            items = _distinct(cfg, name, rng, n, used)
        out[name] = (items[: cfg.n_test], items[cfg.n_test:])
    return out, used


def _distinct(cfg: TaskConfig, name: str, rng: np.random.Generator, n: int, used: set[str]) -> list[Problem]:
    """`n` test-form items of split `name` whose prompts are distinct and not in `used`, which takes theirs."""
    out, tries, test = [], 0, get_split(name).test
    while len(out) < n:
        problem = sampled(name, lambda: test(rng, cfg.max_digits))
        prompt = problem.render(cfg.reverse_operands, cfg.digit_spaces)[0]
        tries += 1
        if prompt not in used:
            used.add(prompt)
            out.append(problem)
        elif tries > 50 * n:
            raise ValueError(f"could not draw {n} distinct test and probe items of split {name!r} (besides the "
                             "splits drawn before it); lower task.n_test or task.n_probe, or raise task.max_digits")
    return out


def _draw(split: Split, max_digits: int) -> dict[str, Problem]:
    """One item of each of the split's forms at `max_digits`, the same each time."""
    return dict(zip(("test", "train"), _draws(split, max_digits, 1)[0]))


def _draws(split: Split, max_digits: int, n: int) -> list[tuple[Problem, Problem]]:
    """`n` (test, train) items of the split at `max_digits`, from the same seed each time."""
    rng = np.random.default_rng(0)
    return [(split.test(rng, max_digits), split.train(rng, max_digits)) for _ in range(n)]


def _where_it_draws(split: Split, max_digits: int) -> str:
    """Advice for a split that cannot be drawn at `max_digits`: the nearest task.max_digits it draws at, above (too
    few digits for it) or below (an operand past 64-bit integers, say)."""
    for distance in range(1, MAX_DIGITS):
        for digits in (max_digits - distance, max_digits + distance):
            if not 1 <= digits <= MAX_DIGITS:
                continue
            try:
                _draw(split, digits)
            except Exception:  # a sampler of your own may raise anything
                continue
            direction = "raise" if digits > max_digits else "lower"
            return f"{direction} task.max_digits to {digits} or drop it from task.shifts"
    return f"drop it from task.shifts (it draws at no task.max_digits from 1 to {MAX_DIGITS})"
