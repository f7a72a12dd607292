"""Sketches: linear, seeded (same map in another process), JL-accurate on real-shaped gradients, shard sums."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from gradtrace.capture.sketch import SKETCHES, CountSketch, ParamLayout, Sketch, make_sketch
from gradtrace.store import check_compatible

LAYOUT = ParamLayout(("emb", "w1", "b1", "head"), ((50, 96), (96, 96), (96,), (96, 50)))
KINDS = ["identity", "countsketch", "gaussian", "rademacher"]


@pytest.mark.parametrize("kind", KINDS)
def test_linear(kind):
    sk = make_sketch(kind, LAYOUT, 256, seed=3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(LAYOUT.size, generator=g), torch.randn(LAYOUT.size, generator=g)
    assert torch.allclose(sk.apply(2.5 * x + y), 2.5 * sk.apply(x) + sk.apply(y), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_shard_sum_equals_whole(kind):
    sk = make_sketch(kind, LAYOUT, 256, seed=1)
    x = torch.randn(LAYOUT.size)
    cuts = [0, 1000, 5000, 9300, LAYOUT.size]
    shards = sum(sk.apply_range(x[a:b], a) for a, b in zip(cuts, cuts[1:]))
    assert torch.allclose(shards, sk.apply(x), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_map_in_another_process(kind):
    sk = make_sketch(kind, LAYOUT, 64, seed=7)
    x = torch.linspace(-1, 1, LAYOUT.size)
    code = (
        "import torch,sys\n"
        "from gradtrace.capture.sketch import ParamLayout, make_sketch\n"
        f"L=ParamLayout({LAYOUT.names!r},{LAYOUT.shapes!r})\n"
        f"s=make_sketch({kind!r},L,64,seed=7)\n"
        "x=torch.linspace(-1,1,L.size)\n"
        "print(','.join(repr(float(v)) for v in s.apply(x)[:64]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    other = torch.tensor([float(v) for v in out.strip().split(",")])
    assert torch.equal(other, sk.apply(x)[:64].float())
    assert not torch.equal(make_sketch(kind, LAYOUT, 64, seed=8).apply(x), sk.apply(x)) or kind == "identity"


def _head_heavy_gradients(n: int, layout: ParamLayout) -> torch.Tensor:
    """Gradient-like vectors whose energy sits in one matrix with a few heavy columns (like an output head)."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(n, layout.size, generator=g) * 0.01
    lo = layout.offsets[-1]
    head = torch.randn(n, 96, 50, generator=g) * torch.linspace(0.05, 3.0, 50) ** 2  # heavy columns
    out[:, lo:] = head.reshape(n, -1)
    return out


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_inner_products_within_jl_bound_at_k4096(kind):
    layout = ParamLayout(("emb", "w", "head"), ((50, 96), (96, 384), (96, 50)))
    sk = make_sketch(kind, layout, 4096, seed=0)
    X = _head_heavy_gradients(12, layout)
    S = torch.stack([sk.apply(x) for x in X])
    norms = X.norm(dim=1)
    cos_true = (X @ X.T) / torch.outer(norms, norms)
    cos_sk = (S @ S.T) / torch.outer(S.norm(dim=1), S.norm(dim=1))
    err = (cos_true - cos_sk).abs()
    # JL: inner-product error of unit vectors ~ sqrt(2/k) per pair; allow 4 sigma for the max over 66 pairs
    assert err.max() < 4 * np.sqrt(2 / 4096)
    assert ((S.norm(dim=1) / norms - 1).abs() < 4 * np.sqrt(2 / 4096)).all()


@pytest.mark.parametrize("kind", ["countsketch", "gaussian", "rademacher"])
def test_sketches_keep_norms_and_orthogonality_of_non_negative_vectors(kind):
    """A sketch is unbiased only with zero-mean entries of variance 1/k and fresh randomness per block: all-ones
    and two disjoint all-ones blocks (alike within their blocks) keep their norms and stay near orthogonal. Unsigned
    CountSketch buckets, ±1 read as 0/2 or scaled, or one block's matrix reused for every block passed the JL test,
    whose Gaussian gradients are zero-mean themselves (and which does not run Rademacher)."""
    sk = make_sketch(kind, LAYOUT, 1024, seed=0)
    ones, first, second = torch.ones(LAYOUT.size), torch.zeros(LAYOUT.size), torch.zeros(LAYOUT.size)
    first[:2048], second[2048:4096] = 1.0, 1.0
    bound = 5 * np.sqrt(2 / 1024)
    for x in (ones, first, second):
        assert abs(sk.apply(x).norm() / x.norm() - 1) < bound
    s1, s2 = sk.apply(first), sk.apply(second)
    assert abs(s1 @ s2) / (s1.norm() * s2.norm()) < bound


def test_countsketch_avoids_row_length_aliasing():
    """k a multiple of a heavy matrix's row length: a plain fold piles a column into few buckets; ours does not."""
    layout = ParamLayout(("w",), ((256, 64),))
    x = torch.zeros(256, 64)
    x[:, 5] = 1.0  # one heavy column
    x = x.reshape(-1)
    S = make_sketch("countsketch", layout, 1024, seed=0).apply(x)
    assert (S != 0).sum() > 100  # a fold (i mod 1024) would pile the column into 16 buckets of 16 entries
    assert S.abs().max() <= 5


@pytest.mark.parametrize("k", [64, 1000, 4096, 20000])  # k > P: one partial block
@pytest.mark.filterwarnings("ignore:sketch 'countsketch' of dim 20000")
def test_countsketch_cpu_kernel_matches_sparse_product_and_index_add(k):
    """The CPU kernel, tensor by tensor or from any offset, equals the CSR path other devices use and a plain
    index_add_ over the documented hash."""
    sk = make_sketch("countsketch", LAYOUT, k, seed=2)
    x = torch.randn(LAYOUT.size)
    reference = torch.zeros(k).index_add_(0, sk.buckets(0, LAYOUT.size), x * sk.signs)
    tensors = [t.reshape(s) for t, s in zip(x.split(LAYOUT.numels), LAYOUT.shapes)]
    torch.testing.assert_close(sk.apply(x), reference, rtol=0, atol=0)
    torch.testing.assert_close(sk.apply_tensors(tensors), reference, rtol=0, atol=0)
    torch.testing.assert_close(sk.apply_csr(x), reference, rtol=1e-5, atol=1e-4)
    for band in (3, CountSketch.BANDS["cuda"]):  # any band width gives the same map (CUDA's is wider)
        banded = make_sketch("countsketch", LAYOUT, k, seed=2)
        banded.band = band
        torch.testing.assert_close(banded.apply_csr(x), reference, rtol=1e-5, atol=1e-4)
    cuts = [0, 7, 4097, 5000, LAYOUT.size]
    shards = sum(sk.apply_range(x[a:b], a) for a, b in zip(cuts, cuts[1:]))
    torch.testing.assert_close(shards, reference, rtol=1e-5, atol=1e-4)


NOWHERE_TO_CACHE = """
import numba.core.caching, torch
numba.core.caching.CacheImpl._locator_classes = []  # as numba finds them in a read-only install and home
from gradtrace.capture.sketch import ParamLayout, make_sketch
layout = ParamLayout(("w",), ((300,),))
sk = make_sketch("countsketch", layout, 64, seed=2)
x = torch.randn(300)
torch.testing.assert_close(sk.apply(x), torch.zeros(64).index_add_(0, sk.buckets(0, 300), x * sk.signs), rtol=0, atol=0)
print("sketched")
"""


def test_the_cpu_kernels_compile_where_numba_has_nowhere_to_cache_them():
    """A read-only install and home (a container run as another user) left numba no folder to cache the compiled
    kernels in: importing them raised "cannot cache function '_signed_add': no locator available", and capture failed
    at its first step."""
    ran = subprocess.run([sys.executable, "-c", NOWHERE_TO_CACHE], capture_output=True, text=True)
    assert ran.stdout == "sketched\n", ran.stderr


def test_countsketch_fused_norms_and_difference_match_the_unfused_path():
    """apply_with_norms / apply_difference_with_norms: the CPU kernels (one pass) equal the generic path (the one
    other devices and other sketches take), for non-contiguous and non-float32 tensors too."""
    sk = make_sketch("countsketch", LAYOUT, 256, seed=4)
    g = torch.Generator().manual_seed(1)
    new = [torch.randn(s, generator=g, dtype=torch.float64) for s in LAYOUT.shapes]
    new[1] = new[1].float().t()  # non-contiguous float32
    old = torch.randn(LAYOUT.size, generator=g)
    exact_norms = torch.stack([t.double().norm() for t in new]).float()
    sketch, norms = sk.apply_with_norms(new)
    generic_sketch, generic_norms = Sketch.apply_with_norms(sk, new)
    torch.testing.assert_close(sketch, generic_sketch, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(norms, exact_norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(generic_norms, exact_norms, rtol=1e-4, atol=0)

    flat_new = torch.cat([t.reshape(-1).float() for t in new])
    diff = flat_new - old
    diff_norms = torch.stack([d.norm() for d in diff.split(LAYOUT.numels)])
    sketch, norms = sk.apply_difference_with_norms(new, old.clone())
    generic_sketch, generic_norms = Sketch.apply_difference_with_norms(sk, [t.float() for t in new], old.clone())
    for s_, n_ in ((sketch, norms), (generic_sketch, generic_norms)):
        torch.testing.assert_close(s_, sk.apply_csr(diff), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(n_, diff_norms, rtol=1e-5, atol=0)


def test_tensor_norms_sum_half_precision_in_float32():
    """Norms of fp16 and bf16 tensors are float32 sums: in fp16 a norm of 10⁵ overflowed to inf, and in bf16 it
    kept 3 digits."""
    from gradtrace.capture.sketch import tensor_norms

    tensors = [torch.full((10_000,), 1000.0, dtype=torch.float16), torch.linspace(0.1, 1, 999).bfloat16()]
    exact = torch.stack([t.double().norm() for t in tensors]).float()
    norms = tensor_norms(tensors)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, exact, rtol=1e-5, atol=0)  # 10⁵ for the first, not inf


def test_identity_is_exact():
    x = torch.randn(LAYOUT.size)
    assert torch.equal(make_sketch("identity", LAYOUT, 0).apply(x), x)


def test_incompatible_sketches_refused():
    a = make_sketch("countsketch", LAYOUT, 64, seed=0).spec()
    check_compatible(a, dict(a))
    for change in ({"seed": 1}, {"dim": 32}, {"kind": "gaussian"}, {"layout_hash": "x"}):
        with pytest.raises(ValueError, match="incompatible sketches"):
            check_compatible(a, {**a, **change})
    wider = ParamLayout(LAYOUT.names, ((50, 96), (96, 128), (128,), (128, 50)))  # same names, other widths
    assert ParamLayout(LAYOUT.names, LAYOUT.shapes).hash == LAYOUT.hash != wider.hash
    for other in (make_sketch("countsketch", LAYOUT, 64, seed=1), make_sketch("countsketch", wider, 64, seed=0)):
        with pytest.raises(ValueError, match="incompatible sketches"):  # the spec records the seed and the shapes
            check_compatible(a, other.spec())


def test_unknown_kind_lists_choices():
    with pytest.raises(ValueError, match="countsketch"):
        make_sketch("bogus", LAYOUT, 8)
    assert set(KINDS) == set(SKETCHES)


def test_a_sketch_no_smaller_than_the_vector_is_warned_of():
    """capture.dim above the parameter count was taken silently: a k-column store of a P < k vector, inexact."""
    import warnings

    for kind in ("countsketch", "gaussian"):
        with pytest.warns(UserWarning, match=f"sketch '{kind}' of dim {LAYOUT.size} for {LAYOUT.size} parameters is "
                                              "no smaller than the vector"):
            make_sketch(kind, LAYOUT, LAYOUT.size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_sketch("countsketch", LAYOUT, LAYOUT.size - 1)
        make_sketch("identity", LAYOUT, 4096)


def test_the_config_accepts_exactly_the_sketches_there_are():
    from gradtrace.config import SKETCH_KINDS

    assert set(SKETCH_KINDS) == set(SKETCHES)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("start, length", [(LAYOUT.size - 10, 20), (LAYOUT.size - 3, 4), (-5, 10)])  # 4: one past
def test_a_range_outside_the_layout_is_refused(kind, start, length):
    with pytest.raises(ValueError, match=r"not inside the sketched vector's \[0, "):
        make_sketch(kind, LAYOUT, 64).apply_range(torch.ones(length), start)
