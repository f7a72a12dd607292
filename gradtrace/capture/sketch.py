"""Linear, seeded sketches of parameter-shaped vectors (DESIGN.md §5 "Sketch").

Every sketch maps a flat P-vector (the model's parameters concatenated in layout order) to k numbers. All are
linear and regenerate their randomness from (seed, layout), so the same seed and layout give the same map in
any process and on any device; none materialises a P×k matrix.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the parameters a sketch covers, in concatenation order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ParamLayout":
        """The layout of a model's trainable parameters."""
        named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(s for _, s in named))

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def size(self) -> int:
        """P, the total number of coordinates."""
        return sum(self.numels)

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for n in self.numels:
            out.append(total)
            total += n
        return out

    @property
    def hash(self) -> str:
        """A short digest of names and shapes: equal layouts, equal hashes."""
        text = json.dumps([self.names, self.shapes])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> list[dict]:
        return [{"name": n, "shape": list(s), "offset": o}
                for n, s, o in zip(self.names, self.shapes, self.offsets)]

    @classmethod
    def from_json(cls, entries: list[dict]) -> "ParamLayout":
        return cls(tuple(e["name"] for e in entries), tuple(tuple(e["shape"]) for e in entries))


def flatten_into(tensors: Iterable[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors (any shapes) into a preallocated flat buffer without a fresh allocation."""
    return torch.cat([t.reshape(-1) for t in tensors], out=out)


def tensor_norms(tensors: Sequence[torch.Tensor], ord: float = 2) -> torch.Tensor:
    """Each tensor's L-`ord` norm as float32, summed in float32 at least: in bf16 or fp16 a norm loses digits, and
    of gradients still scaled by a GradScaler it overflows."""
    if any(t.dtype == torch.float64 for t in tensors):
        wide = [t if t.dtype == torch.float64 else t.float() for t in tensors]
        return torch.stack(torch._foreach_norm(wide, ord)).float()
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=torch.float32))


def _generator(seed: int, *salt: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(hashlib.sha256(repr((seed, *salt)).encode()).hexdigest()[:15], 16))
    return gen


class Sketch(ABC):
    """A seeded linear map from flat parameter vectors (length P) to length `dim`."""

    kind: ClassVar[str]

    def __init__(self, layout: ParamLayout, dim: int, seed: int = 0, device: str | torch.device = "cpu") -> None:
        if dim < 1:
            raise ValueError(f"sketch dim must be >= 1, got {dim}")
        self.layout, self.dim, self.seed, self.device = layout, dim, seed, torch.device(device)

    def apply_range(self, values: torch.Tensor, start: int) -> torch.Tensor:
        """Sketch of a vector equal to `values` on coordinates [start, start+len) and zero elsewhere."""
        if not 0 <= start <= start + values.numel() <= self.layout.size:
            raise ValueError(f"coordinates [{start}, {start + values.numel()}) are not inside the sketched vector's "
                             f"[0, {self.layout.size}): a shard must lie within its layout (trim its padding)")
        return self._apply_range(values, start)

    @abstractmethod
    def _apply_range(self, values: torch.Tensor, start: int) -> torch.Tensor:
        """`apply_range` of coordinates already checked to lie inside the layout."""

    def apply(self, flat: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sketch of a whole flat P-vector (optionally written into `out`)."""
        self._check(flat)
        result = self.apply_range(flat, 0)
        return out.copy_(result) if out is not None else result

    def apply_tensors(self, tensors: Sequence[torch.Tensor], scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Sketch of parameter-shaped tensors in layout order, flattened into `scratch` (a float P-vector; a fresh
        one if None)."""
        if scratch is None:
            return self.apply(torch.cat([t.reshape(-1).float() for t in tensors]))
        return self.apply(flatten_into(tensors, scratch))

    def apply_with_norms(self, tensors: Sequence[torch.Tensor],
                         scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sketch of parameter-shaped tensors in layout order, each tensor's L2 norm)."""
        norms = tensor_norms(tensors)
        return self.apply_tensors(tensors, scratch), norms

    def apply_difference_with_norms(self, new: Sequence[torch.Tensor],
                                    old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sketch of new − old, each tensor's L2 norm of it) for parameter-shaped tensors `new` and the flat
        P-vector `old` of their earlier values, which may be overwritten (it is scratch)."""
        old_parts = old.split(self.layout.numels)
        torch._foreach_sub_(old_parts, [t.reshape(-1) for t in new])  # old − new in place: no extra buffer
        norms = torch.stack(torch._foreach_norm(old_parts)).float()
        return self.apply(old).neg_(), norms

    def spec(self) -> dict:
        """What the store records so analysis can refuse incompatible sketches."""
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "layout_hash": self.layout.hash,
                "num_params": self.layout.size}

    def _check(self, flat: torch.Tensor) -> None:
        if flat.ndim != 1 or flat.numel() != self.layout.size:
            raise ValueError(f"expected a flat vector of {self.layout.size} parameters, got shape {tuple(flat.shape)}")


class IdentitySketch(Sketch):
    """No compression: k = P. For small models, and as the exact reference in tests."""

    kind = "identity"

    def __init__(self, layout: ParamLayout, dim: int | None = None, seed: int = 0, device="cpu") -> None:
        super().__init__(layout, layout.size, seed, device)

    def _apply_range(self, values: torch.Tensor, start: int) -> torch.Tensor:
        out = torch.zeros(self.dim, dtype=values.dtype, device=values.device)
        out[start: start + values.numel()] = values
        return out

    def apply(self, flat: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check(flat)
        return out.copy_(flat) if out is not None else flat.clone()


class CountSketch(Sketch):
    """CountSketch with a structured hash: coordinate i goes to bucket (i mod k + s[i // k]) mod k with sign σ_i.

    Within each block of k consecutive coordinates the buckets are a bijection (no collisions); each block gets
    an independent random cyclic shift s, so coordinates of different blocks collide uniformly at random. This
    avoids the failure of a plain fold (i mod k) when k is a multiple of a weight matrix's row length.

    On the CPU compiled kernels (`kernels`) add each block's signed coordinates to its two runs of consecutive
    buckets, tensor by tensor, with no flat copy, and sum each tensor's squared norm in the same pass (so
    `apply_with_norms` and `apply_difference_with_norms` cost one read of the data). On other devices the map is
    held as sparse k × (columns) CSR matrices of ±1, one per band of `band` blocks (int32 indices), built on first
    use: a sketch is a few sparse matrix-vector products. Banding keeps the coordinates one output row reads within
    a few cache lines: on the CPUs measured, one matrix over all of a 70M-parameter model's 17k blocks was 8-12×
    slower than bands of 256 (bands of 1024: 1.5× on an Intel Xeon). On an H200 bands of 1024 were fastest (a
    sketch of pythia-70m at k = 4096 in 0.66 ms, against 2.7 ms with 256): benchmarks/gpu_sketch.py.
    """

    kind = "countsketch"
    BANDS: ClassVar[dict[str, int]] = {"cuda": 1024}  # blocks per CSR band by device type; 256 on any other

    def __init__(self, layout: ParamLayout, dim: int, seed: int = 0, device="cpu") -> None:
        super().__init__(layout, dim, seed, device)
        P, k = layout.size, dim
        self.blocks = -(-P // k)
        gen = _generator(seed, 1, P, k)
        self.signs = (torch.randint(0, 2, (P,), generator=gen) * 2 - 1).float().to(self.device)
        self.shifts = torch.randint(0, k, (self.blocks,), generator=gen).to(self.device)
        self.band = self.BANDS.get(self.device.type, 256)
        self._bands: list[tuple[int, int, torch.Tensor]] | None = None
        if self.device.type == "cpu":  # the kernels' copies: one byte per sign, so the map costs little cache
            self._signs_cpu, self._shifts_cpu = self.signs.to(torch.int8).numpy(), self.shifts.numpy()

    def _band(self, first: int, last: int) -> tuple[int, int, torch.Tensor]:
        """Coordinates [start, stop) of blocks first..last-1 and their CSR map: row b holds, block by block, the
        one coordinate of each block hashed to bucket b."""
        P, k = self.layout.size, self.dim
        start, stop = first * k, min(last * k, P)
        rows = torch.arange(k, device=self.device)
        cols = torch.arange(first, last, device=self.device) * k + (rows.unsqueeze(1) - self.shifts[first:last]) % k
        valid = cols < P  # the last block may be partial
        indices = cols[valid]
        crow = torch.zeros(k + 1, dtype=torch.int64, device=self.device)
        crow[1:] = valid.sum(1).cumsum(0)
        with warnings.catch_warnings():  # CSR support is labelled beta; matrix-vector products are long stable
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(crow.int(), (indices - start).int(), self.signs[indices],
                                             size=(k, stop - start), check_invariants=False)
        return start, stop, matrix

    def buckets(self, start: int, n: int) -> torch.Tensor:
        """Bucket of each coordinate in [start, start+n)."""
        i = torch.arange(start, start + n, device=self.device)
        return (i % self.dim + self.shifts[i // self.dim]) % self.dim

    def _apply_range(self, values: torch.Tensor, start: int) -> torch.Tensor:
        out = torch.zeros(self.dim, device=values.device)
        if values.device.type == "cpu":
            return self._add_cpu(values, start, out)
        n = values.numel()
        signed = values.reshape(-1).float() * self.signs[start: start + n]
        return out.index_add_(0, self.buckets(start, n), signed)

    def apply(self, flat: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check(flat)
        result = self.apply_range(flat, 0) if flat.device.type == "cpu" else self.apply_csr(flat)
        return out.copy_(result) if out is not None else result

    def apply_tensors(self, tensors: Sequence[torch.Tensor], scratch: torch.Tensor | None = None) -> torch.Tensor:
        if tensors[0].device.type != "cpu":
            return super().apply_tensors(tensors, scratch)
        return self.apply_with_norms(tensors)[0]

    def apply_with_norms(self, tensors: Sequence[torch.Tensor],
                         scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if tensors[0].device.type != "cpu":
            return super().apply_with_norms(tensors, scratch)
        from gradtrace.capture.kernels import countsketch_add  # imports numba: only where the CPU path runs

        out, sumsq = torch.zeros(self.dim), np.empty(len(tensors))
        sketch = out.numpy()
        for i, (tensor, start) in enumerate(zip(tensors, self.layout.offsets)):
            sumsq[i] = countsketch_add(_numpy_flat(tensor), start, self._signs_cpu, self._shifts_cpu, sketch)
        return out, torch.from_numpy(np.sqrt(sumsq, dtype=np.float32))

    def apply_difference_with_norms(self, new: Sequence[torch.Tensor],
                                    old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if old.device.type != "cpu" or old.dtype == torch.float64:  # the kernel reads float32: Δθ of a float64
            return super().apply_difference_with_norms(new, old)         # model is formed in float64 first
        from gradtrace.capture.kernels import countsketch_add_difference

        out, sumsq, old = torch.zeros(self.dim), np.empty(len(new)), _numpy_flat(old)
        sketch = out.numpy()
        for i, (tensor, start, n) in enumerate(zip(new, self.layout.offsets, self.layout.numels)):
            sumsq[i] = countsketch_add_difference(_numpy_flat(tensor), old[start:start + n], start, self._signs_cpu,
                                                  self._shifts_cpu, sketch)
        return out, torch.from_numpy(np.sqrt(sumsq, dtype=np.float32))

    def apply_csr(self, flat: torch.Tensor) -> torch.Tensor:
        """The sketch as sparse matrix-vector products (the path off the CPU; on the CPU for tests)."""
        if self._bands is None:
            self._bands = [self._band(b, min(b + self.band, self.blocks)) for b in range(0, self.blocks, self.band)]
        flat = flat.float()
        result = None
        for start, stop, matrix in self._bands:
            part = matrix @ flat[start:stop]
            result = part if result is None else result.add_(part)
        return result

    def _add_cpu(self, values: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
        from gradtrace.capture.kernels import countsketch_add

        countsketch_add(_numpy_flat(values), start, self._signs_cpu, self._shifts_cpu, out.numpy())
        return out


def _numpy_flat(tensor: torch.Tensor):
    """A CPU tensor's coordinates as a flat float32 numpy array (a view when it already is one)."""
    tensor = tensor.detach()
    return (tensor if tensor.dtype == torch.float32 else tensor.float()).numpy().reshape(-1)


class _BlockJL(Sketch):
    """Dense JL, (1/√k)·R x, with R generated block by block from (seed, block): never P×k at once."""

    block: ClassVar[int] = 2048

    @abstractmethod
    def _matrix(self, gen: torch.Generator, cols: int) -> torch.Tensor:
        """A k × cols block of R from `gen`."""

    def _apply_range(self, values: torch.Tensor, start: int) -> torch.Tensor:
        values = values.reshape(-1).float()
        out = torch.zeros(self.dim, device=values.device)
        stop = start + values.numel()
        for b in range(start // self.block, -(-stop // self.block)):
            lo, hi = b * self.block, min((b + 1) * self.block, self.layout.size)
            R = self._matrix(_generator(self.seed, 2, b), hi - lo).to(values.device)
            a, z = max(lo, start), min(hi, stop)
            out += R[:, a - lo: z - lo] @ values[a - start: z - start]
        return out / math.sqrt(self.dim)


class GaussianSketch(_BlockJL):
    """Dense Gaussian JL, regenerated per block (slow: for small models and offline analysis)."""

    kind = "gaussian"

    def _matrix(self, gen: torch.Generator, cols: int) -> torch.Tensor:
        return torch.randn(self.dim, cols, generator=gen)


class RademacherSketch(_BlockJL):
    """Dense ±1 JL, regenerated per block (slow: for small models and offline analysis)."""

    kind = "rademacher"

    def _matrix(self, gen: torch.Generator, cols: int) -> torch.Tensor:
        return torch.randint(0, 2, (self.dim, cols), generator=gen).float() * 2 - 1


SKETCHES: dict[str, type[Sketch]] = {c.kind: c for c in (IdentitySketch, CountSketch, GaussianSketch, RademacherSketch)}


def make_sketch(kind: str, layout: ParamLayout, dim: int, seed: int = 0, device="cpu") -> Sketch:
    """The sketch called `kind` (identity | countsketch | gaussian | rademacher)."""
    if kind not in SKETCHES:
        raise ValueError(f"unknown sketch {kind!r}; choose one of {', '.join(SKETCHES)}")
    if kind != "identity" and dim >= layout.size:
        warnings.warn(f"sketch {kind!r} of dim {dim} for {layout.size} parameters is no smaller than the vector, and "
                      "inexact: sketch='identity' records every coordinate exactly in fewer columns", UserWarning,
                      stacklevel=2)
    return SKETCHES[kind](layout, dim, seed, device)

