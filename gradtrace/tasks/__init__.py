"""Synthetic arithmetic with one token per digit and a registry of named OOD shifts.

Names load on first use (PEP 562): the split registry (`gradtrace.tasks.shifts`) imports without torch, so a dry
run checks a config's splits in a second.
"""
import importlib

_HOMES = {"ArithmeticTask": "arithmetic", "Encoded": "arithmetic", "task_for": "arithmetic", "Batch": "packing",
          "item_lengths": "packing", "CharTokenizer": "tokenizer", "Problem": "shifts", "Split": "shifts",
          "REGISTRY": "shifts", "get_split": "shifts", "register_split": "shifts", "PROBE_LOSSES": "losses",
          "probe_loss_functions": "losses", "answer_cross_entropy": "losses", "worst_margin_loss": "losses",
          "exact_match": "losses"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'gradtrace.tasks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gradtrace.tasks.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
