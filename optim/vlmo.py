"""VLMo's optimiser parameter groups (official `vlmo_utils.set_schedule`; VLMo spec section 12.1).

A parameter is no-decay iff its name contains one of NO_DECAY as a substring (so `relative_position_bias_table`,
`q_bias` and `v_bias` are not decayed, while `norm2_text.weight` and the LayerNorms inside the classifier
Sequentials are); it is a head parameter iff its name contains one of HEADS. Four groups, in the official order:
(decay, body), (no-decay, body), (decay, head) and (no-decay, head); the head groups learn at lr x lr_mult_heads.
"""
from __future__ import annotations

import torch

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias", "norm1.weight",
            "norm2.bias", "norm2.weight")
HEADS = ("vqa_classifier", "nlvr2_classifier")


def is_no_decay(name: str) -> bool:
    """The official substring rule."""
    return any(s in name for s in NO_DECAY)


def is_head(name: str) -> bool:
    """A task classifier parameter (learns at lr x lr_mult_heads)."""
    return any(s in name for s in HEADS)


def vlmo_param_groups(model: torch.nn.Module, config: dict) -> list[dict]:
    """The four official groups over the trainable parameters (frozen ones, stage 2's, never get a gradient and are
    left out), each with its own lr and weight_decay; the head groups are empty for models without a classifier."""
    opt = config["optimizer"]
    lr, wd = float(opt["lr"]), float(opt.get("weight_decay", 0.01))
    head_lr = lr * float(config.get("lr_mult_heads", 1))
    groups = [{"params": [], "weight_decay": wd, "lr": lr}, {"params": [], "weight_decay": 0.0, "lr": lr},
              {"params": [], "weight_decay": wd, "lr": head_lr}, {"params": [], "weight_decay": 0.0, "lr": head_lr}]
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[2 * is_head(name) + is_no_decay(name)]["params"].append(param)
    return groups
