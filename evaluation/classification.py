"""Exact classification accuracy for NLVR2 and SNLI-VE evaluation.

Accuracy counts every evaluation sample exactly once. The evaluation loaders (engine/tasks.py) give each rank a strided share
without padding (`UnpaddedDistributedSampler`); with any torch `DistributedSampler` that pads instead, the padded
duplicates (the local positions i with rank + i * world_size >= len(dataset)) are left out of the count. The
official code counts those duplicates, so its multi-GPU figure can differ slightly; at one process both agree.
"""
import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import utils


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
