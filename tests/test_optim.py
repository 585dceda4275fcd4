import pytest
import torch
from torch import nn

from optim import create_optimizer, param_groups

torch.set_num_threads(1)


class Toy(nn.Module):
    """Names and shapes that exercise every branch of the official grouping rule."""

    def __init__(self):
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(0.07))               # 0-dim: decayed
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))        # 3-dim: decayed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.embeddings = nn.Embedding(10, 4)                      # table: decayed
        self.linear = nn.Linear(4, 4)                              # weight decayed, bias not
        self.norm = nn.LayerNorm(4)                                # both 1-dim: not decayed
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embeddings.weight                  # tied: appears once
        self.odd = nn.Parameter(torch.zeros(2, 1))                 # 2-dim: decayed
        self.odd_bias_matrix = nn.Module()
        self.odd_bias_matrix.bias = nn.Parameter(torch.zeros(2, 2))  # name ends in .bias: not decayed
        self.linear_m = nn.Linear(4, 4)                            # momentum copy
        for p in self.linear_m.parameters():
            p.requires_grad_(False)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted({n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids})


def test_official_groups():
    model = Toy()
    no_decay, decay = param_groups(model, 0.02)
    assert _names(model, no_decay) == ["head.bias", "linear.bias", "norm.bias", "norm.weight", "odd_bias_matrix.bias"]
    assert _names(model, decay) == ["cls_token", "embeddings.weight", "head.weight", "linear.weight", "odd",
                                    "pos_embed", "temp"]
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.02


def test_tied_and_momentum_parameters():
    model = Toy()
    groups = param_groups(model, 0.02)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    assert sum(p is model.embeddings.weight for p in all_params) == 1
    assert not any(p is model.linear_m.weight for p in all_params)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in all_params} == trainable


def test_wd_exempt_extra_moves_named_params():
    model = Toy()
    no_decay, decay = param_groups(model, 0.02, ["pos_embed", "cls_token", "temp"])
    assert {"pos_embed", "cls_token", "temp"} <= set(_names(model, no_decay))
    assert "embeddings.weight" in _names(model, decay)


def test_wd_exempt_extra_matches_last_component_exactly():
    model = nn.Module()
    model.visual_encoder = nn.Module()
    model.visual_encoder.pos_embed = nn.Parameter(torch.zeros(1, 3, 2))
    model.pos_embed_extra = nn.Parameter(torch.zeros(1, 3, 2))
    no_decay, decay = param_groups(model, 0.02, ["pos_embed"])
    assert _names(model, no_decay) == ["visual_encoder.pos_embed"]
    assert _names(model, decay) == ["pos_embed_extra"]


def test_wd_exempt_extra_rejects_a_bare_string():
    with pytest.raises(ValueError, match="list of parameter names"):
        param_groups(Toy(), 0.02, "pos_embed")


def test_create_optimizer_hyperparameters():
    opt = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, Toy())
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.02]
    for group in opt.param_groups:
        assert group["lr"] == 1e-4 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
        assert not group["amsgrad"] and not group["fused"]


def test_create_optimizer_rejects_fused_on_cpu_and_other_optimisers():
    with pytest.raises(ValueError, match="CUDA"):
        create_optimizer({"opt": "adamW", "lr": 1e-4}, Toy(), fused=True)
    with pytest.raises(ValueError, match="adamW"):
        create_optimizer({"opt": "sgd", "lr": 1e-4}, Toy())


def test_decay_is_applied_only_to_decay_group():
    model = nn.Module()
    model.w = nn.Parameter(torch.ones(2, 2))
    model.b = nn.Parameter(torch.ones(2))
    opt = create_optimizer({"opt": "adamW", "lr": 0.1, "weight_decay": 0.5}, model)
    model.w.grad = torch.zeros(2, 2)
    model.b.grad = torch.zeros(2)
    opt.step()
    # Zero gradient leaves only decoupled decay: w *= 1 - lr*wd, b untouched.
    assert torch.allclose(model.w, torch.full((2, 2), 0.95))
    assert torch.equal(model.b, torch.ones(2))


class TwoTowers(nn.Module):
    """An image encoder (visual_encoder.*), its momentum copy and a text part."""

    def __init__(self):
        super().__init__()
        self.visual_encoder = nn.Linear(3, 3)
        self.visual_encoder_m = nn.Linear(3, 3)
        for p in self.visual_encoder_m.parameters():
            p.requires_grad_(False)
        self.text = nn.Linear(3, 3)


def test_lr_mult_visual_moves_the_image_encoder_to_scaled_groups_that_the_schedule_keeps_scaled():
    from scheduler import create_scheduler
    model = TwoTowers()
    assert len(param_groups(model, 0.02)) == 2  # without the key: the official two groups, unchanged
    opt = create_optimizer({"opt": "adamW", "lr": 1e-3, "weight_decay": 0.02}, model, lr_mult_visual=0.1)
    assert [_names(model, g) for g in opt.param_groups] == [
        ["text.bias"], ["text.weight"], ["visual_encoder.bias"], ["visual_encoder.weight"]]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.02, 0.0, 0.02]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    scheduler = create_scheduler({"epochs": 4, "min_lr": 1e-5, "warmup_lr": 1e-5, "warmup_epochs": 1}, opt)
    for t in (0, 2, 3):
        lr = scheduler.step(t)
        assert scheduler.get_last_lr() == pytest.approx([lr, lr, 0.1 * lr, 0.1 * lr])
    # the multiplier survives a checkpoint: a new optimizer built the same way takes the saved groups
    again = create_optimizer({"opt": "adamW", "lr": 1e-3, "weight_decay": 0.02}, TwoTowers(), lr_mult_visual=0.1)
    again.load_state_dict(opt.state_dict())
    assert [g.get("lr_mult") for g in again.param_groups] == [None, None, 0.1, 0.1]


def test_lr_mult_visual_zero_freezes_the_image_encoder_weight_decay_included():
    model = TwoTowers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = create_optimizer({"opt": "adamW", "lr": 0.1, "weight_decay": 0.5}, model, lr_mult_visual=0)
    loss = (model.visual_encoder(torch.randn(4, 3)) + model.text(torch.randn(4, 3))).pow(2).sum()
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual_encoder."))
    assert not torch.equal(before["text.weight"], after["text.weight"])


def test_lr_mult_visual_refuses_what_it_cannot_apply():
    with pytest.raises(ValueError, match="no trainable visual_encoder"):
        param_groups(Toy(), 0.02, lr_mult_visual=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        param_groups(TwoTowers(), 0.02, lr_mult_visual=-1)
    groups = [{"params": list(TwoTowers().parameters()), "weight_decay": 0.0}]
    with pytest.raises(ValueError, match="builds its own optimizer groups"):
        create_optimizer({"opt": "adamW", "lr": 1e-3}, TwoTowers(), groups=groups, lr_mult_visual=0.5)
