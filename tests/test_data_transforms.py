"""Image transforms: pipeline steps, CLIP normalisation, output shapes."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from dataset.randaugment import RandomAugment
from dataset.transforms import CLIP_MEAN, CLIP_STD, build_transform

torch.set_num_threads(1)


def _steps(kind):
    return build_transform(kind, 32).transforms


@pytest.mark.parametrize("kind, scale", [("pretrain", (0.2, 1.0)), ("train", (0.5, 1.0))])
def test_cropping_pipelines(kind, scale):
    crop, flip, augment, to_tensor, normalize = _steps(kind)
    assert isinstance(crop, T.RandomResizedCrop)
    assert crop.scale == scale and crop.size == (32, 32)
    assert crop.interpolation == InterpolationMode.BICUBIC
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(augment, RandomAugment) and (augment.N, augment.M) == (2, 7)
    assert isinstance(to_tensor, T.ToTensor)
    assert tuple(normalize.mean) == CLIP_MEAN and tuple(normalize.std) == CLIP_STD


def test_grounding_train_resizes_to_square_then_augments():
    resize, flip, augment, _, _ = _steps("grounding_train")
    assert isinstance(resize, T.Resize) and tuple(resize.size) == (32, 32)
    assert resize.interpolation == InterpolationMode.BICUBIC
    assert isinstance(flip, T.RandomHorizontalFlip) and isinstance(augment, RandomAugment)


def test_test_transform_squashes_and_normalises_with_clip_constants():
    image = Image.new("RGB", (50, 20), (255, 0, 128))
    out = build_transform("test", 32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(out[:, 16, 16], torch.tensor(expected), atol=1e-5)


@pytest.mark.parametrize("kind", ["pretrain", "train", "grounding_train", "test"])
def test_every_pipeline_gives_a_normalised_square_tensor(kind):
    np.random.seed(0)
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    out = build_transform(kind, 24)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert -2.0 < out.min() and out.max() < 2.3


def test_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="grounding_train"):
        build_transform("eval", 32)
