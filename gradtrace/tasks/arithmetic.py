"""The synthetic arithmetic task: deterministic test/probe sets per split and a disjoint training stream."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from gradtrace.config import ModelConfig, TaskConfig
from gradtrace.tasks import packing
from gradtrace.tasks.packing import Batch
from gradtrace.tasks.shifts import (Problem, check_splits, draw_held_out, drawing_order, get_split,
                                    import_split_modules, sampled, train_mix, warned_if_slow)
from gradtrace.tasks.tokenizer import CharTokenizer


@dataclass
class Encoded:
    """Token ids (n, L), right-padded, and a mask of answer positions (loss and exact match)."""

    tokens: np.ndarray
    answer_mask: np.ndarray
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.tokens)

    def torch(self, idx: np.ndarray | slice | None = None,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, answer_mask) as tensors, optionally a subset of rows."""
        idx = slice(None) if idx is None else idx
        return (torch.as_tensor(self.tokens[idx], device=device),
                torch.as_tensor(self.answer_mask[idx], device=device))


MAX_REDRAWS = 10_000  # draws of a training item whose prompt is held out before the pool is refused


class ArithmeticTask:
    """ID split + configured OOD shifts; test, probe and training items are disjoint by prompt."""

    def __init__(self, cfg: TaskConfig, tokenizer: CharTokenizer | None = None) -> None:
        check_splits(cfg)  # fail early on unknown names and on splits too long for max_digits
        self.cfg = cfg
        self.tokenizer = tokenizer or CharTokenizer()
        self.splits = ["ID", *cfg.shifts]  # as the results list them
        self._drawn = drawing_order(self.splits)  # as their items are drawn: the same for any order of the shifts

    # -- rendering ------------------------------------------------------------------------------------------
    def render(self, problem: Problem) -> tuple[str, str]:
        """(prompt, answer) strings of one problem in this task's format."""
        return problem.render(self.cfg.reverse_operands, self.cfg.digit_spaces)

    def encode(self, problems: list[Problem]) -> Encoded:
        """Tokenise problems as <bos> prompt answer <eos>, right-padded, with the answer mask."""
        return self.encode_rendered([self.render(p) for p in problems])

    def encode_rendered(self, rendered: list[tuple[str, str]]) -> Encoded:
        """`encode` of already rendered (prompt, answer) pairs."""
        tok = self.tokenizer
        rows, masks, prompts = [], [], []
        for prompt, answer in rendered:
            head = [tok.bos_id, *tok.encode(prompt)]
            tail = [*tok.encode(answer), tok.eos_id]
            rows.append(head + tail)
            masks.append([False] * len(head) + [True] * len(tail))
            prompts.append(prompt)
        width = max(map(len, rows), default=0)  # no items (task.n_probe=0): an empty set
        tokens = np.full((len(rows), width), tok.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for i, (r, m) in enumerate(zip(rows, masks)):
            tokens[i, : len(r)] = r
            mask[i, : len(m)] = m
        return Encoded(tokens, mask, prompts)

    # -- fixed evaluation sets ---------------------------------------------------------------------------------
    @cached_property
    def _held_out(self) -> dict[str, tuple[list[Problem], list[Problem]]]:
        """Per split: (test problems, probe problems), drawn from the task seed; never in training."""
        held_out, self.held_out_prompts = draw_held_out(self.cfg)
        return held_out

    def test_set(self, split: str) -> Encoded:
        """The split's evaluation items (task.n_test of them), encoded once."""
        return self._encoded_held_out[split][0]

    def probe_set(self, split: str) -> Encoded:
        """The split's fixed probe batch (task.n_probe items), disjoint from its test items."""
        return self._encoded_held_out[split][1]

    @cached_property
    def _encoded_held_out(self) -> dict[str, tuple[Encoded, Encoded]]:
        return {name: (self.encode(test), self.encode(probe)) for name, (test, probe) in self._held_out.items()}

    @cached_property
    def items_digest(self) -> str:
        """A digest of every item a run sees, as tokens: each split's test and probe items and the training pool.
        Runs that share it were trained and scored on the same items (a run records it; a sweep or resume refuses
        to join runs of another)."""
        digest = hashlib.sha256()
        parts = [(split, part) for split in self.splits for part in self._encoded_held_out[split]]
        for name, encoded in [*parts, ("pool", self.train_pool)]:
            digest.update(f"{name} {encoded.tokens.shape} {encoded.tokens.dtype}".encode())
            digest.update(encoded.tokens.tobytes() + encoded.answer_mask.tobytes())
        return digest.hexdigest()[:16]

    # -- training stream ---------------------------------------------------------------------------------------
    @cached_property
    def train_pool(self) -> Encoded:
        """task.pool_size training items from the mix, none of whose prompts is a test or probe prompt."""
        return self._pool[0]

    def train_eval_set(self, split: str) -> Encoded:
        """The first task.n_train_eval training-pool items of `split`'s training form (fewer where the pool holds
        fewer, none where the split has no share of the mix): the items of a run's train accuracy on it."""
        return self._train_eval_sets[split]

    @cached_property
    def _train_eval_sets(self) -> dict[str, Encoded]:
        pool, forms = self._pool
        out = {}
        for split in self.splits:
            idx = np.flatnonzero(forms == self._drawn.index(split))[: self.cfg.n_train_eval]
            out[split] = Encoded(pool.tokens[idx], pool.answer_mask[idx], [pool.prompts[j] for j in idx])
        return out

    @cached_property
    def _pool(self) -> tuple[Encoded, np.ndarray]:
        """The training pool and, per item, the index in the drawing order of the split whose training form it is."""
        held = self._held_out and self.held_out_prompts
        mix = train_mix(self.cfg)
        names, probs = self._drawn, np.array([mix[name] for name in self._drawn])
        rng = np.random.default_rng([self.cfg.seed, 10_000])
        picks = rng.choice(len(names), size=self.cfg.pool_size, p=probs)
        items: list[tuple[str, str]] = []
        with warned_if_slow(lambda: names[picks[min(len(items), len(picks) - 1)]], self.cfg.max_digits,
                            f"another of the training pool's {self.cfg.pool_size} items (task.pool_size)",
                            drawn=lambda: len(items)):
            for k in picks:
                split = get_split(names[k])
                for _ in range(MAX_REDRAWS):
                    rendered = self.render(sampled(split.name, lambda: split.train(rng, self.cfg.max_digits)))
                    if rendered[0] not in held:
                        items.append(rendered)
                        break
                else:
                    raise ValueError(f"the test and probe sets hold (nearly) every prompt of split {names[k]!r}'s "
                                     "training form: none is left to train on; lower task.n_test or task.n_probe, "
                                     "or raise task.max_digits")
        return self.encode_rendered(items), picks

    def train_batch(self, step: int, data_seed: int, batch_size: int,
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of optimizer step `step`, right-padded: a pure function of (data_seed, step), so resuming is
        exact."""
        return self.train_pool.torch(self._batch_items(step, data_seed, batch_size), device)

    def train_batches(self, step: int, data_seeds: list[int], batch_size: int, device: str | torch.device = "cpu",
                      pack: bool = True) -> list[Batch]:
        """Step `step`'s batch for each data seed (the same items as `train_batch`), packed into rows of
        `pack_width` (with equal row counts, so they stack) or padded."""
        picks = [self._batch_items(step, seed, batch_size) for seed in data_seeds]
        if not pack:
            return [Batch(*self.train_pool.torch(idx, device)) for idx in picks]
        pool = self.train_pool
        return packing.pack([(pool.tokens[idx], pool.answer_mask[idx]) for idx in picks], self.pack_width, device)

    @cached_property
    def pack_width(self) -> int:
        """Tokens per packed row: 1.5 × the longest training item, so that long items pair with short ones."""
        return math.ceil(1.5 * self.train_pool.tokens.shape[1])

    def _batch_items(self, step: int, data_seed: int, batch_size: int) -> np.ndarray:
        return np.random.default_rng([data_seed, step]).integers(0, self.cfg.pool_size, batch_size)

    def example(self, split: str) -> str:
        """One rendered test item of `split`, prompt and answer."""
        prompt, answer = self.render(self._held_out[split][0][0])
        return f"{prompt}{answer}"


def task_for(task: TaskConfig, model: ModelConfig) -> ArithmeticTask:
    """The task a run trains on (with the model's own tokenizer when pretrained), built once per process for each
    task config and text of its `task.modules` files: a sweep worker reuses its test sets and training pool across
    runs instead of rebuilding them (a dask worker serving study after study built a split file's task once, however
    the file was edited since)."""
    tokenizer = model.name if model.pretrained else None
    return _cached_task(json.dumps(dataclasses.asdict(task), sort_keys=True), tokenizer,
                        import_split_modules(task.modules))


@lru_cache(maxsize=4)
def _cached_task(task_json: str, tokenizer_name: str | None, modules_loaded: tuple[str, ...]) -> ArithmeticTask:
    """`modules_loaded` only keys the cache: the names `import_split_modules` ran the task's modules under (a file's
    holds a digest of its text)."""
    tokenizer = CharTokenizer.from_pretrained(tokenizer_name) if tokenizer_name else None
    return ArithmeticTask(TaskConfig(**json.loads(task_json)), tokenizer)
