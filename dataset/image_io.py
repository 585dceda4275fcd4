"""Image and annotation reading shared by every dataset, with an opt-in skip-and-count mode for bad images."""

import json
import os
import warnings

from PIL import Image, ImageFile
from torch.utils.data import Dataset

from dataset.text import pre_caption

# Web-crawled pretraining images are often truncated or huge; the official loaders accept both.
ImageFile.LOAD_TRUNCATED_IMAGES = True
Image.MAX_IMAGE_PIXELS = None

_SKIP_HINT = (
    "check the annotation's image path and the config's image root (image_root / vqa_root / vg_root), "
    "or set `skip_bad_images: true` in the config to skip and count unreadable images"
)


class ImageLoadError(RuntimeError):
    """An image that cannot be opened or decoded; the message names the path, the dataset index and the fix."""

    def __init__(self, message: str, path=None, index=None):
        # Single positional message so DataLoader workers can re-raise it in the main process.
        super().__init__(message)
        self.path = path
        self.index = index


def load_image(path, index=None) -> Image.Image:
    """Open `path` as an RGB PIL image; raise ImageLoadError naming the path and dataset `index` on failure."""
    try:
        with Image.open(path) as img:
            # convert() forces the decode inside the try, so corrupt data fails here rather than in a transform.
            return img.convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt data (OSError, SyntaxError, struct.error, ...)
        where = f" (dataset index {index})" if index is not None else ""
        message = f"cannot read image '{path}'{where}: {type(err).__name__}: {err}. Fix: {_SKIP_HINT}."
        raise ImageLoadError(message, path=str(path), index=index) from err


def join_root(root, path) -> str:
    """Join an annotation path to its root; absolute annotation paths and an empty root leave it unchanged."""
    return os.path.join(root, path) if root else str(path)


def read_json_list(ann_file) -> list:
    """Read one JSON file that must hold a list (annotations, answer list)."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(
            f"annotation file '{ann_file}' does not exist; check the train_file / val_file / test_file entries "
            f"of the config (paths are relative to the working directory)"
        )
    with open(ann_file, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"annotation file '{ann_file}' is not valid JSON ({err}); re-download or rebuild it")
    if not isinstance(data, list):
        raise ValueError(
            f"annotation file '{ann_file}' must hold a JSON list of items, found {type(data).__name__}; "
            f"see spec section 11.1 for the expected format"
        )
    return data


def read_annotations(ann_file, required_keys=()) -> list:
    """Concatenate the JSON lists of one file or a list of files, checking every item has `required_keys`."""
    files = [ann_file] if isinstance(ann_file, (str, os.PathLike)) else list(ann_file)
    if not files:
        raise ValueError("no annotation file given; set the dataset file keys of the config")
    annotations = []
    for path in files:
        items = read_json_list(path)
        _check_keys(items, required_keys, path)
        annotations.extend(items)
    return annotations


def _check_keys(items: list, required_keys, path) -> None:
    """Raise a ValueError naming the file and item position of the first item missing a required key."""
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"annotation file '{path}' item {position} is {type(item).__name__}, expected an object")
        missing = [key for key in required_keys if key not in item]
        if missing:
            raise ValueError(
                f"annotation file '{path}' item {position} lacks keys {missing} (has {sorted(item)}); "
                f"see spec section 11.1 for the expected format"
            )


class SkippingDataset(Dataset):
    """Base class: subclasses implement `load_item(index)`; unreadable images raise or, if enabled, are skipped.

    With `skip_bad_images` an item whose image cannot be read is replaced by the next readable index (wrapping
    around), so batch sizes stay constant for the feature queues. `num_skipped` counts skip events in this
    process only (each DataLoader worker holds its own copy).
    """

    def __init__(self, skip_bad_images: bool = False):
        """Remember the skip policy and start the skip counter at zero."""
        self.skip_bad_images = bool(skip_bad_images)
        self.num_skipped = 0

    def load_item(self, index: int):
        """Return item `index`; raises ImageLoadError when one of its images cannot be read."""
        raise NotImplementedError

    def __getitem__(self, index: int):
        """Return item `index`, or the next readable one when skipping bad images."""
        if not self.skip_bad_images:
            return self.load_item(index)
        size = len(self)
        for offset in range(size):
            candidate = (index + offset) % size
            try:
                return self.load_item(candidate)
            except ImageLoadError as err:
                self.num_skipped += 1
                warnings.warn(
                    f"skip_bad_images: skipped unreadable image '{err.path}' (dataset index {candidate}); "
                    f"{self.num_skipped} skipped so far in this process",
                    stacklevel=2,
                )
        raise ImageLoadError(
            f"no readable image in the whole dataset ({size} items); check the config's image root "
            f"(image_root / vqa_root / vg_root) and the annotation image paths"
        )


class AnnotationDataset(SkippingDataset):
    """A SkippingDataset over official JSON annotation file(s) (one path or a list): `ann`, `transform`,
    `image_root`, `max_words`. Subclasses name their REQUIRED_KEYS (checked on every item when the files are read)
    and implement `load_item`; they read every text through `clean_text`: ALBEF's `pre_caption` (lower-casing,
    punctuation, the first `max_words` words), or the raw string with `raw_text` (VLMo.md section 3.1: raw strings go
    to the tokenizer)."""

    REQUIRED_KEYS: tuple = ()

    def __init__(self, ann_file, transform, image_root="", max_words=30, skip_bad_images=False, required_keys=None,
                 raw_text=False):
        super().__init__(skip_bad_images)
        keys = self.REQUIRED_KEYS if required_keys is None else required_keys
        self.ann = read_annotations(ann_file, required_keys=keys)
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.raw_text = bool(raw_text)

    def clean_text(self, text: str) -> str:
        """The text the tokenizer gets: `pre_caption(text, max_words)`, or `text` itself with `raw_text`."""
        return text if self.raw_text else pre_caption(text, self.max_words)

    def __len__(self) -> int:
        return len(self.ann)


# ---- image-blind controls (docs/README_synthetic.md) --------------------------------------------------------------
# `image_blind: fixed | shuffled` makes every picture a dataset returns uninformative about its text, so that the same
# run measures what a model reaches without looking at the picture (the control each learning claim is compared
# with). The annotation's picture fields are rewritten once, when the dataset is built; texts, labels, answers and
# ids stay as they are.
IMAGE_BLIND_MODES = ("fixed", "shuffled")
# the fields that name an item's picture(s): `image` (every task), `images` (NLVR2's pair), `dataset` (VQA's root)
_PICTURE_KEYS = ("dataset", "image", "images")


def _picture(item: dict) -> dict:
    return {key: item[key] for key in _PICTURE_KEYS if key in item}


def blind_order(size: int, seed: int) -> list:
    """For item i, the item whose picture it gets under `shuffled`: one random cycle through all items (seeded), so
    no item keeps its own entry (a picture shared by several items can still come back to one of them)."""
    import numpy as np

    if size < 2:
        return list(range(size))
    order = np.random.default_rng(seed).permutation(size)
    source = [0] * size
    for position, item in enumerate(order):
        source[int(item)] = int(order[(position + 1) % size])
    return source


def make_image_blind(dataset, mode, seed: int = 0):
    """Rewrite the picture fields of `dataset.ann` in place: `fixed` gives every item the picture of item 0 (one
    picture for the whole split), `shuffled` gives item i the picture of item blind_order(len, seed)[i]. None
    leaves the dataset unchanged. Returns the dataset."""
    if mode is None:
        return dataset
    if mode not in IMAGE_BLIND_MODES:
        raise ValueError(f"image_blind must be null or one of {IMAGE_BLIND_MODES}, got {mode!r}")
    ann = getattr(dataset, "ann", None)
    if not isinstance(ann, list):
        raise ValueError(
            f"image_blind: {type(dataset).__name__} has no annotation list to rewrite (sharded pretraining is not "
            f"supported); use train_file instead of train_shards for an image-blind control"
        )
    if not ann:
        return dataset
    pictures = [_picture(item) for item in ann]
    source = [0] * len(ann) if mode == "fixed" else blind_order(len(ann), seed)
    dataset.ann = [{**item, **pictures[j]} for item, j in zip(ann, source)]
    # retrieval evaluation keeps a flat list of its pictures beside `ann`
    image_list = getattr(dataset, "image", None)
    if isinstance(image_list, list) and len(image_list) == len(ann):
        dataset.image = [item["image"] for item in dataset.ann]
    dataset.image_blind = mode
    return dataset
