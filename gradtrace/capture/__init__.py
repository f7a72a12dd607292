"""Capture: seeded linear sketches and the Recorder that writes trajectories through optimizer hooks."""
from gradtrace.capture.recorder import Probe, Recorder
from gradtrace.capture.sketch import ParamLayout, Sketch, check_compatible, make_sketch

__all__ = ["Recorder", "Probe", "Sketch", "ParamLayout", "make_sketch", "check_compatible"]
