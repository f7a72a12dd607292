"""Capture: seeded linear sketches, the Recorder that writes trajectories through optimizer hooks, and its
integrations (`attach` for plain / accelerate / DDP loops, `GradtraceCallback` for `transformers.Trainer`;
`ChainedOptimizer` for a model trained by several optimizers)."""
from gradtrace.capture.integrations import IdleRecorder, RunRecorder, attach, sketch_sharded
from gradtrace.capture.optimizers import ChainedOptimizer
from gradtrace.capture.recorder import Probe, Recorder, open_recorders
from gradtrace.capture.sketch import ParamLayout, Sketch, make_sketch
from gradtrace.store import check_compatible

__all__ = ["Recorder", "Probe", "Sketch", "ParamLayout", "make_sketch", "check_compatible", "attach", "RunRecorder",
           "IdleRecorder", "sketch_sharded", "GradtraceCallback", "open_recorders", "ChainedOptimizer"]


def __getattr__(name: str):
    """`GradtraceCallback` is imported on first use: it pulls in `transformers.Trainer`, which is slow to import."""
    if name == "GradtraceCallback":
        from gradtrace.capture.hf import GradtraceCallback

        return GradtraceCallback
    raise AttributeError(f"module 'gradtrace.capture' has no attribute {name!r}")
