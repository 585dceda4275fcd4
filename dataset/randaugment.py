"""RandomAugment: N random ops of magnitude M on HWC uint8 numpy arrays, as the official ALBEF data pipeline.

Randomness comes from numpy's global RNG, which `dataset.seed_worker` seeds in every DataLoader worker. Geometric
ops follow OpenCV's `warpAffine` conventions (integer pixel centres, forward matrix, bilinear, constant grey fill),
so magnitudes match the official implementation; bit-exactness is not a goal.

AutoContrast and Sharpness reproduce two arithmetic slips of the official ops by default (the published models
were trained with them); `fixes=True` (config flag `randaugment_fixes`) selects the intended, clipped ops instead.
See docs/QUIRKS.md.
"""

import numpy as np
from PIL import Image

MAX_LEVEL = 10.0
FILL = (128, 128, 128)
DEFAULT_AUGS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and truncate to uint8 (clipping keeps values from wrapping around)."""
    return np.clip(values, 0, 255).astype(np.uint8)


def _apply_per_channel_table(img: np.ndarray, tables: list) -> np.ndarray:
    """Map every channel c of `img` through its 256-entry lookup table `tables[c]`."""
    out = np.empty_like(img)
    for channel, table in enumerate(tables):
        out[..., channel] = table[img[..., channel]]
    return out


def identity(img: np.ndarray) -> np.ndarray:
    """Return the image unchanged."""
    return img


def auto_contrast(img: np.ndarray, fixes: bool = False) -> np.ndarray:
    """Per channel: the official ALBEF AutoContrast by default, a plain [min, max] -> [0, 255] stretch with `fixes`.

    Both build a 256-entry table `clip(level * scale + offset, 0, 255)` with scale = 255 / (max - min), truncated to
    uint8; a flat channel (max == min) keeps the identity table. The intended offset is -min * scale. The official
    code negates `min` while it is still a uint8 numpy scalar, so for min > 0 the negation wraps (-10 -> 246) and
    the offset becomes (256 - min) * scale. Since max - min <= 255 - min < 256 - min, that offset alone exceeds 255: a
    channel whose minimum is above 0 comes out entirely 255, and only a channel whose minimum is 0 is stretched
    (docs/QUIRKS.md, randaugment_fixes).
    """
    tables = []
    for channel in range(img.shape[2]):
        low, high = int(img[..., channel].min()), int(img[..., channel].max())
        levels = np.arange(256, dtype=np.float64)
        if high > low:
            scale = 255.0 / (high - low)
            negated_low = -low if fixes else (-low) % 256  # uint8 negation wraps modulo 256 in the official op
            levels = levels * scale + negated_low * scale
        tables.append(_to_uint8(levels))
    return _apply_per_channel_table(img, tables)


def _equalize_table(channel: np.ndarray) -> np.ndarray:
    """PIL's histogram-equalisation lookup table for one uint8 channel."""
    hist = np.bincount(channel.reshape(-1), minlength=256)
    used = hist[hist > 0]
    identity_table = np.arange(256, dtype=np.uint8)
    if used.size <= 1:
        return identity_table
    step = (int(used.sum()) - int(used[-1])) // 255
    if step == 0:
        return identity_table
    counts_below = np.concatenate(([0], np.cumsum(hist)[:-1]))
    return _to_uint8((counts_below + step // 2) // step)


def equalize(img: np.ndarray) -> np.ndarray:
    """Equalise each channel's histogram the way PIL's ImageOps.equalize does."""
    tables = [_equalize_table(img[..., channel]) for channel in range(img.shape[2])]
    return _apply_per_channel_table(img, tables)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Multiply every value by `factor`, clip to [0, 255]."""
    table = _to_uint8(np.arange(256, dtype=np.float32) * factor)
    return table[img]


def _wrap_to_uint8(values: np.ndarray) -> np.ndarray:
    """numpy's float -> uint8 cast as the official Sharpness relies on: truncate toward zero, keep it modulo 256.

    A direct out-of-range float -> uint8 cast is undefined behaviour in C (numpy's result depends on the platform),
    so the wrap is spelled out: 311.5 -> 55, -3.24 -> 253.
    """
    return (np.trunc(values).astype(np.int64) % 256).astype(np.uint8)


def sharpness(img: np.ndarray, factor: float, fixes: bool = False) -> np.ndarray:
    """Blend interior pixels with a 3x3 smoothed copy (centre weight 5, total 13); the 1-pixel border is kept.

    The blend is computed in float32. The official op casts it back to uint8 without clipping, so values above
    255 or below 0 wrap around modulo 256; that is the default here. `fixes=True` clips to [0, 255] instead
    (docs/QUIRKS.md, randaugment_fixes).
    """
    if img.shape[0] < 3 or img.shape[1] < 3:
        return img
    src = img.astype(np.float32)
    height, width = img.shape[:2]
    neighbourhood = np.zeros_like(src[1:-1, 1:-1])
    for dy in range(3):
        for dx in range(3):
            neighbourhood += src[dy : dy + height - 2, dx : dx + width - 2]
    centre = src[1:-1, 1:-1]
    # The official smoothed image is itself uint8 (OpenCV rounds it) before blending.
    smooth = np.rint((neighbourhood + 4.0 * centre) / 13.0)
    out = src.copy()
    out[1:-1, 1:-1] = smooth + factor * (centre - smooth)
    return _to_uint8(out) if fixes else _wrap_to_uint8(out)


def _warp_affine(img: np.ndarray, forward: np.ndarray, fill=FILL) -> np.ndarray:
    """Warp with the 2x3 forward matrix (dst = M @ src), bilinear sampling, constant `fill` outside the image."""
    height, width, channels = img.shape
    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    # A one-pixel frame of fill colour lets out-of-range neighbours read the fill value by clipping indices.
    padded = np.empty((height + 2, width + 2, channels), dtype=np.float32)
    padded[...] = np.asarray(fill, dtype=np.float32)[:channels]
    padded[1:-1, 1:-1] = img
    x0 = np.floor(src_x)
    y0 = np.floor(src_y)
    wx = (src_x - x0)[..., None].astype(np.float32)
    wy = (src_y - y0)[..., None].astype(np.float32)
    left = np.clip(x0.astype(np.int64) + 1, 0, width + 1)
    right = np.clip(x0.astype(np.int64) + 2, 0, width + 1)
    top = np.clip(y0.astype(np.int64) + 1, 0, height + 1)
    bottom = np.clip(y0.astype(np.int64) + 2, 0, height + 1)
    upper = padded[top, left] * (1 - wx) + padded[top, right] * wx
    lower = padded[bottom, left] * (1 - wx) + padded[bottom, right] * wx
    return _to_uint8(np.rint(upper * (1 - wy) + lower * wy))


def shear_x(img: np.ndarray, factor: float, fill=FILL) -> np.ndarray:
    """Shear horizontally: x' = x + factor * y."""
    return _warp_affine(img, np.array([[1.0, factor, 0.0], [0.0, 1.0, 0.0]]), fill)


def shear_y(img: np.ndarray, factor: float, fill=FILL) -> np.ndarray:
    """Shear vertically: y' = y + factor * x."""
    return _warp_affine(img, np.array([[1.0, 0.0, 0.0], [factor, 1.0, 0.0]]), fill)


def translate_x(img: np.ndarray, offset: float, fill=FILL) -> np.ndarray:
    """Shift content left by `offset` pixels (x' = x - offset), as the official op."""
    return _warp_affine(img, np.array([[1.0, 0.0, -offset], [0.0, 1.0, 0.0]]), fill)


def translate_y(img: np.ndarray, offset: float, fill=FILL) -> np.ndarray:
    """Shift content up by `offset` pixels (y' = y - offset), as the official op."""
    return _warp_affine(img, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -offset]]), fill)


def rotate(img: np.ndarray, degrees: float, fill=FILL) -> np.ndarray:
    """Rotate by `degrees` (counter-clockwise on screen) about (W/2, H/2), like cv2.getRotationMatrix2D."""
    height, width = img.shape[:2]
    centre_x, centre_y = width / 2.0, height / 2.0
    cos, sin = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    forward = np.array(
        [
            [cos, sin, (1 - cos) * centre_x - sin * centre_y],
            [-sin, cos, sin * centre_x + (1 - cos) * centre_y],
        ]
    )
    return _warp_affine(img, forward, fill)


OPS = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}

# Ops whose official arithmetic slip `fixes=True` corrects (docs/QUIRKS.md, randaugment_fixes).
FIXABLE_OPS = ("AutoContrast", "Sharpness")

# Largest magnitude of each signed geometric op at level MAX_LEVEL.
_SIGNED_MAX = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 10.0, "TranslateY": 10.0, "Rotate": 30.0}


def op_arguments(name: str, level: float) -> tuple:
    """Arguments of op `name` at `level`; signed ops draw their sign (50/50) from numpy's global RNG."""
    if name in _SIGNED_MAX:
        magnitude = level / MAX_LEVEL * _SIGNED_MAX[name]
        if np.random.random() < 0.5:
            magnitude = -magnitude
        return (magnitude, FILL)
    if name in ("Brightness", "Sharpness"):
        return (level / MAX_LEVEL * 1.8 + 0.1,)
    return ()


class RandomAugment:
    """Apply N ops drawn with replacement from `augs`, each with probability 0.5, at magnitude level M.

    `fixes` (config flag `randaugment_fixes`, default False) switches AutoContrast and Sharpness from the official
    arithmetic to the intended clipped ops (docs/QUIRKS.md); the random draws are the same either way.
    """

    def __init__(self, N: int = 2, M: float = 7, isPIL: bool = True, augs=None, fixes: bool = False):
        """Keep the official argument names; `augs=None` means the ten official ops (DEFAULT_AUGS)."""
        names = tuple(augs) if augs else DEFAULT_AUGS
        unknown = [name for name in names if name not in OPS]
        if unknown:
            raise ValueError(f"RandomAugment (dataset/randaugment.py): unknown ops {unknown}; choose from {list(OPS)}")
        self.N = N
        self.M = M
        self.isPIL = isPIL
        self.augs = names
        self.fixes = bool(fixes)

    def __call__(self, img):
        """Augment a PIL image or HWC uint8 array; returns an HWC uint8 array (ToTensor accepts it)."""
        # A copy: arrays viewed from PIL images are read-only, which torch.from_numpy warns about.
        array = np.array(img) if self.isPIL or isinstance(img, Image.Image) else img
        if array.ndim != 3 or array.dtype != np.uint8:
            raise ValueError(
                f"RandomAugment expects an RGB image or HWC uint8 array, got shape {array.shape} dtype {array.dtype}"
            )
        chosen = np.random.choice(len(self.augs), self.N)
        for op_index in chosen:
            if np.random.random() > 0.5:
                continue
            name = self.augs[op_index]
            extra = {"fixes": self.fixes} if name in FIXABLE_OPS else {}
            array = OPS[name](array, *op_arguments(name, self.M), **extra)
        return np.ascontiguousarray(array)

    def __repr__(self) -> str:
        return f"RandomAugment(N={self.N}, M={self.M}, augs={list(self.augs)}, fixes={self.fixes})"
