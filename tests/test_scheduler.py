import pytest
import torch
from torch import nn

from scheduler import (CosineLRScheduler, create_scheduler, cosine_lr, epoch_end, epoch_start, lr_at, warmup_index,
                       warmup_step)

torch.set_num_threads(1)


def _config(lr, epochs, min_lr, warmup_epochs, warmup_lr=1e-5):
    return {"optimizer": {"opt": "adamW", "lr": lr, "weight_decay": 0.02},
            "schedular": {"sched": "cosine", "lr": lr, "epochs": epochs, "min_lr": min_lr, "decay_rate": 1,
                          "warmup_lr": warmup_lr, "warmup_epochs": warmup_epochs, "cooldown_epochs": 0}}


PRETRAIN = _config(1e-4, 30, 1e-5, 20)
COCO = _config(1e-5, 5, 1e-6, 1)
FLICKR = _config(1e-5, 10, 1e-6, 1)
VQA = _config(2e-5, 8, 1e-6, 4)
NLVR = _config(2e-5, 10, 1e-6, 1)
VE = _config(2e-5, 5, 1e-6, 1)

# The official learning-rate curves at epochs 1, 2, ... (three significant digits).
TABLE_EPOCHS = [
    (PRETRAIN, [9.98e-5, 9.90e-5, 9.78e-5, 9.61e-5, 9.40e-5, 9.14e-5, 8.84e-5, 8.51e-5, 8.15e-5, 7.75e-5, 7.33e-5,
                6.89e-5, 6.44e-5, 5.97e-5, 5.50e-5, 5.03e-5, 4.56e-5, 4.11e-5, 3.67e-5, 3.25e-5, 2.85e-5, 2.49e-5,
                2.16e-5, 1.86e-5, 1.60e-5, 1.39e-5, 1.22e-5, 1.10e-5, 1.02e-5]),
    (COCO, [9.14e-6, 6.89e-6, 4.11e-6, 1.86e-6]),
    (FLICKR, [9.78e-6, 9.14e-6, 8.15e-6, 6.89e-6, 5.50e-6, 4.11e-6, 2.85e-6, 1.86e-6, 1.22e-6]),
    (VQA, [1.93e-5, 1.72e-5, 1.41e-5, 1.05e-5, 6.86e-6, 3.78e-6, 1.72e-6]),
    (NLVR, [1.95e-5, 1.82e-5, 1.61e-5, 1.34e-5, 1.05e-5, 7.56e-6, 4.92e-6, 2.81e-6, 1.46e-6]),
    (VE, [1.82e-5, 1.34e-5, 7.56e-6, 2.81e-6]),
]


def _three_digits(x):
    return float(f"{x:.3g}")


@pytest.mark.parametrize("config,expected", TABLE_EPOCHS)
def test_epoch_lrs_match_table(config, expected):
    epochs = config["schedular"]["epochs"]
    assert len(expected) == epochs - 1
    got = [_three_digits(lr_at(config, e, 0)) for e in range(1, epochs)]
    assert got == expected


def test_pretrain_epoch0_staircase():
    assert lr_at(PRETRAIN, 0, 0) == pytest.approx(1e-5)
    assert lr_at(PRETRAIN, 0, 100) == pytest.approx(1e-5)
    assert lr_at(PRETRAIN, 0, 101) == pytest.approx(1.45e-5)
    assert lr_at(PRETRAIN, 0, 200) == pytest.approx(1.45e-5)
    assert lr_at(PRETRAIN, 0, 201) == pytest.approx(1.9e-5)
    assert lr_at(PRETRAIN, 0, 2000) == pytest.approx(9.55e-5)
    assert lr_at(PRETRAIN, 0, 2001) == pytest.approx(1e-4)
    assert lr_at(PRETRAIN, 0, 50000) == pytest.approx(1e-4)


def test_vqa_staircase():
    starts = {0: 1e-5, 101: 1.25e-5, 201: 1.5e-5, 301: 1.75e-5, 401: 2e-5}
    for i, lr in starts.items():
        assert lr_at(VQA, 0, i) == pytest.approx(lr)
    assert lr_at(VQA, 0, 400) == pytest.approx(1.75e-5)


def test_single_warmup_epoch_tasks_switch_after_iteration_100():
    for config in (COCO, NLVR, VE):
        assert lr_at(config, 0, 100) == pytest.approx(1e-5)
        assert lr_at(config, 0, 101) == pytest.approx(config["optimizer"]["lr"])


def test_last_epoch_never_reaches_min_lr():
    assert lr_at(PRETRAIN, 29, 0) > PRETRAIN["schedular"]["min_lr"]
    assert cosine_lr(50, 1e-4, 1e-5, 1e-5, 20, 30) == 1e-5


def test_warmup_index_rule():
    assert [warmup_index(i, 20) for i in (0, 1, 100, 101, 2000, 2001, 9999)] == [0, 0, 0, 1, 19, 20, 20]


def _optimizer(lr=1e-4):
    return torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=lr)


def test_construction_sets_warmup_lr_and_step_sets_all_groups():
    opt = _optimizer()
    sched = create_scheduler(PRETRAIN["schedular"], opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    sched.step(21)
    assert sched.get_last_lr()[0] == pytest.approx(lr_at(PRETRAIN, 1, 0))


def _simulate(config, epochs, iters_per_epoch, step_size=100, end_rule=False):
    """Drive the scheduler as the official loop does; record the LR each iteration trains with."""
    opt = _optimizer(config["optimizer"]["lr"])
    sched = create_scheduler(config["schedular"], opt)
    warmup = config["schedular"]["warmup_epochs"]
    seen = {}
    for epoch in range(epochs):
        if not end_rule:
            epoch_start(sched, epoch, warmup)
        for i in range(iters_per_epoch):
            seen[(epoch, i)] = opt.param_groups[0]["lr"]
            opt.step()
            warmup_step(sched, epoch, i, warmup, step_size)
        if end_rule:
            epoch_end(sched, epoch, warmup)
    return seen


@pytest.mark.parametrize("end_rule", [False, True])
def test_driving_rules_agree_with_lr_at(end_rule):
    seen = _simulate(VQA, epochs=3, iters_per_epoch=450, end_rule=end_rule)
    for (epoch, i), lr in seen.items():
        assert lr == pytest.approx(lr_at(VQA, epoch, i)), (epoch, i)


def test_short_epoch0_cuts_warmup_short():
    seen = _simulate(PRETRAIN, epochs=2, iters_per_epoch=150)
    assert seen[(0, 149)] == pytest.approx(1.45e-5)
    assert seen[(1, 0)] == pytest.approx(lr_at(PRETRAIN, 1, 0))


def test_warmup_step_size_one_is_per_iteration():
    config = dict(VQA, warmup_step_size=1)
    seen = _simulate(config, epochs=1, iters_per_epoch=8, step_size=1)
    assert [seen[(0, i)] for i in range(6)] == pytest.approx([1e-5, 1e-5, 1.25e-5, 1.5e-5, 1.75e-5, 2e-5])
    assert lr_at(config, 0, 3) == pytest.approx(1.5e-5)


def test_state_dict_round_trip_restores_lr():
    opt = _optimizer(2e-5)
    sched = create_scheduler(VQA["schedular"], opt)
    sched.step(6)
    state = sched.state_dict()
    opt2 = _optimizer(2e-5)
    sched2 = create_scheduler(VQA["schedular"], opt2)
    sched2.load_state_dict(state)
    assert sched2.last_t == 6
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt2.param_groups[0]["lr"] != pytest.approx(1e-5)


def test_bad_schedular_blocks_are_rejected():
    with pytest.raises(ValueError, match="cosine"):
        create_scheduler(dict(VQA["schedular"], sched="step"), _optimizer())
    with pytest.raises(ValueError, match="missing"):
        create_scheduler({"sched": "cosine", "epochs": 3}, _optimizer())
    with pytest.raises(ValueError):
        CosineLRScheduler(_optimizer(), epochs=0, min_lr=0, warmup_lr=0, warmup_epochs=0)
