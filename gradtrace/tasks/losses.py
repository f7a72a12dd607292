"""Losses on answer tokens only: cross-entropy for training, a worst-margin probe loss, exact match."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _shifted(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """Logits at positions that predict answer tokens (in float32 at least, as transformers' own losses take them:
    a bf16 model's losses and their gradients lost digits), the targets there, and the target mask."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return logits[:, :-1], tokens[:, 1:], mask[:, 1:]


def answer_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (the training loss)."""
    logits, targets, mask = _shifted(logits, tokens, mask)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    m = mask.reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum()


def answer_margins(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per item, the worst answer-token margin: target logit minus the best other logit, minimum over tokens."""
    logits, targets, mask = _shifted(logits, tokens, mask)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, targets.unsqueeze(-1), float("-inf")).amax(-1)
    margin = (target_logit - others).masked_fill(~mask, float("inf"))
    return margin.amin(-1)


def worst_margin_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean softplus(-worst margin): near exact match, it is small only when every answer token is right."""
    return F.softplus(-answer_margins(logits, tokens, mask)).mean()


def exact_match(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per item, whether greedy decoding reproduces the whole answer (teacher-forced argmax on every token)."""
    logits, targets, mask = _shifted(logits, tokens, mask)
    right = (logits.argmax(-1) == targets) | ~mask
    return right.all(-1)


PROBE_LOSSES = {"ce": answer_cross_entropy, "margin": worst_margin_loss}


def probe_loss_functions(names: list[str]) -> dict:
    """The probe losses of these names, by name; a clear error for an unknown one."""
    unknown = set(names) - set(PROBE_LOSSES)
    if unknown:
        raise ValueError(f"unknown capture.probe_losses {sorted(unknown)}; choose from {', '.join(PROBE_LOSSES)}")
    return {name: PROBE_LOSSES[name] for name in names}
