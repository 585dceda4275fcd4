"""The shared training loop: one epoch of steps, and `fit`, the epochs with evaluation, logging and checkpoints.

A task hands `fit` a `step_fn(model, batch, alpha) -> {name: tensor}` (the `loss*` entries are summed and optimised,
the others are only logged, e.g. a codebook's usage) and optionally an
`evaluate_fn(model, epoch) -> {metric: value}`. Where a run stands (resume, checkpoints, non-finite losses) is
`engine.checkpoints.TrainingRun`; the data position of a resumed epoch is `engine.data_position.EpochData`.
"""
import contextlib
import math
import os
import time
from typing import NamedTuple, Optional

import torch
from tqdm import tqdm

import utils
from engine.checkpoints import TrainingRun, resolve_resume
from engine.config import ConfigError
from engine.data_position import CountedBatch, EpochData
from engine.logging import StepLog
from models.speed import resolve_speed_mode
from optim import create_optimizer
from scheduler import create_scheduler, create_step_scheduler, epoch_start, warmup_step


def to_device(batch, device):
    """Move every tensor (and text batch) of a collated batch to `device`."""
    if hasattr(batch, 'to'):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def autocast(device, precision):
    """bf16 or fp16 autocast when asked; the models keep similarities, softmaxes and losses in fp32 themselves."""
    if precision == 'bf16':
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == 'fp16':
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(config, device):
    """The dynamic loss scaler of `precision: fp16` (VLMo's official setting: PyTorch Lightning's native AMP, i.e.
    torch's GradScaler with its defaults: scale 2^16, x2 after 2,000 finite steps, x0.5 and the step skipped on an
    inf/NaN gradient); None for fp32 and bf16, whose loop is unchanged."""
    if config.get('precision', 'fp32') != 'fp16':
        return None
    return torch.amp.GradScaler(device.type)


def alpha_at(config, epoch, i, steps_per_epoch, ramp):
    """Distillation weight: alpha * min(1, i / steps) in epoch 0 when ramping (the paper's warm-up), else alpha."""
    alpha = config.get('alpha', 0.4)
    if ramp and epoch == 0 and steps_per_epoch > 0:
        return alpha * min(1.0, i / steps_per_epoch)
    return alpha


def epoch_steps(loader, config):
    """Training steps in one full epoch: len(loader), capped by max_steps_per_epoch."""
    steps = len(loader)
    if config.get('max_steps_per_epoch'):
        steps = min(steps, int(config['max_steps_per_epoch']))
    return steps


def train_one_epoch(model, loader, optimizer, scheduler, step_fn, *, config, device, epoch, ramp_alpha, run,
                    log=None, start_step=0, steps=None, accumulate=1):
    """Train `epoch` from step `start_step` (`loader` yields its batches from there); returns the epoch averages.

    `run` (a TrainingRun) restores a resumed epoch's RNG and running averages, writes step checkpoints and decides
    what a non-finite loss does; `log` (a StepLog) writes train_steps.jsonl every log_every steps.

    A step here is one micro-batch (the data position). With `accumulate` > 1 each micro-batch loss is divided by
    `accumulate` and the optimizer steps after every `accumulate` micro-batches counted from the epoch's start, and
    after the epoch's last one (a shorter last window, as PyTorch Lightning does); under DDP the other micro-batches
    run under `no_sync`. A non-finite micro-batch (skip_nonfinite_steps) adds no gradient; when it is a window's
    last, the window takes no optimizer step. A scheduler with
    `per_optimizer_step` (the `schedule` block) is stepped after every optimizer step; the epoch schedule
    (`schedular`) follows the data position as before. With accumulate 1 every micro-batch is one optimizer step and
    the operations are exactly those of the loop without accumulation.
    """
    model.train()
    steps = epoch_steps(loader, config) if steps is None else steps
    per_step = getattr(scheduler, 'per_optimizer_step', False)
    if not per_step:
        warmup_epochs, step_size = int(config['schedular']['warmup_epochs']), int(config.get('warmup_step_size', 100))
    tracker = run.take_tracker()
    scaler = getattr(run, 'scaler', None)  # fp16's loss scaler (grad_scaler), else None
    log = log or StepLog(None, config, device)
    log.start_epoch(epoch, steps, start_step, counting=getattr(getattr(loader, 'dataset', None), 'skip_bad_images', False))
    it = iter(loader)
    run.restore_data_rng()  # after the iterator exists: making it may draw from the global generators
    for i in range(start_step, steps):
        t0 = time.time()
        raw = next(it)
        if isinstance(raw, CountedBatch):
            run.skipped_images += raw.skipped
            raw = raw.batch
        batch = to_device(raw, device)
        log.data_wait += time.time() - t0
        window_end = (i + 1) % accumulate == 0 or i + 1 == steps  # a window's last micro-batch: the optimizer step
        # under DDP the gradients of a window are all-reduced once, in the backward of its last micro-batch
        with (model.no_sync() if not window_end and hasattr(model, 'no_sync') else contextlib.nullcontext()):
            with autocast(device, config.get('precision', 'fp32')):
                loss_dict = step_fn(model, batch, alpha_at(config, epoch, i, steps, ramp_alpha))
            loss = total_loss(loss_dict)
            skip = run.skip_nonfinite(loss, loss_dict, epoch, i)
            if i % accumulate == 0 or i == start_step:  # a window's first micro-batch
                optimizer.zero_grad(set_to_none=True)
            if not skip:
                part = loss if accumulate == 1 else loss / accumulate
                (part if scaler is None else scaler.scale(part)).backward()
        if window_end:
            if not skip:  # a window whose last micro-batch is skipped is dropped (its gradients were never reduced)
                if scaler is None:
                    optimizer.step()
                else:  # unscales; skips the update when a gradient is inf/NaN; then adapts the scale
                    scaler.step(optimizer)
                    scaler.update()
            if per_step:
                scheduler.step()  # the schedule counts windows (dropped ones included)
        if not per_step:
            warmup_step(scheduler, epoch, i, warmup_epochs, step_size)  # the schedule follows the data position
        n = log.count(batch)
        if not skip:
            tracker.update(n, **{k: v.item() for k, v in loss_dict.items()})
        tracker.update(1, lr=optimizer.param_groups[0]['lr'])
        log.step(i, loss_dict, optimizer, run)
        run.after_step(epoch, i, steps, tracker)
    tracker.synchronize()
    return log.end_epoch(tracker.summary(), run)


def total_loss(step_out):
    """The sum of a step's `loss*` entries; its other entries are monitoring values (logged, not optimised)."""
    return sum(v for k, v in step_out.items() if k.startswith('loss'))


class FitResult(NamedTuple):
    """What `fit` returns: this process's epoch records, and the record the run reports (see `reported`)."""

    records: list
    best: Optional[dict]
    last: Optional[dict]

    @property
    def reported(self):
        """The best epoch's record where the task selects one, else the last epoch's (resumed runs included)."""
        return self.best if self.best is not None else self.last


def accumulation(config, world_size):
    """Micro-batches per optimizer step: batch_size_global // (per-GPU batch x world_size) when the config sets
    batch_size_global (VLMo, spec section 5.6), else 1. The per-GPU batch is `batch_size_train` where the config has
    it (fine-tuning), else `batch_size` (pretraining). A global batch that is not a positive multiple is refused."""
    target = config.get('batch_size_global')
    if target is None:
        return 1
    key = 'batch_size_train' if 'batch_size_train' in config else 'batch_size'
    if key not in config:
        raise ConfigError('batch_size_global needs the per-GPU batch (batch_size_train or batch_size) in the config')
    per_rank = int(config[key])
    micro = per_rank * int(world_size)
    if target < micro or target % micro:
        nearest = max(micro, target - target % micro)
        raise ConfigError(f'batch_size_global {target} must be a positive multiple of {key} {per_rank} x {world_size} '
                          f'process(es) = {micro} (the accumulation count is their quotient); change '
                          f'batch_size_global or {key}, e.g. --opt batch_size_global={nearest}')
    return target // micro


def fit(args, config, model, train_loader, step_fn, *, evaluate_fn=None, select_key=None, ramp_alpha=True,
        find_unused_parameters=False, train_sampler=None, device=None):
    """Train for schedular.epochs epochs with per-epoch evaluation, logging, checkpoints and resume.

    A config with a `schedule` block (VLMo) instead trains on the per-optimizer-step schedule of
    scheduler.StepScheduler, with gradient accumulation to `batch_size_global`, for the epochs
    scheduler.schedule_steps derives (stopping at `schedule.max_steps` optimizer steps when it is set). The
    optimizer's parameter groups are the model family's own where its TaskSpec has `optimizer_groups`
    (registry.optimizer_groups_for), else the project's AdamW groups.
    `select_key`: the evaluate_fn metric whose maximum marks checkpoint_best.pth. Returns a FitResult.
    """
    from engine.script import device_of, wrap_ddp  # the set-up helpers sit above the loop
    from models import registry
    device = device or device_of(args)
    per_step = config.get('schedule') is not None
    if per_step and config.get('schedular') is not None:
        raise ConfigError('the config has both `schedule` (per optimizer step) and `schedular` (per epoch); keep one')
    if not per_step and config.get('batch_size_global') is not None:
        raise ConfigError('batch_size_global (gradient accumulation) needs the per-step `schedule` block')
    accumulate = accumulation(config, utils.get_world_size())
    model_ddp, model = wrap_ddp(model, args, find_unused_parameters)
    optimizer = create_optimizer(config['optimizer'], model, fused=resolve_speed_mode(config)['fused'],
                                 wd_exempt_extra=config.get('wd_exempt_extra'),
                                 groups=registry.optimizer_groups_for(config, model),
                                 lr_mult_visual=config.get('lr_mult_visual'))
    if per_step:
        scheduler, epochs = create_step_scheduler(config, optimizer, epoch_steps(train_loader, config), accumulate)
        _print_step_plan(config, scheduler, epochs, epoch_steps(train_loader, config), accumulate)
    else:
        scheduler, epochs = create_scheduler(config['schedular'], optimizer), int(config['schedular']['epochs'])
    run = TrainingRun(args, config, model, optimizer, scheduler, select_key=select_key)
    run.accumulate = accumulate
    run.scaler = grad_scaler(config, device)
    resume_path = resolve_resume(args)
    if resume_path:
        run.resume(resume_path)
    data = EpochData(train_loader, train_sampler, args.seed, config)
    log = StepLog(args.output_dir, config, device)
    log_file = os.path.join(args.output_dir, 'log.txt')
    records = []
    for epoch in range(run.epoch, epochs):
        start = run.step if epoch == run.epoch else 0
        if not per_step:
            epoch_start(scheduler, epoch, int(config['schedular']['warmup_epochs']))
        steps = epoch_steps(train_loader, config)
        if per_step and config['schedule'].get('max_steps') is not None:  # the last epoch stops at max_steps
            done_before = epoch * math.ceil(steps / accumulate)  # earlier epochs ran in full
            steps = min(steps, (scheduler.total_steps - done_before) * accumulate)
        stats = train_one_epoch(model_ddp, data.for_epoch(epoch, start), optimizer, scheduler, step_fn, config=config,
                                device=device, epoch=epoch, ramp_alpha=ramp_alpha, run=run, log=log,
                                start_step=start, steps=steps, accumulate=accumulate)
        record = {f'train_{k}': (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()}
        record.update(evaluate_fn(model, epoch) if evaluate_fn else {})
        record['epoch'] = epoch
        run.end_epoch(epoch, record)
        log.epoch_record(record)
        if utils.is_main_process():
            utils.append_jsonl(log_file, record)
        records.append(record)
        utils.barrier()
    log.close()
    if utils.is_main_process() and run.best_epoch is not None:
        with open(log_file, 'a') as f:
            f.write(f'best epoch: {run.best_epoch}\n')
    return FitResult(records, run.best_record, run.last_record)


def _print_step_plan(config, scheduler, epochs, steps_per_epoch, accumulate):
    """One line saying what the per-step schedule will do (VLMo spec section 5.6: record N with every run)."""
    if not utils.is_main_process():
        return
    key = 'batch_size_train' if 'batch_size_train' in config else 'batch_size'
    world, per_rank = utils.get_world_size(), config.get(key)
    batch = (f'{key} {per_rank} x {world} process(es) = global batch {per_rank * world * accumulate} (ITC/ITM batch '
             f'N = {per_rank * world})' if per_rank else f'{world} process(es)')
    print(f'schedule: {scheduler.total_steps} optimizer steps (warm-up {scheduler.warmup_steps}, decay to end_lr '
          f'{scheduler.end_lr:g}) over {epochs} epoch(s) of {steps_per_epoch} micro-batches per process; one optimizer '
          f'step = {accumulate} micro-batch(es) of {batch}')


def evaluate_only(args, model, evaluate_fn):
    """One evaluation pass logged to log.txt as epoch 0 (the official --evaluate line); returns the metrics."""
    metrics = evaluate_fn(model, 0)
    if utils.is_main_process():
        utils.append_jsonl(os.path.join(args.output_dir, 'log.txt'), {**metrics, 'epoch': 0})
    utils.barrier()
    return metrics
