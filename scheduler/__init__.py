"""The official cosine schedule with linear warm-up and the way the scripts drive it (§10.3).

The schedule is a function of an integer "epoch index" t. The official scripts step it in two regimes:
- epoch 0: after the optimizer step of iteration i, if i % step_size == 0 and i <= step_size * W_t, set
  lr(i // step_size) (a staircase warm-up of step_size * W_t iterations; step_size is `warmup_step_size`, 100);
- epochs e >= 1: a constant lr(e + W_t), set at the start of epoch e (`epoch_start`) or, equivalently, at the end
  of epoch e - 1 (`epoch_end`).
"""
from __future__ import annotations

import math

import torch

DEFAULT_WARMUP_STEP_SIZE = 100


def cosine_lr(t: int, base_lr: float, warmup_lr: float, min_lr: float, warmup_epochs: int, epochs: int) -> float:
    """lr(t): linear from warmup_lr over t < W_t, then cosine from base_lr to min_lr over `epochs` (min_lr after)."""
    if t < warmup_epochs:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
    position = t - warmup_epochs
    if position >= epochs:
        return min_lr  # past the single cosine cycle, as the official scheduler does
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * position / epochs))


class CosineLRScheduler:
    """Sets every param group's LR to lr(t) on `step(t)` (times the group's `lr_mult` where it has one, see
    optim.param_groups); LR starts at lr(0) (= warmup_lr with a warm-up)."""

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, min_lr: float, warmup_lr: float,
                 warmup_epochs: int, base_lr: float | None = None):
        if epochs < 1 or warmup_epochs < 0:
            raise ValueError(f"schedular needs epochs >= 1 and warmup_epochs >= 0, got {epochs}, {warmup_epochs}")
        self.optimizer = optimizer
        self.base_lr = float(base_lr if base_lr is not None else optimizer.param_groups[0]["lr"])
        self.epochs = int(epochs)
        self.min_lr = float(min_lr)
        self.warmup_lr = float(warmup_lr)
        self.warmup_epochs = int(warmup_epochs)
        self.last_t: int | None = None
        self.step(0)

    def lr(self, t: int) -> float:
        """The LR this schedule assigns to epoch index t."""
        return cosine_lr(t, self.base_lr, self.warmup_lr, self.min_lr, self.warmup_epochs, self.epochs)

    def step(self, t: int) -> float:
        """Set the optimizer's LR to lr(t) and return it."""
        value = self.lr(t)
        for group in self.optimizer.param_groups:
            group["lr"] = value * group["lr_mult"] if "lr_mult" in group else value
        self.last_t = int(t)
        return value

    def get_last_lr(self) -> list[float]:
        """Current LR of every param group (torch scheduler convention)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Everything but the optimizer, so a resumed run continues the same curve."""
        return {"base_lr": self.base_lr, "epochs": self.epochs, "min_lr": self.min_lr, "warmup_lr": self.warmup_lr,
                "warmup_epochs": self.warmup_epochs, "last_t": self.last_t}

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule and re-apply the LR of the last step taken."""
        for key in ("base_lr", "epochs", "min_lr", "warmup_lr", "warmup_epochs", "last_t"):
            if key in state:
                setattr(self, key, state[key])
        if self.last_t is not None:
            self.step(self.last_t)


def create_scheduler(config_schedular: dict, optimizer: torch.optim.Optimizer) -> CosineLRScheduler:
    """Build the scheduler from the config block spelled `schedular` (sic); its own `lr` is unused, as officially."""
    sched = config_schedular.get("sched", "cosine")
    if sched != "cosine":
        raise ValueError(f"schedular.sched must be 'cosine' (the only schedule ALBEF uses), got {sched!r}")
    missing = [k for k in ("epochs", "min_lr", "warmup_lr", "warmup_epochs") if k not in config_schedular]
    if missing:
        raise ValueError(f"schedular block is missing {missing}; see configs/Pretrain.yaml for a complete block")
    # decay_rate (1) and cooldown_epochs (0) only matter for restarts/cool-down, which ALBEF never reaches.
    return CosineLRScheduler(optimizer, epochs=int(config_schedular["epochs"]),
                             min_lr=float(config_schedular["min_lr"]), warmup_lr=float(config_schedular["warmup_lr"]),
                             warmup_epochs=int(config_schedular["warmup_epochs"]))


def warmup_step(scheduler: CosineLRScheduler, epoch: int, i: int, warmup_epochs: int,
                step_size: int = DEFAULT_WARMUP_STEP_SIZE) -> bool:
    """Call after the optimizer step of iteration i: the epoch-0 staircase warm-up; True when the LR was set."""
    if epoch == 0 and i % step_size == 0 and i <= step_size * warmup_epochs:
        scheduler.step(i // step_size)
        return True
    return False


def epoch_start(scheduler: CosineLRScheduler, epoch: int, warmup_epochs: int) -> None:
    """Pretrain/VQA/TA rule: at the start of epoch e >= 1 set lr(e + W_t)."""
    if epoch > 0:
        scheduler.step(epoch + warmup_epochs)


def epoch_end(scheduler: CosineLRScheduler, epoch: int, warmup_epochs: int) -> None:
    """Retrieval/NLVR/VE/Grounding rule: at the end of epoch e set lr(e + 1 + W_t) for the next epoch."""
    scheduler.step(epoch + warmup_epochs + 1)


def warmup_index(i: int, warmup_epochs: int, step_size: int = DEFAULT_WARMUP_STEP_SIZE) -> int:
    """k(i) = min(floor(max(i - 1, 0) / step_size), W_t): the epoch index iteration i of epoch 0 trains with."""
    return min(max(i - 1, 0) // step_size, warmup_epochs)


def lr_at(config: dict, epoch: int, i: int = 0, step_size: int | None = None) -> float:
    """The LR iteration i of epoch `epoch` trains with under the official driving rule (full task config)."""
    sched = config["schedular"]
    warmup_epochs = int(sched["warmup_epochs"])
    if step_size is None:
        step_size = int(config.get("warmup_step_size", DEFAULT_WARMUP_STEP_SIZE))
    t = warmup_index(i, warmup_epochs, step_size) if epoch == 0 else epoch + warmup_epochs
    return cosine_lr(t, float(config["optimizer"]["lr"]), float(sched["warmup_lr"]), float(sched["min_lr"]),
                     warmup_epochs, int(sched["epochs"]))


# ---- the per-optimizer-step schedule (VLMo; config block `schedule`) ---------------------------------------------
SCHEDULE_KINDS = ("linear", "cosine")  # official decay_power: a number (polynomial; 1 = linear) or "cosine"


class StepScheduler:
    """Linear warm-up from 0, then polynomial decay to end_lr at `total_steps` (transformers'
    get_polynomial_decay_schedule_with_warmup, VLMo spec section 12.2), or with `sched='cosine'` half a cosine to 0
    (get_cosine_schedule_with_warmup: the official `decay_power: cosine`; end_lr and power are not read then),
    driven per optimizer step.

    Every group's lr is its own base lr (the lr it had when the scheduler was built: heads keep their multiplier)
    times factor(s), s = optimizer steps taken so far; the first step uses factor(0) = 0. The factor is
    `models.losses.vlmo_lr_factor` with end factor end_lr / base_lr (base_lr: the optimizer's `lr`), as transformers
    computes it from the optimizer's default lr; `models.losses.vlmo_cosine_lr_factor` for the cosine.
    """

    per_optimizer_step = True  # engine/loop.py: step after every optimizer step, not by the epoch staircase

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, base_lr: float,
                 end_lr: float = 0.0, power: float = 1.0, sched: str = "linear"):
        if sched not in SCHEDULE_KINDS:
            raise ValueError(f"schedule.sched must be one of {', '.join(SCHEDULE_KINDS)}, got {sched!r}")
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"schedule needs max_steps >= 1 and 0 <= warmup_steps <= max_steps, got {total_steps}, "
                             f"{warmup_steps}")
        if end_lr > base_lr:
            raise ValueError(f"schedule.end_lr ({end_lr}) must not exceed optimizer.lr ({base_lr})")
        self.optimizer = optimizer
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.base_lr, self.end_lr, self.power = float(base_lr), float(end_lr), float(power)
        self.sched = sched
        self.optimizer_step = 0
        self._apply()

    def factor(self, s: int) -> float:
        """The multiple of each group's base lr that optimizer step s (0-based) uses."""
        from models.losses import vlmo_cosine_lr_factor, vlmo_lr_factor  # with VLMo's other formulas
        if self.sched == "cosine":
            return vlmo_cosine_lr_factor(s, self.total_steps, self.warmup_steps)
        return vlmo_lr_factor(s, self.total_steps, self.warmup_steps, self.power, self.end_lr / self.base_lr)

    def _apply(self) -> None:
        f = self.factor(self.optimizer_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> float:
        """Call after every optimizer step: set the lr of the next one; returns group 0's lr."""
        self.optimizer_step += 1
        self._apply()
        return self.optimizer.param_groups[0]["lr"]

    def get_last_lr(self) -> list[float]:
        """Current LR of every param group (torch scheduler convention)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Everything but the optimizer; `optimizer_step` is the schedule's position (optimizer steps taken)."""
        return {"base_lrs": list(self.base_lrs), "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "base_lr": self.base_lr, "end_lr": self.end_lr, "power": self.power,
                "optimizer_step": self.optimizer_step, "sched": self.sched}

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule and re-apply the lr of the next optimizer step."""
        if "optimizer_step" not in state:
            raise ValueError("this checkpoint's lr_scheduler was written by the epoch schedule (schedular); a run "
                             "with a `schedule` block cannot resume from it")
        for key in ("base_lrs", "total_steps", "warmup_steps", "base_lr", "end_lr", "power", "optimizer_step"):
            setattr(self, key, state[key])
        self.sched = state.get("sched", "linear")  # files written before the cosine existed
        self._apply()


def schedule_steps(config_schedule: dict, steps_per_epoch: int, accumulate: int) -> tuple[int, int, int]:
    """(S, S_w, epochs) of a `schedule` block for an epoch of `steps_per_epoch` micro-batches per rank.

    Optimizer steps per epoch = ceil(steps_per_epoch / accumulate) (the last, shorter window of an epoch steps too,
    as PyTorch Lightning does). `max_steps` set: S = max_steps and the run takes the epochs needed to reach it
    (at most `epochs` when given: the official max_epoch); `max_steps` null (epoch-based fine-tuning): `epochs` is
    required and S = steps_per_epoch * epochs // accumulate (official). S_w = int(warmup_steps * S) for a float
    warmup_steps, else warmup_steps.
    """
    sched = config_schedule.get("sched", "linear")
    if sched not in SCHEDULE_KINDS:
        raise ValueError(f"schedule.sched must be 'linear' (warm-up then polynomial decay) or 'cosine' (warm-up then "
                         f"half a cosine to 0), got {sched!r}")
    if steps_per_epoch < 1:
        raise ValueError("schedule: the training loader has no batches")
    per_epoch = math.ceil(steps_per_epoch / accumulate)
    epochs = config_schedule.get("epochs")
    if config_schedule.get("max_steps") is not None:
        total = int(config_schedule["max_steps"])
        needed = math.ceil(total / per_epoch)
        epochs = needed if epochs is None else min(int(epochs), needed)
    else:
        if epochs is None:
            raise ValueError("schedule: with max_steps null (epoch-based fine-tuning) the block needs `epochs`, "
                             "e.g. schedule: {sched: linear, max_steps: null, warmup_steps: 0.1, epochs: 10}")
        epochs = int(epochs)
        total = steps_per_epoch * epochs // accumulate
    warmup = config_schedule.get("warmup_steps", 0)
    warmup = int(warmup * total) if isinstance(warmup, float) else int(warmup)
    if total < 1 or epochs < 1:
        raise ValueError(f"schedule: {total} optimizer steps over {epochs} epochs; give max_steps >= 1 / epochs >= 1")
    return total, warmup, epochs


def create_step_scheduler(config: dict, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                          accumulate: int) -> tuple[StepScheduler, int]:
    """The `schedule` block's scheduler for a full task config, and the number of epochs the run takes."""
    total, warmup, epochs = schedule_steps(config["schedule"], steps_per_epoch, accumulate)
    sched = config["schedule"]
    scheduler = StepScheduler(optimizer, total, warmup, float(config["optimizer"]["lr"]),
                              float(sched.get("end_lr", 0.0)), float(sched.get("power", 1.0)),
                              sched.get("sched", "linear"))
    return scheduler, epochs
