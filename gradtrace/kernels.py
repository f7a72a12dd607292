"""CPU kernel pinning: one float rounding, and so one realisation of a chaotic study, on AMD x86 CPUs with AVX2.

torch picks its CPU kernels by the instruction set it finds (AVX2, AVX-512, …), and so do the oneDNN and MKL
libraries it calls; the choices round differently, and a base run trained for hundreds of steps amplifies one
rounding into another model (experiments/README.md). Pinning all three to AVX2 gave AMD Zen 3 and Zen 4 CPUs one
base; an Intel Xeon still trained another (MKL's products take vendor-specific paths, and its setting for the same
results across vendors, MKL_CBWR=COMPATIBLE, took 1.75× the base run's time there: not used). Each reads its
setting from the environment once, when first used, so it is set before a run computes, and a process keeps its
kernels for life: the settings stay in its environment, so that the worker processes it starts run what it runs.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch's own kernels and oneDNN's: each changed a base's weights on an AVX-512 AMD CPU (MKL's setting did not: MKL
# takes its AVX2 paths on AMD CPUs; it is pinned for Intel CPUs with AVX-512, where it would not, though their AVX2
# paths are not AMD's)
PINNED_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
CHOICES = ("native", *PINNED_ENV)


class KernelsNotPinned(RuntimeWarning):
    """A run asked for pinned CPU kernels in a process that had already computed with others."""


class OtherArithmetic(UserWarning):
    """Runs of one study, or one run's steps before and after a resume, trained with other code, releases, device, CPU,
    its kernels or threads (`RECORDED`): their float rounding differs, so a chaotic run's realisation may too."""


def changes(recorded, now: dict) -> dict:
    """The entries of `now` (`attrs`) that `recorded` (a run's attributes) holds with another value; keys a run
    recorded before they were added are not compared."""
    return {key: value for key, value in now.items() if key in recorded and recorded[key] != value}


def describe_changes(recorded, changed: dict) -> str:
    """`changes` in words: "torch_version 2.12.0 → 2.13.0; cpu_threads 2 → 1"."""
    return "; ".join(f"{key} {recorded[key]} → {value}" for key, value in changed.items())


def in_use() -> str:
    """The CPU kernels this process runs, as torch names them (e.g. AVX2, AVX512, DEFAULT)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def code_fingerprint() -> str:
    """A hash of gradtrace's source files: whether two processes run the same gradtrace (its version number stays
    the same between commits)."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# what a run records of what computed it (`attrs`): a difference in any can change a chaotic run's float rounding
RECORDED = ("gradtrace_code", "torch_version", "transformers_version", "device", "cpu", "cpu_kernels", "cpu_threads")


@functools.cache
def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """This machine's CPU as its system names it: on Linux the model name of `cpuinfo` with the vendor, family and
    model numbers that set which kernel paths MKL takes ("AMD EPYC (AuthenticAMD family 26 model 2)": a VM's model
    name may leave out the generation); on ARM Linux, which names no model, the architecture with the core's
    implementer and part ("aarch64 (CPU implementer 0x41 part 0xd40)": Neoverse V1, whose SVE kernels round
    otherwise than N1's); on macOS its brand ("Apple M2 Pro"); elsewhere `platform.processor()`, or the
    architecture."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:  # the first processor's entries, up to the blank line that ends them
                key, colon, value = line.partition(":")
                if not colon and fields:
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    core = [fields.get(key) for key in ("CPU implementer", "CPU part")]
    if "model name" not in fields and all(core):
        return f"{platform.machine() or 'ARM'} (CPU implementer {core[0]} part {core[1]})"
    name = fields.get("model name") or _mac_brand() or platform.processor() or platform.machine() or "unknown"
    numbers = [fields.get(key) for key in ("vendor_id", "cpu family", "model")]
    return f"{name} ({numbers[0]} family {numbers[1]} model {numbers[2]})" if all(numbers) else name


def _mac_brand() -> str:
    """macOS's name of its CPU ("Apple M2 Pro"; `platform.processor()` says only "arm"), "" elsewhere."""
    if platform.system() != "Darwin":
        return ""
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict:
    """The part of `attrs` a process knows before it computes: gradtrace's code (`code_fingerprint`: its version
    number stays the same between commits) and the versions of torch and transformers (the model's code), whose
    kernels change between releases."""
    import torch
    import transformers

    return {"gradtrace_code": code_fingerprint(), "torch_version": torch.__version__,
            "transformers_version": transformers.__version__}


def attrs(device: torch.device) -> dict:
    """What a run records of the arithmetic it trained with (`RECORDED`): `versions`, the device (`cpu`, `mps` or
    the GPU's name: on a GPU `train.precision: auto` is bf16), on the CPU which one (`cpu_name`: CPUs of two vendors
    round otherwise with the same kernels pinned), and torch's CPU kernels and thread count."""
    import torch

    return {**versions(), "device": device_name(device), **({"cpu": cpu_name()} if device.type == "cpu" else {}),
            "cpu_kernels": in_use(), "cpu_threads": torch.get_num_threads()}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the kind of device (`cpu`, `mps`)."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def device_kind(recorded_device: str) -> str:
    """A run's recorded `device` as the kind of device it names: `cpu`, `mps`, or `cuda` for a GPU's name."""
    return recorded_device if recorded_device in ("cpu", "mps") else "cuda"


def describe(recorded) -> str:
    """What a run's attributes record of its arithmetic, in words: "torch 2.13.0, transformers 5.25.0, cpu: AMD EPYC
    (AuthenticAMD family 26 model 2), AVX2 on 2 thread(s), gradtrace code 1f0e…"; parts a run of before did not
    record are left out ("not recorded": none)."""
    if "cpu_kernels" not in recorded:
        return "not recorded"
    parts = [f"{name} {recorded[key]}" for name, key in (("torch", "torch_version"),
                                                         ("transformers", "transformers_version")) if key in recorded]
    if "device" in recorded:
        parts.append(f"{recorded['device']}: {recorded['cpu']}" if "cpu" in recorded else recorded["device"])
    parts.append(f"{recorded['cpu_kernels']} on {recorded['cpu_threads']} thread(s)")
    parts += [f"gradtrace code {recorded['gradtrace_code']}"] if "gradtrace_code" in recorded else []
    return ", ".join(parts)


def use(kernels: str, device: torch.device) -> None:
    """Pin this process's CPU kernels as `train.cpu_kernels` says, before a run on the CPU trains; warn where they
    cannot be pinned: not x86, or this process has already computed on the CPU (torch, oneDNN and MKL read their
    settings once, when first used)."""
    if kernels not in CHOICES:
        raise ValueError(f"train.cpu_kernels must be one of {', '.join(CHOICES)}, got {kernels!r}")
    if device.type != "cpu":
        return
    if kernels == "native":
        pinned = {name: os.environ[name] for env in PINNED_ENV.values() for name in env if name in os.environ}
        if pinned:  # an earlier run of this process pinned them (a dask worker's), or its environment did
            warnings.warn(f"train.cpu_kernels=native asks for this CPU's own kernels, but this process runs "
                          f"{in_use()} ({' '.join(f'{k}={v}' for k, v in pinned.items())}): train in a fresh process "
                          "without these variables", KernelsNotPinned, stacklevel=2)
        return
    env, before = PINNED_ENV[kernels], {name: os.environ.get(name) for name in PINNED_ENV[kernels]}
    if platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.update(env)  # worker processes inherit it
    if in_use().lower() != kernels:  # torch chose its kernels before this: leave the process native throughout,
        for name, value in before.items():  # not half pinned by a oneDNN that reads the variable later
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        warnings.warn(
            f"train.cpu_kernels={kernels} asks for {kernels.upper()} kernels, but this process runs {in_use()}: "
            f"its runs round as this CPU does, so a chaotic study (experiments/README.md) may take another "
            f"realisation. On x86 CPUs with {kernels.upper()}, train in a fresh process (as the gradtrace command "
            f"line does) or set {' '.join(f'{k}={v}' for k, v in env.items())} before torch computes anything.",
            KernelsNotPinned, stacklevel=2)
