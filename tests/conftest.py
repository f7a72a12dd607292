"""Shared fixtures: tiny configs that train in seconds on one CPU thread."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from gradtrace import config, kernels

# Tests build models from configs and never reach the Hugging Face hub; where it is unreachable (no network, as on
# CI), a name the hub is asked for would cost its client's five retries (~25 s) before the refusal a test checks.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
# Tests send Ctrl-C (SIGINT) to themselves and to the sweeps they start. A test run started in the background of a
# script (`make test &`, nohup) inherits SIGINT ignored, and so do its children: those tests then failed, testing
# nothing of gradtrace. Ctrl-C is given back to the test process, and through it to its children.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):
    """Tests leave recorders open where a loop was killed or interrupted: as the test process ends, their runs are
    throwaway, not to be marked failed by the exit handler (`capture.integrations._fail_unclosed`, tested in a
    process of its own)."""
    from gradtrace.capture import integrations

    integrations._OPENED_HERE.clear()


TINY = {"model.name": "micro", "model.init_from": None, "train.steps": 40, "train.batch_size": 16, "train.warmup": 5,
        "task.n_test": 64, "task.n_probe": 16, "task.pool_size": 4096, "capture.dim": 128, "capture.probe_every": 20,
        "train.checkpoint_every": 16, "capture.chunk": 8, "train.device": "cpu"}


# Parametrize a test over these to run it on a GPU too where there is one (skipped elsewhere).
DEVICES = ["cpu",
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def set_args(settings: dict) -> list[str]:
    """Config keys as the command line's `--set key=value` arguments."""
    return [a for k, v in settings.items() for a in ("--set", f"{k}={'null' if v is None else v}")]


def tiny_config(**overrides) -> config.Config:
    """A config small enough for unit tests; keyword overrides use double underscores for dots."""
    return config.load(None, {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}})


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(autouse=True)
def unpinned_kernels():
    """Each test starts without the kernel-pinning variables and leaves none behind: a run that pins them
    (`train.cpu_kernels`) writes them to this process's environment, and the next test's subprocesses would inherit
    them."""
    saved = dict(os.environ)
    for name in kernels.PINNED_ENV["avx2"]:
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def split_registry():
    """The split registry as it was before the test, restored after: splits a test registers (and the files of
    `task.modules` it ran) leave with it."""
    import sys

    from gradtrace.tasks import REGISTRY

    saved, modules = dict(REGISTRY), set(sys.modules)
    yield REGISTRY
    REGISTRY.clear()
    REGISTRY.update(saved)
    for name in set(sys.modules) - modules:
        if name.startswith("gradtrace_splits_"):
            del sys.modules[name]
