"""Training on a GPU (skipped without CUDA; capture's own checks there are test_capture's `cuda` cases): a run
records on CUDA what it records on the CPU, in bf16 too, and ensemble members train like standalone runs."""
import numpy as np
import pytest
import torch
import zarr

from conftest import tiny_config
from gradtrace import store
from gradtrace.ensemble import train_ensemble
from gradtrace.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def trained_run(out, **overrides) -> zarr.Group:
    """A tiny run trained into `out`, its run group read back."""
    train(tiny_config(train__steps=10, **overrides), out, "r", progress=False)
    return zarr.open_group(out / "store.zarr", mode="r")["r"]


def test_a_run_on_cuda_records_what_the_same_run_on_the_cpu_does(tmp_path):
    """fp32, the same init and batches: losses and recorded sketches agree up to the kernels' other sum orders."""
    cpu = trained_run(tmp_path / "cpu", train__device="cpu", train__precision="fp32")
    gpu = trained_run(tmp_path / "cuda", train__device="cuda", train__precision="fp32")
    assert gpu.attrs["status"] == "complete" and gpu.attrs["sketch"] == cpu.attrs["sketch"]
    np.testing.assert_allclose(gpu["loss"][:], cpu["loss"][:], rtol=1e-3)
    for name in ("grad", "probe/grad"):
        np.testing.assert_allclose(store.read(gpu, name)[0], store.read(cpu, name)[0], rtol=1e-3, atol=1e-6,
                                   err_msg=name)


def test_a_bf16_run_on_cuda_completes_with_finite_rows(tmp_path):
    gpu = trained_run(tmp_path, train__device="cuda")  # precision auto: bf16 autocast on CUDA
    assert gpu.attrs["status"] == "complete"
    for name in ("loss", "grad", "update", "probe/grad"):
        assert np.isfinite(store.read(gpu, name)).all(), name


def test_ensemble_members_on_cuda_train_like_standalone_runs(tmp_path):
    members = [tiny_config(train__device="cuda", train__precision="fp32", train__steps=20, train__eval_every=10,
                           capture__enabled=False, train__init_seed=seed, train__data_seed=seed + 1, train__lr=lr)
               for seed, lr in ((1, 2e-3), (3, 1e-2))]
    train_ensemble(members, tmp_path / "ensemble", ["a", "b"], ["sweep"] * 2)
    together = zarr.open_group(tmp_path / "ensemble" / "store.zarr", mode="r")
    for cfg, run_id in zip(members, "ab"):
        train(cfg, tmp_path / "standalone", run_id, role="sweep", progress=False)
        alone = zarr.open_group(tmp_path / "standalone" / "store.zarr", mode="r")[run_id]
        np.testing.assert_allclose(together[run_id]["loss"][:], alone["loss"][:], rtol=1e-3, err_msg=run_id)
        np.testing.assert_allclose(together[run_id]["evals/accuracy"][:], alone["evals/accuracy"][:], atol=0.02)
