"""Sketch quality and speed on real gradients of the default model: cosine and norm error vs the JL scale.

Trains the default model (`experiments/default.yaml`) from a random init for a few hundred steps, keeps the
per-step batch gradients of the last steps (whose energy concentrates in a few matrices, as real gradients do), and
sketches them. Prints, per sketch and k, the median / p95 absolute error of pairwise cosines and of norms, their ratio
to sqrt(2/k) (the JL scale of inner-product error between unit vectors), and the time of one sketch.

    OMP_NUM_THREADS=1 python benchmarks/sketch_quality.py [--steps 200] [--keep 24]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from gradtrace import config
from gradtrace.capture.sketch import ParamLayout, make_sketch
from gradtrace.models import build_model
from gradtrace.tasks import ArithmeticTask, answer_cross_entropy

ROOT = Path(__file__).resolve().parents[1]  # the paths below hold from any working directory


def real_gradients(steps: int, keep: int) -> tuple[torch.Tensor, ParamLayout]:
    """Flat batch gradients of the last `keep` of `steps` AdamW steps on the default task."""
    cfg = config.load(ROOT / "experiments" / "default.yaml", {"model.init_from": None})  # from a random init
    task = ArithmeticTask(cfg.task)
    model = build_model(cfg.model, task.tokenizer.vocab_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    grads = []
    for step in range(steps):
        x, m = task.train_batch(step, 0, cfg.train.batch_size)
        loss = answer_cross_entropy(model(input_ids=x).logits, x, m)
        opt.zero_grad()
        loss.backward()
        if step >= steps - keep:
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        opt.step()
    return torch.stack(grads), ParamLayout.of(model)


def errors(X: torch.Tensor, S: torch.Tensor) -> dict[str, float]:
    """Median and p95 absolute error of pairwise cosines and of relative norms."""
    def cosines(A):
        A = A / A.norm(dim=1, keepdim=True)
        C = A @ A.T
        return C[torch.triu_indices(len(A), len(A), 1).unbind()]
    cos_err = (cosines(X.double()) - cosines(S.double())).abs().numpy()
    norm_err = (S.norm(dim=1) / X.norm(dim=1) - 1).abs().numpy()
    return {"cos_median": float(np.median(cos_err)), "cos_p95": float(np.quantile(cos_err, 0.95)),
            "norm_median": float(np.median(norm_err)), "norm_p95": float(np.quantile(norm_err, 0.95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--keep", type=int, default=24)
    args = parser.parse_args()
    if not 2 <= args.keep <= args.steps:
        parser.error(f"expected 2 ≤ --keep ≤ --steps (pairwise cosines need two gradients), got --keep {args.keep} "
                     f"--steps {args.steps}")
    torch.set_num_threads(1)
    X, layout = real_gradients(args.steps, args.keep)
    head = layout.names.index("embed_out.weight") if "embed_out.weight" in layout.names else -1
    share = float((X[:, layout.offsets[head]: layout.offsets[head] + layout.numels[head]] ** 2).sum() / (X ** 2).sum())
    print(f"{len(X)} real gradients of {layout.size:,} parameters; output head holds {share:.0%} of their energy")
    rows = []
    for kind, ks in (("countsketch", (1024, 4096, 16384)), ("gaussian", (1024, 4096)), ("rademacher", (1024,))):
        for k in ks:
            sketch = make_sketch(kind, layout, k, seed=0)
            sketch.apply(X[0])  # warm-up
            t0 = time.perf_counter()
            S = torch.stack([sketch.apply(x) for x in X])
            ms = (time.perf_counter() - t0) / len(X) * 1e3
            row = {"sketch": kind, "k": k, "ms_per_sketch": ms, "jl_scale": float(np.sqrt(2 / k)), **errors(X, S)}
            rows.append(row)
            print(f"{kind:<12} k={k:<6} cos err median {row['cos_median']:.4f} p95 {row['cos_p95']:.4f} "
                  f"({row['cos_p95'] / row['jl_scale']:.2f}× sqrt(2/k))  norm err median {row['norm_median']:.4f}  "
                  f"{ms:8.2f} ms/sketch")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sketch_quality.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
