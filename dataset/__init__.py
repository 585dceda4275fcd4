"""Data package: datasets of every task, transforms, samplers and loaders (spec sections 11 and 13).

`create_dataset(task, config)` returns `DatasetSplits(train, val, test)` (None where the task has no such split):

| task | train | val | test |
|---|---|---|---|
| pretrain (also TA) | pretrain_dataset (ShardedPretrainDataset when `train_shards` is set) | None | None |
| re | re_train_dataset | re_eval_dataset | re_eval_dataset |
| vqa | vqa_dataset(split='train') | None | vqa_dataset(split='test') |
| nlvr, ve | nlvr_dataset / ve_dataset | same | same |
| grounding | grounding_dataset(mode='train') | None | grounding_dataset(mode='test') |

This package never imports `models/`.
"""

import random
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from dataset.caption_dataset import pretrain_dataset, re_eval_dataset, re_train_dataset
from dataset.collate import (TEXT_SETTINGS, TextBatch, TextCollator, VQACollator, build_collate_fn,
                             static_shape_options, tokenize)
from dataset.grounding_dataset import grounding_dataset
from dataset.image_io import IMAGE_BLIND_MODES, ImageLoadError, load_image, make_image_blind
from dataset.nlvr_dataset import nlvr_dataset
from dataset.shards import ShardedPretrainDataset
from dataset.text import pre_caption, pre_question
from dataset.transforms import build_transform, normalisation_of
from dataset.ve_dataset import ve_dataset
from dataset.vqa_dataset import vqa_dataset

TASKS = ("pretrain", "re", "vqa", "nlvr", "ve", "grounding")


class DatasetSplits(NamedTuple):
    """The train, val and test datasets of a task; a split the task lacks is None."""

    train: Optional[Dataset]
    val: Optional[Dataset]
    test: Optional[Dataset]


def _require(config, key: str, task: str):
    """Read a config key, failing with a message that names the task and the missing key."""
    if key not in config or config[key] in (None, ""):
        raise KeyError(f"create_dataset('{task}'): the config lacks `{key}`; add it to the task's YAML (spec 9.2)")
    return config[key]


def _fixes(config) -> bool:
    """The `randaugment_fixes` switch (docs/QUIRKS.md): the intended AutoContrast and Sharpness instead of the official."""
    return bool(config.get("randaugment_fixes", False))


def caption_sampling_of(config) -> str:
    """How a pretraining item with a caption list is read: config `data.caption_sampling`, else 'per_caption' for
    `model: vlmo` (one sample per caption, VLMo.md §13.2) and 'random' (ALBEF's per-access choice) otherwise."""
    chosen = (config.get("data") or {}).get("caption_sampling")
    return chosen or ("per_caption" if config.get("model") == "vlmo" else "random")


def raw_text_of(config) -> bool:
    """Whether texts reach the tokenizer as written: config `data.text_cleaning: raw | albef`, else raw for
    `model: vlmo` (VLMo.md 3.1: no pre_caption / pre_question, no word limit) and ALBEF's cleaning otherwise."""
    chosen = (config.get("data") or {}).get("text_cleaning")
    return (chosen or ("raw" if config.get("model") == "vlmo" else "albef")) == "raw"


def _train_test_transforms(config):
    """The fine-tuning training transform (random crop, flip, RandomAugment) and the test transform."""
    norm = normalisation_of(config)
    train = build_transform("train", config["image_res"], config.get("crop_min_scale"), _fixes(config), norm)
    return train, build_transform("test", config["image_res"], normalisation=norm)


def _simla_mim(config):
    """The `mim:` block of a SIMLA pretraining config whose masked image modelling is on, else None. The pretraining
    config is the one whose ViT has the mask token (`vit_mask_token: true`); text-assignment pretraining reads the
    same pairs without MIM."""
    if config.get("model") != "simla" or not config.get("vit_mask_token", False):
        return None
    mim = config.get("mim") or {}
    return mim if mim.get("enabled", True) else None


def _pretrain_transform(config):
    """ALBEF's pretraining transform; for SIMLA with MIM on, the three views of dataset/simla_views.py (image,
    tokenizer view, block-wise patch mask) instead, so the views and masks exist only when MIM needs them."""
    mim = _simla_mim(config)
    if mim is None:
        return build_transform("pretrain", config["image_res"], config.get("crop_min_scale"), _fixes(config),
                               normalisation_of(config))
    from dataset.simla_views import SimlaPretrainTransform
    options = {key: mim[key] for key in ("tokenizer_res", "view", "num_masking_patches", "min_num_patches",
                                         "max_num_patches", "min_aspect") if mim.get(key) is not None}
    return SimlaPretrainTransform(config["image_res"], patch_size=(config.get("vit") or {}).get("patch_size", 16),
                                  crop_min_scale=config.get("crop_min_scale"), randaugment_fixes=_fixes(config),
                                  **options)


def _pretrain_splits(config, skip: bool) -> DatasetSplits:
    """Pretraining (and TA pretraining) image-caption pairs: WebDataset shards when `train_shards` is set; VLMo's
    stage-2 text lines (dataset/text_lines.py) when `text_files` is."""
    if config.get("text_files"):
        from dataset.text_lines import text_line_dataset
        return DatasetSplits(text_line_dataset(config["text_files"]), None, None)
    transform = _pretrain_transform(config)
    if config.get("train_shards"):
        train = ShardedPretrainDataset(
            config["train_shards"], transform, _require(config, "batch_size", "pretrain"),
            epoch_samples=config.get("shard_epoch_samples"), shuffle_buffer=config.get("shuffle_buffer", 1000),
            skip_bad_images=skip,
        )
        return DatasetSplits(train, None, None)
    train = pretrain_dataset(
        _require(config, "train_file", "pretrain"), transform, config.get("image_root", ""), skip_bad_images=skip,
        caption_sampling=caption_sampling_of(config), raw_text=raw_text_of(config),
    )
    return DatasetSplits(train, None, None)


def _retrieval_splits(config, skip: bool) -> DatasetSplits:
    """COCO / Flickr30K retrieval: caption-level train set, image-level val and test sets."""
    root = _require(config, "image_root", "re")
    train_tf, test_tf = _train_test_transforms(config)
    raw = raw_text_of(config)
    return DatasetSplits(
        re_train_dataset(_require(config, "train_file", "re"), train_tf, root, skip_bad_images=skip, raw_text=raw),
        re_eval_dataset(_require(config, "val_file", "re"), test_tf, root, skip_bad_images=skip, raw_text=raw),
        re_eval_dataset(_require(config, "test_file", "re"), test_tf, root, skip_bad_images=skip, raw_text=raw),
    )


def _vqa_splits(config, skip: bool) -> DatasetSplits:
    """VQA v2 + VG-QA training set and the VQA test set with its answer list."""
    vqa_root, vg_root = _require(config, "vqa_root", "vqa"), _require(config, "vg_root", "vqa")
    eos = config.get("eos", "[SEP]")
    train_tf, test_tf = _train_test_transforms(config)
    train_file, test_file = _require(config, "train_file", "vqa"), _require(config, "test_file", "vqa")
    answer_list = _require(config, "answer_list", "vqa")
    raw = raw_text_of(config)
    train = vqa_dataset(train_file, train_tf, vqa_root, vg_root, eos=eos, split="train", skip_bad_images=skip,
                        raw_text=raw)
    test = vqa_dataset(
        test_file, test_tf, vqa_root, vg_root, eos=eos, split="test", answer_list=answer_list, skip_bad_images=skip,
        raw_text=raw,
    )
    return DatasetSplits(train, None, test)


def _three_split(dataset_class, task: str, config, skip: bool) -> DatasetSplits:
    """NLVR2 / SNLI-VE: train, val and test files under one image_root."""
    root = _require(config, "image_root", task)
    train_tf, test_tf = _train_test_transforms(config)
    raw = raw_text_of(config)
    return DatasetSplits(
        dataset_class(_require(config, "train_file", task), train_tf, root, skip_bad_images=skip, raw_text=raw),
        dataset_class(_require(config, "val_file", task), test_tf, root, skip_bad_images=skip, raw_text=raw),
        dataset_class(_require(config, "test_file", task), test_tf, root, skip_bad_images=skip, raw_text=raw),
    )


def _grounding_splits(config, skip: bool) -> DatasetSplits:
    """RefCOCO+ training expressions and the concatenated val + test files."""
    root = _require(config, "image_root", "grounding")
    train_tf = build_transform("grounding_train", config["image_res"], randaugment_fixes=_fixes(config))
    test_tf = build_transform("test", config["image_res"])
    train_file, test_file = _require(config, "train_file", "grounding"), _require(config, "test_file", "grounding")
    train = grounding_dataset(train_file, train_tf, root, mode="train", skip_bad_images=skip)
    test = grounding_dataset(test_file, test_tf, root, mode="test", skip_bad_images=skip)
    return DatasetSplits(train, None, test)


def create_dataset(task: str, config) -> DatasetSplits:
    """Build the (train, val, test) datasets of `task` from its config (keys of spec 9.2 plus skip_bad_images).

    `image_blind: fixed | shuffled` (default null) makes the pictures of every split uninformative about their texts
    (dataset.image_io.make_image_blind, shuffled seeded by `image_blind_seed`): the image-blind control of a run.
    """
    splits = _create_splits(task, config)
    mode = config.get("image_blind")
    if mode is None:
        return splits
    seed = int(config.get("image_blind_seed", 0))
    return DatasetSplits(*(None if split is None else make_image_blind(split, mode, seed + offset)
                           for offset, split in enumerate(splits)))


def _create_splits(task: str, config) -> DatasetSplits:
    """The (train, val, test) datasets of `task`, pictures as annotated."""
    _require(config, "image_res", task)
    skip = bool(config.get("skip_bad_images", False))
    if task == "pretrain":
        return _pretrain_splits(config, skip)
    if task == "re":
        return _retrieval_splits(config, skip)
    if task == "vqa":
        return _vqa_splits(config, skip)
    if task == "nlvr":
        return _three_split(nlvr_dataset, task, config, skip)
    if task == "ve":
        return _three_split(ve_dataset, task, config, skip)
    if task == "grounding":
        return _grounding_splits(config, skip)
    raise ValueError(f"create_dataset (dataset/__init__.py): unknown task {task!r}; use one of {TASKS}")


class UnpaddedDistributedSampler(DistributedSampler):
    """Non-shuffled strided split without padding, so evaluation sees every sample exactly once across ranks."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        """Give rank r the indices r, r + W, r + 2W, ... (the official assignment minus the padded tail)."""
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def create_sampler(datasets, shuffles, num_tasks: int, global_rank: int, seed: int = 0, pad_eval: bool = False):
    """One DistributedSampler per dataset (None for a None dataset); non-shuffled ones do not pad unless `pad_eval`."""
    if len(datasets) != len(shuffles):
        raise ValueError(f"create_sampler: {len(datasets)} datasets but {len(shuffles)} shuffle flags")
    samplers = []
    for dataset, shuffle in zip(datasets, shuffles):
        if dataset is None or isinstance(dataset, IterableDataset):
            samplers.append(None)  # an iterable dataset (shards) splits itself over ranks and workers
        elif shuffle or pad_eval:
            samplers.append(
                DistributedSampler(dataset, num_replicas=num_tasks, rank=global_rank, shuffle=shuffle, seed=seed)
            )
        else:
            samplers.append(UnpaddedDistributedSampler(dataset, num_tasks, global_rank))
    return samplers


def seed_worker(worker_id: int) -> None:
    """Seed numpy (RandomAugment) and Python `random` (caption sampling) from this worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _per_split(value, count: int, name: str) -> list:
    """Broadcast a scalar to every split, or check a list has one entry per split."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"create_loader: `{name}` has {len(values)} entries for {count} datasets")
    return values


def _check_nonempty(dataset, sampler, batch_size: int) -> None:
    """A drop_last loader over fewer items than one batch would silently yield nothing."""
    available = len(sampler) if sampler is not None else len(dataset)
    if available < batch_size:
        raise ValueError(
            f"create_loader: a training split has {available} items per process but batch size {batch_size} with "
            f"drop_last, so it would yield no batch; lower the batch size or add data"
        )


def create_loader(datasets, samplers, batch_size, num_workers, is_trains, collate_fns, seed: Optional[int] = None):
    """DataLoaders with the official rules: train drops the last batch and shuffles only without a sampler.

    `seed` (pass seed + rank) fixes the shuffle order and the workers' base seed; `seed_worker` then seeds numpy
    and `random` per worker. A None dataset gives a None loader.
    """
    count = len(datasets)
    columns = [
        _per_split(samplers, count, "samplers"),
        _per_split(batch_size, count, "batch_size"),
        _per_split(num_workers, count, "num_workers"),
        _per_split(is_trains, count, "is_trains"),
        _per_split(collate_fns, count, "collate_fns"),
    ]
    loaders = []
    for dataset, sampler, size, workers, is_train, collate_fn in zip(datasets, *columns):
        if dataset is None:
            loaders.append(None)
            continue
        if isinstance(dataset, IterableDataset):
            loaders.append(_iterable_loader(dataset, workers, collate_fn, seed))
            continue
        if is_train:
            _check_nonempty(dataset, sampler, size)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        loaders.append(
            DataLoader(
                dataset,
                batch_size=size,
                num_workers=workers,
                pin_memory=torch.cuda.is_available(),
                sampler=sampler,
                shuffle=bool(is_train) and sampler is None,
                collate_fn=collate_fn,
                drop_last=bool(is_train),
                worker_init_fn=seed_worker,
                persistent_workers=workers > 0,
                generator=generator,
            )
        )
    return loaders


def _iterable_loader(dataset, workers: int, collate_fn, seed: Optional[int]) -> DataLoader:
    """Loader over a dataset that yields whole batches (shards); workers restart every epoch to see its position."""
    # its own generator: making an iterator then leaves the global RNG (and so exact resume) alone
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      collate_fn=collate_fn, worker_init_fn=seed_worker, persistent_workers=False,
                      generator=generator)


__all__ = [
    "IMAGE_BLIND_MODES",
    "TASKS",
    "TEXT_SETTINGS",
    "DatasetSplits",
    "ImageLoadError",
    "ShardedPretrainDataset",
    "TextBatch",
    "TextCollator",
    "UnpaddedDistributedSampler",
    "VQACollator",
    "build_collate_fn",
    "build_transform",
    "caption_sampling_of",
    "create_dataset",
    "create_loader",
    "create_sampler",
    "static_shape_options",
    "grounding_dataset",
    "load_image",
    "make_image_blind",
    "nlvr_dataset",
    "pre_caption",
    "pre_question",
    "pretrain_dataset",
    "re_eval_dataset",
    "re_train_dataset",
    "seed_worker",
    "tokenize",
    "ve_dataset",
    "vqa_dataset",
]
