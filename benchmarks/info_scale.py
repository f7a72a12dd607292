"""Benchmark `gradtrace info` (`store.summary`) on a study of thousands of runs: zarr's array objects against the
listing read from the arrays' zarr.json files.

`summary` lists each run's arrays (path, shape, dtype, dimension names, stored bytes). Building zarr's array object
for each (~39,000 at 3,000 sweep runs) took most of its time; it now reads a local run's array metadata as JSON. This
builds a store of N runs (one sweep-like run of 13 arrays written by gradtrace, its folder copied N − 1 times), checks
both listings give the same text and times them in interleaved rounds.

    python benchmarks/info_scale.py             # 3,000 runs
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from ab import in_words, interleaved

from gradtrace import store


def build_store(path: Path, runs: int) -> None:
    """A gradtrace store of `runs` complete runs, each with a sweep run's arrays (150 steps, 15 probes)."""
    root = store.open_experiment(path, mode="a")
    writer = store.RunWriter(store.create_run(root, "run-0000", {}), chunk=32)
    for name in ("loss", "lr", "grad_norm"):
        writer.declare(name, (), "float32")
    writer.declare("step", (), "int64")
    writer.declare("nonfinite", (), "bool")
    for name in ("layer_grad_norm", "layer_update_norm", "layer_v_mean"):
        writer.declare(name, (8,), "float32")
    for step in range(150):
        writer.append({"loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "step": step, "nonfinite": False,
                       **{name: np.ones(8, np.float32) for name in ("layer_grad_norm", "layer_update_norm",
                                                                    "layer_v_mean")}})
    writer.close()
    group = root["run-0000"]
    for name, shape, dtype in (("probe/step", (15,), "int64"), ("probe/loss", (15, 8, 2), "float32"),
                               ("eval/correct", (8, 2000), "bool"), ("evals/step", (4,), "int64"),
                               ("evals/accuracy", (4, 8), "float32")):
        group.create_array(name, shape=shape, dtype=dtype)[...] = np.ones(shape, dtype=dtype)
    store.set_status(group, "complete")
    for i in range(1, runs):
        shutil.copytree(path / "run-0000", path / f"run-{i:04d}")


def through_zarr(group) -> list:
    """The listing as `summary` read it before: zarr's array objects, their files' bytes summed."""
    return [store._ListedArray(name, tuple(arr.shape), str(arr.attrs.get("storage_dtype", arr.dtype)),
                               tuple(arr.metadata.dimension_names or ()), store._stored_bytes_in(str(
                                   store.local_path(arr))))
            for name, arr in sorted(store._arrays(group).items())]


def summary_with(listing):
    """`store.summary` of a store, with `listing` for each run's arrays."""
    def summary(path: Path) -> str:
        as_now = store._listed_arrays
        store._listed_arrays = listing
        try:
            return store.summary(path)
        finally:
            store._listed_arrays = as_now
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.zarr"
        build_store(path, args.runs)
        arrays = len(store._listed_arrays(store.open_experiment(path)["run-0000"]))
        before, now, _ = interleaved(lambda: summary_with(through_zarr)(path),
                                     lambda: summary_with(store._listed_arrays)(path), args.rounds)
        print(f"{args.runs} runs of {arrays} arrays, {args.rounds} rounds: "
              + in_words(("through zarr", "from the zarr.json files"), before, now))


if __name__ == "__main__":
    main()
