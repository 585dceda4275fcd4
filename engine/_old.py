"""The shared training engine: argument parsing, set-up, one train epoch, the epoch loop, checkpoints, resume.

Every entry script (Pretrain.py, Retrieval.py, ...) parses its arguments with `base_parser`, calls `setup`,
builds its datasets and model, and hands `fit` a `step_fn(model, batch, alpha) -> {loss_name: tensor}` plus an
optional `evaluate_fn(model, epoch) -> {metric: value}`. Everything a second script would copy lives here.

Robustness (docs/README_robustness.md): `TrainingRun` writes epoch checkpoints and, with checkpoint_every_steps,
step checkpoints that hold everything an uninterrupted run would still have in memory (per-rank RNG states,
running averages, the position in the epoch); `EpochData` re-creates the data order of a resumed epoch without
loading the batches already trained on; `--resume auto` takes the newest intact checkpoint.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import re
import shutil
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info
from tqdm import tqdm

import utils
from dataset.shards import batch_seed, seeded_rngs
from models.model_pretrain import resolve_speed_mode
from optim import create_optimizer
from scheduler import create_scheduler, epoch_start, warmup_step


# ---- arguments and set-up --------------------------------------------------------------------------------------
def base_parser(description, config, output_dir):
    """The official command-line arguments (with `type=bool` fixed) plus --opt overrides and --precision."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--config', default=config)
    p.add_argument('--output_dir', default=output_dir)
    p.add_argument('--checkpoint', default='', help='weights to start from (pretrained or fine-tuned)')
    p.add_argument('--resume', nargs='?', const='last', default=None,
                   help="continue a run: bare flag = <output_dir>/checkpoint_last.pth (or the --checkpoint file); "
                        "'auto' = the newest intact checkpoint in output_dir, falling back past corrupt ones and "
                        "starting fresh when there is none (implied after a torchrun restart); or a path")
    p.add_argument('--text_encoder', default='bert-base-uncased',
                   help="local BERT folder or a name in the local HF cache; 'none' = random init")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seed', default=42, type=int)
    p.add_argument('--world_size', default=1, type=int, help='set by torchrun/SLURM; kept for compatibility')
    p.add_argument('--dist_url', default='env://')
    p.add_argument('--distributed', action=argparse.BooleanOptionalAction, default=True,
                   help='use the launcher environment when present (default); --no-distributed forces one process')
    p.add_argument('--opt', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config key, dotted for nested keys (repeatable), e.g. optimizer.lr=2e-4')
    p.add_argument('--precision', choices=['fp32', 'bf16'], default=None,
                   help='fp32 (official) or bf16 autocast; default: the config key precision, else fp32')
    return p


def setup(args):
    """Distributed init, config (with overrides), seeds, output folder; returns the config dict."""
    if (int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') or 0) > 0
            and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'):
        print('warning: this torchrun restart shares the rendezvous store of the failed attempt, whose stale '
              'addresses can make the process-group set-up fail (pytorch/pytorch#135712); launch torchrun with '
              'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment', flush=True)
    utils.init_distributed_mode(args)
    config = utils.load_config(args.config, args.opt)
    if args.precision:
        config['precision'] = args.precision
    config.setdefault('precision', 'fp32')
    seed = args.seed + utils.get_rank()
    utils.seed_everything(seed)
    if args.device.startswith('cuda'):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # the official A100 runs used TF32 (torch 1.8 default)
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.output_dir, exist_ok=True)
    resolve_auto_resume(args)  # before the script builds its model: it starts differently when resuming
    if utils.is_main_process():
        utils.save_config(config, os.path.join(args.output_dir, 'config.yaml'))
    return config


def device_of(args):
    """torch.device for this process (the local GPU under torchrun)."""
    if args.device.startswith('cuda') and getattr(args, 'gpu', None) is not None:
        return torch.device('cuda', args.gpu)
    return torch.device(args.device)


def wrap_ddp(model, args, find_unused_parameters=False):
    """DDP over the task model when distributed; returns (model, model_without_ddp).

    Buffers are not re-broadcast every step: the queues are updated identically on every rank from all-gathered
    features, and DDP already syncs every buffer from rank 0 at construction.
    """
    if not getattr(args, 'distributed', False):
        return model, model
    device_ids = [args.gpu] if next(model.parameters()).is_cuda else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                                    find_unused_parameters=find_unused_parameters)
    return ddp, model


def to_device(batch, device):
    """Move every tensor (and text batch) of a collated batch to `device`."""
    if hasattr(batch, 'to') and not isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def autocast(device, precision):
    """bf16 autocast when asked; the models keep similarities, softmaxes and losses in fp32 themselves."""
    if precision == 'bf16':
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def alpha_at(config, epoch, i, steps_per_epoch, ramp):
    """Distillation weight: alpha * min(1, i / steps) in epoch 0 when ramping (spec 5.3), else alpha."""
    alpha = config.get('alpha', 0.4)
    if ramp and epoch == 0 and steps_per_epoch > 0:
        return alpha * min(1.0, i / steps_per_epoch)
    return alpha


# ---- one epoch ---------------------------------------------------------------------------------------------------
def epoch_steps(loader, config):
    """Training steps in one full epoch: len(loader), capped by max_steps_per_epoch."""
    steps = len(loader)
    if config.get('max_steps_per_epoch'):
        steps = min(steps, int(config['max_steps_per_epoch']))
    return steps


def train_one_epoch(model, loader, optimizer, scheduler, step_fn, *, config, device, epoch, ramp_alpha,
                    log_path=None, start_step=0, steps=None, run=None):
    """Train one epoch from step `start_step`; returns the epoch averages of every loss, the LR and the throughput.

    `loader` yields the epoch's batches from `start_step` on and `steps` is the full epoch's length (default:
    epoch_steps(loader, config)). `run` (a TrainingRun) restores a resumed epoch's RNG and running averages,
    writes step checkpoints and decides what a non-finite loss does; without it such a loss stops the epoch.
    """
    model.train()
    steps = epoch_steps(loader, config) if steps is None else steps
    warmup_epochs = int(config['schedular']['warmup_epochs'])
    step_size = int(config.get('warmup_step_size', 100))
    log_every = int(config.get('log_every', 50))
    tracker = run.take_tracker() if run else utils.MetricTracker()
    counting = getattr(getattr(loader, 'dataset', None), 'skip_bad_images', False)
    bar = tqdm(total=steps, initial=start_step, desc=f'epoch {epoch}', disable=not utils.is_main_process(),
               dynamic_ncols=True)
    world = utils.get_world_size()
    t_epoch = t_last = time.time()
    data_wait = 0.0
    samples = 0
    it = iter(loader)
    if run:
        run.restore_data_rng()  # after the iterator exists: making it may draw from the global generators
    for i in range(start_step, steps):
        t0 = time.time()
        raw = next(it)
        if isinstance(raw, CountedBatch):
            if run:
                run.skipped_images += raw.skipped
            raw = raw.batch
        batch = to_device(raw, device)
        data_wait += time.time() - t0
        alpha = alpha_at(config, epoch, i, steps, ramp_alpha)
        with autocast(device, config.get('precision', 'fp32')):
            loss_dict = step_fn(model, batch, alpha)
        loss = sum(loss_dict.values())
        skip = run.skip_nonfinite(loss, loss_dict, epoch, i) if run else _stop_if_nonfinite(loss, loss_dict, epoch, i)
        optimizer.zero_grad(set_to_none=True)
        if not skip:
            loss.backward()
            optimizer.step()
        warmup_step(scheduler, epoch, i, warmup_epochs, step_size)  # the schedule follows the data position
        batch_size = _batch_size(batch)
        samples += batch_size * world
        if not skip:
            tracker.update(batch_size, **{k: v.item() for k, v in loss_dict.items()})
        tracker.update(1, lr=optimizer.param_groups[0]['lr'])
        if utils.is_main_process():
            bar.update(1)
            if (i + 1) % log_every == 0 or i + 1 == steps:
                now = time.time()
                rate = samples / max(now - t_epoch, 1e-9)
                bar.set_postfix({k: f'{v.item():.3f}' for k, v in loss_dict.items()} | {'samples/s': f'{rate:.1f}'})
                if log_path:
                    record = _step_record(epoch, i, loss_dict, optimizer, rate, data_wait, now - t_last, device)
                    if run and counting:
                        record['skipped_images'] = run.skipped_images
                    if run and run.nonfinite_skipped:
                        record['nonfinite_skipped'] = run.nonfinite_skipped
                    utils.append_jsonl(log_path, record)
                t_last = now
        if run:
            run.after_step(epoch, i, steps, tracker)
    bar.close()
    tracker.synchronize()
    stats = tracker.summary()
    elapsed = time.time() - t_epoch
    stats.update(samples_per_s=samples / max(elapsed, 1e-9), data_wait_s=data_wait, epoch_time_s=elapsed)
    if run and counting:
        stats['skipped_images'] = int(_sum_over_ranks(run.skipped_images))
        if stats['skipped_images']:
            print(f'epoch {epoch}: skipped {stats["skipped_images"]} unreadable images (skip_bad_images)')
    if run and run.max_nonfinite:
        stats['nonfinite_skipped'] = run.nonfinite_skipped
    return stats


def _stop_if_nonfinite(loss, loss_dict, epoch, i):
    if not torch.isfinite(loss):
        raise FloatingPointError(f'non-finite loss {loss.item()} at epoch {epoch} step {i} '
                                 f'({ {k: float(v.detach()) for k, v in loss_dict.items()} })')
    return False


def reseed_loader(loader, seed, epoch):
    """Make the workers' seeds a function of (seed, epoch) so a resumed run augments like an uninterrupted one."""
    if getattr(loader, 'generator', None) is not None:
        loader.generator.manual_seed(seed * 1000 + epoch)


def _batch_size(batch):
    first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
    return int(first.shape[0])


def _step_record(epoch, i, loss_dict, optimizer, rate, data_wait, interval, device):
    rec = {'epoch': epoch, 'step': i, 'lr': optimizer.param_groups[0]['lr'], 'samples_per_s': round(rate, 2),
           'data_wait_s': round(data_wait, 3), 'interval_s': round(interval, 3)}
    rec.update({k: round(v.item(), 5) for k, v in loss_dict.items()})
    if device.type == 'cuda':
        rec['peak_mem_gb'] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return rec


def _collective_device():
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _sum_over_ranks(value):
    """`value` summed over every rank (itself without a process group)."""
    if not utils.is_dist_avail_and_initialized():
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return total.item()


def _gather_from_ranks(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a process group)."""
    if not utils.is_dist_avail_and_initialized():
        return [obj]
    gathered = [None] * utils.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _broadcast_from_main(obj):
    """Rank 0's `obj` on every rank."""
    if not utils.is_dist_avail_and_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ---- each epoch's data -------------------------------------------------------------------------------------------
class CountedBatch(NamedTuple):
    """A collated batch plus the images its producing process skipped since its previous batch."""

    batch: object
    skipped: int


class CountSkips:
    """Collate wrapper that reports skipped unreadable images (skip_bad_images) from whichever process loads data.

    Each DataLoader worker holds its own copy of the dataset and of this wrapper, so the counts travel with the
    batches instead of staying in the workers.
    """

    def __init__(self, collate_fn, dataset):
        """Wrap `collate_fn` (None: torch's default collate) for data read from `dataset`."""
        self.collate_fn = collate_fn or default_collate
        self.dataset = dataset
        self.reported = 0

    def __call__(self, items):
        """Collate `items` and attach the skip count since the last call in this process."""
        batch = self.collate_fn(items)
        info = get_worker_info()
        total = int(getattr(info.dataset if info is not None else self.dataset, 'num_skipped', 0))
        delta, self.reported = total - self.reported, total
        return CountedBatch(batch, delta)


class BatchPlan(Sampler):
    """One epoch of a batch sampler's index lists from batch `start` on (earlier ones are listed, never loaded).

    With `seed_parts`, every index of batch k comes as (index, batch_seed(*seed_parts, k)) for StepSeeded.
    """

    def __init__(self, batch_sampler, start=0, seed_parts=None):
        """Plan `batch_sampler`'s batches from `start` on."""
        self.batch_sampler, self.start, self.seed_parts = batch_sampler, int(start), seed_parts

    def __iter__(self):
        for k, batch in enumerate(self.batch_sampler):
            if k < self.start:
                continue
            if self.seed_parts is None:
                yield batch
            else:
                seed = batch_seed(*self.seed_parts, k)
                yield [(index, seed) for index in batch]

    def __len__(self):
        return max(0, len(self.batch_sampler) - self.start)


class StepSeeded(Dataset):
    """A map-style dataset whose batches are loaded with every RNG seeded from their (seed, epoch, step).

    Augmentations then depend neither on the number of DataLoader workers nor on where a run was resumed.
    """

    def __init__(self, dataset):
        """Wrap `dataset`; indices arrive as (index, seed) pairs from BatchPlan."""
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with seeded_rngs(seed):
            return self.dataset[index]

    def __getitems__(self, items):
        with seeded_rngs(items[0][1]):
            return [self.dataset[index] for index, _ in items]

    @property
    def num_skipped(self):
        """Unreadable images the wrapped dataset skipped in this process."""
        return getattr(self.dataset, 'num_skipped', 0)

    @property
    def skip_bad_images(self):
        """Whether the wrapped dataset skips unreadable images."""
        return getattr(self.dataset, 'skip_bad_images', False)


class EpochData:
    """Turns the script's training loader into each epoch's loader: sampler epoch, worker seeds, resume position.

    - Shards (a dataset with `set_position`) are told (epoch, start step, seed) and position themselves.
    - Map-style data: the sampler order and worker seeds are functions of (seed, epoch); a resumed epoch gets a
      one-epoch loader whose BatchPlan skips the batches already trained on without loading their images.
    - `data_seed_per_step: true` seeds every batch from (seed + rank, epoch, step), so a resume is exact with
      DataLoader workers too.
    """

    def __init__(self, loader, sampler, seed, config):
        """Take the script's loader (and its sampler with set_epoch); `seed` is args.seed."""
        self.loader, self.sampler, self.seed = loader, sampler, int(seed)
        self.per_step = bool(config.get('data_seed_per_step', False))
        if getattr(loader.dataset, 'skip_bad_images', False) and not isinstance(loader.collate_fn, CountSkips):
            loader.collate_fn = CountSkips(loader.collate_fn, loader.dataset)
        self._warned = False

    def for_epoch(self, epoch, start=0):
        """The loader to iterate for `epoch`, yielding its batches from step `start` on."""
        loader, data = self.loader, self.loader.dataset
        if self.sampler is not None and hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)
        if hasattr(data, 'set_position'):
            data.set_position(epoch, start, seed=self.seed)
            return loader
        rank_seed = self.seed + utils.get_rank()
        reseed_loader(loader, rank_seed, epoch)
        if start == 0 and not self.per_step:
            return loader
        if loader.batch_sampler is None:
            raise ValueError('fit: the training loader has no batch sampler (batch_size=None), so a resumed epoch '
                             'cannot skip batches; build it with a batch size')
        if start and not hasattr(loader.sampler, 'set_epoch') and not self._warned:
            self._warned = True
            print('warning: the training loader has no sampler with set_epoch, so its order is not a function of '
                  '(seed, epoch) and the resumed epoch may visit samples in another order; pass a '
                  'DistributedSampler (as Pretrain.py does) for exact resume')
        plan = BatchPlan(loader.batch_sampler, start, (rank_seed, epoch) if self.per_step else None)
        dataset = StepSeeded(data) if self.per_step else data
        return _one_epoch_loader(loader, dataset, plan)


def _one_epoch_loader(template, dataset, batch_sampler):
    """A DataLoader like `template` over `dataset` and `batch_sampler`, with workers that live for one epoch."""
    kwargs = dict(batch_sampler=batch_sampler, num_workers=template.num_workers, collate_fn=template.collate_fn,
                  pin_memory=template.pin_memory, timeout=template.timeout, worker_init_fn=template.worker_init_fn,
                  multiprocessing_context=template.multiprocessing_context, generator=template.generator)
    if template.num_workers > 0:
        kwargs['prefetch_factor'] = template.prefetch_factor
    return DataLoader(dataset, **kwargs)


# ---- checkpoints -------------------------------------------------------------------------------------------------
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


def save_checkpoint(output_dir, model, optimizer, scheduler, config, epoch, extra=None, best=False):
    """Atomically write checkpoint_last.pth and link it as checkpoint_XX.pth (and checkpoint_best.pth)."""
    last = os.path.join(output_dir, 'checkpoint_last.pth')
    utils.atomic_torch_save(_checkpoint_dict(model, optimizer, scheduler, config, epoch, extra), last)
    names = [f'checkpoint_{epoch:02d}.pth'] + (['checkpoint_best.pth'] if best else [])
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
    """Training checkpoints in `output_dir`, newest first (checkpoint_last.pth first when it is a separate file)."""
    if not os.path.isdir(output_dir):
        return []
    named = sorted(((_checkpoint_position(n), n) for n in os.listdir(output_dir) if _checkpoint_position(n)),
                   reverse=True)
    paths = [os.path.join(output_dir, n) for _, n in named]
    last = os.path.join(output_dir, 'checkpoint_last.pth')
    if os.path.isfile(last) and not any(os.path.samefile(last, p) for p in paths):
        paths.insert(0, last)
    return paths


def check_training_checkpoint(path):
    """Raise CheckpointError unless `path` is an intact training checkpoint (CRC-checked, with model/optimizer/...)."""
    from models.checkpoint import CheckpointError, load_checkpoint_file, verify_checkpoint_file
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
    from models.checkpoint import CheckpointError
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
    path = _broadcast_from_main(path)  # every rank resumes from the same file
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
    from models.checkpoint import CheckpointError, load_checkpoint_file, verify_checkpoint_file
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


# ---- the state of a run ------------------------------------------------------------------------------------------
class TrainingRun:
    """Where a run stands and its fault policy: what checkpoints hold, when they are written, what NaN losses do.

    A checkpoint holds model (momentum encoders and queues included), optimizer, scheduler, config, epoch, the
    steps done in that epoch (`step_in_epoch`, None at an epoch's end), `global_step`, and per rank the RNG states,
    running loss averages and skipped-image count, so a resumed run continues bit for bit.
    """

    def __init__(self, args, config, model, optimizer, scheduler):
        """Read the robustness keys of `config`: checkpoint_every_steps, keep_step_checkpoints, skip_nonfinite_steps."""
        self.output_dir, self.seed, self.config = args.output_dir, int(args.seed), config
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.every = int(config.get('checkpoint_every_steps') or 0)
        self.keep = int(config.get('keep_step_checkpoints', 2))
        self.max_nonfinite = int(config.get('skip_nonfinite_steps', 0))
        if self.keep < 1 or self.every < 0 or self.max_nonfinite < 0:
            raise utils.ConfigError('checkpoint_every_steps and skip_nonfinite_steps must be >= 0 and '
                                    f'keep_step_checkpoints >= 1 (got {self.every}, {self.max_nonfinite}, '
                                    f'{self.keep}); fix them in the config or --opt')
        self.epoch = self.step = self.global_step = 0
        self.best, self.best_epoch = -math.inf, None
        self.nonfinite_skipped = 0
        self.skipped_images = 0
        self.last_checkpoint = None
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
        self.global_step = int(ckpt.get('global_step', 0))
        self.nonfinite_skipped = int(ckpt.get('nonfinite_skipped', 0))
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
        bad = _sum_over_ranks(0.0 if torch.isfinite(loss) else 1.0) > 0  # every rank decides the same way
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
        """Count the step and write a step checkpoint every `checkpoint_every_steps` steps (not at an epoch's end)."""
        self.global_step += 1
        self.epoch, self.step = epoch, i + 1
        if self.every and self.step % self.every == 0 and self.step < steps:
            self._save(epoch, self.step, tracker)

    def end_epoch(self, epoch, metrics, select_key):
        """Track the best metric and write the epoch's checkpoint; returns whether it is the best so far."""
        improved = select_key is not None and metrics.get(select_key, -math.inf) > self.best
        if improved:
            self.best, self.best_epoch = metrics[select_key], epoch
        self._save(epoch, None, utils.MetricTracker(), best=improved)
        self.epoch, self.step, self.skipped_images = epoch + 1, 0, 0
        return improved

    def _save(self, epoch, step, tracker, best=False):
        per_rank = _gather_from_ranks({'rng': utils.get_rng_state(), 'skipped_images': self.skipped_images,
                                       'tracker': {'counts': dict(tracker.counts), 'totals': dict(tracker.totals)}})
        extra = {'best': self.best, 'best_epoch': self.best_epoch, 'global_step': self.global_step,
                 'nonfinite_skipped': self.nonfinite_skipped, 'seed': self.seed, 'world_size': len(per_rank),
                 'per_rank': per_rank}
        args = (self.output_dir, self.model, self.optimizer, self.scheduler, self.config, epoch)
        if step is None:
            if utils.is_main_process():
                save_checkpoint(*args, extra=extra, best=best)
            self.last_checkpoint = os.path.join(self.output_dir, f'checkpoint_{epoch:02d}.pth')
        else:
            if utils.is_main_process():
                save_step_checkpoint(*args, step, extra=extra, keep=self.keep)
            self.last_checkpoint = os.path.join(self.output_dir, step_checkpoint_name(epoch, step))


# ---- the epoch loop ----------------------------------------------------------------------------------------------
def fit(args, config, model, train_loader, step_fn, *, evaluate_fn=None, select_key=None, ramp_alpha=True,
        find_unused_parameters=False, train_sampler=None):
    """Train for schedular.epochs epochs with per-epoch evaluation, logging, checkpoints and resume.

    `select_key`: metric (from evaluate_fn) whose maximum marks checkpoint_best.pth.
    Returns the list of per-epoch log records.
    """
    device = device_of(args)
    model_ddp, model = wrap_ddp(model, args, find_unused_parameters)
    optimizer = create_optimizer(config['optimizer'], model, fused=resolve_speed_mode(config)['fused'],
                                 wd_exempt_extra=config.get('wd_exempt_extra'))
    scheduler = create_scheduler(config['schedular'], optimizer)
    run = TrainingRun(args, config, model, optimizer, scheduler)
    resume_path = resolve_resume(args)
    if resume_path:
        run.resume(resume_path)
    data = EpochData(train_loader, train_sampler, args.seed, config)
    warmup_epochs = int(config['schedular']['warmup_epochs'])
    log_file = os.path.join(args.output_dir, 'log.txt')
    steps_file = os.path.join(args.output_dir, 'train_steps.jsonl')
    records = []
    for epoch in range(run.epoch, int(config['schedular']['epochs'])):
        start = run.step if epoch == run.epoch else 0
        epoch_start(scheduler, epoch, warmup_epochs)
        steps = epoch_steps(train_loader, config)
        loader = data.for_epoch(epoch, start)
        stats = train_one_epoch(model_ddp, loader, optimizer, scheduler, step_fn, config=config, device=device,
                                epoch=epoch, ramp_alpha=ramp_alpha, log_path=steps_file, start_step=start,
                                steps=steps, run=run)
        record = {f'train_{k}': (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()}
        metrics = evaluate_fn(model, epoch) if evaluate_fn else {}
        record.update(metrics)
        record['epoch'] = epoch
        run.end_epoch(epoch, metrics, select_key)
        if utils.is_main_process():
            utils.append_jsonl(log_file, record)
        records.append(record)
        utils.barrier()
    if utils.is_main_process() and run.best_epoch is not None:
        with open(log_file, 'a') as f:
            f.write(f'best epoch: {run.best_epoch}\n')
    return records


def print_json(record):
    """Print a result dict as one JSON line on the main process."""
    if utils.is_main_process():
        print(json.dumps(record))


def destroy():
    """Tear down the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- result files (VQA, grounding) -------------------------------------------------------------------------------
def gather_objects(items):
    """The list `items` of every rank concatenated in rank order; `items` itself without a process group."""
    if not utils.is_dist_avail_and_initialized() or utils.get_world_size() == 1:
        return list(items)
    gathered = [None] * utils.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


def save_result(result, result_dir, filename, merge=None):
    """Write this rank's `<filename>_rank<r>.json`, then the all-rank `<filename>.json` on rank 0.

    `merge` (e.g. deduplication) is applied to the concatenated list. Ranks exchange results in memory, so no
    shared file system is needed. Returns (path, merged list) on rank 0 and (None, None) elsewhere.
    """
    os.makedirs(result_dir, exist_ok=True)
    utils.atomic_write_json(result, os.path.join(result_dir, f'{filename}_rank{utils.get_rank()}.json'))
    merged = gather_objects(result)
    path = None
    if utils.is_main_process():
        merged = merge(merged) if merge else merged
        path = os.path.join(result_dir, f'{filename}.json')
        utils.atomic_write_json(merged, path)
        print(f'result file saved to {path}')
    utils.barrier()
    return (path, merged) if utils.is_main_process() else (None, None)


# ---- evaluation-only runs (--evaluate) ---------------------------------------------------------------------------
def evaluate_only(args, model, evaluate_fn):
    """One evaluation pass logged to log.txt as epoch 0 (the official --evaluate line); returns the metrics."""
    metrics = evaluate_fn(model, 0)
    if utils.is_main_process():
        utils.append_jsonl(os.path.join(args.output_dir, 'log.txt'), {**metrics, 'epoch': 0})
    utils.barrier()
    return metrics


def best_logged_record(output_dir, select_key):
    """The epoch record of output_dir/log.txt with the highest `select_key` (first on ties; resumed runs too)."""
    path = os.path.join(output_dir, 'log.txt')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.startswith('{')]
    scored = [r for r in records if select_key in r]
    return max(scored, key=lambda r: r[select_key]) if scored else None
