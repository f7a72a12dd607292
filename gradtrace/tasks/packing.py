"""Packed batches: several items to a row, each attending only to itself, so a batch costs its tokens, not its padding.

Items of the default task are 8–16 tokens long (11.2 on average) and padded to 16: 30% of a padded batch is
padding. Packed two or three to a row of 24, each item keeps its own positions (restarting at 0) and a causal mask
confined to itself (block diagonal), so every item's logits, the loss and the gradient are those of the padded batch
up to float rounding (tested), at ~75% of the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """A training batch as a causal LM takes it: token ids and the answer mask (rows × width), and for packed rows
    each token's position within its item and the additive attention mask (rows × 1 × width × width)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The tensors a Hugging Face causal LM's forward takes for this batch, by keyword; the attention mask in
        the model's float `dtype` (CPU sdpa miscomputes a float32 mask against float64 queries)."""
        packed = {} if self.position_ids is None else {"position_ids": self.position_ids,
                                                        "attention_mask": self.attention_mask.to(dtype)}
        return {"input_ids": self.tokens, **packed}


def item_lengths(answer_mask: np.ndarray) -> np.ndarray:
    """Each right-padded item's length: its answer mask ends with its last token (the eos)."""
    return answer_mask.shape[1] - answer_mask[:, ::-1].argmax(1)


def pack(items: list[tuple[np.ndarray, np.ndarray]], width: int, device: str | torch.device = "cpu") -> list[Batch]:
    """Each batch of right-padded items, (token ids, answer mask) both n × L, packed into rows of `width` (best fit,
    longest first); every batch gets as many rows as the fullest needs, so batches of several runs stack for vmap
    (rows of padding hold no answer and attend only to padding)."""
    lengths = [item_lengths(mask) for _, mask in items]
    longest = max(int(n.max()) for n in lengths)
    if longest > width:
        raise ValueError(f"an item of {longest} tokens does not fit a packed row of {width}")
    fits = [_best_fit(n, width) for n in lengths]
    rows = max(int(row_of.max()) + 1 for row_of, _ in fits)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril_()
    out = []
    for (tokens, answer_mask), n, (row_of, start) in zip(items, lengths, fits):
        item = np.repeat(np.arange(len(n)), n)  # one entry per real token
        within = np.arange(len(item)) - np.repeat(np.cumsum(n) - n, n)
        at = (row_of[item], start[item] + within)
        packed = {"tokens": np.zeros((rows, width), dtype=tokens.dtype), "mask": np.zeros((rows, width), dtype=bool),
                  "positions": np.zeros((rows, width), dtype=np.int64),
                  "segment": np.zeros((rows, width), dtype=np.int64)}  # segment 0: padding
        packed["tokens"][at] = tokens[item, within]  # padding stays token 0, as in the items
        packed["mask"][at] = answer_mask[item, within]
        packed["positions"][at] = within
        packed["segment"][at] = item + 1
        t = {k: torch.as_tensor(v, device=device) for k, v in packed.items()}
        allowed = (t["segment"][:, :, None] == t["segment"][:, None, :]) & causal
        attention = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        out.append(Batch(t["tokens"], t["mask"], t["positions"], attention.unsqueeze(1)))
    return out


def _best_fit(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and start of each item: longest first, each into the open row it fills most tightly."""
    row_of, start = np.empty(len(lengths), dtype=np.int64), np.empty(len(lengths), dtype=np.int64)
    open_rows: list[list[int]] = [[] for _ in range(width + 1)]  # open_rows[f]: rows with f tokens free
    used: list[int] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        free = next((f for f in range(n, width + 1) if open_rows[f]), None)
        if free is None:
            row, free = len(used), width
            used.append(0)
        else:
            row = open_rows[free].pop()
        row_of[i], start[i] = row, used[row]
        used[row] += n
        open_rows[free - n].append(row)
    return row_of, start


def stack(batches: list[Batch]) -> Batch:
    """Batches of several runs (of equal shapes) stacked along a new first axis, for vmap."""
    fields = ("tokens", "mask", "position_ids", "attention_mask")
    return Batch(*(None if getattr(batches[0], f) is None else torch.stack([getattr(b, f) for b in batches])
                   for f in fields))
