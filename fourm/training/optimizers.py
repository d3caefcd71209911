"""The training loop's optimizer: AdamW, or Muon on the transformer's hidden matrices with AdamW on
the rest (``optim.name: muon``).

Muon (``torch.optim.Muon``) orthogonalises each 2-D update by Newton-Schulz iterations; it is meant
for hidden matrices only, so the split is: the ``nn.Linear`` weights inside the transformer blocks
go to Muon; embeddings, the output head, the pixel stem (convolutions and its patch projection),
norms, biases and LoRA adapters stay on AdamW. Muon's learning rate is matched to AdamW's update
size (``adjust_lr_fn="match_rms_adamw"``, Moonshot's rule) so one schedule drives both, scaled by
``muon_lr_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# parameters under these module names are the model's input and output layers, never Muon's
IO_MODULES = ("embed", "lm_head", "pixel_embed", "modality_embeddings")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    muon_lr_scale: float = 1.0  # Muon's learning rate / AdamW's (after the RMS match)
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per update (each costs three matmuls of the matrix)
    muon_min_dim: int = 0  # matrices whose smaller side is below this stay on AdamW

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "muon"):
            raise ValueError(f"optim.name must be 'adamw' or 'muon', got {self.name!r}")
        if self.muon_ns_steps < 1 or self.muon_lr_scale <= 0 or self.muon_min_dim < 0:
            raise ValueError("optim.muon_ns_steps must be >= 1, optim.muon_lr_scale > 0 and optim.muon_min_dim >= 0")


def muon_split(model: torch.nn.Module, min_dim: int = 0) -> tuple[list[str], list[str]]:
    """(Muon's, AdamW's) trainable parameter names of ``model``: Muon takes the 2-D weights of
    ``nn.Linear`` modules (neither under ``IO_MODULES`` nor LoRA adapters) whose smaller side is at
    least ``min_dim``; AdamW everything else."""
    linear_weights = {f"{name}.weight" if name else "weight" for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        hidden = name in linear_weights and p.dim() == 2 and not any(part in IO_MODULES for part in parts) and not any(part.startswith("lora_") for part in parts)
        (muon if hidden and min(p.shape) >= min_dim else adamw).append(name)
    return muon, adamw


def _adamw(params: list[torch.nn.Parameter], optim: OptimConfig, fused: bool) -> torch.optim.AdamW:
    """Weight decay on matrices and embeddings, none on norms and biases."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), **({"fused": True} if fused else {}))


def make_optimizer(params: list[torch.nn.Parameter] | torch.nn.Module, optim: OptimConfig, fused: bool):
    """The optimizer over ``params`` (a list: AdamW; a module: its trainable parameters, split for
    Muon when ``optim.name`` is muon). ``fused``: PyTorch's fused AdamW kernel (288 against 309 ms
    an encdec_tiny step of 8 on 2 CPU cores, the same weights within 2e-6 after 14 steps); off
    under DeepSpeed, which steps its own flat partitions."""
    if isinstance(params, torch.nn.Module):
        model = params
        if optim.name == "muon":
            named = dict(model.named_parameters())
            muon_names, adamw_names = muon_split(model, optim.muon_min_dim)
            muon = torch.optim.Muon([named[n] for n in muon_names], lr=optim.lr, weight_decay=optim.weight_decay, momentum=optim.muon_momentum, ns_steps=optim.muon_ns_steps, adjust_lr_fn="match_rms_adamw")
            for group in muon.param_groups:
                group["lr_scale"] = optim.muon_lr_scale
                group["lr"] = optim.lr * optim.muon_lr_scale
            return MuonWithAdamW(muon, _adamw([named[n] for n in adamw_names], optim, fused))
        params = [p for p in model.parameters() if p.requires_grad]
    elif optim.name == "muon":
        raise ValueError("optim.name=muon needs the model (its parameter names), not a list of parameters")
    return _adamw(params, optim, fused)


class MuonWithAdamW:
    """Muon and AdamW stepped as one optimizer: ``param_groups`` (Muon's first), ``step``,
    ``zero_grad``, and one ``state_dict`` whose parameter indices run on across both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({int(k) + offset: v for k, v in sd["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups, offset = list(sd["param_groups"]), 0
        if len(groups) != sum(len(opt.param_groups) for opt in self.optimizers):
            raise ValueError(f"optimizer state of {len(groups)} parameter groups does not fit Muon + AdamW's {len(self.param_groups)}: resume with the optimizer the run started with")
        for opt in self.optimizers:
            own, groups = groups[: len(opt.param_groups)], groups[len(opt.param_groups):]
            n = sum(len(g["params"]) for g in own)
            state = {int(k) - offset: v for k, v in sd["state"].items() if offset <= int(k) < offset + n}
            opt.load_state_dict({"state": state, "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in own]})
            offset += n
