"""SIMLA's block-wise patch mask generator (BEiT's, as the SIMLA release uses it; SIMLA.md section 5.5).

One mask per image, drawn in the data-loader worker with Python's `random` (seeded per worker like the rest of the
pipeline). Blocks of at least `min_num_patches` cells with a log-uniform aspect ratio are added until
`num_masking_patches` cells are masked or a block attempt adds nothing; the result never exceeds the target.
"""
import math
import random

import numpy as np


class BlockMaskGenerator:
    """`generator()` -> bool array [height, width] with at most `num_masking_patches` True cells."""

    def __init__(self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None, min_aspect=0.3,
                 max_aspect=None, rng=None):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_masking_patches if max_num_patches is None else int(max_num_patches)
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng or random

    def _mask_block(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                num_masked = int(mask[top:top + h, left:left + w].sum())
                if 0 < h * w - num_masked <= max_mask_patches:  # new cells only, within the budget
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros((self.height, self.width), dtype=np.int64)  # the release's removed np.int alias, made explicit
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._mask_block(mask, budget)
            if delta == 0:
                break
            count += delta
        return mask.astype(bool)
