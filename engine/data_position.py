"""Resumable data positions: each epoch's loader as a function of (seed, epoch), started at any step.

A resumed epoch re-creates the uninterrupted run's data order and skips the batches already trained on without
loading their images; with `data_seed_per_step` every batch's augmentations are seeded from (seed + rank, epoch,
step), so a resume is exact with DataLoader workers too. Unreadable images skipped by a dataset are counted in
whichever process loads them and travel with the batches.
"""
from typing import NamedTuple

from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

import utils
from dataset.shards import batch_seed, seeded_rngs


def reseed_loader(loader, seed, epoch):
    """Make the workers' seeds a function of (seed, epoch) so a resumed run augments like an uninterrupted one."""
    if getattr(loader, 'generator', None) is not None:
        loader.generator.manual_seed(seed * 1000 + epoch)



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
