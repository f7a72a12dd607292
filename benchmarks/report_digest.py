"""Benchmark the report's store digest on a study of thousands of runs: a plain glob against `_metadata_files`.

The report's provenance hashes every zarr.json of the store (`report.store_metadata_digest`). A glob over the store
stat'ed every chunk file too; the digest does not enter arrays' folders, and reads the runs' folders through
`store.map_reads` (one after another on a local disk, on threads where reads wait on a file server). This builds a
store of N runs (one run group of 14 chunked arrays, its folder copied N − 1 times), checks both give the same digest
and times them in interleaved rounds; `--cold` drops the page cache before each timing (Linux, as root), as a store
read first after a sweep on another node is read.

    python benchmarks/report_digest.py                    # 3,000 runs, warm cache
    sudo python benchmarks/report_digest.py --cold        # each timing from a cold cache
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import zarr
from ab import in_words, interleaved

from gradtrace.report import store_metadata_digest


def build_store(path: Path, runs: int) -> None:
    """A store of `runs` run groups, each with a sweep run's arrays (14, chunked along their step axis)."""
    root = zarr.open_group(path, mode="w")
    run = root.create_group("run-0000")
    for name in ("step", "loss", "lr", "grad_norm", "nonfinite", "layer_grad_norm", "layer_update_norm",
                 "layer_v_mean", "eval/accuracy", "eval/step", "evals/step", "evals/accuracy", "probe/step",
                 "probe/loss"):
        run.create_array(name, shape=(150, 8), chunks=(32, 8), dtype="f4")[:] = np.ones((150, 8), dtype="f4")
    for i in range(1, runs):
        shutil.copytree(path / "run-0000", path / f"run-{i:04d}")


def glob_digest(store_path: Path) -> tuple[str, int]:
    """The digest as the report computed it before: every zarr.json a glob finds, sorted, hashed in turn."""
    digest = hashlib.sha256()
    files = sorted(store_path.rglob("zarr.json"))
    for file in files:
        digest.update(file.relative_to(store_path).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest(), len(files)


def drop_page_cache() -> None:
    """Drop the page cache (Linux, as root): the next reads wait on the disk."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each timing (root)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.zarr"
        build_store(path, args.runs)
        before, now, (_, files) = interleaved(lambda: glob_digest(path), lambda: store_metadata_digest(path),
                                              args.rounds, drop_page_cache if args.cold else lambda: None)
        print(f"{args.runs} runs, {files} zarr.json files, {'cold' if args.cold else 'warm'} cache, {args.rounds} "
              "rounds: " + in_words(("glob", "digest"), before, now))


if __name__ == "__main__":
    main()
