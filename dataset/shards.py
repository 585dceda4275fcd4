"""WebDataset tar shards for pretraining: a reader with per-rank and per-worker splitting, a shuffle buffer, a fixed
epoch length and exact mid-epoch resume. `python -m dataset.make_shards` writes the shards.

Shard layout (one sample = tar members sharing a key; the `webdataset` package reads and writes them):

    000000042.jpg    image bytes (the original file, or re-encoded smaller by make_shards --max_size)
    000000042.json   {"caption": str | [str, ...], "image": original path, "index": position in the JSON lists}

plus `index.json` next to the shards: {"format", "shards": [{"name", "samples"}], "total", ...}.

How one epoch is read (every choice is a function of (seed, epoch), so a resumed run reads what the uninterrupted
run read):
1. The shard list is shuffled with (seed, epoch) and dealt to R ranks x W workers ("slots"); slot s gets shards
   s, s + R*W, s + 2*R*W, ... (so there must be at least R*W shards).
2. A slot reads its shards in a (seed, epoch, slot, pass)-shuffled order through a shuffle buffer of
   `shuffle_buffer` samples; when it runs out it starts another pass. An epoch therefore has a fixed length,
   `epoch_samples // (R * batch_size)` batches per rank, whatever the shard sizes.
3. Batch k of a rank is made by worker k mod W from its slot's next batch_size samples, and decoded and augmented
   with every RNG seeded from (seed, epoch, rank, k): the result does not depend on which process made it.
4. Resuming at step s: the workers read, without decoding, the samples of batches before s, and DataLoader worker j
   plays logical worker (j + s) mod W, so batches still arrive in the order s, s + 1, ...
"""

import contextlib
import io
import json
import os
import random
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

import utils
from dataset.image_io import ImageLoadError
from dataset.text import pre_caption

INDEX_NAME = "index.json"
INDEX_FORMAT = "albef-pretrain-shards-v1"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")


class ShardError(ValueError):
    """Shards that cannot be used; the message names the config key or file and the fix."""


# ---- seeds -------------------------------------------------------------------------------------------------------
def batch_seed(*parts) -> int:
    """A 32-bit seed that is a pure function of integer `parts` (e.g. seed, epoch, rank, step)."""
    entropy = [int(p) % 2**63 for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed Python `random`, numpy and torch's CPU generator; the main process gets its own states back afterwards.

    DataLoader workers own their generators, so there the seeds simply stay; in the main process (num_workers 0)
    the training RNG streams must not depend on how the data were produced.
    """
    restore = get_worker_info() is None
    if restore:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


# ---- shard lists -------------------------------------------------------------------------------------------------
def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def read_index(path: str) -> tuple[list, list]:
    """(shard paths, sample counts) listed by a make_shards index.json."""
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
        shards = index["shards"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardError(f"shard index {path} is unreadable ({type(err).__name__}: {err}); re-run "
                         f"python -m dataset.make_shards to rebuild it") from err
    folder = os.path.dirname(os.path.abspath(path))
    urls = [s["name"] if _is_remote(s["name"]) else os.path.join(folder, s["name"]) for s in shards]
    return urls, [int(s["samples"]) for s in shards]


def resolve_shards(spec) -> tuple[list, list]:
    """Expand `train_shards` (folders, index.json files, tar paths, brace patterns) to (urls, counts or None)."""
    import braceexpand  # installed with webdataset

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    if not specs:
        raise ShardError("train_shards is empty; set it to the folder python -m dataset.make_shards wrote")
    urls, counts = [], []
    for item in map(str, specs):
        if os.path.isdir(item):
            index = os.path.join(item, INDEX_NAME)
            if not os.path.isfile(index):
                raise ShardError(f"train_shards: {item} has no {INDEX_NAME} (the conversion did not finish, or this "
                                 f"is not a shard folder); re-run python -m dataset.make_shards, or list the tar "
                                 f"files and set shard_epoch_samples")
            more_urls, more_counts = read_index(index)
        elif item.endswith(".json"):
            if not os.path.isfile(item):
                raise ShardError(f"train_shards: shard index {item} does not exist; check the path in the config")
            more_urls, more_counts = read_index(item)
        else:
            more_urls = list(braceexpand.braceexpand(item))
            more_counts = [None] * len(more_urls)
        missing = [u for u in more_urls if not _is_remote(u) and not os.path.isfile(u)]
        if missing:
            raise ShardError(f"train_shards: {len(missing)} shard file(s) do not exist, e.g. {missing[0]}; check the "
                             f"train_shards entry {item!r} of the config")
        urls += more_urls
        counts += more_counts
    return urls, counts


# ---- samples -----------------------------------------------------------------------------------------------------
def _shard_samples(url: str):
    """Raw samples (dicts of bytes keyed by extension, plus __key__/__url__) of one tar shard, in file order."""
    from webdataset.tariterators import tarfile_samples

    try:
        yield from tarfile_samples([{"url": url}])
    except Exception as err:  # tarfile/gopen raise many types for damaged or unreachable shards
        raise ShardError(f"cannot read shard {url} ({type(err).__name__}: {err}); re-create it with "
                         f"python -m dataset.make_shards or drop it from train_shards") from err


def _buffer_shuffled(samples, size: int, rng: random.Random):
    """Shuffle a stream through a buffer of `size` samples (0 or 1: keep the order)."""
    if size <= 1:
        yield from samples
        return
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)
    yield from buffer


def sample_caption(sample: dict):
    """The caption (string or list of strings) and metadata of a raw shard sample."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        return meta["caption"], meta
    if "txt" in sample:
        return sample["txt"].decode("utf-8"), {}
    raise ShardError(f"sample {sample.get('__key__')} of shard {sample.get('__url__')} has no .json or .txt caption; "
                     f"write shards with python -m dataset.make_shards")


def decode_image(sample: dict) -> Image.Image:
    """The RGB image of a raw shard sample; ImageLoadError names the shard, the key and the source image."""
    key, url = sample.get("__key__"), sample.get("__url__")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    where = f"sample {key} of shard {url}" + (f" (source image {meta['image']})" if "image" in meta else "")
    try:
        if ext is None:
            raise KeyError(f"no image member (looked for {', '.join(IMAGE_KEYS)})")
        with Image.open(io.BytesIO(sample[ext])) as img:
            return img.convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt data
        raise ImageLoadError(f"cannot read the image of {where}: {type(err).__name__}: {err}. Fix: re-create the "
                             f"shard with python -m dataset.make_shards, or set `skip_bad_images: true` to skip and "
                             f"count unreadable images", path=f"{url}#{key}", index=meta.get("index")) from err


# ---- the dataset ---------------------------------------------------------------------------------------------------
class ShardedPretrainDataset(IterableDataset):
    """Pretraining (image, caption) batches read from WebDataset shards; yields lists of batch_size samples.

    Use it with DataLoader(batch_size=None, collate_fn=<the pretrain collate>, persistent_workers=False) and call
    `set_position(epoch, start_step, seed)` in the main process before each epoch's iterator is made (the engine
    does). `len()` is the number of batches per rank in an epoch.
    """

    def __init__(self, shards, transform, batch_size: int, epoch_samples=None, shuffle_buffer: int = 1000,
                 max_words: int = 30, skip_bad_images: bool = False, seed: int = 0):
        """Resolve the shard list and the epoch length; nothing is read until iteration."""
        super().__init__()
        self.urls, counts = resolve_shards(shards)
        known = None if any(c is None for c in counts) else sum(counts)
        if epoch_samples is None and known is None:
            raise ShardError("train_shards lists tar files without an index.json, so the epoch length is unknown; "
                             "set shard_epoch_samples (samples per epoch over all ranks) in the config")
        self.epoch_samples = int(epoch_samples if epoch_samples is not None else known)
        self.total_samples = known
        self.transform = transform
        self.batch_size = int(batch_size)
        self.shuffle_buffer = int(shuffle_buffer)
        self.max_words = max_words
        self.skip_bad_images = bool(skip_bad_images)
        self.num_skipped = 0
        self.seed, self.epoch, self.start_step = int(seed), 0, 0
        self.rank, self.world_size = utils.get_rank(), utils.get_world_size()

    def set_position(self, epoch: int, start_step: int = 0, seed=None) -> None:
        """Read epoch `epoch` from batch `start_step` on; call in the main process before making the iterator."""
        self.epoch, self.start_step = int(epoch), int(start_step)
        if seed is not None:
            self.seed = int(seed)
        self.rank, self.world_size = utils.get_rank(), utils.get_world_size()

    def __len__(self) -> int:
        steps = self.epoch_samples // (self.world_size * self.batch_size)
        if steps < 1:
            raise ShardError(f"an epoch of {self.epoch_samples} samples is less than one batch of {self.batch_size} "
                             f"on each of {self.world_size} ranks; raise shard_epoch_samples or lower batch_size")
        return steps

    def __iter__(self):
        info = get_worker_info()
        workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        logical = (worker_id + self.start_step) % workers
        slots = self.world_size * workers
        if len(self.urls) < slots:
            raise ShardError(f"{len(self.urls)} shards cannot feed {self.world_size} rank(s) x {workers} worker(s) "
                             f"= {slots} readers (each needs at least one shard); write more, smaller shards "
                             f"(python -m dataset.make_shards --shard_size) or lower num_workers")
        slot = self.rank * workers + logical
        stream = self._slot_stream(slot, slots)
        for k in range(logical, len(self), workers):
            raw = [next(stream) for _ in range(self.batch_size)]
            if k >= self.start_step:  # earlier batches were trained on before the resume: read, never decoded
                yield self._decode_batch(raw, k)

    def _slot_stream(self, slot: int, slots: int):
        """Endless raw samples of one slot: its shards, pass after pass, each pass shuffled anew."""
        order = list(self.urls)
        random.Random(batch_seed(self.seed, self.epoch)).shuffle(order)
        mine = order[slot::slots]
        for pass_no in range(2**62):
            rng = random.Random(batch_seed(self.seed, self.epoch, slot, pass_no))
            shards = list(mine)
            rng.shuffle(shards)
            count = 0
            for sample in _buffer_shuffled((s for url in shards for s in _shard_samples(url)), self.shuffle_buffer,
                                           rng):
                count += 1
                yield sample
            if count == 0:
                raise ShardError(f"shards {mine[:3]}{'...' if len(mine) > 3 else ''} hold no samples; rebuild them "
                                 f"with python -m dataset.make_shards")

    def _decode_batch(self, raw: list, k: int) -> list:
        """Decode and transform batch k; with skip_bad_images an unreadable image is replaced from the same batch."""
        with seeded_rngs(batch_seed(self.seed, self.epoch, self.rank, k)):
            items, readable = [], []
            for sample in raw:
                try:
                    items.append(self._decode(sample))
                    readable.append(sample)
                except ImageLoadError as err:
                    if not self.skip_bad_images:
                        raise
                    self.num_skipped += 1
                    warnings.warn(f"skip_bad_images: skipped unreadable image {err.path}; {self.num_skipped} skipped "
                                  f"so far in this process", stacklevel=2)
            if not readable:
                raise ImageLoadError(f"every image of batch {k} (epoch {self.epoch}) is unreadable, e.g. "
                                     f"{raw[0].get('__key__')} of shard {raw[0].get('__url__')}; check the shards")
            while len(items) < len(raw):  # keep the batch size constant for the feature queues
                items.append(self._decode(readable[len(items) % len(readable)]))
        return items

    def _decode(self, sample: dict):
        caption, _ = sample_caption(sample)
        if isinstance(caption, list):
            caption = random.choice(caption)
        return self.transform(decode_image(sample)), pre_caption(caption, self.max_words)
