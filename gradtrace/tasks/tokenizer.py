"""One token per character: every digit is its own token, so no BPE chunking can blur the task."""
from __future__ import annotations

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SYMBOLS = list("0123456789+-=# ")


class CharTokenizer:
    """Maps task strings to ids, one id per character, with pad/bos/eos specials."""

    def __init__(self) -> None:
        self.vocab = [PAD, BOS, EOS] + SYMBOLS
        self.index = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of each character of `text` (no specials added)."""
        try:
            return [self.index[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the task vocabulary {SYMBOLS}") from None

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of `ids`, specials dropped."""
        return "".join(self.vocab[i] for i in ids if i > self.eos_id)
