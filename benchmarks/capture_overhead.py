"""Capture overhead: training step time with the Recorder (every step recorded) ÷ without, beside wandb.watch.

Every variant trains its own copy of the same model on the same batches. Each round runs, for every captured
variant in rotating order, a block of capture-free steps and a block of its steps back to back (which goes first
alternates), so machine-load drift hits both alike; a variant's ratio is the median over rounds of (its step
time ÷ the adjacent capture-free step time). A captured step's time includes its share of the store's chunk
writes (one whole chunk of its rows, timed on its own, ÷ the rows per chunk). Three clocks: wall time (`ratio`);
this process's CPU time (`cpu_ratio`: the cost with a core to itself, the steadier estimate on a machine other
jobs share; it misses work done in other processes, such as wandb's writer); and CPU time inside
`optimizer.step()`, where the Recorder's hooks run (`hooks_ratio` = 1 + (its optimizer.step CPU time − the
baseline's) ÷ the baseline's step CPU time). One torch thread. On a GPU (`--device cuda`) every block ends with a
synchronisation, so wall time is the device's; the CPU clocks then count only kernel launches and the host side.

    python benchmarks/capture_overhead.py                # default model (tiny, batch 128) and pythia-70m shape
    python benchmarks/capture_overhead.py --quick        # fewer rounds; pythia-70m with k=4096 and wandb only
    python benchmarks/capture_overhead.py --device cuda  # the same on a GPU
    python benchmarks/capture_overhead.py --optimizer muon  # torch's Muon and AdamW, chained (ChainedOptimizer)

Writes `benchmarks/out/capture_overhead.json`: a list of {"model", "device", "optimizer", "k", "what", "ratio",
"step_ms_without", "step_ms_with", "ratio_iqr", "cpu_ratio", "hooks_ratio", "store_ms_per_step"}. wandb (offline)
is optional: without it that row is skipped with a message.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gradtrace import store
from gradtrace.capture import ChainedOptimizer, attach
from gradtrace.capture.recorder import declare_arrays
from gradtrace.config import CaptureConfig, ModelConfig, load
from gradtrace.kernels import device_name
from gradtrace.models import build_model, count_parameters
from gradtrace.tasks import ArithmeticTask, answer_cross_entropy
from gradtrace.train import adamw

ALL = ["grad", "update", "adam_m"]
ROUNDS = {(False, False): 12, (False, True): 5, (True, False): 3, (True, True): 2}  # (pythia-70m?, --quick?)


@dataclass
class Variant:
    """One training loop being timed: its model and optimizer, what it records, and its per-block timings beside
    the baseline block it was paired with."""

    what: str
    k: int | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    after_step: Callable[[torch.Tensor], None] = lambda loss: None
    log: Callable[[torch.Tensor], None] = lambda loss: None
    hooks_in_step: bool = True  # its capture runs inside optimizer.step (wandb's runs in backward hooks)
    store_cost: Callable[[], tuple[float, float]] | None = None  # (wall, CPU) ms per step of writing its chunks
    times: list[tuple[float, float, float]] = field(default_factory=list)  # (wall, CPU, optimizer.step CPU) ms/step
    paired: list[tuple[float, float, float]] = field(default_factory=list)  # the baseline block's, beside each


def make_variants(model_name: str, ks: list[int], breakdown: bool, use_wandb: bool, vocab: int, train,
                  device: torch.device, out_dir: Path, stack: contextlib.ExitStack,
                  muon: bool = False) -> list[Variant]:
    """The capture-free baseline, grad+update+adam_m at each k (Adam's v statistics every `v_stats_every` steps, the
    default), optional per-quantity rows and v statistics every step, and wandb.watch. `muon`: torch's Muon for the
    blocks' matrices chained with AdamW for the rest (`ChainedOptimizer`), instead of AdamW alone."""
    def pair() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = build_model(ModelConfig(name=model_name), vocab, seed=0).to(device)
        model.train()
        if not muon:
            return model, adamw(model.parameters(), train, device)
        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
        return model, ChainedOptimizer(torch.optim.Muon(matrices, lr=0.02), adamw(rest, train, device))

    def recorded(what: str, k: int, quantities: list[str], v_stats_every: int = CaptureConfig.v_stats_every) -> Variant:
        model, opt = pair()
        rec = attach(model, opt, out_dir, f"{model_name}-{what}-{k}", total_steps=10**6,
                     capture=CaptureConfig(sketch="countsketch", dim=k, quantities=quantities, probe_every=0,
                                           v_stats_every=v_stats_every))
        stack.callback(rec.close)
        # on a GPU a background thread writes the chunks beside training (capture.writer_thread): its cost is in
        # the timed blocks, not added
        threaded = rec.cfg.use_writer_thread(device)
        return Variant(what, k, model, opt, log=rec.log,
                       store_cost=None if threaded else chunk_write_cost(rec, out_dir))

    variants = [Variant("none", None, *pair())]
    variants += [recorded("grad+update+adam_m", k, ALL) for k in ks]
    if breakdown:
        k = 4096 if 4096 in ks else ks[0]
        variants += [recorded(q, k, [q]) for q in ALL] + [recorded("per-layer stats only", k, [])]
        variants.append(recorded("grad+update+adam_m, v stats every step", k, ALL, v_stats_every=1))
    if use_wandb:
        variants.append(wandb_variant(pair, out_dir, stack))
    return variants


def chunk_write_cost(rec, out_dir: Path) -> Callable[[], tuple[float, float]]:
    """A function giving the Recorder's store cost per step, (wall ms, CPU ms): one whole chunk of its last
    recorded row written by a fresh writer with the same arrays, codecs and chunk, divided by the chunk's rows.

    A chunk is written once every `capture.chunk` steps (256 by default), so the timed blocks, a few steps each,
    rarely hold a write, and a median over rounds would drop the one that does; the write is timed on its own
    and spread over the steps it serves, as in a long run."""
    last: dict = {}
    append = rec.writer.append
    rec.writer.append = lambda row: (last.update(row=row), append(row))[1]

    def cost(reps: int = 3) -> tuple[float, float]:
        root = store.open_experiment(out_dir / "chunk-cost.zarr", mode="a")
        times = []
        for _ in range(reps):
            writer = store.RunWriter(store.create_run(root, f"r{len(list(root.group_keys()))}", {}), rec.cfg.chunk)
            declare_arrays(writer, rec.cfg, rec.k, len(rec.layout.numels), 0, 0)
            for _ in range(rec.cfg.chunk - 1):
                writer.append(last["row"])
            wall, cpu = time.perf_counter(), time.process_time()
            writer.append(last["row"])  # fills the chunk: written now
            times.append(((time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000))
        wall_ms, cpu_ms = np.median(np.array(times), axis=0)
        return wall_ms / rec.cfg.chunk, cpu_ms / rec.cfg.chunk
    return cost


def wandb_variant(pair: Callable, out_dir: Path, stack: contextlib.ExitStack) -> Variant:
    """wandb.watch(model, log="gradients", log_freq=1) in offline mode, logging the loss each step as users do."""
    import wandb

    os.environ["WANDB_MODE"] = "offline"
    run = wandb.init(mode="offline", dir=str(out_dir), project="gradtrace-bench", settings=wandb.Settings(
        silent=True, console="off"))
    stack.callback(run.finish)
    model, opt = pair()
    run.watch(model, log="gradients", log_freq=1)
    return Variant("wandb.watch(gradients, log_freq=1)", None, model, opt,
                   after_step=lambda loss: run.log({"loss": loss.item()}), hooks_in_step=False)


def train_step(v: Variant, task: ArithmeticTask, step: int, batch: int, clip: float) -> float:
    """One step of the default training loop (as gradtrace.train) with the variant's capture; returns the CPU
    seconds spent in optimizer.step (where the Recorder's hooks run)."""
    b = task.train_batches(step, [0], batch, next(v.model.parameters()).device)[0]  # packed, as gradtrace.train
    loss = answer_cross_entropy(v.model(**b.inputs(), use_cache=False).logits, b.tokens, b.mask)
    v.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.model.parameters(), clip)
    v.log(loss)
    began = time.process_time()
    v.optimizer.step()
    spent = time.process_time() - began
    v.after_step(loss)
    return spent


def run_block(v: Variant, task: ArithmeticTask, start: int, steps: int, batch: int,
              clip: float) -> tuple[float, float, float]:
    """Wall ms, CPU ms and optimizer.step CPU ms per step over `steps` steps from batch `start` (on a GPU, from
    and to an idle device)."""
    synchronize = torch.cuda.synchronize if next(v.model.parameters()).is_cuda else (lambda: None)
    synchronize()
    wall, cpu, in_step = time.perf_counter(), time.process_time(), 0.0
    for i in range(steps):
        in_step += train_step(v, task, start + i, batch, clip)
    synchronize()
    return ((time.perf_counter() - wall) / steps * 1000, (time.process_time() - cpu) / steps * 1000,
            in_step / steps * 1000)


def measure(base: Variant, variants: list[Variant], task: ArithmeticTask, batch: int, clip: float, rounds: int,
            block: int) -> None:
    """Warm up, then `rounds` rounds; in each, every variant's block sits beside a baseline block (same batches)."""
    for v in [base, *variants]:
        run_block(v, task, 0, 2, batch, clip)
    step = 0
    for r in range(rounds):
        for i in range(len(variants)):
            j = (i + r) % len(variants)
            v = variants[j]
            first, second = (base, v) if (j + r) % 2 == 0 else (v, base)  # each variant's side alternates by round
            timed = {id(first): run_block(first, task, step, block, batch, clip),
                     id(second): run_block(second, task, step, block, batch, clip)}
            v.times.append(timed[id(v)])
            v.paired.append(timed[id(base)])
        step += block
        print(f"  round {r + 1}/{rounds} (wall ratios): " + ", ".join(
            f"{v.what}@{v.k}: {v.times[-1][0] / v.paired[-1][0]:.3f}" for v in variants), flush=True)


def records(model_name: str, device: torch.device, optimizer: str, variants: list[Variant]) -> list[dict]:
    """One record per captured variant: medians over its pairings of the wall, CPU and hooks ratios, each step's
    time including its share of the store's chunk writes (which run inside optimizer.step)."""
    out = []
    for v in variants:
        (wall, cpu, opt), (base_wall, base_cpu, base_opt) = np.array(v.times).T, np.array(v.paired).T
        store_wall, store_cpu = v.store_cost() if v.store_cost else (0.0, 0.0)
        wall, cpu, opt = wall + store_wall, cpu + store_cpu, opt + store_cpu
        ratios = wall / base_wall
        hooks = 1 + (opt - base_opt) / base_cpu
        out.append({"model": model_name, "device": device.type, "optimizer": optimizer, "k": v.k, "what": v.what,
                    "ratio": round(float(np.median(ratios)), 4),
                    "step_ms_without": round(float(np.median(base_wall)), 2),
                    "step_ms_with": round(float(np.median(wall)), 2),
                    "ratio_iqr": [round(float(q), 4) for q in np.percentile(ratios, [25, 75])],
                    "cpu_ratio": round(float(np.median(cpu / base_cpu)), 4),
                    "hooks_ratio": round(float(np.median(hooks)), 4) if v.hooks_in_step else None,
                    "store_ms_per_step": round(store_wall, 3)})
    return out


def main() -> None:
    """Parse arguments, time every model's variants, print the table and write the JSON records."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds; pythia-70m with k=4096 only")
    parser.add_argument("--models", default="tiny,pythia-70m", help="comma-separated: tiny, pythia-70m, micro")
    parser.add_argument("--ks", default="1024,4096,16384", help="sketch dims for grad+update+adam_m")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 12 tiny, 3 pythia; quick: 5, 2)")
    parser.add_argument("--no-wandb", action="store_true", help="skip the wandb.watch row")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="only the grad+update+adam_m rows (more rounds in the same time)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU")
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                        help="adamw (gradtrace.train's), or muon: torch's Muon for the blocks' matrices chained with "
                        "AdamW for the rest")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "capture_overhead.json"))
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(1)
    device = torch.device(args.device)
    cfg = load(Path(__file__).parents[1] / "experiments" / "default.yaml")
    train, task = cfg.train, ArithmeticTask(cfg.task)
    use_wandb = not args.no_wandb
    if use_wandb and importlib.util.find_spec("wandb") is None:
        print("wandb is not installed: skipping the wandb.watch row (pip install wandb to include it)")
        use_wandb = False
    ks = [int(k) for k in args.ks.split(",")]
    results = []
    for name in args.models.split(","):
        big = name == "pythia-70m"
        batch, block = (8, 2) if big else (train.batch_size, 4)
        rounds = ROUNDS[(big, args.quick)] if args.rounds is None else args.rounds
        model_ks = [4096] if big and args.quick else ks
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            variants = make_variants(name, model_ks, not (big or args.no_breakdown), use_wandb,
                                     task.tokenizer.vocab_size, train, device, Path(tmp), stack,
                                     muon=args.optimizer == "muon")
            params = count_parameters(variants[0].model)
            print(f"{name} on {device_name(device)}: {params:,} parameters, {args.optimizer}, batch {batch}, "
                  f"{rounds} rounds × {block} steps per block", flush=True)
            measure(variants[0], variants[1:], task, batch, train.clip, rounds, block)
            results += records(name, device, args.optimizer, variants[1:])
    print(f"\n{'model':<11} {'k':>6}  {'recorded':<36} {'ratio':>6} {'(IQR)':<13} {'cpu':>6} {'hooks':>6} "
          f"{'ms without':>10} {'ms with':>8} {'store ms':>8}")
    for r in results:
        iqr = f"({r['ratio_iqr'][0]:.3f}-{r['ratio_iqr'][1]:.3f})"
        print(f"{r['model']:<11} {r['k'] or '-':>6}  {r['what']:<36} {r['ratio']:>6.3f} {iqr:<13} "
              f"{r['cpu_ratio']:>6.3f} {r['hooks_ratio'] or float('nan'):>6.3f} {r['step_ms_without']:>10.1f} "
              f"{r['step_ms_with']:>8.1f} {r['store_ms_per_step']:>8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
