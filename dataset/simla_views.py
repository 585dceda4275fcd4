"""SIMLA's pretraining views (SIMLA.md section 6): the ViT view, the visual tokenizer's view and the patch mask.

`SimlaPretrainTransform(pil_image) -> (image, tok_view, patch_mask)`:
- image: ALBEF's pretraining pipeline (RandomResizedCrop at image_res, scale 0.2-1, bicubic; flip; RandomAugment(2, 7);
  ToTensor; CLIP normalisation);
- tok_view: `view: shared` (the paper, default here) resizes the same augmented picture to `tokenizer_res` with
  Lanczos, so the code grid lines up with the masked ViT patches; `view: independent` (the release) draws its own
  crop, flip and RandomAugment at `tokenizer_res`. Then ToTensor and DALL-E's map_pixels (0.8 x + 0.1);
- patch_mask: bool [grid * grid], row-major, from the block-wise generator (dataset/simla_masking.py) on the
  `image_res // patch_size` grid.
The pipeline returns these only when MIM is on; otherwise ALBEF's transform is used unchanged.
"""
from PIL import Image
import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from dataset.randaugment import DEFAULT_AUGS, RandomAugment
from dataset.simla_masking import BlockMaskGenerator
from dataset.transforms import CLIP_MEAN, CLIP_STD

VIEWS = ('shared', 'independent')


def map_pixels(x, eps=0.1):
    """DALL-E's input mapping of [0, 1] pixels: (1 - 2 eps) x + eps."""
    return (1 - 2 * eps) * x + eps


def _augment(res, scale, randaugment_fixes):
    return [T.RandomResizedCrop(res, scale=scale, interpolation=InterpolationMode.BICUBIC), T.RandomHorizontalFlip(),
            RandomAugment(2, 7, isPIL=True, augs=DEFAULT_AUGS, fixes=randaugment_fixes)]


class SimlaPretrainTransform:
    def __init__(self, image_res, tokenizer_res=None, view='shared', patch_size=16, num_masking_patches=75,
                 min_num_patches=16, max_num_patches=None, min_aspect=0.3, crop_min_scale=None,
                 randaugment_fixes=False, rng=None):
        if view not in VIEWS:
            raise ValueError(f'mim.view must be one of {VIEWS}, got {view!r}')
        scale = (0.2 if crop_min_scale is None else float(crop_min_scale), 1.0)
        self.view = view
        self.tokenizer_res = tokenizer_res or image_res // 2
        self.augment = T.Compose(_augment(image_res, scale, randaugment_fixes))
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        self.tok_augment = T.Compose(_augment(self.tokenizer_res, scale, randaugment_fixes))
        grid = image_res // patch_size
        self.masks = BlockMaskGenerator((grid, grid), num_masking_patches, min_num_patches, max_num_patches,
                                        min_aspect, rng=rng)

    def tokenizer_view(self, picture):
        """[3, tokenizer_res, tokenizer_res] in [0.1, 0.9]: map_pixels of the picture."""
        return map_pixels(T.functional.to_tensor(picture))

    def __call__(self, image):
        augmented = self.augment(image)  # RandomAugment returns an HWC uint8 array
        if self.view == 'shared':
            picture = Image.fromarray(np.asarray(augmented)).resize((self.tokenizer_res, self.tokenizer_res),
                                                                    Image.LANCZOS)
        else:
            picture = self.tok_augment(image)
        mask = torch.from_numpy(self.masks()).flatten()
        return self.normalize(augmented), self.tokenizer_view(picture), mask
