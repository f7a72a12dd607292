"""CPU kernel pinning: a run asking for `train.cpu_kernels: avx2` trains as the environment variables would make it."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import zarr

from conftest import TINY, set_args
from gradtrace import kernels

CPU = torch.device("cpu")
AVX2_CPU = platform.machine().lower() in ("x86_64", "amd64") and Path("/proc/cpuinfo").exists() \
    and " avx2" in Path("/proc/cpuinfo").read_text()


def test_unknown_kernels_are_refused():
    with pytest.raises(ValueError, match="train.cpu_kernels must be one of native, avx2"):
        kernels.use("avx3", CPU)


def test_the_cpu_is_named_with_its_vendor_family_and_model(tmp_path):
    """A VM's model name may leave out the generation ("AMD EPYC" on Zen 3, 4 and 5); the numbers tell them apart.
    The first processor's entries are read; a CPU without them (ARM's /proc/cpuinfo) is named by what it has."""
    amd = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
           "flags\t\t: fpu avx2\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Other\n")
    (tmp_path / "amd").write_text(amd)
    assert kernels.cpu_name(str(tmp_path / "amd")) == "AMD EPYC (AuthenticAMD family 26 model 2)"
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
                                  "\nprocessor\t: 1\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")
    assert kernels.cpu_name(str(tmp_path / "arm")) == f"{platform.machine()} (CPU implementer 0x41 part 0xd40)"
    (tmp_path / "arm-bare").write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # was all an ARM VM's cpuinfo said
    assert kernels.cpu_name(str(tmp_path / "arm-bare")) == (platform.processor() or platform.machine())
    assert kernels.cpu_name(str(tmp_path / "none")) == (platform.processor() or platform.machine())


def test_a_mac_is_named_by_its_brand(tmp_path, monkeypatch):
    """`platform.processor()` says "arm" on every Apple silicon Mac: M1 and M3 runs read alike."""
    monkeypatch.setattr(kernels.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(kernels.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(
        args, 0, "Apple M2 Pro\n" if args == ["sysctl", "-n", "machdep.cpu.brand_string"] else "", ""))
    assert kernels.cpu_name(str(tmp_path / "none")) == "Apple M2 Pro"


def test_native_kernels_and_gpu_runs_pin_nothing():  # conftest starts each test without the variables
    kernels.use("native", CPU)
    kernels.use("avx2", torch.device("cuda"))
    assert not set(kernels.PINNED_ENV["avx2"]) & set(os.environ)


def test_a_process_that_computed_with_other_kernels_warns_and_stays_unpinned(monkeypatch):
    monkeypatch.setattr(kernels, "in_use", lambda: "AVX512")  # what torch keeps once it has chosen
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE"  # a user's own setting is given back
    with pytest.warns(RuntimeWarning, match="asks for AVX2 kernels, but this process runs AVX512"):
        kernels.use("avx2", CPU)
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"  # no half-pinned process: oneDNN reads it later
    assert not {"ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"} & set(os.environ)


def test_native_kernels_in_a_process_an_earlier_run_pinned_are_warned_of(monkeypatch):
    """A dask worker that trained a pinned run keeps its kernels: a native run there trained with them, silently."""
    monkeypatch.setattr(kernels, "in_use", lambda: "AVX2")
    os.environ.update(kernels.PINNED_ENV["avx2"])
    with pytest.warns(kernels.KernelsNotPinned, match="cpu_kernels=native asks for this CPU's own kernels, but this "
                                                      "process runs AVX2 .*ATEN_CPU_CAPABILITY=avx2"):
        kernels.use("native", CPU)


@pytest.mark.slow
@pytest.mark.skipif(not AVX2_CPU, reason="pinning to AVX2 needs an x86 CPU with AVX2")
def test_a_run_pins_its_kernels_as_the_environment_does(tmp_path):
    """Two fresh processes, one pinned by the config and one by the variables set outside it, end bitwise alike
    (torch and oneDNN read theirs when first used, so a run can still set them), and both record AVX2."""
    clean = dict(os.environ)  # without the variables (conftest)
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("{}\n")  # every key from gradtrace/config.py, then TINY

    def train(name: str, cpu_kernels: str, env: dict) -> tuple[bytes, str]:
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "gradtrace.cli", "train", str(defaults), "--out", str(out),
                        *set_args({**TINY, "train.cpu_kernels": cpu_kernels})],
                       env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
        group = zarr.open_group(out / "store.zarr", mode="r")["run"]
        assert group.attrs["cpu_threads"] == 1
        assert (group.attrs["torch_version"], group.attrs["transformers_version"]) == (torch.__version__,
                                                                                      transformers.__version__)
        return (out / "weights" / "run" / "final.safetensors").read_bytes(), group.attrs["cpu_kernels"]

    by_config = train("config", "avx2", clean)
    by_environment = train("environment", "native", {**clean, **kernels.PINNED_ENV["avx2"]})
    assert by_config[1] == by_environment[1] == "AVX2"
    assert by_config[0] == by_environment[0]


@pytest.mark.slow
@pytest.mark.skipif(not AVX2_CPU, reason="pinning to AVX2 needs an x86 CPU with AVX2")
def test_a_one_worker_sweep_of_given_weights_trains_on_the_pinned_kernels(tmp_path):
    """The sweep checked the weights its runs fine-tune by building the model on the CPU in its own process, which
    then ran its CPU's own kernels: a one-worker sweep of the default trained there unpinned (on an AVX-512 CPU),
    another realisation, with a warning."""
    out = tmp_path / "study"
    command = [sys.executable, "-m", "gradtrace.cli", "sweep", "experiments/default.yaml", "--out", str(out)]
    small = {"sweep.runs": 1, "sweep.reference_runs": 0, "sweep.workers": 1, "train.steps": 2, "task.n_test": 64,
             "task.n_train_eval": 0}
    done = subprocess.run([*command, *set_args(small)],
                          cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "KernelsNotPinned" not in done.stderr
    assert zarr.open_group(out / "store.zarr", mode="r")["run-000"].attrs["cpu_kernels"] == "AVX2"
