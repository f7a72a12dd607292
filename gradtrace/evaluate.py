"""Exact-match accuracy per split: one teacher-forced forward pass per batch (equal to greedy decoding)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from gradtrace.tasks import ArithmeticTask, Encoded, exact_match, item_lengths


def correctness(model: torch.nn.Module, task: ArithmeticTask, splits: list[str] | None = None,
                batch_size: int = 128) -> dict[str, np.ndarray]:
    """Per split, a bool per test item (in test-set order): does greedy decoding give exactly the answer?

    Items are batched by length and each batch is cut to its longest item, so no position past every item's end
    is computed (right padding under causal attention changes nothing before it): 11% less work on the default
    task. Batches of 128 keep a small model's activations in a CPU core's cache."""
    return _correct(model, {split: task.test_set(split) for split in splits or task.splits}, batch_size)


def train_accuracy(model: torch.nn.Module, task: ArithmeticTask, batch_size: int = 128) -> dict[str, float]:
    """Per split with a training form in the pool, exact-match accuracy on task.n_train_eval of its training items:
    the run's train accuracy (train − test is its generalisation gap)."""
    sets = {split: task.train_eval_set(split) for split in task.splits}
    return accuracy(_correct(model, {split: data for split, data in sets.items() if len(data)}, batch_size))


@torch.inference_mode()
def _correct(model: torch.nn.Module, sets: dict[str, Encoded], batch_size: int) -> dict[str, np.ndarray]:
    """Per named item set, a bool per item: is the model's greedy answer exactly right?"""
    device = next(model.parameters()).device
    out = {}
    with evaluating(model):
        for name, data in sets.items():
            right = np.empty(len(data), dtype=bool)
            for idx, width in length_batches(data, batch_size):
                tokens, mask = data.torch(idx, device)
                right[idx] = exact_match(model(input_ids=tokens[:, :width]).logits, tokens[:, :width],
                                         mask[:, :width]).cpu().numpy()
            out[name] = right
    return out


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block; after it, every submodule back in the mode it had (a loop may keep
    parts in eval mode while the rest trains: `model.train(was_training)` would switch them back on)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def length_batches(data: Encoded, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """(item indices, width) of batches of items sorted by length; width is the batch's longest item."""
    lengths = item_lengths(data.answer_mask)
    order = np.argsort(lengths, kind="stable")
    return [(order[lo:lo + batch_size], int(lengths[order[lo:lo + batch_size]].max()))
            for lo in range(0, len(order), batch_size)]


def accuracy(correct: dict[str, np.ndarray]) -> dict[str, float]:
    """Exact-match accuracy per split from per-item correctness."""
    return {split: float(c.mean()) for split, c in correct.items()}
