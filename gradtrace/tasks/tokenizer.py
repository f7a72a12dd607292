"""One token per character: every digit is its own token, so no BPE chunking can blur the task."""
from __future__ import annotations

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SYMBOLS = list("0123456789+-=# ")


class CharTokenizer:
    """Maps task strings to ids, one id per character, with pad/bos/eos specials.

    By default ids are 0..17 (for models built from a config). `from_pretrained` maps each character to the id
    a pretrained model's own tokenizer gives it, so pretrained embeddings see the digits they know.
    """

    def __init__(self, ids: dict[str, int] | None = None, vocab_size: int | None = None) -> None:
        self.ids = ids or {tok: i for i, tok in enumerate([PAD, BOS, EOS] + SYMBOLS)}
        self.pad_id, self.bos_id, self.eos_id = self.ids[PAD], self.ids[BOS], self.ids[EOS]
        self._text = {i: tok for tok, i in self.ids.items() if tok in SYMBOLS}
        self._size = vocab_size or max(self.ids.values()) + 1

    @classmethod
    def from_pretrained(cls, name: str) -> "CharTokenizer":
        """One id per character from a Hugging Face tokenizer (name or path); refuses characters it splits."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name)
        ids = {}
        for c in SYMBOLS:
            pieces = hf.encode(c, add_special_tokens=False)
            if len(pieces) != 1:
                raise ValueError(f"tokenizer {name!r} splits {c!r} into {len(pieces)} tokens; one per character needed")
            ids[c] = pieces[0]
        shared = {c for c in SYMBOLS if list(ids.values()).count(ids[c]) > 1}
        if shared:
            raise ValueError(f"tokenizer {name!r} gives {''.join(sorted(shared))!r} the same id (an unknown-token "
                             "id?); each character needs its own")
        eos = hf.eos_token_id
        ids[EOS] = eos
        ids[BOS] = hf.bos_token_id if hf.bos_token_id is not None else eos
        ids[PAD] = hf.pad_token_id if hf.pad_token_id is not None else eos
        return cls(ids, vocab_size=len(hf))

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model's embedding must hold."""
        return self._size

    def encode(self, text: str) -> list[int]:
        """Ids of each character of `text` (no specials added)."""
        try:
            return [self.ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the task vocabulary {SYMBOLS}") from None

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of `ids`, specials dropped."""
        return "".join(self._text.get(int(i), "") for i in ids)
