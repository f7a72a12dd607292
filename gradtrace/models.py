"""Model factory: embedded GPT-NeoX (Pythia architecture) configs built offline, or any HF causal LM."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gradtrace.config import ModelConfig
from gradtrace.files import sha256_of

if TYPE_CHECKING:  # torch and transformers load on first build: reading EMBEDDED (a dry run's estimate) stays fast
    import torch
    from transformers import GPTNeoXConfig


@dataclass(frozen=True)
class NeoXShape:
    """The few numbers that size a GPT-NeoX: rotary positions and parallel residual as in Pythia."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int | None = None  # None: the task tokenizer's size
    max_positions: int = 64
    rotary_fraction: float = 1.0

    def __post_init__(self) -> None:  # refused where the shape is written, not at a sweep's first run
        if min(self.hidden, self.layers, self.heads, self.ffn, self.max_positions) < 1 or self.hidden % self.heads:
            raise ValueError(f"{self}: sizes must be >= 1 and hidden divisible by heads (each head gets "
                             "hidden // heads dimensions)")
        if not 0 < self.rotary_fraction <= 1:
            raise ValueError(f"{self}: rotary_fraction must be in (0, 1]")


OUTPUT_LAYER_NAMES = ("lm_head.", "embed_out.")  # GPT-NeoX's output layer in transformers 5 and 4

EMBEDDED: dict[str, NeoXShape] = {
    # the default study's model: ~340k parameters, lands shifts mid-range in ~1k steps on a CPU core
    "tiny": NeoXShape(hidden=96, layers=3, heads=4, ffn=384),
    # for tests and smoke runs: ~20k parameters
    "micro": NeoXShape(hidden=32, layers=2, heads=2, ffn=64),
    # EleutherAI/pythia-70m's published shape (random init here: no weights are downloaded)
    "pythia-70m": NeoXShape(hidden=512, layers=6, heads=8, ffn=2048, vocab=50304, max_positions=2048,
                            rotary_fraction=0.25),
}


def neox_config(shape: NeoXShape, vocab_size: int, attn_implementation: str = "eager") -> GPTNeoXConfig:
    """A GPTNeoXConfig for an embedded shape. The rotary fraction is spelt both ways: transformers 5 reads
    `rope_parameters`, transformers 4 `rotary_pct` (and would otherwise rotate only its default quarter of each
    head)."""
    from transformers import GPTNeoXConfig

    theta = 10000.0  # the rotary base, also spelt both ways
    config = GPTNeoXConfig(
        vocab_size=shape.vocab or vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.ffn,
        max_position_embeddings=shape.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": shape.rotary_fraction},
        rotary_pct=shape.rotary_fraction,
        rotary_emb_base=theta,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config._attn_implementation = attn_implementation
    return config


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    """A causal LM initialised from `seed` (or `cfg.init_from` weights); embedded name, HF name, or path. Seeds
    torch's global generators with `seed`, as the weights are drawn from them (`train` gives the caller's back)."""
    model = _build(cfg, vocab_size, seed)
    if cfg.init_from:
        from safetensors.torch import load_file

        from gradtrace.checkpoint import untied_state

        path = Path(cfg.init_from)
        if not path.exists():
            raise FileNotFoundError(f"model.init_from: {path} not found (expected a safetensors file of weights, "
                                    "e.g. DIR/weights/base/final.safetensors)")
        weights, own = in_this_release(load_file(str(path)), model), model.state_dict()
        other = [f"{n} {tuple(w.shape)}, not {tuple(own[n].shape)}" for n, w in weights.items()
                 if n in own and w.shape != own[n].shape]
        if other:  # torch would list every one, in a RuntimeError
            raise ValueError(f"model.init_from: {path} holds weights of other shapes than model {cfg.name!r}'s: "
                             f"{'; '.join(other[:3])}{' …' if len(other) > 3 else ''}{ANOTHER_START}")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        untied = untied_state(model)  # a tied layer is saved under its first name only
        if unexpected or [m for m in missing if "rotary" not in m and m in untied]:
            raise ValueError(f"model.init_from: {path} does not match model {cfg.name!r} "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]}){ANOTHER_START}")
    return model


ANOTHER_START = ("; give weights of this model, or set model.init_from=null to start from a random init (the default "
                 "config fine-tunes its shipped base, the tiny model's)")


def weights_digest(path: str | Path) -> str:
    """The first 16 hex digits of the sha256 of a weights file: a run records it (`init_digest`), so the same
    weights at another path (a study moved, gradtrace installed anew) are known for the same start."""
    return sha256_of(path)[:16]


def start_attrs(cfg: ModelConfig) -> dict:
    """What a run records of the weights it started from (`init_digest`): nothing for a random init."""
    return {"init_digest": weights_digest(cfg.init_from)} if cfg.init_from else {}


def check_init_from(cfg: ModelConfig) -> None:
    """Refuse `cfg.init_from` weights the model cannot take before a sweep trains, whose every run would fail on
    them at its start: the model built once from its config on the meta device, which computes nothing (a model
    built on the CPU fixed the process's CPU kernels before a run trained there could pin them: `kernels.use`),
    torch's global generators left as they were. A pretrained model is left to its runs (its vocabulary is its
    tokenizer's, looked up on the hub)."""
    import warnings

    import torch

    from gradtrace.tasks.tokenizer import CharTokenizer

    if cfg.init_from and not cfg.pretrained:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "for .*: copying from a non-meta parameter", UserWarning)
            build_model(cfg, CharTokenizer().vocab_size, seed=0)


def in_this_release(weights: dict, model: torch.nn.Module) -> dict:
    """Weights saved by either transformers release under this model's names: GPT-NeoX's output layer is
    `embed_out` in transformers 4 and `lm_head` in 5, the same weights either way (4.57.6 and 5.24.0 train the
    default's base bit for bit alike: experiments/README.md)."""
    names = model.state_dict().keys()
    ours = next((p for p in OUTPUT_LAYER_NAMES if any(n.startswith(p) for n in names)), None)
    if ours is None:
        return weights
    theirs = next(p for p in OUTPUT_LAYER_NAMES if p != ours)
    return {ours + k.removeprefix(theirs) if k.startswith(theirs) else k: v for k, v in weights.items()}


def _build(cfg: ModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    name = cfg.name.removeprefix("EleutherAI/") if cfg.name.removeprefix("EleutherAI/") in EMBEDDED else cfg.name
    if name in EMBEDDED and not cfg.pretrained:
        shape = EMBEDDED[name]
        if shape.vocab is not None and shape.vocab < vocab_size:
            raise ValueError(f"model {name} has {shape.vocab} token ids; the task needs {vocab_size}")
        return GPTNeoXForCausalLM(neox_config(shape, vocab_size, cfg.attn_implementation))
    config = _hub_config(cfg)
    if cfg.pretrained:
        return AutoModelForCausalLM.from_pretrained(cfg.name, attn_implementation=cfg.attn_implementation)
    if config.vocab_size < vocab_size:
        raise ValueError(f"model {cfg.name} has {config.vocab_size} token ids; the task needs {vocab_size}")
    return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)


def from_hub(cfg: ModelConfig) -> bool:
    """Whether the model comes from the Hugging Face hub (or a local path): not embedded, or pretrained weights."""
    return cfg.name.removeprefix("EleutherAI/") not in EMBEDDED or cfg.pretrained


def check_model(cfg: ModelConfig) -> None:
    """Refuse a model name that is neither embedded nor reachable, before anything trains (a model from the hub:
    its config only is fetched)."""
    if cfg.pretrained and cfg.name in EMBEDDED:  # the hub's pythia-70m is EleutherAI/pythia-70m
        raise ValueError(f"model.pretrained loads a hub model's weights, and the embedded {cfg.name!r} is built from "
                         "its config, with none to load: drop model.pretrained, or name a hub model "
                         "(EleutherAI/pythia-70m)")
    if from_hub(cfg):
        _hub_config(cfg)


def _hub_config(cfg: ModelConfig):
    """The transformers config of a Hugging Face model name or local path, or a clear error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.name)
    except OSError as err:
        close = embedded_like(cfg.name)
        raise ValueError(
            f"model {cfg.name!r} is neither embedded ({', '.join(EMBEDDED)}) nor reachable as a Hugging Face "
            f"name or local path ({err}). Use an embedded name{f' (did you mean {close!r}?)' if close else ''}, "
            "or download it where the hub is reachable.") from None


def embedded_like(name: str) -> str | None:
    """The embedded model name `name` looks like a misspelling of, if any (`micr0`: `micro`)."""
    close = difflib.get_close_matches(name, list(EMBEDDED), 1)
    return close[0] if close else None


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
