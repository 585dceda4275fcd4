"""Image transforms of the official ALBEF pipelines (CLIP normalisation, bicubic resampling, RandomAugment(2, 7))."""

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from dataset.randaugment import DEFAULT_AUGS, RandomAugment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # VLMo's (and BEiT's) Normalize(mean 0.5, std 0.5)
CLIP = (CLIP_MEAN, CLIP_STD)
TRANSFORM_KINDS = ("pretrain", "train", "grounding_train", "test")

# RandomResizedCrop scale ranges of the two cropping pipelines.
_CROP_SCALE = {"pretrain": (0.2, 1.0), "train": (0.5, 1.0)}


NORMALIZATIONS = {"clip": CLIP, "half": (HALF, HALF)}


def normalisation_of(config: dict) -> tuple:
    """(mean, std) of a config's pipelines, named by the config key `image_norm` ('clip' | 'half'); without it,
    mean = std = 0.5 for `model: vlmo` (VLMo's square transforms, VLMo.md §13.3) and the CLIP statistics of the
    official ALBEF code for every other family."""
    name = config.get("image_norm") or ("half" if config.get("model") == "vlmo" else "clip")
    if name not in NORMALIZATIONS:
        raise ValueError(f"config key image_norm: {name!r} unknown; use one of {sorted(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]


def _normalize_tail(normalisation: tuple = CLIP) -> list:
    """ToTensor followed by the normalisation (CLIP's unless told), shared by every pipeline."""
    return [T.ToTensor(), T.Normalize(*normalisation)]


def _augment_head(randaugment_fixes: bool) -> list:
    """Horizontal flip and RandomAugment(2, 7), shared by every training pipeline."""
    return [T.RandomHorizontalFlip(), RandomAugment(2, 7, isPIL=True, augs=DEFAULT_AUGS, fixes=randaugment_fixes)]


def build_transform(
    kind: str, image_res: int, crop_min_scale: float | None = None, randaugment_fixes: bool = False,
    normalisation: tuple = CLIP,
) -> T.Compose:
    """Build the `kind` pipeline (pretrain | train | grounding_train | test) at `image_res` pixels.

    `crop_min_scale` (config key, default: the official 0.2 / 0.5) lowers the crop strength for small synthetic
    pictures whose objects a 20% crop would cut away. `randaugment_fixes` (config flag, default False: the official
    AutoContrast and Sharpness arithmetic) selects the intended clipped ops; see docs/QUIRKS.md. The test pipeline
    has no RandomAugment and ignores it. `normalisation`: (mean, std), `normalisation_of(config)`.
    """
    square = (image_res, image_res)
    if kind in _CROP_SCALE:
        scale = _CROP_SCALE[kind] if crop_min_scale is None else (float(crop_min_scale), 1.0)
        crop = T.RandomResizedCrop(image_res, scale=scale, interpolation=InterpolationMode.BICUBIC)
        return T.Compose([crop, *_augment_head(randaugment_fixes), *_normalize_tail(normalisation)])
    if kind == "grounding_train":
        resize = T.Resize(square, interpolation=InterpolationMode.BICUBIC)
        return T.Compose([resize, *_augment_head(randaugment_fixes), *_normalize_tail(normalisation)])
    if kind == "test":
        # Squashes to a square without keeping the aspect ratio, as the official test transform does.
        resize = T.Resize(square, interpolation=InterpolationMode.BICUBIC)
        return T.Compose([resize, *_normalize_tail(normalisation)])
    raise ValueError(f"build_transform (dataset/transforms.py): unknown kind {kind!r}; use one of {TRANSFORM_KINDS}")
