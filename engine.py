"""The shared training engine: argument parsing, set-up, one train epoch, the epoch loop, checkpoints, resume.

Every entry script (Pretrain.py, Retrieval.py, ...) parses its arguments with `base_parser`, calls `setup`,
builds its datasets and model, and hands `fit` a `step_fn(model, batch, alpha) -> {loss_name: tensor}` plus an
optional `evaluate_fn(model, epoch) -> {metric: value}`. Everything a second script would copy lives here.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import utils
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
                        "or a path")
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
def train_one_epoch(model, loader, optimizer, scheduler, step_fn, *, config, device, epoch, ramp_alpha,
                    log_path=None):
    """Train one epoch; returns the epoch averages of every loss, the LR and the throughput."""
    model.train()
    steps = len(loader)
    if config.get('max_steps_per_epoch'):
        steps = min(steps, int(config['max_steps_per_epoch']))
    warmup_epochs = int(config['schedular']['warmup_epochs'])
    step_size = int(config.get('warmup_step_size', 100))
    log_every = int(config.get('log_every', 50))
    tracker = utils.MetricTracker()
    bar = tqdm(total=steps, desc=f'epoch {epoch}', disable=not utils.is_main_process(), dynamic_ncols=True)
    world = utils.get_world_size()
    t_epoch = t_last = time.time()
    data_wait = 0.0
    samples = 0
    it = iter(loader)
    for i in range(steps):
        t0 = time.time()
        batch = to_device(next(it), device)
        data_wait += time.time() - t0
        alpha = alpha_at(config, epoch, i, steps, ramp_alpha)
        with autocast(device, config.get('precision', 'fp32')):
            loss_dict = step_fn(model, batch, alpha)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f'non-finite loss {loss.item()} at epoch {epoch} step {i} '
                                     f'({ {k: float(v) for k, v in loss_dict.items()} }); the last good checkpoint '
                                     f'is the newest checkpoint_*.pth in the output folder')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup_step(scheduler, epoch, i, warmup_epochs, step_size)
        batch_size = _batch_size(batch)
        samples += batch_size * world
        tracker.update(batch_size, **{k: v.item() for k, v in loss_dict.items()})
        tracker.update(1, lr=optimizer.param_groups[0]['lr'])
        if utils.is_main_process():
            bar.update(1)
            if (i + 1) % log_every == 0 or i + 1 == steps:
                now = time.time()
                rate = samples / max(now - t_epoch, 1e-9)
                bar.set_postfix({k: f'{v.item():.3f}' for k, v in loss_dict.items()} | {'samples/s': f'{rate:.1f}'})
                if log_path:
                    utils.append_jsonl(log_path, _step_record(epoch, i, loss_dict, optimizer, rate, data_wait,
                                                              now - t_last, device))
                t_last = now
    bar.close()
    tracker.synchronize()
    stats = tracker.summary()
    elapsed = time.time() - t_epoch
    stats.update(samples_per_s=samples / max(elapsed, 1e-9), data_wait_s=data_wait, epoch_time_s=elapsed)
    return stats


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


# ---- checkpoints -------------------------------------------------------------------------------------------------
def save_checkpoint(output_dir, model, optimizer, scheduler, config, epoch, extra=None, best=False):
    """Atomically write checkpoint_last.pth and link it as checkpoint_XX.pth (and checkpoint_best.pth)."""
    obj = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'lr_scheduler': scheduler.state_dict(),
           'config': config, 'epoch': epoch, 'rng': utils.get_rng_state()}
    obj.update(extra or {})
    last = os.path.join(output_dir, 'checkpoint_last.pth')
    utils.atomic_torch_save(obj, last)
    names = [f'checkpoint_{epoch:02d}.pth'] + (['checkpoint_best.pth'] if best else [])
    for name in names:
        _link_or_copy(last, os.path.join(output_dir, name))
    return last


def _link_or_copy(src, dst):
    tmp = dst + '.tmp'
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def resolve_resume(args):
    """The checkpoint file `--resume` names, or None."""
    if args.resume is None:
        return None
    if args.resume in ('last', 'auto'):
        if args.checkpoint:
            return args.checkpoint
        return os.path.join(args.output_dir, 'checkpoint_last.pth')
    return args.resume


def load_resume(path, model, optimizer, scheduler):
    """Restore model (strict), optimizer, scheduler and RNG; returns the checkpoint dict."""
    from models.checkpoint import load_checkpoint_file, CheckpointError
    ckpt = load_checkpoint_file(path)
    for key in ('model', 'optimizer', 'lr_scheduler', 'epoch'):
        if key not in ckpt:
            raise CheckpointError(f'{path} has no {key!r}: it is not a training checkpoint; use --checkpoint to '
                                  f'start from its weights instead of --resume')
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['lr_scheduler'])
    if 'rng' in ckpt:
        utils.set_rng_state(ckpt['rng'])
    print(f'resumed from {path} (epoch {ckpt["epoch"]})')
    return ckpt


# ---- the epoch loop ----------------------------------------------------------------------------------------------
def fit(args, config, model, train_loader, step_fn, *, evaluate_fn=None, select_key=None, ramp_alpha=True,
        find_unused_parameters=False, train_sampler=None):
    """Train for schedular.epochs epochs with per-epoch evaluation, logging, checkpoints and resume.

    `select_key`: metric (from evaluate_fn) whose maximum marks checkpoint_best.pth.
    Returns the list of per-epoch log records.
    """
    device = device_of(args)
    model_ddp, model = wrap_ddp(model, args, find_unused_parameters)
    optimizer = create_optimizer(config['optimizer'], model, wd_exempt_extra=config.get('wd_exempt_extra'))
    scheduler = create_scheduler(config['schedular'], optimizer)
    start_epoch, best, best_epoch = 0, -math.inf, None
    resume_path = resolve_resume(args)
    if resume_path:
        ckpt = load_resume(resume_path, model, optimizer, scheduler)
        start_epoch = ckpt['epoch'] + 1
        best, best_epoch = ckpt.get('best', -math.inf), ckpt.get('best_epoch')
    warmup_epochs = int(config['schedular']['warmup_epochs'])
    log_file = os.path.join(args.output_dir, 'log.txt')
    steps_file = os.path.join(args.output_dir, 'train_steps.jsonl')
    records = []
    for epoch in range(start_epoch, int(config['schedular']['epochs'])):
        epoch_start(scheduler, epoch, warmup_epochs)
        if train_sampler is not None and hasattr(train_sampler, 'set_epoch'):
            train_sampler.set_epoch(epoch)
        reseed_loader(train_loader, args.seed + utils.get_rank(), epoch)
        stats = train_one_epoch(model_ddp, train_loader, optimizer, scheduler, step_fn, config=config,
                                device=device, epoch=epoch, ramp_alpha=ramp_alpha, log_path=steps_file)
        record = {f'train_{k}': (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()}
        metrics = evaluate_fn(model, epoch) if evaluate_fn else {}
        record.update(metrics)
        record['epoch'] = epoch
        improved = select_key is not None and metrics.get(select_key, -math.inf) > best
        if improved:
            best, best_epoch = metrics[select_key], epoch
        if utils.is_main_process():
            save_checkpoint(args.output_dir, model, optimizer, scheduler, config, epoch,
                            extra={'best': best, 'best_epoch': best_epoch}, best=improved)
            utils.append_jsonl(log_file, record)
        records.append(record)
        utils.barrier()
    if utils.is_main_process() and best_epoch is not None:
        with open(log_file, 'a') as f:
            f.write(f'best epoch: {best_epoch}\n')
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
