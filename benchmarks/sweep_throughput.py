"""Sweep throughput on the default model: runs per hour of a naive loop, vectorised ensembles and worker pools.

Every setting trains real sweep runs of `experiments/default.yaml` (capture disabled, as a sweep's runs are) with
`gradtrace.train.train` or `gradtrace.ensemble.train_ensemble`, in fresh worker processes with a fixed thread
count, at two step counts. The fit T(steps) = fixed + steps × per_step gives the time of a full-length run (the
config's train.steps) without training that long; `fixed` holds model building and evaluation (each worker
builds the task before timing starts, as a sweep worker builds it once for all its runs). Settings run
interleaved in a shuffled order, repeated; medians are reported. Two clocks: wall time, and each worker's CPU
time — what the setting would take with its cores to itself, the better estimate on a machine that other jobs
share (undefined for multi-thread workers, which spin).

    OMP_NUM_THREADS=1 python benchmarks/sweep_throughput.py                 # the full comparison (~30 min)
    OMP_NUM_THREADS=1 python benchmarks/sweep_throughput.py --reps 1 --steps 2 6 --only tiny/128   # smoke run

Writes benchmarks/out/sweep_throughput.json: one record per setting, {"name", "runs_per_hour", "ratio",
"ratio_sequential", ...}: `ratio` against the naive loop of the same model and batch (one run after another on
right-padded batches, as a hand-written loop trains; the faster of 1 and 2 threads), `ratio_sequential` against
gradtrace's own sequential loop (packed batches, the faster of 1 and 2 threads).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "default.yaml"
OUT = ROOT / "benchmarks" / "out" / "sweep_throughput.json"


@dataclass(frozen=True)
class Setting:
    """How runs are trained: `naive` (one run after another) or `ensemble` of `members`, in `processes` workers;
    `pack=False` trains on right-padded batches, as a hand-written loop does (`train.pack=false`)."""

    name: str
    model: str
    batch: int
    kind: str
    members: int = 1
    processes: int = 1
    threads: int = 1
    steps: tuple[int, int] = (10, 60)  # the fit's two step counts: enough steps that training outweighs noise
    pack: bool = True

    @property
    def runs(self) -> int:
        """Runs one measurement trains."""
        return self.members * self.processes


def settings() -> list[Setting]:
    """The default model's comparison, then a smaller batch and model to show where the ensemble gain comes from."""
    out = [Setting("naive loop, padded batches, 1 thread", "tiny", 128, "naive", pack=False),
           Setting("naive loop, padded batches, 2 threads", "tiny", 128, "naive", threads=2, pack=False),
           Setting("packed batches, 1 thread", "tiny", 128, "naive"),
           Setting("packed batches, 2 threads", "tiny", 128, "naive", threads=2),
           Setting("packed, pool of 2×1-thread workers", "tiny", 128, "naive", processes=2),
           Setting("packed, ensemble of 8, 1 thread", "tiny", 128, "ensemble", 8),
           Setting("packed, ensembles of 8, pool of 2×1-thread workers", "tiny", 128, "ensemble", 8, processes=2)]
    for model, batch, steps in (("tiny", 32, (10, 240)), ("micro", 16, (10, 600))):
        out += [Setting("naive loop, 1 thread", model, batch, "naive", steps=steps),
                Setting("ensemble of 8, 1 thread", model, batch, "ensemble", 8, steps=steps)]
    return out


def worker(spec: dict) -> None:
    """One worker of a measurement: build its runs, wait for "go" on stdin, train, print wall and CPU seconds."""
    from gradtrace import config, sweep
    from gradtrace.ensemble import train_ensemble
    from gradtrace.tasks import task_for
    from gradtrace.train import train

    base = config.load(CONFIG, {"model.name": spec["model"], "train.batch_size": spec["batch"],
                                "train.steps": spec["steps"], "train.threads": spec["threads"],
                                "train.pack": spec["pack"],
                                "train.device": "cpu", "capture.enabled": False,
                                "sweep.pretrain_steps": 0})  # from a random init: a step costs what a fine-tuning step does
    runs = [r for r in sweep.plan(base) if r.role == "sweep"][spec["first"]:spec["first"] + spec["members"]]
    cfgs = [sweep.run_config(base, r) for r in runs]
    task_for(base.task, base.model)  # built once per process, as in a sweep's workers: not timed
    with tempfile.TemporaryDirectory() as out:
        print("ready", flush=True)
        sys.stdin.readline()
        wall, cpu = time.perf_counter(), time.process_time()
        if spec["kind"] == "ensemble":
            train_ensemble(cfgs, out, [r.run_id for r in runs])
        else:
            for cfg, run in zip(cfgs, runs):
                train(cfg, out, run.run_id, role="sweep", progress=False)
        print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}), flush=True)


def measure(s: Setting, steps: int) -> dict[str, float]:
    """Train one measurement of setting `s` at `steps` steps per run: seconds of the slowest worker, two clocks."""
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
    procs, logs = [], []
    for w in range(s.processes):
        spec = {**asdict(s), "steps": steps, "first": w * s.members}
        logs.append(tempfile.TemporaryFile(mode="w+"))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[-1]))
    for p in procs:  # start together: imports and task building are not timed
        if p.stdout.readline().strip() != "ready":
            p.wait()
            _fail(s, p, logs[procs.index(p)])
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p, log in zip(procs, logs):
        line = p.stdout.readline()
        if p.wait() != 0 or not line.strip():
            _fail(s, p, log)
        results.append(json.loads(line))
    return {clock: max(r[clock] for r in results) for clock in ("wall", "cpu")}


def _fail(s: Setting, proc: subprocess.Popen, log) -> None:
    log.seek(0)
    raise RuntimeError(f"worker of {s.name} ({s.model}/{s.batch}) exited with {proc.returncode}:\n{log.read()[-3000:]}")


def fit(short: dict, long: dict, steps: tuple[int, int], full: int, clock: str) -> tuple[float, float, float]:
    """(per_step s, fixed s, full-length s) of one measurement pair, from T(steps) = fixed + steps × per_step."""
    per_step = (long[clock] - short[clock]) / (steps[1] - steps[0])
    fixed = short[clock] - steps[0] * per_step
    return per_step, fixed, fixed + full * per_step


def main() -> None:
    """Measure every setting, print the table and write the JSON records."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every setting (medians reported)")
    parser.add_argument("--steps", type=int, nargs=2, help="the fit's two step counts (default: each setting's)")
    parser.add_argument("--only", default=None, help="only settings of this model/batch, e.g. tiny/128")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    from gradtrace import config

    full = config.load(CONFIG).train.steps
    todo = [s for s in settings() if args.only in (None, f"{s.model}/{s.batch}")]
    samples: dict[Setting, list[dict]] = {s: [] for s in todo}
    loads: list[float] = []
    print(f"{len(todo)} settings × {args.reps} reps, extrapolated to {full} steps per run; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for rep in range(args.reps):
        for s in random.Random(rep).sample(todo, len(todo)):
            steps = tuple(args.steps or s.steps)
            short, long = measure(s, steps[0]), measure(s, steps[1])
            loads.append(os.getloadavg()[0])
            sample = {"load": loads[-1]}
            for clock in ("wall", "cpu"):
                per_step, fixed, total = fit(short, long, steps, full, clock)
                sample[clock] = {"per_step": per_step, "fixed": fixed, "runs_per_hour": s.runs * 3600 / total}
            samples[s].append(sample)
            print(f"  rep {rep}  {s.model}/{s.batch:<4} {s.name:<45} {sample['wall']['runs_per_hour']:6.1f} runs/h "
                  f"wall, {sample['cpu']['runs_per_hour']:6.1f} cpu  (load {loads[-1]:.1f})", flush=True)
    records = summarise(samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1))
    print(table(records, args, full, loads))


def summarise(samples: dict[Setting, list[dict]]) -> list[dict]:
    """One record per setting: medians over repetitions; `ratio` against the naive loop of its model and batch (one
    run after another on padded batches, where measured, at its faster thread count), `ratio_sequential` against
    the faster of gradtrace's own sequential loops (packed batches)."""
    def median(s: Setting, clock: str, key: str) -> float:
        return statistics.median(x[clock][key] for x in samples[s])

    def best(settings: list[Setting]) -> float:
        return max(median(n, "wall", "runs_per_hour") for n in settings)

    records = []
    for s in samples:
        sequential = [n for n in samples
                      if n.kind == "naive" and n.processes == 1 and (n.model, n.batch) == (s.model, s.batch)]
        naive = [n for n in sequential if not n.pack] or sequential
        wall = median(s, "wall", "runs_per_hour")
        record = {"name": f"{s.model}/{s.batch}: {s.name}", "runs_per_hour": round(wall, 1),
                  "ratio": round(wall / best(naive), 2),
                  "ratio_sequential": round(wall / best([n for n in sequential if n.pack] or sequential), 2)}
        if s.threads == 1:  # CPU time says nothing of the wall time of threads that spin
            cpu = median(s, "cpu", "runs_per_hour")
            record.update({"runs_per_hour_cpu": round(cpu, 1), "ratio_cpu": round(cpu / max(
                               median(n, "cpu", "runs_per_hour") for n in naive if n.threads == 1), 2),
                           "step_ms_per_run_cpu": round(1000 * median(s, "cpu", "per_step") / s.members, 1),
                           "fixed_s_per_run_cpu": round(median(s, "cpu", "fixed") / s.members, 1)})
        load = statistics.median(x["load"] for x in samples[s])
        records.append({**asdict(s), **record, "reps": len(samples[s]), "load_1min": round(load, 1)})
    return records


def table(records: list[dict], args, full: int, loads: list[float]) -> str:
    """The results as a Markdown table."""
    lines = [f"\nRuns per hour at {full} steps (fitted from two shorter lengths per setting, median of {args.reps}); "
             f"ratio vs the naive loop (padded batches), and vs gradtrace's sequential loop (packed); load average "
             f"{min(loads):.1f}–{max(loads):.1f} during the run", "",
             "| setting | runs/h (wall) | ratio | vs sequential | runs/h (CPU) | ratio | step ms/run (CPU) | "
             "fixed s/run (CPU) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        keys = ("runs_per_hour_cpu", "ratio_cpu", "step_ms_per_run_cpu", "fixed_s_per_run_cpu")
        cells = [r.get(k, "–") for k in keys]
        lines.append(f"| {r['name']} | {r['runs_per_hour']} | {r['ratio']} | {r['ratio_sequential']} | "
                     + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
