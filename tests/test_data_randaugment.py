"""RandomAugment (spec 11.3): op semantics, magnitudes, probabilities and seeding."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dataset import randaugment as ra
from dataset.randaugment import OPS, RandomAugment, op_arguments

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


def test_auto_contrast_stretches_each_channel_to_full_range():
    img = np.zeros((1, 3, 3), dtype=np.uint8)
    img[0, :, 0] = [50, 60, 101]
    img[0, :, 1] = [0, 10, 255]
    img[0, :, 2] = [7, 7, 7]
    out = ra.auto_contrast(img)
    assert out[0, :, 0].tolist() == [0, 50, 255]
    assert out[0, :, 1].tolist() == [0, 10, 255]
    assert out[0, :, 2].tolist() == [7, 7, 7]


def test_auto_contrast_and_equalize_match_pil():
    img = (_random_image(seed=3) // 3 + 40).astype(np.uint8)
    assert np.array_equal(ra.auto_contrast(img), np.asarray(ImageOps.autocontrast(Image.fromarray(img))))
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
    out = ra.sharpness(img, 1.36)
    # smooth centre = round(500 / 13) = 38; 38 + 1.36 * (100 - 38) = 122.32
    assert out[2, 2].tolist() == [122, 122, 122]
    assert out[0, 0].tolist() == [90, 90, 90]
    flat = np.full((6, 6, 3), 77, dtype=np.uint8)
    assert np.array_equal(ra.sharpness(flat, 1.36), flat)


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
