"""Checkpoint files and resume: what a checkpoint holds, which files are kept, finding and restoring the newest one.

`TrainingRun` is the state of a run between steps (epoch, step, best metric, per-rank RNG states and running
averages, fault counters); it writes epoch and step checkpoints atomically (never a partial file) and restores
them so that a resumed run continues as the uninterrupted one would. `--resume auto` takes the newest intact
checkpoint, falling back past corrupt ones.
"""
import contextlib
import glob
import math
import os
import re
import shutil

import torch

import utils
from engine.config import ConfigError
from models.checkpoint import CheckpointError, load_checkpoint_file, verify_checkpoint_file


_EPOCH_CHECKPOINT = re.compile(r'^checkpoint_(\d+)\.pth$')
_STEP_CHECKPOINT = re.compile(r'^checkpoint_(\d+)_step(\d+)\.pth$')
_REQUIRED_KEYS = ('model', 'optimizer', 'lr_scheduler', 'epoch')


def step_checkpoint_name(epoch, step):
    """File name of the checkpoint taken in `epoch` after `step` completed steps."""
    return f'checkpoint_{epoch:02d}_step{step:06d}.pth'


def _checkpoint_dict(model, optimizer, scheduler, config, epoch, extra):
    obj = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'lr_scheduler': scheduler.state_dict(),
           'config': config, 'epoch': epoch, 'rng': utils.get_rng_state()}
    obj.update(extra or {})
    return obj


def save_checkpoint(output_dir, model, optimizer, scheduler, config, epoch, extra=None, best=False, keep_epoch=True):
    """Atomically write checkpoint_last.pth; link it as checkpoint_XX.pth (`keep_epoch`) and checkpoint_best.pth.

    The links share the file's blocks, so keeping an epoch costs disk space only once the next epoch replaces
    checkpoint_last.pth.
    """
    last = os.path.join(output_dir, 'checkpoint_last.pth')
    utils.atomic_torch_save(_checkpoint_dict(model, optimizer, scheduler, config, epoch, extra), last)
    names = ([f'checkpoint_{epoch:02d}.pth'] if keep_epoch else []) + (['checkpoint_best.pth'] if best else [])
    for name in names:
        _link_or_copy(last, os.path.join(output_dir, name))
    return last


def save_step_checkpoint(output_dir, model, optimizer, scheduler, config, epoch, step, extra=None, keep=2):
    """Atomically write checkpoint_EE_stepSSSSSS.pth, link it as checkpoint_last.pth, keep the newest `keep`."""
    path = os.path.join(output_dir, step_checkpoint_name(epoch, step))
    extra = {**(extra or {}), 'step_in_epoch': step}
    utils.atomic_torch_save(_checkpoint_dict(model, optimizer, scheduler, config, epoch, extra), path)
    _link_or_copy(path, os.path.join(output_dir, 'checkpoint_last.pth'))
    steps = sorted((_checkpoint_position(n), n) for n in os.listdir(output_dir) if _STEP_CHECKPOINT.match(n))
    for _, name in steps[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, name))
    return path


def _checkpoint_position(name):
    """(epoch, completed steps) a checkpoint file name stands for; an epoch's end sorts after its steps."""
    match = _STEP_CHECKPOINT.match(name)
    if match:
        return int(match.group(1)), int(match.group(2))
    match = _EPOCH_CHECKPOINT.match(name)
    return (int(match.group(1)), math.inf) if match else None


def _link_or_copy(src, dst):
    tmp = dst + '.tmp'
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def remove_stale_temporaries(output_dir):
    """Delete checkpoint temporaries a killed run left behind (they are never read)."""
    for pattern in ('.checkpoint_*.tmp', 'checkpoint_*.pth.tmp'):
        for path in glob.glob(os.path.join(glob.escape(output_dir), pattern)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def checkpoint_candidates(output_dir):
    """Training checkpoints in `output_dir`, newest first: checkpoint_last.pth first when it is a separate file,
    then the numbered epoch and step files, then checkpoint_best.pth (an older state, the last fallback)."""
    if not os.path.isdir(output_dir):
        return []
    named = sorted(((_checkpoint_position(n), n) for n in os.listdir(output_dir) if _checkpoint_position(n)),
                   reverse=True)
    paths = [os.path.join(output_dir, n) for _, n in named]
    for name, where in (('checkpoint_last.pth', 0), ('checkpoint_best.pth', len(paths))):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path) and not any(os.path.samefile(path, p) for p in paths):
            paths.insert(where if where == 0 else len(paths), path)
    return paths


def check_training_checkpoint(path):
    """Raise CheckpointError unless `path` is an intact training checkpoint (CRC-checked, with model/optimizer/...)."""
    verify_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)  # structure only, no tensor reads
    except Exception:
        ckpt = load_checkpoint_file(path)
    missing = [k for k in _REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f'{path} has no {missing}: it is not a training checkpoint')


def find_latest_checkpoint(output_dir):
    """The newest intact training checkpoint in `output_dir`, falling back past corrupt ones; None if there is none."""
    for path in checkpoint_candidates(output_dir):
        try:
            check_training_checkpoint(path)
            return path
        except CheckpointError as err:
            print(f'--resume auto: skipping {path}: {err}')
    return None


def resolve_auto_resume(args):
    """Turn `--resume auto` (implied after a torchrun restart) into the newest intact checkpoint's path, or None."""
    restarts = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') or 0)
    if args.resume is None and restarts > 0:
        print(f'torchrun restart {restarts}: resuming from the newest intact checkpoint in {args.output_dir}')
        args.resume = 'auto'
    if args.resume != 'auto':
        return args.resume
    path = find_latest_checkpoint(args.output_dir) if utils.is_main_process() else None
    path = utils.broadcast_from_main(path)  # every rank resumes from the same file
    if path is None:
        print(f'--resume auto: no intact checkpoint in {args.output_dir}; starting a new run')
    args.resume = path
    return path


def resolve_resume(args):
    """The checkpoint file `--resume` names, or None ('auto': the newest intact one in output_dir)."""
    if args.resume is None:
        return None
    if args.resume == 'auto':
        return resolve_auto_resume(args)
    if args.resume == 'last':
        if args.checkpoint:
            return args.checkpoint
        return os.path.join(args.output_dir, 'checkpoint_last.pth')
    return args.resume


def load_resume(path, model, optimizer, scheduler, restore_rng=True):
    """Restore model (strict), optimizer, scheduler and (optionally) RNG; returns the checkpoint dict."""
    verify_checkpoint_file(path)
    ckpt = load_checkpoint_file(path)
    for key in _REQUIRED_KEYS:
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise CheckpointError(f'{path} has no {key!r}: it is not a training checkpoint; use --checkpoint to '
                                  f'start from its weights instead of --resume')
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['lr_scheduler'])
    if restore_rng and 'rng' in ckpt:
        utils.set_rng_state(ckpt['rng'])
    where = f'epoch {ckpt["epoch"]}' + (f' step {ckpt["step_in_epoch"]}' if ckpt.get('step_in_epoch') else '')
    print(f'resumed from {path} ({where})')
    return ckpt


class TrainingRun:
    """Where a run stands and its fault policy: what checkpoints hold, when they are written, what NaN losses do.

    A checkpoint holds model (momentum encoders and queues included), optimizer, scheduler, config, epoch, the
    steps done in that epoch (`step_in_epoch`, None at an epoch's end), `global_step`, and per rank the RNG states,
    running loss averages and skipped-image count, so a resumed run continues bit for bit.
    """

    def __init__(self, args, config, model, optimizer, scheduler, select_key=None):
        """Read the checkpoint keys of `config` (checkpoint_every_steps, keep_step_checkpoints, keep_epoch_checkpoints,
        skip_nonfinite_steps); `select_key` is the metric whose maximum marks checkpoint_best.pth (None: no selection,
        so every epoch's checkpoint is kept by default, as the official scripts without selection do)."""
        self.output_dir, self.seed, self.config = args.output_dir, int(args.seed), config
        self.select_key = select_key
        keep_epoch = config.get('keep_epoch_checkpoints')
        self.keep_epoch = (select_key is None) if keep_epoch is None else bool(keep_epoch)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.every = int(config.get('checkpoint_every_steps') or 0)
        self.keep = int(config.get('keep_step_checkpoints', 2))
        self.max_nonfinite = int(config.get('skip_nonfinite_steps', 0))
        if self.keep < 1 or self.every < 0 or self.max_nonfinite < 0:
            raise ConfigError('checkpoint_every_steps and skip_nonfinite_steps must be >= 0 and '
                              f'keep_step_checkpoints >= 1 (got {self.every}, {self.max_nonfinite}, '
                              f'{self.keep}); fix them in the config or --opt')
        self.epoch = self.step = self.global_step = 0
        self.best, self.best_epoch = -math.inf, None
        self.best_record = self.last_record = None
        self.nonfinite_skipped = 0
        self.skipped_images = 0
        self.last_checkpoint = None
        # micro-batches per optimizer step (engine.loop.fit sets it): with gradient accumulation a step checkpoint
        # is written every checkpoint_every_steps optimizer steps, always after an optimizer step
        self.accumulate = 1
        self.scaler = None  # fp16's GradScaler (engine.loop.fit sets it): its state travels with the checkpoints
        self._tracker = None
        self._pending_rng = None
        if utils.is_main_process():
            remove_stale_temporaries(self.output_dir)

    def resume(self, path):
        """Continue from checkpoint `path`: at the next epoch, or mid-epoch from a step checkpoint."""
        ckpt = load_resume(path, self.model, self.optimizer, self.scheduler, restore_rng=False)
        rank, world = utils.get_rank(), utils.get_world_size()
        self.last_checkpoint = path
        self.best, self.best_epoch = ckpt.get('best', -math.inf), ckpt.get('best_epoch')
        self.best_record, self.last_record = ckpt.get('best_record'), ckpt.get('last_record')
        self.global_step = int(ckpt.get('global_step', 0))
        self.nonfinite_skipped = int(ckpt.get('nonfinite_skipped', 0))
        if self.scaler is not None and ckpt.get('grad_scaler') is not None:
            self.scaler.load_state_dict(ckpt['grad_scaler'])
        if ckpt.get('seed', self.seed) != self.seed:
            print(f'warning: {path} was trained with --seed {ckpt["seed"]}, this run uses {self.seed}: the data '
                  f'order and augmentations from here on differ from the original run')
        per_rank = ckpt.get('per_rank')
        mine = per_rank[rank] if per_rank and len(per_rank) == world else None
        if per_rank and mine is None:
            print(f'warning: {path} was written by {len(per_rank)} processes, this run has {world}: RNG states '
                  f'are re-seeded and a mid-epoch position is scaled, so the run continues but not bit for bit')
            utils.seed_everything(self.seed + rank + self.global_step)
        if ckpt.get('step_in_epoch') is None:
            self.epoch, self.step = int(ckpt['epoch']) + 1, 0
            rng = mine['rng'] if mine else (ckpt.get('rng') if not per_rank and (world == 1 or rank == 0) else None)
            if rng is not None:
                utils.set_rng_state(rng)
            return ckpt
        self.epoch, self.step = int(ckpt['epoch']), int(ckpt['step_in_epoch'])
        if mine is None:
            saved_world = len(per_rank) if per_rank else 1
            self.step = self.step * saved_world // world
            return ckpt
        self._tracker = utils.MetricTracker()
        self._tracker.counts, self._tracker.totals = dict(mine['tracker']['counts']), dict(mine['tracker']['totals'])
        self.skipped_images = int(mine.get('skipped_images', 0))
        self._pending_rng = mine['rng']
        return ckpt

    def take_tracker(self):
        """The running averages of a resumed epoch (once), else a fresh tracker."""
        tracker, self._tracker = self._tracker or utils.MetricTracker(), None
        return tracker

    def restore_data_rng(self):
        """Apply a mid-epoch checkpoint's RNG states; called once the resumed epoch's data iterator exists."""
        if self._pending_rng is not None:
            utils.set_rng_state(self._pending_rng)
            self._pending_rng = None

    def skip_nonfinite(self, loss, loss_dict, epoch, i):
        """False for a finite loss; True (skip the step) or FloatingPointError for a non-finite one, on every rank."""
        bad = utils.sum_over_ranks(0.0 if torch.isfinite(loss) else 1.0) > 0  # every rank decides the same way
        if not bad:
            return False
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        where = f'epoch {epoch} step {i} (global step {self.global_step})'
        if self.nonfinite_skipped < self.max_nonfinite:
            self.nonfinite_skipped += 1
            print(f'non-finite loss at {where} {values}: step skipped ({self.nonfinite_skipped} of at most '
                  f'{self.max_nonfinite}, skip_nonfinite_steps)')
            return True
        last = (f'the last good checkpoint is {self.last_checkpoint}' if self.last_checkpoint else
                f'no checkpoint was written yet in {self.output_dir} (checkpoint_every_steps saves within epochs)')
        limit = (f'after {self.nonfinite_skipped} skipped steps (skip_nonfinite_steps: {self.max_nonfinite})'
                 if self.max_nonfinite else '(set skip_nonfinite_steps: N to skip up to N such steps)')
        raise FloatingPointError(f'non-finite loss at {where}: {values}; stopping {limit}. {last.capitalize()}; '
                                 f'fix the cause (e.g. a lower lr, --precision fp32) and continue with --resume auto')

    def after_step(self, epoch, i, steps, tracker):
        """Count the step and write a step checkpoint every `checkpoint_every_steps` steps (not at an epoch's end).

        `step` and `global_step` count micro-batches (the data position); with gradient accumulation
        `checkpoint_every_steps` counts optimizer steps (every x accumulate micro-batches)."""
        self.global_step += 1
        self.epoch, self.step = epoch, i + 1
        if self.every and self.step % (self.every * self.accumulate) == 0 and self.step < steps:
            self._save(epoch, self.step, tracker)

    def end_epoch(self, epoch, record):
        """Track the best epoch record and write the epoch's checkpoint; returns whether it is the best so far."""
        key = self.select_key
        record = utils.plain_json(record)  # metrics may be numpy scalars; checkpoints load with weights_only=True
        improved = key is not None and record.get(key, -math.inf) > self.best
        if improved:
            self.best, self.best_epoch, self.best_record = record[key], epoch, record
        self.last_record = record
        self._save(epoch, None, utils.MetricTracker(), best=improved)
        self.epoch, self.step, self.skipped_images = epoch + 1, 0, 0
        return improved

    def _save(self, epoch, step, tracker, best=False):
        per_rank = utils.gather_from_ranks({'rng': utils.get_rng_state(), 'skipped_images': self.skipped_images,
                                            'tracker': {'counts': dict(tracker.counts), 'totals': dict(tracker.totals)}})
        extra = {'best': self.best, 'best_epoch': self.best_epoch, 'best_record': self.best_record,
                 'last_record': self.last_record, 'global_step': self.global_step,
                 'nonfinite_skipped': self.nonfinite_skipped, 'seed': self.seed, 'world_size': len(per_rank),
                 'per_rank': per_rank}
        if self.scaler is not None:
            extra['grad_scaler'] = self.scaler.state_dict()
        args = (self.output_dir, self.model, self.optimizer, self.scheduler, self.config, epoch)
        if step is None:
            if utils.is_main_process():
                save_checkpoint(*args, extra=extra, best=best, keep_epoch=self.keep_epoch)
            name = f'checkpoint_{epoch:02d}.pth' if self.keep_epoch else 'checkpoint_last.pth'
            self.last_checkpoint = os.path.join(self.output_dir, name)
        else:
            if utils.is_main_process():
                save_step_checkpoint(*args, step, extra=extra, keep=self.keep)
            self.last_checkpoint = os.path.join(self.output_dir, step_checkpoint_name(epoch, step))
