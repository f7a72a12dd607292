"""Sweep throughput on the default model: runs per hour of a naive loop, vectorised ensembles and worker pools.

Every setting trains whole sweep runs of `experiments/default.yaml` at full length (capture disabled, as a sweep's
runs are) with `gradtrace.train.train` or `gradtrace.ensemble.train_ensemble`: model building, training and the
final evaluation, timed together. Each setting has its own long-lived worker processes with fixed thread counts;
they build the task and warm up before any clock starts, as a sweep's workers build it once for all their runs,
then train one round of runs each time they are told to. A round runs every setting once, one setting at a time,
in a shuffled order, so slow drift on a shared machine reaches all settings alike; ratios are taken within each
round (paired) and their median over rounds reported, with their range. Two clocks: wall time, and the workers'
CPU time (for one-thread settings only: threads that spin make CPU time meaningless).

    OMP_NUM_THREADS=1 python benchmarks/sweep_throughput.py --only tiny/128 --rounds 4   # the default's (~25 min)
    OMP_NUM_THREADS=1 python benchmarks/sweep_throughput.py                            # + tiny/32 and micro/16
    OMP_NUM_THREADS=1 python benchmarks/sweep_throughput.py --only tiny/128 --rounds 1 --steps 5   # smoke run

Writes benchmarks/out/sweep_throughput.json: one record per setting, {"name", "runs_per_hour", "ratio",
"ratio_range", "ratio_sequential", ...}: `ratio` against the naive loop of the same model and batch (one run after
another on right-padded batches, as a hand-written loop trains; the faster of 1 and 2 threads), `ratio_sequential`
against gradtrace's own sequential loop (packed batches, the faster of 1 and 2 threads).
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
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "default.yaml"
OUT = ROOT / "benchmarks" / "out" / "sweep_throughput.json"


@dataclass(frozen=True)
class Setting:
    """How runs are trained: `naive` (each worker trains its `members` runs one after another) or `ensemble` (each
    worker trains its `members` runs as one vmap ensemble), in `processes` workers of `threads` threads;
    `pack=False` trains on right-padded batches, as a hand-written loop does (`train.pack=false`)."""

    name: str
    model: str
    batch: int
    kind: str
    members: int = 1
    processes: int = 1
    threads: int = 1
    pack: bool = True

    @property
    def runs(self) -> int:
        """Runs one round of this setting trains."""
        return self.members * self.processes


def settings() -> list[Setting]:
    """The default model's comparison, then a smaller batch and model to show where the ensemble gain comes from."""
    out = [Setting("naive loop, padded batches, 1 thread", "tiny", 128, "naive", pack=False),
           Setting("naive loop, padded batches, 2 threads", "tiny", 128, "naive", threads=2, pack=False),
           Setting("packed batches, 1 thread", "tiny", 128, "naive"),
           Setting("packed batches, 2 threads", "tiny", 128, "naive", threads=2),
           Setting("packed, pool of 2×1-thread workers, 2 runs each", "tiny", 128, "naive", 2, processes=2),
           Setting("packed, ensemble of 4, 1 thread", "tiny", 128, "ensemble", 4),
           Setting("packed, ensembles of 4, pool of 2×1-thread workers", "tiny", 128, "ensemble", 4, processes=2)]
    for model, batch in (("tiny", 32), ("micro", 16)):
        out += [Setting("naive loop, padded batches, 1 thread", model, batch, "naive", 8, pack=False),
                Setting("packed, ensemble of 8, 1 thread", model, batch, "ensemble", 8)]
    return out


def worker(spec: dict) -> None:
    """One worker of a setting: build its runs and warm up, print "ready"; then train its runs at each line on
    stdin, printing wall and CPU seconds, until stdin closes."""
    import time

    from gradtrace import config, sweep
    from gradtrace.ensemble import train_ensemble
    from gradtrace.tasks import task_for
    from gradtrace.train import train

    def configs(steps: int | None) -> tuple[list, list]:
        overrides = {"model.name": spec["model"], "train.batch_size": spec["batch"], "train.threads": spec["threads"],
                     "train.pack": spec["pack"], "train.device": "cpu", "capture.enabled": False,
                     "sweep.pretrain_steps": 0, "model.init_from": None}  # from a random init (any model): a step
        # costs what a fine-tuning step does
        base = config.load(CONFIG, overrides | ({"train.steps": steps} if steps else {}))
        runs = [r for r in sweep.plan(base) if r.role == "sweep"][spec["first"]:spec["first"] + spec["members"]]
        task_for(base.task, base.model)  # built once per process, as in a sweep's workers: not timed
        return [sweep.run_config(base, r) for r in runs], [r.run_id for r in runs]

    def train_all(cfgs: list, run_ids: list[str]) -> None:
        with tempfile.TemporaryDirectory() as out:
            if spec["kind"] == "ensemble":
                train_ensemble(cfgs, out, run_ids)
            else:
                for cfg, run_id in zip(cfgs, run_ids):
                    train(cfg, out, run_id, role="sweep", progress=False)

    train_all(*configs(2))  # warm-up: first-call costs (allocator, kernels' first dispatch) stay off the clock
    cfgs, run_ids = configs(spec["steps"])
    print("ready", flush=True)
    for _ in sys.stdin:
        wall, cpu = time.perf_counter(), time.process_time()
        train_all(cfgs, run_ids)
        print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}), flush=True)


class Workers:
    """A setting's long-lived worker processes (each with its thread count, its share of the runs)."""

    def __init__(self, s: Setting, steps: int | None):
        env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
        self.setting, self.logs, self.procs = s, [], []
        for w in range(s.processes):
            spec = {**asdict(s), "steps": steps, "first": w * s.members}
            self.logs.append(tempfile.TemporaryFile(mode="w+"))
            self.procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                               text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=self.logs[-1]))

    def wait_ready(self) -> None:
        for p, log in zip(self.procs, self.logs):
            if p.stdout.readline().strip() != "ready":
                self._fail(p, log)

    def round(self) -> dict[str, float]:
        """Train one round (every worker at once): seconds of the slowest worker, two clocks."""
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p, log in zip(self.procs, self.logs):
            line = p.stdout.readline()
            if not line.strip():
                self._fail(p, log)
            results.append(json.loads(line))
        return {clock: max(r[clock] for r in results) for clock in ("wall", "cpu")}

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait()

    def _fail(self, proc: subprocess.Popen, log) -> None:
        proc.wait()
        log.seek(0)
        s = self.setting
        raise RuntimeError(f"worker of {s.name} ({s.model}/{s.batch}) exited with {proc.returncode}:\n"
                           f"{log.read()[-3000:]}")


def main() -> None:
    """Start every setting's workers, run the rounds, print the table and write the JSON records."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of every setting (medians reported)")
    parser.add_argument("--steps", type=int, help="steps per run (default: the config's train.steps)")
    parser.add_argument("--only", default=None, help="only settings of this model/batch, e.g. tiny/128")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    from gradtrace import config

    steps = args.steps or config.load(CONFIG).train.steps
    todo = [s for s in settings() if args.only in (None, f"{s.model}/{s.batch}")]
    if not todo or args.rounds < 1:  # refused before any worker starts, and before --out is written
        parser.error(f"--only {args.only!r} names no setting (choose from "
                     f"{', '.join(sorted({f'{s.model}/{s.batch}' for s in settings()}))})" if not todo else
                     f"--rounds must be at least 1, got {args.rounds}")
    print(f"{len(todo)} settings × {args.rounds} rounds of whole {steps}-step runs; starting "
          f"{sum(s.processes for s in todo)} workers (task built and warmed up in each, not timed)", flush=True)
    pools = {s: Workers(s, args.steps) for s in todo}
    samples: dict[Setting, list[dict]] = {s: [] for s in todo}
    loads = []
    try:
        for w in pools.values():
            w.wait_ready()
        for rnd in range(args.rounds):
            for s in random.Random(rnd).sample(todo, len(todo)):
                sample = pools[s].round()
                loads.append(os.getloadavg()[0])
                samples[s].append({clock: s.runs * 3600 / sample[clock] for clock in ("wall", "cpu")})
                print(f"  round {rnd}  {s.model}/{s.batch:<4} {s.name:<52} {samples[s][-1]['wall']:6.1f} runs/h wall"
                      f", {samples[s][-1]['cpu']:6.1f} cpu  (load {loads[-1]:.1f})", flush=True)
    finally:
        for w in pools.values():
            w.close()
    records = summarise(samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1))
    print(table(records, args.rounds, steps, loads))


def summarise(samples: dict[Setting, list[dict]]) -> list[dict]:
    """One record per setting: median runs/h over rounds; `ratio` paired within each round against the naive loop
    of its model and batch (padded batches, the thread count faster over all rounds; median and range over rounds),
    `ratio_sequential` likewise against the faster of gradtrace's own sequential loops (packed batches)."""
    def median(s: Setting, clock: str = "wall") -> float:
        return statistics.median(x[clock] for x in samples[s])

    def paired(s: Setting, ref: Setting, clock: str = "wall") -> list[float]:
        return [a[clock] / b[clock] for a, b in zip(samples[s], samples[ref])]

    records = []
    for s in samples:
        same = [n for n in samples if (n.model, n.batch) == (s.model, s.batch)]
        sequential = [n for n in same if n.kind == "naive" and n.processes == 1 and n.members == 1] or \
                     [n for n in same if n.kind == "naive"]
        naive = max([n for n in sequential if not n.pack] or sequential, key=median)
        packed = max([n for n in sequential if n.pack] or sequential, key=median)
        ratios = paired(s, naive)
        record = {"name": f"{s.model}/{s.batch}: {s.name}", "runs_per_hour": round(median(s), 1),
                  "ratio": round(statistics.median(ratios), 2),
                  "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
                  "ratio_sequential": round(statistics.median(paired(s, packed)), 2), "against": naive.name}
        single = [n for n in sequential if not n.pack and n.threads == 1]
        if s.threads == 1 and single:  # CPU time says nothing of the wall time of threads that spin
            record.update({"runs_per_hour_cpu": round(median(s, "cpu"), 1),
                           "ratio_cpu": round(statistics.median(paired(s, single[0], "cpu")), 2)})
        records.append({**asdict(s), **record, "rounds": len(samples[s])})
    return records


def table(records: list[dict], rounds: int, steps: int, loads: list[float]) -> str:
    """The results as a Markdown table."""
    lines = [f"\nRuns per hour of whole {steps}-step runs (median of {rounds} rounds); ratio paired within each "
             f"round against the naive loop (padded batches, its faster thread count: median, and range over "
             f"rounds), and against gradtrace's sequential loop (packed); load average "
             f"{min(loads):.1f}–{max(loads):.1f} during the run", "",
             "| setting | runs/h (wall) | ratio | range | vs sequential | runs/h (CPU) | ratio (CPU, vs 1 thread) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in records:
        lo, hi = r["ratio_range"]
        lines.append(f"| {r['name']} | {r['runs_per_hour']} | {r['ratio']} | {lo}–{hi} | {r['ratio_sequential']} | "
                     f"{r.get('runs_per_hour_cpu', '–')} | {r.get('ratio_cpu', '–')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
