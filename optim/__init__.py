"""AdamW with the official two weight-decay groups (ALBEF), or a family's own groups and update rule (VLMo:
optim/vlmo.py, optim/adamw_hf.py)."""
from __future__ import annotations

from collections.abc import Iterable

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8


def is_no_decay(name: str, param: torch.Tensor, exempt_names: Iterable[str] = ()) -> bool:
    """Official rule: exactly one dimension or a `.bias` name; plus opt-in exact last-component names."""
    return param.ndim == 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in set(exempt_names)


VISUAL_PREFIX = "visual_encoder."


def param_groups(model: torch.nn.Module, weight_decay: float, wd_exempt_extra: Iterable[str] = (),
                 lr_mult_visual: float | None = None) -> list[dict]:
    """[no-decay group, decay group] over trainable parameters, each tensor once (tied weights shared).

    With `lr_mult_visual` (not an official setting; absent, the groups are the official two) the image encoder's
    parameters (`visual_encoder.*`) move to a third and fourth group, [no-decay, decay], marked `lr_mult`: the
    schedulers set their learning rate to the scheduled one times it (0 freezes the ViT, weight decay included)."""
    exempt = _check_exempt_names(wd_exempt_extra)
    no_decay, decay, seen = [], [], set()
    visual_no_decay, visual_decay = [], []
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad or id(param) in seen:
            continue  # momentum copies never train; a tied tensor is optimised once
        seen.add(id(param))
        visual = lr_mult_visual is not None and name.startswith(VISUAL_PREFIX)
        if is_no_decay(name, param, exempt):
            (visual_no_decay if visual else no_decay).append(param)
        else:
            (visual_decay if visual else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    if lr_mult_visual is None:
        return groups
    mult = float(lr_mult_visual)
    if not mult >= 0:
        raise ValueError(f"lr_mult_visual must be a number >= 0 (0 freezes the image encoder), got {lr_mult_visual!r}")
    if not (visual_no_decay or visual_decay):
        raise ValueError(f"lr_mult_visual is set but the model has no trainable {VISUAL_PREFIX}* parameters; "
                         f"remove the key")
    return groups + [{"params": visual_no_decay, "weight_decay": 0.0, "lr_mult": mult},
                     {"params": visual_decay, "weight_decay": weight_decay, "lr_mult": mult}]


def _check_exempt_names(names) -> set[str]:
    if names is None:
        return set()
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"wd_exempt_extra must be a list of parameter names such as [pos_embed, cls_token, temp], "
                         f"got {names!r}")
    return set(names)


def _resolve_fused(fused: bool | None, groups: list[dict]) -> bool:
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    if fused is None:
        return on_cuda
    if fused and not on_cuda:
        raise ValueError("fused AdamW needs every parameter on CUDA; move the model to the GPU first or pass "
                         "fused=None/False")
    return bool(fused)


def create_optimizer(config_optimizer: dict, model: torch.nn.Module, fused: bool | None = None,
                     wd_exempt_extra: Iterable[str] | None = None, groups: list[dict] | None = None,
                     lr_mult_visual: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the official groups, or over `groups` (a family's own, each with its lr and weight_decay).

    `lr_mult_visual`: the image encoder learns at the learning rate times this (param_groups); only with the
    project's groups.

    `optimizer.opt`: `adamW` (ALBEF; also `adamw_torch`) is torch's AdamW, fused on CUDA unless told otherwise;
    `adamw_hf` is the update of transformers 4.8.1 (optim/adamw_hf.py, VLMo). betas and eps come from
    `optimizer.betas` / `optimizer.eps` when given, else (0.9, 0.999) and 1e-8 (the ALBEF values).
    """
    opt = str(config_optimizer.get("opt", "adamW"))
    if opt.lower() not in ("adamw", "adamw_torch", "adamw_hf"):
        raise ValueError(f"optimizer.opt must be 'adamW' (the only optimiser ALBEF uses), 'adamw_torch' (the same "
                         f"torch update) or 'adamw_hf' (transformers 4.8.1 AdamW, VLMo), got {opt!r}")
    if "lr" not in config_optimizer:
        raise ValueError("optimizer block needs 'lr' (the base learning rate), e.g. optimizer: {opt: adamW, lr: 1e-4}")
    if groups is None:
        groups = param_groups(model, float(config_optimizer.get("weight_decay", 0.02)), wd_exempt_extra or (),
                              lr_mult_visual)
    elif lr_mult_visual is not None:
        raise ValueError("lr_mult_visual applies to the project's AdamW groups, but this model family builds its own "
                         "optimizer groups (e.g. VLMo's, with lr_mult_heads); remove lr_mult_visual from the config")
    if not any(group["params"] for group in groups):
        raise ValueError("create_optimizer: the model has no trainable parameters")
    betas = tuple(float(b) for b in config_optimizer.get("betas", BETAS))
    eps = float(config_optimizer.get("eps", EPS))
    if len(betas) != 2:
        raise ValueError(f"optimizer.betas must be two numbers such as [0.9, 0.98], got {list(betas)}")
    lr = float(config_optimizer["lr"])
    for group in groups:
        if "lr_mult" in group:
            group["lr"] = lr * group["lr_mult"]
    if opt.lower() == "adamw_hf":
        if fused:
            raise ValueError("optimizer.opt adamw_hf has no fused kernel; use adamw_torch for fused AdamW")
        from .adamw_hf import AdamWHF
        return AdamWHF(groups, lr=lr, betas=betas, eps=eps, correct_bias=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=_resolve_fused(fused, groups))
