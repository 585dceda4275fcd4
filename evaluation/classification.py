"""Classification fine-tuning shared by NLVR.py and VE.py: loaders, the training step and exact accuracy (spec 12.4).

Accuracy counts every evaluation sample exactly once. The loaders built here give each rank a strided share
without padding (`UnpaddedDistributedSampler`); with any torch `DistributedSampler` that pads instead, the padded
duplicates (the local positions i with rank + i * world_size >= len(dataset)) are left out of the count. The
official code counts those duplicates, so its multi-GPU figure can differ slightly; at one process both agree.
"""
import os
from typing import NamedTuple, Optional

import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import utils
from dataset import build_collate_fn, create_dataset, create_loader, create_sampler, static_shape_options


class TaskLoaders(NamedTuple):
    """Train/val/test loaders of a classification task and the training sampler (None without a process group)."""

    train: Optional[torch.utils.data.DataLoader]
    val: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader
    train_sampler: Optional[DistributedSampler]


def batch_sizes(config):
    """(train, eval) per-GPU batch sizes: batch_size_train/batch_size_test (VE) or one batch_size (NLVR2)."""
    train = config.get('batch_size_train', config.get('batch_size'))
    test = config.get('batch_size_test', config.get('batch_size'))
    if train is None or test is None:
        raise KeyError('the config needs batch_size (NLVR2) or batch_size_train and batch_size_test (SNLI-VE)')
    return train, test


def build_loaders(task, config, tokenizer, distributed, seed, with_train=True):
    """Loaders of `task` ('nlvr' or 've'): shuffled train (drop_last), exactly-once val and test."""
    splits = create_dataset(task, config)
    world, rank = utils.get_world_size(), utils.get_rank()
    samplers = (create_sampler([splits.train, splits.val, splits.test], [True, False, False], world, rank, seed)
                if distributed else [None, None, None])
    train_bs, test_bs = batch_sizes(config)
    workers = config.get('num_workers', 4)
    static = static_shape_options(config)  # text bucketed to multiples of 8 under compile: true (spec 16.5)
    collates = [build_collate_fn(task, tokenizer, train=True, **static),
                build_collate_fn(task, tokenizer, train=False, **static),
                build_collate_fn(task, tokenizer, train=False, **static)]
    datasets = [splits.train if with_train else None, splits.val, splits.test]
    train, val, test = create_loader(datasets, samplers, [train_bs, test_bs, test_bs], workers, [True, False, False],
                                     collates, seed=seed + rank)
    return TaskLoaders(train, val, test, samplers[0])


def make_step(unpack):
    """step_fn for engine.fit: `unpack(batch)` -> (image, text, label); returns {'loss': ...}."""
    def step(model, batch, alpha):
        image, text, label = unpack(batch)
        return {'loss': model(image, text, label, alpha=alpha, train=True)}
    return step


def local_unique_count(loader):
    """How many leading samples of this rank's loader are not sampler padding (None: all of them)."""
    sampler = getattr(loader, 'sampler', None)
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
    return None


@torch.no_grad()
def evaluate_accuracy(model, loader, unpack, device, autocast=None, desc='eval'):
    """{'acc': fraction correct, 'n': samples counted, 'padded': duplicates skipped} over all ranks."""
    model.eval()
    unique = local_unique_count(loader)
    correct = counted = seen = 0
    for batch in tqdm(loader, desc=desc, disable=not utils.is_main_process(), leave=False):
        image, text, label = unpack(batch)
        image, text, label = image.to(device), text.to(device), label.to(device)
        if autocast is not None:
            with autocast():
                logits = model(image, text, label, train=False)
        else:
            logits = model(image, text, label, train=False)
        keep = label.shape[0] if unique is None else max(0, min(label.shape[0], unique - seen))
        correct += int((logits[:keep].argmax(dim=1) == label[:keep]).sum())
        counted += keep
        seen += label.shape[0]
    totals = torch.tensor([correct, counted, seen - counted], dtype=torch.float64, device=device)
    utils.all_reduce_sum(totals)
    correct, counted, padded = (int(v) for v in totals.tolist())
    return {'acc': correct / max(counted, 1), 'n': counted, 'padded': padded}


def make_evaluate(unpack, loaders, device, autocast=None):
    """evaluate_fn(model, epoch) -> {'<split>_acc', '<split>_n'} for every (split, loader) in `loaders`."""
    def evaluate(model, epoch):
        metrics = {}
        for split, loader in loaders.items():
            result = evaluate_accuracy(model, loader, unpack, device, autocast, desc=f'{split} epoch {epoch}')
            metrics[f'{split}_acc'] = round(result['acc'], 6)
            metrics[f'{split}_n'] = result['n']
            note = f' ({result["padded"]} padded duplicates not counted)' if result['padded'] else ''
            print(f'{split} accuracy after epoch {epoch}: {100 * result["acc"]:.2f}% of {result["n"]} samples{note}')
        return metrics
    return evaluate


def report_best(args, select_key, val_name, test_name):
    """Print and save (output_dir/metrics.json) the val and test accuracy of the best-val epoch."""
    import engine  # the training engine sits above evaluation; imported here to keep module import order simple
    best = engine.best_logged_record(args.output_dir, select_key)
    if best is None or not utils.is_main_process():
        return
    summary = {'best_epoch': best['epoch'], f'{val_name}_acc': best['val_acc'], 'test_acc': best['test_acc'],
               'checkpoint': args.checkpoint, 'config': args.config}
    utils.atomic_write_json(summary, os.path.join(args.output_dir, 'metrics.json'))
    print(f'best {val_name} epoch {best["epoch"]}: {val_name} {100 * best["val_acc"]:.2f}%, '
          f'{test_name} {100 * best["test_acc"]:.2f}%')
