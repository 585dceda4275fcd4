"""Visual tokenizers for SIMLA's MIM targets (SIMLA.md section 5.6): one interface, `encode(view) -> codes`.

`encode` takes the tokenizer view [B, 3, H, W] (pixels in [0, 1] after `map_pixels`, as the data pipeline gives it)
and returns int64 codes [B, G, G] on the patch grid, under no-grad; `vocab_size` is the width `mim_head` needs. A
tokenizer is never a submodule of a task model (not in its state dict or optimiser); the trainer calls it on the
device.

- `color_quant`: weight-free, deterministic, spatially meaningful (a masked patch's mean colour is predictable from its
  context): the mean colour of each grid cell, each channel quantised to `levels` steps, code = r * b^2 + g * b + b.
  For tests, CI and the synthetic world; numbers are not comparable with the paper's.
- `dalle`: the DALL-E dVAE encoder of the paper (8192 codes), read from a local file named by `mim.tokenizer_path`;
  nothing is downloaded (docs/README_simla.md says how to extract its weights).
"""
import os

import torch
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels: x -> (1 - 2 eps) x + eps


def map_pixels(x):
    """DALL-E's input mapping of [0, 1] pixels: 0.8 x + 0.1."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x):
    """The inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class ColorQuantTokenizer:
    """Mean colour per grid cell, `levels` steps per channel: `levels ** 3` codes on a `grid` x `grid` grid."""

    def __init__(self, grid, levels=8, mapped=True):
        if levels < 1 or grid < 1:
            raise ValueError(f'color_quant needs grid >= 1 and levels >= 1, got grid {grid}, levels {levels}')
        self.grid, self.levels, self.mapped = int(grid), int(levels), bool(mapped)
        self.vocab_size = self.levels ** 3

    @torch.no_grad()
    def encode(self, view):
        """Codes [B, grid, grid] (int64) of the view [B, 3, H, W] (H, W multiples of grid)."""
        if view.dim() != 4 or view.shape[1] != 3:
            raise ValueError(f'the tokenizer view must be [B, 3, H, W], got {tuple(view.shape)}')
        H, W = view.shape[-2:]
        if H % self.grid or W % self.grid:
            raise ValueError(f'tokenizer view {H}x{W} is not divisible into a {self.grid}x{self.grid} grid; set '
                             f'mim.tokenizer_res to a multiple of the patch grid')
        pixels = unmap_pixels(view.float()) if self.mapped else view.float().clamp(0, 1)
        means = F.avg_pool2d(pixels, kernel_size=(H // self.grid, W // self.grid))
        q = torch.clamp((means * self.levels).floor().long(), max=self.levels - 1)
        return q[:, 0] * self.levels ** 2 + q[:, 1] * self.levels + q[:, 2]

    __call__ = encode


def build_visual_tokenizer(config):
    """The tokenizer named by `mim.tokenizer` (`color_quant` or `dalle`) on the patch grid of the config."""
    mim = config.get('mim') or {}
    name = mim.get('tokenizer', 'dalle')
    patch = (config.get('vit') or {}).get('patch_size', 16)
    grid = config['image_res'] // patch
    if name == 'color_quant':
        levels = mim.get('color_levels')
        if levels is None:
            levels = round(mim.get('vocab_size', 512) ** (1 / 3))
        tokenizer = ColorQuantTokenizer(grid, levels)
        if mim.get('vocab_size') not in (None, tokenizer.vocab_size):
            raise ValueError(f"mim.vocab_size {mim['vocab_size']} != color_quant's levels**3 = {tokenizer.vocab_size}")
        return tokenizer
    if name == 'dalle':
        path = mim.get('tokenizer_path')
        if not path or not os.path.exists(os.path.join(path, 'encoder.pkl') if os.path.isdir(path) else path):
            raise FileNotFoundError(f'mim.tokenizer: dalle needs the DALL-E dVAE encoder.pkl in a local folder named '
                                    f'by the config key mim.tokenizer_path (got {path!r}); nothing is downloaded. '
                                    f'Use mim.tokenizer: color_quant to run without it')
        raise NotImplementedError('the dalle tokenizer (our encoder module reading encoder.pkl weights) is not built '
                                  'yet; see docs/README_simla.md')
    raise ValueError(f"mim.tokenizer must be 'color_quant' or 'dalle', got {name!r}")
