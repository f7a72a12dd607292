"""Several optimizers stepped as one: `ChainedOptimizer(muon, adamw)` for a model whose parameters they share out.

torch's `Muon` steps matrices only, so its recipe pairs it with AdamW for the rest; attached to either, a Recorder
sees half a training step (its `update` reads 0 for the other's tensors). Chained, one `step()` steps each in turn
and the Recorder, attached to the chain, records the whole Δθ, and Adam's moments of the tensors Adam holds::

    opt = ChainedOptimizer(torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=3e-4))
    rec = attach(model, opt, "out", total_steps=N)          # then opt.zero_grad(), loss.backward(), opt.step()

The chain is a `torch.optim.Optimizer`, so LR schedulers, `GradScaler`, accelerate and the Trainer take it as one:
its `param_groups` are its optimizers' own groups, in order, and its `state` looks each tensor up in theirs.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch


class ChainedState(Mapping):
    """A tensor's optimizer state, looked up in the chained optimizers' states at each access (a `load_state_dict`
    replaces an optimizer's state)."""

    def __init__(self, optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
        self.optimizers = optimizers

    def __getitem__(self, param: torch.Tensor) -> dict:
        for optimizer in self.optimizers:
            if param in optimizer.state:  # not optimizer.state[param]: a defaultdict would add it
                return optimizer.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (param for optimizer in self.optimizers for param in optimizer.state)

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self.optimizers)


class ChainedOptimizer(torch.optim.Optimizer):
    """Optimizers that hold disjoint parameters, stepped, zeroed, saved and loaded as one, in the order given."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError(f"ChainedOptimizer(*optimizers) takes torch.optim.Optimizer instances, got "
                            f"{[type(o).__name__ for o in optimizers] or 'none'}")
        prepared = [type(o).__name__ for o in optimizers if type(o).__module__.partition(".")[0] == "accelerate"]
        if prepared:  # its step skips gradient-accumulation micro-steps: the chain's hooks would record those
            raise TypeError(f"chain the optimizers themselves, then prepare the chain (accelerator.prepare(chain)), "
                            f"not accelerate's {prepared[0]}")
        seen: dict[int, str] = {}
        for optimizer in optimizers:
            for param in (p for g in optimizer.param_groups for p in g["params"]):
                if id(param) in seen:
                    raise ValueError(f"a parameter is held by both {seen[id(param)]} and {type(optimizer).__name__}: "
                                     "each parameter must be stepped by one of the chained optimizers")
                seen[id(param)] = type(optimizer).__name__
        self.optimizers = tuple(optimizers)
        super().__init__(self.param_groups, {})  # the step hooks' machinery; add_param_group keeps the groups theirs
        self.state = ChainedState(self.optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The chained optimizers' own groups, in order (a scheduler of the chain schedules each of them)."""
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list) -> None:
        if groups:  # torch's Optimizer.__init__ starts from []; the groups stay the chained optimizers'
            raise AttributeError("a ChainedOptimizer's param_groups are its optimizers': set theirs")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refuse a new group (add it to the chained optimizer that is to step it); those given at construction
        are the optimizers' own, kept where they are."""
        if not any(param_group is group for group in self.param_groups):
            raise TypeError("add the group to the chained optimizer that is to step it "
                            "(e.g. chain.optimizers[1].add_param_group(group))")

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Step each optimizer in turn (`closure`, if given, evaluated once, before them)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(f"not the state of a chain of {len(self.optimizers)} optimizers: load what this "
                             "chain's state_dict() saved")
        for optimizer, state in zip(self.optimizers, saved):
            optimizer.load_state_dict(state)

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizers": self.optimizers, "defaults": self.defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.state = ChainedState(self.optimizers)

    def __repr__(self) -> str:
        inner = ",\n".join("    " + repr(o).replace("\n", "\n    ") for o in self.optimizers)
        return f"{type(self).__name__}(\n{inner}\n)"
