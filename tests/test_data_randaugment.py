"""RandomAugment: op semantics, the official AutoContrast / Sharpness quirks (docs/QUIRKS.md), magnitudes, seeding."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dataset import randaugment as ra
from dataset.randaugment import OPS, RandomAugment, op_arguments
from dataset.transforms import build_transform

torch.set_num_threads(1)


def _random_image(height=24, width=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_keeps_shape_and_dtype(name):
    img = _random_image()
    np.random.seed(1)
    out = OPS[name](img, *op_arguments(name, 7))
    assert out.shape == img.shape
    assert out.dtype == np.uint8


def test_magnitudes_at_level_7():
    np.random.seed(0)
    for name, expected in [("Rotate", 21.0), ("ShearX", 0.21), ("ShearY", 0.21), ("TranslateX", 7.0)]:
        magnitudes = {round(op_arguments(name, 7)[0], 6) for _ in range(50)}
        assert magnitudes == {expected, -expected}
    assert op_arguments("TranslateY", 7)[1] == (128, 128, 128)
    assert op_arguments("Brightness", 7) == pytest.approx((1.36,))
    assert op_arguments("Sharpness", 7) == pytest.approx((1.36,))
    assert op_arguments("Equalize", 7) == ()


def test_brightness_multiplies_and_clips():
    img = np.array([[[0, 100, 200]]], dtype=np.uint8)
    assert ra.brightness(img, 1.36).tolist() == [[[0, 136, 255]]]


def test_auto_contrast_fixed_stretches_each_channel_to_full_range():
    img = np.zeros((1, 3, 3), dtype=np.uint8)
    img[0, :, 0] = [50, 60, 101]
    img[0, :, 1] = [0, 10, 255]
    img[0, :, 2] = [7, 7, 7]
    out = ra.auto_contrast(img, fixes=True)
    assert out[0, :, 0].tolist() == [0, 50, 255]
    assert out[0, :, 1].tolist() == [0, 10, 255]
    assert out[0, :, 2].tolist() == [7, 7, 7]


def _auto_contrast_example():
    img = np.zeros((1, 3, 3), dtype=np.uint8)
    img[0, :, 0] = [10, 61, 112]  # minimum 10
    img[0, :, 1] = [0, 11, 170]  # minimum 0
    img[0, :, 2] = [7, 7, 7]  # flat
    return img


def test_auto_contrast_official_saturates_channels_whose_minimum_is_above_zero():
    out = ra.auto_contrast(_auto_contrast_example())
    # scale = 255 / 102 = 2.5; -10 wraps to 246 as uint8, offset = 246 * 2.5 = 615 > 255 for every level.
    assert out[0, :, 0].tolist() == [255, 255, 255]
    # minimum 0: scale = 255 / 170 = 1.5, offset 0: 0, 16.5 -> 16, 255.
    assert out[0, :, 1].tolist() == [0, 16, 255]
    assert out[0, :, 2].tolist() == [7, 7, 7]
    assert out.dtype == np.uint8


def test_auto_contrast_fixed_on_the_same_example():
    out = ra.auto_contrast(_auto_contrast_example(), fixes=True)
    # scale 2.5, offset -25: 0, 127.5 -> 127, 255.
    assert out[0, :, 0].tolist() == [0, 127, 255]
    assert out[0, :, 1].tolist() == [0, 16, 255]
    assert out[0, :, 2].tolist() == [7, 7, 7]


@pytest.mark.parametrize("low", [1, 2, 40, 128, 200, 254])
def test_auto_contrast_official_rule_any_positive_minimum_gives_all_255(low):
    channel = np.arange(low, 256, dtype=np.uint8)
    img = np.stack([channel, channel, np.full_like(channel, low)], axis=-1)[None]
    out = ra.auto_contrast(img)
    assert (out[..., :2] == 255).all()
    assert (out[..., 2] == low).all()  # flat channel: identity table


def test_auto_contrast_official_equals_fixed_when_every_minimum_is_zero():
    img = _random_image(seed=5)
    img[0, 0] = 0
    assert np.array_equal(ra.auto_contrast(img), ra.auto_contrast(img, fixes=True))


def test_auto_contrast_and_equalize_match_pil():
    img = (_random_image(seed=3) // 3 + 40).astype(np.uint8)
    assert np.array_equal(ra.auto_contrast(img, fixes=True), np.asarray(ImageOps.autocontrast(Image.fromarray(img))))
    assert np.array_equal(ra.equalize(img), np.asarray(ImageOps.equalize(Image.fromarray(img))))


def test_translate_moves_a_pixel_by_7_and_fills_grey():
    img = np.zeros((20, 30, 3), dtype=np.uint8)
    img[10, 15] = 255
    left = ra.translate_x(img, 7.0)
    assert left[10, 8].tolist() == [255, 255, 255]
    assert left[10, 15].tolist() == [0, 0, 0]
    assert (left[:, -7:] == 128).all()
    right = ra.translate_x(img, -7.0)
    assert right[10, 22].tolist() == [255, 255, 255]
    down = ra.translate_y(img, -7.0)
    assert down[17, 15].tolist() == [255, 255, 255]
    assert (down[:7] == 128).all()


def test_shear_x_moves_pixels_by_factor_times_row():
    img = np.zeros((20, 30, 3), dtype=np.uint8)
    img[10, 5] = 255
    out = ra.shear_x(img, 0.2)
    assert out[10, 7].tolist() == [255, 255, 255]
    out = ra.shear_y(img, 0.2)
    assert out[11, 5].tolist() == [255, 255, 255]


def test_rotate_turns_about_the_centre_and_zero_is_identity():
    img = _random_image(10, 10)
    assert np.array_equal(ra.rotate(img, 0.0), img)
    spot = np.zeros((10, 10, 3), dtype=np.uint8)
    spot[5, 2] = 200
    # cv2 convention: x' = y + cx - cy, y' = -x + cx + cy for +90 degrees about (W/2, H/2).
    assert ra.rotate(spot, 90.0)[8, 5].tolist() == [200, 200, 200]
    assert ra.rotate(spot, 90.0)[0, 0].tolist() == [128, 128, 128]


def test_sharpness_blends_interior_only():
    img = np.zeros((5, 5, 3), dtype=np.uint8)
    img[2, 2] = 100
    img[0, 0] = 90
    for fixes in (False, True):
        out = ra.sharpness(img, 1.36, fixes=fixes)
        # smooth centre = round(500 / 13) = 38; 38 + 1.36 * (100 - 38) = 122.32, in range so both agree
        assert out[2, 2].tolist() == [122, 122, 122]
        assert out[0, 0].tolist() == [90, 90, 90]
        flat = np.full((6, 6, 3), 77, dtype=np.uint8)
        assert np.array_equal(ra.sharpness(flat, 1.36, fixes=fixes), flat)


def _three_by_three(centre, ring):
    img = np.full((3, 3, 3), ring, dtype=np.uint8)
    img[1, 1] = centre
    return img


def test_sharpness_official_wraps_values_above_255():
    img = _three_by_three(255, 0)
    # smooth = round(5 * 255 / 13) = round(98.08) = 98; 98 + 1.36 * (255 - 98) = 311.52 -> 311 -> 311 - 256 = 55
    out = ra.sharpness(img, 1.36)
    assert out[1, 1].tolist() == [55, 55, 55]
    assert (out[0] == 0).all() and (out[:, 0] == 0).all()
    assert ra.sharpness(img, 1.36, fixes=True)[1, 1].tolist() == [255, 255, 255]


def test_sharpness_official_wraps_values_below_0():
    img = _three_by_three(0, 15)
    # smooth = round(8 * 15 / 13) = round(9.23) = 9; 9 + 1.36 * (0 - 9) = -3.24 -> -3 (toward zero) -> 253
    out = ra.sharpness(img, 1.36)
    assert out[1, 1].tolist() == [253, 253, 253]
    assert (out[0] == 15).all()
    assert ra.sharpness(img, 1.36, fixes=True)[1, 1].tolist() == [0, 0, 0]


def test_wrap_to_uint8_truncates_toward_zero_then_wraps():
    values = np.array([311.52, 256.0, 255.9, 0.7, -0.7, -3.24, -56.52, 511.9], dtype=np.float32)
    assert ra._wrap_to_uint8(values).tolist() == [55, 0, 255, 0, 0, 253, 200, 255]


def _first_applied(augment, img):
    """Output of `augment` (N=1, one op) under the first numpy seed whose 50% draw applies the op."""
    for seed in range(20):
        np.random.seed(seed)
        np.random.choice(1, 1)
        if np.random.random() <= 0.5:
            np.random.seed(seed)
            return augment(img)
    raise AssertionError("no seed in range(20) applies the op")


def test_random_augment_flag_reaches_both_ops():
    assert RandomAugment(2, 7).fixes is False
    assert "fixes=True" in repr(RandomAugment(2, 7, fixes=True))
    contrast = _auto_contrast_example()
    official = _first_applied(RandomAugment(1, 7, isPIL=False, augs=["AutoContrast"]), contrast)
    fixed = _first_applied(RandomAugment(1, 7, isPIL=False, augs=["AutoContrast"], fixes=True), contrast)
    assert official[0, :, 0].tolist() == [255, 255, 255] and fixed[0, :, 0].tolist() == [0, 127, 255]
    sharp = _three_by_three(255, 0)
    official = _first_applied(RandomAugment(1, 7, isPIL=False, augs=["Sharpness"]), sharp)
    fixed = _first_applied(RandomAugment(1, 7, isPIL=False, augs=["Sharpness"], fixes=True), sharp)
    assert official[1, 1, 0] == 55 and fixed[1, 1, 0] == 255


def test_random_augment_is_deterministic_under_numpy_seed():
    img = Image.fromarray(_random_image())
    outputs = []
    for seed in (0, 0, 1, 2, 3, 4):
        np.random.seed(seed)
        outputs.append(RandomAugment(2, 7, isPIL=True)(img))
    assert np.array_equal(outputs[0], outputs[1])
    assert any(not np.array_equal(outputs[0], other) for other in outputs[2:])
    assert all(out.dtype == np.uint8 and out.shape == (24, 32, 3) for out in outputs)


def test_two_ops_each_applied_with_probability_half():
    img = _random_image(4, 4) // 2
    augment = RandomAugment(2, 7, augs=["Brightness"])
    unchanged = 0
    for seed in range(400):
        np.random.seed(seed)
        unchanged += np.array_equal(augment(img), img)
    # Neither of the two draws applied: 0.5 * 0.5.
    assert 0.18 < unchanged / 400 < 0.32


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="Solarize"):
        RandomAugment(2, 7, augs=["Solarize"])


@pytest.mark.parametrize("kind", ["pretrain", "train", "grounding_train"])
def test_build_transform_threads_randaugment_fixes(kind):
    # Default: the official AutoContrast / Sharpness arithmetic (docs/QUIRKS.md).
    assert build_transform(kind, 32).transforms[2].fixes is False
    assert build_transform(kind, 32, randaugment_fixes=True).transforms[2].fixes is True
    assert build_transform(kind, 32, None, True).transforms[2].fixes is True

