"""Regenerate the paper's figures and numbers from an experiment directory.

    python paper/build.py --store storage/default          (or `make paper` at the repository root)

Draws every figure of the report into paper/figures/<name>.{pdf,png} and writes paper/build/paper.md: paper.md
with each placeholder replaced by the value it names, tagged with a footnote giving the file, store and command it
came from. Placeholders:

    {{stats:A~B:FIELD}}  {{stats:A~B:FIELD@linear}}   a column of stats.csv for the shift pair (default: probit)
    {{results:SPLIT:mean|std|min|max}}                accuracy over the sweep runs, percent
    {{scores:PREDICTOR:FIELD}}                        a column of predict_scores.csv
    {{count:runs|reference|shifts|pairs}}             sizes of the study
    {{config:dotted.key}}                             a value of the experiment's config.yaml
    {{config:start}}                                  what the runs fine-tuned, from config.yaml
    {{figure:NAME}}                                   a figure with its number and caption

A value that cannot be found is written as **[missing: why]** and listed at the end (an error with --strict).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from gradtrace import figures, report
from gradtrace.console import plain_text_where_unencodable
from gradtrace.results import base_groups
from gradtrace.stats import varying_shifts

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PLACEHOLDER = re.compile(r"\{\{\s*(\w+):([^{}]*?)\s*\}\}")


class Missing(Exception):
    """A placeholder whose value the experiment does not hold."""


def _fmt(value: object, field: str) -> str:
    """Numbers as a paper prints them: integers as they are, p-values to 2 significant digits, other floats to 2
    decimals, minus signs typeset."""
    if isinstance(value, (bool, np.bool_, str)) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(value)
    number = float(value)
    if not math.isfinite(number):
        raise Missing(f"{field} is {number}")
    text = f"{number:.2g}" if field == "p" or field.startswith("p_") else report.rounded(number, 2)
    return text.lstrip("-") if float(text) == 0 else text.replace("-", "−")  # no "−0.00"


class Filler:
    """Resolves placeholders against one experiment directory and remembers which sources it used."""

    SOURCES = {
        "stats": ("stats.csv", "gradtrace stats {store}"),
        "results": ("results.csv", "gradtrace sweep CONFIG --out {store}"),
        "scores": ("predict_scores.csv", "gradtrace predict {store}"),
        "count": ("results.csv", "gradtrace sweep CONFIG --out {store}"),
        "config": ("config.yaml", "gradtrace sweep CONFIG --out {store}"),
    }

    def __init__(self, inputs: report.Inputs, items: list[report.FigureItem], store_label: str) -> None:
        self.inputs, self.store_label = inputs, store_label
        self.items = {item.name: item for item in items}
        self.used: list[str] = []
        self.missing: list[str] = []
        self.figure_numbers: dict[str, int] = {}
        self.kinds: dict[str, Callable[[str], str]] = {
            "stats": self.stats, "results": self.results, "scores": self.scores, "count": self.count,
            "config": self.config, "figure": self.figure}

    def _table(self, key: str) -> pd.DataFrame:
        table = getattr(self.inputs, key)
        if table is None:
            raise Missing(self.inputs.notes.get(key, f"no {key} table"))
        return table

    def stats(self, arg: str) -> str:
        """`A~B:FIELD[@RESIDUALIZE]`."""
        pair, _, field = arg.rpartition(":")
        field, _, method = field.partition("@")
        a, sep, b = pair.partition("~")
        if not sep or not field:
            raise ValueError(f"stats placeholder {arg!r} must read A~B:FIELD (optionally FIELD@residualize)")
        stats = self._table("stats")
        rows = stats[((stats["a"] == a) & (stats["b"] == b)) | ((stats["a"] == b) & (stats["b"] == a))]
        if "residualize" in rows:
            rows = rows[rows["residualize"] == (method or "probit")]
        if rows.empty or field not in rows:
            raise Missing(f"stats.csv has no {field!r} for {a}~{b} ({method or 'probit'})")
        return _fmt(rows[field].iloc[0], field)

    def results(self, arg: str) -> str:
        """`SPLIT:mean|std|min|max` in percent over sweep runs."""
        split, _, stat = arg.partition(":")
        if stat not in ("mean", "std", "min", "max"):
            raise ValueError(f"results placeholder {arg!r} must read SPLIT:mean|std|min|max")
        self._table("results")
        summary = report.results_summary(self.inputs.sweep)
        rows = summary[summary["split"] == split]
        if rows.empty:
            raise Missing(f"results.csv has no acc_{split}")
        value = float(rows[f"{stat} %"].iloc[0])
        if math.isnan(value):  # no sweep run, or one for a std
            raise Missing(f"the {stat} of acc_{split} over {len(self.inputs.sweep)} sweep run(s) is NaN")
        return f"{report.rounded(value, 1)}%"

    def scores(self, arg: str) -> str:
        """`PREDICTOR:FIELD` of predict_scores.csv."""
        name, _, field = arg.partition(":")
        scores = self._table("scores")
        rows = scores[scores["predictor"] == name]
        if rows.empty or field not in rows:
            raise Missing(f"predict_scores.csv has no {field!r} for predictor {name!r}")
        return _fmt(rows[field].iloc[0], field)

    def count(self, arg: str) -> str:
        """`runs` (sweep runs), `reference` (reference runs), `shifts` (those whose accuracy varies across the sweep,
        which stats correlates) or `pairs` (of those)."""
        results = self._table("results")
        with warnings.catch_warnings():  # `gradtrace stats` has warned of the constant shifts it leaves out
            warnings.simplefilter("ignore")
            shifts = varying_shifts(self.inputs.sweep, "ID", within=base_groups(self.inputs.sweep))  # as stats does
        counts = {"runs": len(self.inputs.sweep),
                  "reference": int((results["role"] == "reference").sum()),
                  "shifts": len(shifts), "pairs": len(shifts) * (len(shifts) - 1) // 2}
        if arg not in counts:
            raise ValueError(f"count placeholder {arg!r}: choose one of {', '.join(counts)}")
        return str(counts[arg])

    def config(self, arg: str) -> str:
        """A dotted key of config.yaml, or `start`: what the runs fine-tuned (the study's base runs, given weights, or
        nothing)."""
        if self.inputs.config_text is None:
            raise Missing("config.yaml not found")
        value: object = yaml.safe_load(self.inputs.config_text)
        if arg == "start":
            return _start(value)
        for part in arg.split("."):
            if not isinstance(value, dict) or part not in value:
                raise Missing(f"config.yaml has no {arg!r}")
            value = value[part]
        return ", ".join(map(str, value)) if isinstance(value, list) else str(value)

    def figure(self, name: str) -> str:
        """A numbered figure with its caption, or a note saying why it is absent."""
        item = self.items.get(name)
        if item is None:
            raise ValueError(f"unknown figure {name!r}; figures: {', '.join(self.items)}")
        if item.figure is None:
            raise Missing(f"figure {name}: {item.note}")
        number = self.figure_numbers.setdefault(name, len(self.figure_numbers) + 1)
        return (f"![Figure {number}. {item.title}](../figures/{name}.png)\n\n"
                f"*Figure {number}. {item.title}.* {item.caption}")

    def replace(self, match: re.Match) -> str:
        """The text for one placeholder, tagged with its source."""
        kind, arg = match.group(1), match.group(2).strip()
        if kind not in self.kinds:
            raise ValueError(f"unknown placeholder kind {kind!r} in {match.group(0)}; kinds: {', '.join(self.kinds)}")
        try:
            text = self.kinds[kind](arg)
        except Missing as why:
            self.missing.append(f"{match.group(0)}: {why}")
            return f"**[missing: {why}]**"
        if kind == "figure":
            return text
        if kind not in self.used:
            self.used.append(kind)
        return f"{text}[^{kind}]"

    def footnotes(self) -> str:
        """One footnote per source used: file, its checksum, the store and the command that writes it."""
        lines = []
        for kind in self.used:
            filename, command = self.SOURCES[kind]
            path = self.inputs.path(filename)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "absent"
            origin = self.inputs.origins.get(kind, "")
            how = f"; {origin}" if origin.startswith("computed") else ""
            command = command.format(store=self.store_label)
            if filename in report.ANALYSIS_FILES and self.inputs.analysis_dir != self.inputs.exp_dir:
                command += f" --out {_store_label(self.inputs.analysis_dir)}"
            lines.append(f"[^{kind}]: `{filename}` of store `{self.store_label}` (sha256 {digest}…), written by "
                         f"`{command}`{how}.")
        return "\n".join(lines)


def _start(cfg: dict) -> str:
    """What a study's runs fine-tuned, in words: its base runs (trained from scratch or from given weights), given
    weights (the default's shipped base), or nothing (a random init)."""
    sweep, init_from = cfg.get("sweep") or {}, (cfg.get("model") or {}).get("init_from")
    weights = f"the weights in `{Path(init_from).name}`" if init_from else ""
    if sweep.get("pretrain_steps"):
        return (f"{sweep.get('bases', 1)} base run(s) of {sweep['pretrain_steps']} steps trained by the study from "
                f"{weights or 'a random init'}")
    return weights or "a random init (no base)"


def _store_label(path: Path) -> str:
    """The store's path relative to the repository when inside it, else absolute."""
    path = path.resolve()
    return os.path.relpath(path, REPO) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    """Build paper figures and paper/build/paper.md from an experiment directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="experiment directory (e.g. storage/default)")
    parser.add_argument("--out", default=str(HERE), help="where figures/ and build/ go (default: paper/)")
    parser.add_argument("--analysis", default=None, help="where the tables of stats and predict are (the --out given "
                        "to gradtrace stats, predict or report for a study one cannot write to; default: the study)")
    parser.add_argument("--template", default=str(HERE / "paper.md"), help="the paper's text with placeholders")
    parser.add_argument("--strict", action="store_true",
                        help="fail when any placeholder has no value or the sweep is not finished")
    args = parser.parse_args(argv)

    exp = Path(args.store)
    absent = [name for name in ("results.csv", "store.zarr") if not (exp / name).exists()]
    if absent:
        print(f"build.py: error: no experiment at {exp} ({', '.join(absent)} missing). Produce it first with "
              "`make demo` (or `gradtrace sweep experiments/default.yaml --out DIR`), then pass --store DIR "
              "(`make paper OUT=DIR`).",
              file=sys.stderr)
        return 2
    inputs = report.load_inputs(exp, out=args.analysis)
    items = report.build_figures(inputs)
    out = Path(args.out)
    for item in items:
        if item.figure is not None:
            figures.save(item.figure, out / "figures" / item.name)
    filler = Filler(inputs, items, _store_label(exp))
    body = PLACEHOLDER.sub(filler.replace, Path(args.template).read_text(encoding="utf-8"))
    filler.missing += [f"{line.strip()!r}: braces no placeholder reads (`{{{{kind:argument}}}}`)"
                       for line in body.splitlines() if "{{" in line or "}}" in line]
    prov = report.provenance(inputs)
    header = (f"<!-- generated by paper/build.py from {filler.store_label} at {prov['generated (UTC)']}; "
              f"gradtrace {prov['gradtrace version']}, commit {prov['code commit']}. Edit paper/paper.md. -->\n\n")
    sources = "\n\n## Sources\n\nFigures: regenerated from the store by " \
              f"`python paper/build.py --store {filler.store_label}` (`make paper`).\n\n{filler.footnotes()}\n"
    (out / "build").mkdir(parents=True, exist_ok=True)
    target = out / "build" / "paper.md"
    target.write_text(header + body + sources, encoding="utf-8")
    drawn = sum(item.figure is not None for item in items)
    print(f"figures: {drawn} of {len(items)} in {out / 'figures'}; paper: {target}")
    for line in filler.missing:
        print(f"missing: {line}", file=sys.stderr)
    for key in ("unfinished", "diverged"):
        if key in inputs.notes:
            print(f"warning: {inputs.notes[key]}", file=sys.stderr)
    return 1 if args.strict and (filler.missing or "unfinished" in inputs.notes) else 0


if __name__ == "__main__":
    with plain_text_where_unencodable():  # its warnings as plain text on a console without their symbols
        sys.exit(main())
