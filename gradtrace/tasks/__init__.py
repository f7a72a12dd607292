"""Synthetic arithmetic with one token per digit and a registry of named OOD shifts."""
from gradtrace.tasks.arithmetic import ArithmeticTask, Encoded, task_for
from gradtrace.tasks.packing import Batch, item_lengths
from gradtrace.tasks.losses import (PROBE_LOSSES, answer_cross_entropy, exact_match, probe_loss_functions,
                                     worst_margin_loss)
from gradtrace.tasks.shifts import REGISTRY, Problem, Split, get_split, register_split
from gradtrace.tasks.tokenizer import CharTokenizer

__all__ = ["ArithmeticTask", "Encoded", "task_for", "Batch", "item_lengths", "CharTokenizer", "Problem", "Split",
           "REGISTRY", "get_split", "register_split", "PROBE_LOSSES", "probe_loss_functions", "answer_cross_entropy",
           "worst_margin_loss", "exact_match"]
