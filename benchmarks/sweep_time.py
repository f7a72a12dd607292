"""How long a whole study takes on this machine, from a timed slice of it run through `gradtrace sweep`.

The slice is the study's config with fewer sweep runs (`--runs`; base and reference runs as configured), run end to
end by `gradtrace.sweep.run_sweep` into a fresh directory: the base runs first (one alone, several side by side on
the workers), then the rest on the sweep's workers or ensembles, as the study would run. The study's time is then
estimated as the slice's base runs plus the slice's time after them, scaled by the study's run time over the
slice's (each role's mean `wall_time_s` per run, times the study's runs of that role, over the slice's sum): the
slice measures how much its runs overlap on this machine's workers, and the study's runs are assumed to overlap as
much.

    python benchmarks/sweep_time.py experiments/large.yaml --runs 12                  # this machine, ~5 min
    python benchmarks/sweep_time.py experiments/large.yaml --runs 64 --set sweep.workers=4 --set train.device=cuda

Prints and writes (`--out-json`, default benchmarks/out/sweep_time.json) a record: {"config", "overrides",
"device", "slice_runs", "slice_seconds", "base_seconds", "seconds_per_run", "study_runs", "study_seconds"}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from gradtrace import config as config_mod
from gradtrace.kernels import device_name
from gradtrace.sweep import bases_side_by_side, plan, run_sweep
from gradtrace.train import resolve_device

OUT = Path(__file__).resolve().parent / "out" / "sweep_time.json"


def time_slice(study: config_mod.Config, runs: int, out: Path) -> dict:
    """Run a `runs`-run slice of `study` into `out` (empty) and estimate the whole study's time from it."""
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: a resumed slice would time only what is left")
    piece = config_mod.from_dict(study.to_dict(), {"sweep.runs": runs})
    study_runs = plan(study)
    wanted = Counter(r.role for r in study_runs if r.role != "base")
    missing = set(wanted) - {r.role for r in plan(piece)}
    if missing:  # before it trains anything
        raise ValueError(f"the slice would train no {', '.join(sorted(missing))} run to time; give it more runs")
    began = time.perf_counter()
    table = run_sweep(piece, out)
    seconds = time.perf_counter() - began
    bases = table.loc[table.role == "base", "wall_time_s"]
    base = float(bases.sum()) / bases_side_by_side(len(bases), piece.sweep.workers)
    rest = table[table.role != "base"]
    per_run = rest.groupby("role").wall_time_s.mean().to_dict()
    scale = sum(n * per_run[role] for role, n in wanted.items()) / float(rest.wall_time_s.sum())
    return {"slice_runs": len(table), "slice_seconds": round(seconds, 1), "base_seconds": round(base, 1),
            "seconds_per_run": {role: round(s, 2) for role, s in per_run.items()},
            "study_runs": len(study_runs), "study_seconds": round(base + (seconds - base) * scale, 1)}


def main() -> None:
    """Parse arguments, time the slice, print and write the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the study's YAML config, e.g. experiments/large.yaml")
    parser.add_argument("--runs", type=int, default=12, help="sweep runs in the slice (default 12)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", type=Path, help="the slice's experiment directory (default: a temporary one)")
    parser.add_argument("--out-json", type=Path, default=OUT)
    args = parser.parse_args()
    overrides = config_mod.parse_overrides(args.set)
    study = config_mod.load(args.config, overrides)
    device = resolve_device(study.train.device)
    with tempfile.TemporaryDirectory() as tmp:
        record = time_slice(study, args.runs, args.out or Path(tmp) / "slice")
    name = device_name(device)
    record = {"config": str(args.config), "overrides": overrides, "device": name, **record}
    minutes, seconds = divmod(record["study_seconds"], 60)
    print(json.dumps(record, indent=1))
    print(f"{args.config}: {record['study_runs']} runs, ~{minutes:.0f} min {seconds:.0f} s on {name} "
          f"(from a {record['slice_runs']}-run slice that took {record['slice_seconds']:.0f} s)")
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
