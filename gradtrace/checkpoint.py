"""Resumable training state without pickle: tensors in safetensors, the rest in JSON, written atomically."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gradtrace.store import sync_to_disk


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Model parameters as safetensors (names from `named_parameters`), written whole or not at all, and synced:
    the runs of a sweep start from its base's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}, tmp)
        sync_to_disk(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: the part written gives its space back
        raise
    os.replace(tmp, path)
    sync_to_disk(path.parent)


def save_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, steps_done: int,
               optimizer_steps: int) -> None:
    """Write model, optimizer, scheduler, gradient scaler and RNG state, with the training steps done and the
    optimizer steps taken (fewer where a GradScaler skipped some); the previous checkpoint survives until the new
    one is whole."""
    tensors = {f"model.{n}": t for n, t in untied_state(model).items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    save_tensors(directory, tensors, {"steps_done": steps_done, "optimizer_steps": optimizer_steps,
                                      "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
                                      "scaler": scaler.state_dict()})


def untied_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with a tensor tied under several names (embeddings and output layer) once, under
    its first name, as `named_parameters` gives it: safetensors refuses tensors that share memory."""
    first = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {n: t for n, t in model.state_dict().items() if n in first}


def save_tensors(directory: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write named tensors (safetensors) and JSON metadata as one checkpoint, atomically: the previous one
    survives until the new one is whole."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        sync_to_disk(tmp / "state.safetensors", tmp / "state.json", tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: the part written gives its space back
        raise
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)  # left by a kill after the last save's rename: `directory` is newer
        os.replace(directory, old)
    os.replace(tmp, directory)
    sync_to_disk(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' `save_file`, its I/O errors raised as the OSError they are, naming the file (its own error type,
    no OSError, made a full disk a traceback of `gradtrace train`, and named no file), with the mode an ordinary file
    gets there: safetensors 0.8 writes 0600 whatever the umask (safetensors/safetensors#782), and a colleague who
    shares the study (umask 002 or 022) could read every file of it but its weights."""
    path.touch()
    mode = stat.S_IMODE(path.stat().st_mode)
    try:
        save_file(tensors, str(path))
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err
    os.chmod(path, mode)


def checkpoint_dir(root: Path) -> Path | None:
    """The newest whole checkpoint under `root` (a rename may have been interrupted), or None."""
    for candidate in (root, root.with_name(root.name + ".old")):
        if (candidate / "state.json").exists() and (candidate / "state.safetensors").exists():
            return candidate
    return None


def load_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> tuple[int, int]:
    """Restore a `save_state` checkpoint in place; returns (training steps done, optimizer steps taken)."""
    tensors, meta = load_tensors(directory)
    saved = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    differ = sorted(set(saved) ^ set(untied_state(model)))
    if differ:
        raise ValueError(f"checkpoint {directory} holds another model's parameters than this run's: {differ[:4]} "
                         "differ")
    model.load_state_dict(saved, strict=False)  # the tied names it leaves out share the loaded tensors
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if meta.get("scaler"):  # {} from a scaler that is off (fp32, bf16)
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["steps_done"]), int(meta.get("optimizer_steps", meta["steps_done"]))


def load_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The named tensors and metadata of a `save_tensors` checkpoint."""
    return load_file(str(directory / "state.safetensors")), load_meta(directory)


def load_meta(directory: Path) -> dict:
    """The metadata of a `save_tensors` checkpoint, without its tensors."""
    return json.loads((directory / "state.json").read_text(encoding="utf-8"))


def remove(root: Path) -> None:
    """Delete a run's checkpoints once it is complete."""
    for suffix in ("", ".tmp", ".old"):
        shutil.rmtree(root.with_name(root.name + suffix), ignore_errors=True)
