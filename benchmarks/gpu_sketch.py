"""CountSketch off the CPU: the banded sparse products the Recorder uses there, against fewer, larger products, a
gather and a scatter formulation, and (on a GPU) the banded products replayed as one CUDA graph, timed on one
device in one run.

On an H200 the Recorder's cost was mostly the sketches' sparse products (benchmarks/README.md, gpu_check.sh):
`CountSketch.apply_csr` launches one sparse product per band of `band` blocks of k coordinates (`CountSketch.BANDS`
by device: 1024 on CUDA since this benchmark's first GPU run, 256 before and elsewhere: 68 products for pythia-70m
at k = 4096). This times one sketch of a flat vector of the model's size by each variant (median of
`--reps`, each ended by a device synchronisation), checks every variant's sketch against the banded one, and prints
each one's time and its ratio to the banded one's.

    python benchmarks/gpu_sketch.py --device cuda                      # pythia-70m shape, k = 4096 and 16384
    python benchmarks/gpu_sketch.py --device cpu --model tiny --reps 5  # a rehearsal (the CPU trains by kernels)

Writes `benchmarks/out/gpu_sketch.json` (after each k): a list of {"model", "device", "k", "variant", "launches",
"ms", "ratio"}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gradtrace.capture.sketch import CountSketch, ParamLayout
from gradtrace.config import ModelConfig
from gradtrace.models import build_model
from gradtrace.tasks import CharTokenizer


def timed_ms(fn: Callable[[], torch.Tensor], device: torch.device, reps: int) -> float:
    """Median wall time of `fn` in ms, each call ended by a device synchronisation (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - began) * 1e3)
    return float(np.median(times))


def banded(layout: ParamLayout, k: int, device: torch.device, band: int) -> CountSketch:
    """The Recorder's CountSketch (seed 0) with `band` blocks per sparse product."""
    sketch = CountSketch(layout, k, seed=0, device=device)
    sketch.band = band
    return sketch


def gather_sketch(sketch: CountSketch) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same map as one gather and one column sum over the (blocks × k) layout: bucket m of block b holds its
    coordinate (m − s_b) mod k. Costs an int64 index per coordinate, as the CSR matrices cost an int32 and a sign."""
    P, k, blocks = sketch.layout.size, sketch.dim, sketch.blocks
    index = (torch.arange(k, device=sketch.device) - sketch.shifts.unsqueeze(1)) % k
    signs = torch.zeros(blocks * k, device=sketch.device)
    signs[:P] = sketch.signs
    padded = torch.zeros(blocks * k, device=sketch.device)

    def apply(flat: torch.Tensor) -> torch.Tensor:
        torch.mul(flat, signs[:P], out=padded[:P])
        return padded.view(blocks, k).gather(1, index).sum(0)
    return apply


def scatter_sketch(sketch: CountSketch) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same map as one signed product and one index_add_ into the k buckets (atomic adds on a GPU), from a
    precomputed int64 bucket per coordinate."""
    buckets = sketch.buckets(0, sketch.layout.size)

    def apply(flat: torch.Tensor) -> torch.Tensor:
        return torch.zeros(sketch.dim, device=flat.device).index_add_(0, buckets, flat * sketch.signs)
    return apply


def graphed(fn: Callable[[torch.Tensor], torch.Tensor], flat: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` captured once into a CUDA graph on a static copy of `flat`: each call copies its input in and replays
    every launch as one."""
    static_in = flat.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (workspace allocation, as the docs ask)
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def apply(values: torch.Tensor) -> torch.Tensor:
        static_in.copy_(values)
        graph.replay()
        return static_out
    return apply


def main() -> None:
    """Parse arguments, time every variant at every k, print the table and write the JSON records."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="pythia-70m", help="an embedded model whose layout is sketched")
    parser.add_argument("--ks", default="4096,16384")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "gpu_sketch.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    layout = ParamLayout.of(build_model(ModelConfig(name=args.model), CharTokenizer().vocab_size, seed=0))
    flat = torch.randn(layout.size, generator=torch.Generator().manual_seed(0)).to(device)
    records, out = [], Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for k in (int(k) for k in args.ks.split(",")):
        reference = CountSketch(layout, k, seed=0, device=device)
        expected = reference.apply_csr(flat)
        blocks, now = reference.blocks, reference.band
        variants = {f"banded {now} (now)": (reference.apply_csr, -(-blocks // now))}
        for band in sorted({256, 1024, 4096, blocks} - {now}):
            variants[f"banded {band}"] = (banded(layout, k, device, band).apply_csr, -(-blocks // band))
        variants["gather"] = (gather_sketch(reference), 1)
        variants["scatter"] = (scatter_sketch(reference), 1)
        if device.type == "cuda":
            try:
                variants[f"banded {now} graphed"] = (graphed(reference.apply_csr, flat), 1)
            except RuntimeError as error:  # sparse products may not be capturable: say so, time the rest
                print(f"banded {now} graphed: not capturable ({error})", flush=True)
        base_ms = None
        for name, (fn, launches) in variants.items():
            torch.testing.assert_close(fn(flat), expected, rtol=1e-4, atol=1e-3, msg=name)
            ms = timed_ms(lambda: fn(flat), device, args.reps)
            base_ms = base_ms or ms
            records.append({"model": args.model, "device": str(device), "k": k, "variant": name,
                            "launches": launches, "ms": round(ms, 3), "ratio": round(ms / base_ms, 3)})
            print(f"{args.model} k={k:<6} {name:<22} {launches:>4} product(s)  {ms:8.3f} ms  {ms / base_ms:6.3f}",
                  flush=True)
        out.write_text(json.dumps(records, indent=1))  # each k's as it ends: a run stopped at its limit keeps them
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
