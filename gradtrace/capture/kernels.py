"""Compiled CPU kernels for CountSketch (numba): one pass over a tensor gives its sketch and its squared norm.

CountSketch's structured hash sends the coordinates of each block of k to consecutive buckets, cyclically
shifted (see `sketch.CountSketch`), so a block's sketch is two contiguous signed additions that the compiler
vectorises. On one CPU thread this is ~2.5× faster than the sparse matrix-vector product the other devices use;
it needs no flat copy of the vector (tensors are sketched where they lie), and the map it reads is one byte per
coordinate (the signs) instead of eight. The squared norm is summed in float64 in the same pass (reassociated,
so vectorised); the sketch itself is summed in the same order as a plain `index_add_`.
"""
from __future__ import annotations

import numba
import numpy as np

_REASSOC = {"reassoc"}  # lets the compiler vectorise the norm's running sum; no other fast-math liberty


def _compiled(**options):
    """`numba.njit`, its machine code cached on disk where numba finds a folder to write it to (beside this file, or
    the user's cache), compiled in each process where it finds none: a read-only install and home (a container run
    as another user) raised "cannot cache function …: no locator available" as this module was imported."""
    def compile_(function):
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:
            return numba.njit(**options)(function)
    return compile_


@numba.njit(inline="always")
def _runs_from(i: int, stop: int, shifts: np.ndarray, k: int) -> tuple[int, int, int]:
    """From coordinate i (< stop): where its block's part below `stop` ends, the bucket of i, and how many
    coordinates go to consecutive buckets from it before they wrap round to bucket 0."""
    block = i // k
    end = min(stop, (block + 1) * k)
    bucket = (i - block * k + shifts[block]) % k
    return end, bucket, min(end - i, k - bucket)


@_compiled(nogil=True, fastmath=_REASSOC)
def _signed_add(out: np.ndarray, signs: np.ndarray, x: np.ndarray) -> float:
    sumsq = 0.0
    for i in range(out.size):
        out[i] += np.float32(signs[i]) * x[i]
        sumsq += np.float64(x[i]) * x[i]
    return sumsq


@_compiled(nogil=True, fastmath=_REASSOC)
def _signed_add_difference(out: np.ndarray, signs: np.ndarray, new: np.ndarray, old: np.ndarray) -> float:
    sumsq = 0.0
    for i in range(out.size):
        d = new[i] - old[i]
        out[i] += np.float32(signs[i]) * d
        sumsq += np.float64(d) * d
    return sumsq


@_compiled(nogil=True)
def countsketch_add(x: np.ndarray, start: int, signs: np.ndarray, shifts: np.ndarray, out: np.ndarray) -> float:
    """out += the CountSketch of the vector equal to `x` on coordinates [start, start + len(x)) and zero elsewhere
    (coordinate i to bucket (i mod k + shifts[i // k]) mod k with sign signs[i], k = len(out)); returns ‖x‖²."""
    k, stop, i, sumsq = out.size, start + x.size, start, 0.0
    while i < stop:
        end, bucket, run = _runs_from(i, stop, shifts, k)
        a, b, c = i - start, i - start + run, end - start
        sumsq += _signed_add(out[bucket:bucket + run], signs[i:i + run], x[a:b])
        sumsq += _signed_add(out[:end - i - run], signs[i + run:end], x[b:c])
        i = end
    return sumsq


@_compiled(nogil=True)
def countsketch_add_difference(new: np.ndarray, old: np.ndarray, start: int, signs: np.ndarray, shifts: np.ndarray,
                               out: np.ndarray) -> float:
    """As `countsketch_add` for x = new − old, without forming it; returns ‖new − old‖²."""
    k, stop, i, sumsq = out.size, start + new.size, start, 0.0
    while i < stop:
        end, bucket, run = _runs_from(i, stop, shifts, k)
        a, b, c = i - start, i - start + run, end - start
        sumsq += _signed_add_difference(out[bucket:bucket + run], signs[i:i + run], new[a:b], old[a:b])
        sumsq += _signed_add_difference(out[:end - i - run], signs[i + run:end], new[b:c], old[b:c])
        i = end
    return sumsq
