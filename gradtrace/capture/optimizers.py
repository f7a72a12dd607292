"""What capture knows of optimizers: several stepped as one (`ChainedOptimizer(muon, adamw)`, for a model whose
parameters they share out), the wrappers around an optimizer (which one's step hooks see the whole step, which one's
state holds Adam's moments), and the optimizers whose steps or moments cannot be recorded (`check_optimizer`).

torch's `Muon` steps matrices only, so its recipe pairs it with AdamW for the rest; attached to either, a Recorder
sees half a training step (its `update` reads 0 for the other's tensors). Chained, one `step()` steps each in turn
and the Recorder, attached to the chain, records the whole Δθ, and Adam's moments of the tensors Adam holds::

    opt = ChainedOptimizer(torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=3e-4))
    rec = attach(model, opt, "out", total_steps=N)          # then opt.zero_grad(), loss.backward(), opt.step()

The chain is a `torch.optim.Optimizer`, so LR schedulers, `GradScaler`, accelerate and the Trainer take it as one:
its `param_groups` are its optimizers' own groups, in order, and its `state` looks each tensor up in theirs.
"""
from __future__ import annotations

import sys
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
        prepared = [type(o).__name__ for o in optimizers if _package(o) == "accelerate"]
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
        """Each optimizer's state dict, in order; the chain's own state-dict hooks run as torch's Optimizer's do."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state_dict = _hooked(post_hook(self, state_dict), state_dict)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what `state_dict()` saved into each optimizer (the chain's load hooks run as torch's Optimizer runs
        them: the pre-hooks may give another state dict)."""
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = _hooked(pre_hook(self, state_dict), state_dict)
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(f"not the state of a chain of {len(self.optimizers)} optimizers: load what this "
                             "chain's state_dict() saved")
        for optimizer, state in zip(self.optimizers, saved):
            optimizer.load_state_dict(state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizers": self.optimizers, "defaults": self.defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.state = ChainedState(self.optimizers)

    def __repr__(self) -> str:
        inner = ",\n".join("    " + repr(o).replace("\n", "\n    ") for o in self.optimizers)
        return f"{type(self).__name__}(\n{inner}\n)"


def _hooked(result: dict[str, Any] | None, state_dict: dict[str, Any]) -> dict[str, Any]:
    """What a state-dict hook gave in place of `state_dict` (None: it is kept)."""
    return state_dict if result is None else result


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose step hooks run around the whole step: the outermost of the wrappers holding the next as
    `.optimizer` that runs step hooks of its own, or, under SAM and its kin, the `.base_optimizer`. accelerate's
    `AcceleratedOptimizer` runs none (its step calls the one it holds, skipping it on gradient-accumulation
    micro-steps); a Lookahead does (its step moves the parameters after its base optimizer's step), so its hooks see
    the whole Δθ; SAM's `second_step` puts the parameters back and steps its base optimizer with the gradient taken
    at the perturbed point, so the base's hooks see that gradient and the whole Δθ (SAM's own `step` is not called
    by loops that call `first_step` and `second_step`)."""
    while True:
        if isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and not runs_step_hooks(optimizer):
            optimizer = optimizer.optimizer
        elif isinstance(getattr(optimizer, "base_optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.base_optimizer
        else:
            return optimizer


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer at the end of the wrappers, each holding the next as `.optimizer` (or `.base_optimizer`): the one
    whose state holds Adam's moments (a Lookahead's AdamW)."""
    while True:
        inner = getattr(optimizer, "optimizer", None)
        inner = inner if isinstance(inner, torch.optim.Optimizer) else getattr(optimizer, "base_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            return optimizer
        optimizer = inner


def moment_holders(optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, ...]:
    """The optimizers whose states hold Adam's moments: the base optimizer, or a chain's optimizers, each its base."""
    optimizer = base_optimizer(optimizer)
    if isinstance(optimizer, ChainedOptimizer):
        return tuple(base_optimizer(o) for o in optimizer.optimizers)
    return (optimizer,)


def moments_view(optimizer: torch.optim.Optimizer) -> Callable[[dict], Mapping]:
    """How to read one tensor's state of `optimizer` (a moment holder) under torch's names (`exp_avg`, `exp_avg_sq`,
    `step`): as it is, or, for bitsandbytes' optimizers, through `BitsAndBytesMoments`."""
    return BitsAndBytesMoments if _package(optimizer) == "bitsandbytes" else _as_it_is


def _as_it_is(state: dict) -> dict:
    return state


class BitsAndBytesMoments(Mapping):
    """One tensor's bitsandbytes optimizer state under torch's names: `exp_avg` its `state1`, `exp_avg_sq` its
    `state2` (Lion's and the momentum optimizers' keep only state1), dequantized as read where they are 8-bit (by
    bitsandbytes' blockwise dequantization, with the blocks of 256 its optimizers quantize in), and `step`."""

    NAMES = {"exp_avg": "1", "exp_avg_sq": "2"}
    BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizers quantize their state in blocks of 256

    def __init__(self, state: dict) -> None:
        self.state, self._read = state, {}

    def _name(self, key: str) -> str | None:
        if key == "step":
            return "step" if "step" in self.state else None
        n = self.NAMES.get(key)
        return f"state{n}" if n is not None and f"state{n}" in self.state else None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._name(key) is not None

    def __getitem__(self, key: str) -> Any:
        name = self._name(key) if isinstance(key, str) else None
        if name is None:
            raise KeyError(key)
        if key not in self._read:
            value = self.state[name]
            if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                # bitsandbytes' own dequantization, imported with its optimizers (gradtrace imports nothing of it)
                functional = sys.modules["bitsandbytes.functional"]
                n = self.NAMES[key]
                value = functional.dequantize_blockwise(value, absmax=self.state[f"absmax{n}"],
                                                        code=self.state[f"qmap{n}"], blocksize=self.BLOCKSIZE)
            self._read[key] = value
        return self._read[key]

    def __iter__(self) -> Iterator[str]:
        return (key for key in (*self.NAMES, "step") if key in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _package(obj: Any) -> str:
    """The top package of an object's class (`bitsandbytes` for bitsandbytes' optimizers): how other libraries'
    optimizers are known without importing them."""
    return type(obj).__module__.partition(".")[0]


def runs_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step runs its own step hooks (it was set up by `torch.optim.Optimizer.__init__`, or
    as it does)."""
    return "_optimizer_step_pre_hooks" in vars(optimizer) and getattr(type(optimizer).step, "hooked", False)


def count_held(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """How many of `params` the optimizer steps."""
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return sum(id(p) in optimized for p in params)


def stepped_without_adam(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """{optimizer's name: how many of `params` it steps in groups without Adam's betas}, where another group has
    them (Muon's tensors in a chain with AdamW); empty where none or all of its groups have them."""
    groups = [(type(o).__name__, g) for o in moment_holders(optimizer) for g in o.param_groups]
    if all("betas" in g for _, g in groups) or not any("betas" in g for _, g in groups):
        return {}
    ours = {id(p) for p in params}
    counts: dict[str, int] = {}
    for name, group in groups:
        if "betas" not in group:
            counts[name] = counts.get(name, 0) + sum(id(p) in ours for p in group["params"])
    return {name: n for name, n in counts.items() if n}


def check_optimizer(optimizer: Any, params: list[torch.nn.Parameter], adam_m: bool) -> None:
    """Refuse an optimizer (as given: accelerate's, DeepSpeed's wrappers around it) whose steps cannot be recorded
    for `params`, the model's trainable parameters: one that steps none of them (another model's; DeepSpeed's flat
    copies of them; transformers' layer-wise stand-in), whose step runs no step hooks, or that keeps no Adam moment
    `exp_avg` of each where `adam_m` is recorded (SGD; ZeroRedundancyOptimizer's and schedule-free ones keep theirs
    otherwise)."""
    inner = unwrap_optimizer(optimizer)
    if not count_held(params, inner):
        _refuse_optimizer(optimizer, inner)
    if not runs_step_hooks(inner):
        _refuse_unhooked(inner)
    if adam_m:
        _check_adam_moments(inner)


def _check_adam_moments(optimizer: torch.optim.Optimizer) -> None:
    """Refuse `adam_m` for an optimizer that keeps no Adam moment `exp_avg` for each parameter of its groups with
    Adam's betas, or has no such group (found only at its first step otherwise, in the writing rank's hook); in a
    chain, for any of its optimizers that keeps Adam's moments otherwise, or where none keeps them."""
    chained = moment_holders(optimizer)
    refusals = [(type(o).__name__, _adam_moments_refused(o)) for o in chained]
    otherwise = [(name, keeps) for name, keeps in refusals if keeps not in (None, "no Adam moments")]
    if otherwise:
        name, keeps = otherwise[0]
    elif all(keeps for _, keeps in refusals):
        chain = isinstance(optimizer, ChainedOptimizer)
        name = f"{type(optimizer).__name__}({', '.join(n for n, _ in refusals)})" if chain else refusals[0][0]
        keeps = "no Adam moments"
    else:
        return
    raise ValueError(f"capture.quantities has adam_m, but {name} keeps {keeps}: drop it, e.g. "
                     "CaptureConfig(quantities=['grad', 'update'])")


def _adam_moments_refused(optimizer: torch.optim.Optimizer) -> str | None:
    """What an optimizer (not a chain) keeps instead of Adam's `exp_avg` of each parameter of its groups with Adam's
    betas; None where it keeps that."""
    local = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer's, of this rank's share of the parameters
    if type(optimizer).__name__ == "ZeroRedundancyOptimizer" and "betas" in local.defaults:  # (its groups: the local's)
        return f"{type(local).__name__}'s moments sharded across ranks, each its share (v statistics read NaN)"
    if not any("betas" in group for group in optimizer.param_groups):
        return "no Adam moments"
    if _package(optimizer) == "bitsandbytes" and not getattr(getattr(optimizer, "args", None), "block_wise", True):
        return "8-bit Adam moments quantized per tensor (block_wise=False), which gradtrace does not read"
    if "ScheduleFree" in type(optimizer).__name__:  # schedulefree's, pytorch_optimizer's
        return "no Adam m (schedule-free: the sequence z stands in its place; v is read)"
    return None


def _refuse_optimizer(optimizer: Any, inner: torch.optim.Optimizer) -> None:
    """Raise for an optimizer (`inner`, unwrapped) that steps none of the model's trainable parameters, naming
    DeepSpeed's where it is among the wrappers, and transformers' stand-in for its layer-wise optimizers."""
    if type(inner).__name__ == "LayerWiseDummyOptimizer":  # transformers' optim="..._layerwise"
        raise ValueError("transformers' layer-wise optimizers (optim='..._layerwise') step each tensor inside "
                         "backward, in a gradient hook, and hand the Trainer a LayerWiseDummyOptimizer whose step does "
                         "nothing: there is no optimizer step to record. Train with the optimizer that is not "
                         "layer-wise")
    deepspeed = _deepspeed_optimizer(optimizer)
    if deepspeed is None:
        raise ValueError(f"the {type(inner).__name__} given holds none of the model's trainable parameters: pass the "
                         "optimizer that trains this model")
    raise ValueError(f"DeepSpeed's {type(deepspeed).__name__} steps flat copies of the model's parameters (ZeRO stages "
                     "1-3 partition them and their gradients and Adam moments across ranks; fp16 and bf16 keep fp32 "
                     "master copies), and gradtrace records the parameter tensors themselves: attach works under "
                     "DeepSpeed with ZeRO stage 0 in fp32. Otherwise sketch in a loop of your own the gradient "
                     "gathered whole by deepspeed.utils.safe_get_full_grad(p), called on every rank between "
                     "backward and step")


def _refuse_unhooked(optimizer: torch.optim.Optimizer) -> None:
    """Raise for an optimizer whose step runs no step hooks (one that wraps another without setting itself up as an
    optimizer: torch's PostLocalSGDOptimizer, which averages the parameters across ranks after its local one's step)."""
    local = getattr(optimizer, "optim", None)
    instead = (f": attach its local {type(local).__name__} (.optim) to record the local steps alone, without the "
               "averaging" if isinstance(local, torch.optim.Optimizer) else "")
    raise ValueError(f"the {type(optimizer).__name__} given runs no step hooks (torch.optim.Optimizer.__init__ never "
                     f"set it up), so its steps cannot be recorded{instead}")


def _deepspeed_optimizer(optimizer: Any) -> Any | None:
    """DeepSpeed's optimizer (ZeRO's, or its fp16/bf16 wrapper) among the wrappers, each holding the next as
    `.optimizer` (accelerate's around DeepSpeed's around the torch optimizer); None without one."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if _package(optimizer) == "deepspeed":
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None
