"""evaluation/classification.py: accuracy counts every sample exactly once, also across ranks whose sampler pads."""
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dataset import TextBatch, UnpaddedDistributedSampler
from engine.tasks import batch_sizes, classification_step as make_step
from evaluation.classification import evaluate_accuracy, local_unique_count


class Items(torch.utils.data.Dataset):
    """Item i: image = [i], label = i % 3 (the stub model predicts the label right iff i < 7)."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i % 3


def collate(items):
    images = torch.stack([x for x, _ in items])
    ids = torch.ones(len(items), 2, dtype=torch.long)
    return images, TextBatch(ids, ids), torch.tensor([y for _, y in items])


class Stub(torch.nn.Module):
    def forward(self, image, text, targets, alpha=0, train=True):
        right = torch.nn.functional.one_hot(targets, 3).float()
        return torch.where(image < 7, right, 1 - right)


def per_rank(sampler_cls, world):
    results = []
    for rank in range(world):
        sampler = sampler_cls(Items(), num_replicas=world, rank=rank, shuffle=False) \
            if sampler_cls is DistributedSampler else sampler_cls(Items(), world, rank)
        loader = DataLoader(Items(), batch_size=3, sampler=sampler, collate_fn=collate)
        results.append(evaluate_accuracy(Stub(), loader, lambda b: b, torch.device('cpu')))
    return results


def test_single_process_counts_every_item():
    loader = DataLoader(Items(), batch_size=4, collate_fn=collate)
    assert local_unique_count(loader) is None
    assert evaluate_accuracy(Stub(), loader, lambda b: b, torch.device('cpu')) == {'acc': 0.7, 'n': 10, 'padded': 0}


def test_padded_distributed_sampler_duplicates_are_not_counted():
    results = per_rank(DistributedSampler, world=4)  # 10 items padded to 12: ranks 2 and 3 get one duplicate each
    assert sum(r['n'] for r in results) == 10 and sum(r['padded'] for r in results) == 2
    correct = sum(round(r['acc'] * r['n']) for r in results)
    assert correct == 7


def test_unpadded_sampler_needs_no_correction():
    results = per_rank(UnpaddedDistributedSampler, world=4)
    assert sum(r['n'] for r in results) == 10 and sum(r['padded'] for r in results) == 0
    assert sum(round(r['acc'] * r['n']) for r in results) == 7


def test_batch_sizes_and_step():
    assert batch_sizes({'batch_size': 16}) == (16, 16)
    assert batch_sizes({'batch_size_train': 32, 'batch_size_test': 64}) == (32, 64)
    step = make_step(lambda b: b)
    calls = []

    class Model(torch.nn.Module):
        def forward(self, image, text, targets, alpha=0, train=True):
            calls.append((alpha, train))
            return image.sum()
    out = step(Model(), (torch.ones(2), None, torch.zeros(2)), 0.25)
    assert set(out) == {'loss'} and calls == [(0.25, True)]
