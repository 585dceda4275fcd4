"""Visual tokenizers for SIMLA's MIM targets (SIMLA.md section 5.6): one interface, `encode(view) -> codes`.

`encode` takes the tokenizer view [B, 3, H, W] (pixels in [0, 1] after `map_pixels`, as the data pipeline gives it)
and returns int64 codes [B, G, G] on the patch grid, under no-grad; `vocab_size` is the width `mim_head` needs. A
tokenizer is never a submodule of a task model (not in its state dict or optimiser); the trainer calls it on the
device.

- `color_quant`: weight-free, deterministic, spatially meaningful (a masked patch's mean colour is predictable from its
  context): the mean colour of each grid cell, each channel quantised to `levels` steps, code = r * b^2 + g * b + b.
  For tests, CI and the synthetic world; numbers are not comparable with the paper's.
- `random_dvae`: the dalle architecture at width 64 with seeded random weights (exercises that path, no meaning).
- `dalle`: the DALL-E dVAE encoder of the paper (8192 codes), read from a local file named by `mim.tokenizer_path`;
  nothing is downloaded; `python -m models.simla.visual_tokenizer encoder.pkl encoder.pth` extracts its weights
  once into a plain state dict (docs/README_simla.md).
"""
import os
import pickle
import sys
from collections import OrderedDict

import torch
import torch.nn as nn
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
        return DalleTokenizer(dalle_weights_file(mim.get('tokenizer_path')))
    if name == 'random_dvae':
        return DalleTokenizer.random(vocab_size=mim.get('vocab_size', 8192))
    raise ValueError(f"mim.tokenizer must be 'color_quant', 'dalle' or 'random_dvae', got {name!r}")


# ---- DALL-E dVAE encoder (SIMLA.md section 5.6), our own module ---------------------------------------------------
class DalleEncoderBlock(nn.Module):
    """id(x) + (1 / n_layers^2) * res(x); res = ReLU-conv3-ReLU-conv3-ReLU-conv3-ReLU-conv1 at width n_out / 4."""

    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / (n_layers ** 2)
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ('relu_1', nn.ReLU()), ('conv_1', nn.Conv2d(n_in, n_hid, 3, padding=1)),
            ('relu_2', nn.ReLU()), ('conv_2', nn.Conv2d(n_hid, n_hid, 3, padding=1)),
            ('relu_3', nn.ReLU()), ('conv_3', nn.Conv2d(n_hid, n_hid, 3, padding=1)),
            ('relu_4', nn.ReLU()), ('conv_4', nn.Conv2d(n_hid, n_out, 1))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """The dVAE encoder: 7x7 input conv, four groups of `n_blk_per_group` blocks (widths 1, 2, 4, 8 x n_hid, a 2x2
    max-pool after groups 1-3), ReLU + 1x1 conv to `vocab_size` logits. Module names follow the published encoder, so
    its weights load after `.w` / `.b` become `.weight` / `.bias` (`dalle_state_dict_from_pickle`)."""

    def __init__(self, n_hid=256, n_blk_per_group=2, group_count=4, input_channels=3, vocab_size=8192):
        super().__init__()
        n_layers = group_count * n_blk_per_group
        widths = [n_hid * 2 ** g for g in range(group_count)]
        groups = [('input', nn.Conv2d(input_channels, n_hid, 7, padding=3))]
        n_in = n_hid
        for g, width in enumerate(widths):
            blocks = []
            for i in range(n_blk_per_group):
                blocks.append((f'block_{i + 1}', DalleEncoderBlock(n_in, width, n_layers)))
                n_in = width
            if g < group_count - 1:
                blocks.append(('pool', nn.MaxPool2d(kernel_size=2)))
            groups.append((f'group_{g + 1}', nn.Sequential(OrderedDict(blocks))))
        groups.append(('output', nn.Sequential(OrderedDict([('relu', nn.ReLU()),
                                                            ('conv', nn.Conv2d(n_in, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))
        self.vocab_size = vocab_size

    def forward(self, x):
        return self.blocks(x.float())


class _Foreign:
    """Stands in for any class of the `dall_e` package while reading its pickle: keeps the state, runs no code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


class _WeightsOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == 'dall_e' or module.startswith('dall_e.'):
            return _Foreign
        return super().find_class(module, name)


_WEIGHTS_PICKLE = type(sys)('simla_dalle_pickle')
_WEIGHTS_PICKLE.Unpickler = _WeightsOnlyUnpickler
_WEIGHTS_PICKLE.load = lambda f, **kw: _WeightsOnlyUnpickler(f, **kw).load()
_WEIGHTS_PICKLE.__name__ = 'pickle'


def _collect(obj, prefix, out):
    state = getattr(obj, '__dict__', {})
    for name, value in (state.get('_parameters') or {}).items():
        if value is not None:
            out[prefix + {'w': 'weight', 'b': 'bias'}.get(name, name)] = value.detach().float().clone()
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            _collect(child, f'{prefix}{name}.', out)
    return out


def dalle_state_dict_from_pickle(path):
    """The tensors of a published DALL-E `encoder.pkl` as a state dict of `DalleEncoder`, read without importing or
    running the `dall_e` package (its classes are replaced by inert holders while unpickling; torch's own classes
    rebuild the tensors). The file is still a pickle: read only files you trust."""
    obj = torch.load(path, map_location='cpu', weights_only=False, pickle_module=_WEIGHTS_PICKLE)
    return _collect(obj, '', {})


def dalle_weights_file(path):
    """The encoder weights named by `mim.tokenizer_path`: a folder holding encoder.pth (a plain state dict, preferred)
    or encoder.pkl, or one of those files."""
    candidates = [path] if path and os.path.isfile(path) else (
        [os.path.join(path, 'encoder.pth'), os.path.join(path, 'encoder.pkl')] if path else [])
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f'mim.tokenizer: dalle needs the DALL-E dVAE encoder (encoder.pth or encoder.pkl) in a '
                            f'local folder named by the config key mim.tokenizer_path (got {path!r}); nothing is '
                            f'downloaded. Use mim.tokenizer: color_quant to run without it')


class DalleTokenizer:
    """Frozen DALL-E encoder: codes = argmax of the logits over the 8192 channels (8x downsampling)."""

    def __init__(self, weights, device='cpu', **encoder_args):
        sd = dalle_state_dict_from_pickle(weights) if str(weights).endswith('.pkl') else \
            torch.load(weights, map_location='cpu', weights_only=True)
        if not encoder_args:
            encoder_args = {'n_hid': sd['blocks.input.weight'].shape[0], 'vocab_size': sd['blocks.output.conv.weight'].shape[0]}
        self.encoder = DalleEncoder(**encoder_args).eval().requires_grad_(False).to(device)
        self.encoder.load_state_dict(sd, strict=True)
        self.vocab_size = self.encoder.vocab_size

    @classmethod
    def random(cls, vocab_size=8192, n_hid=64, seed=0):
        """`random_dvae` (SIMLA.md section 5.6): the dalle architecture at reduced width with seeded random weights;
        it exercises the real tokenizer's path (shapes, dtypes, map_pixels, device) but its codes mean nothing."""
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            encoder = DalleEncoder(n_hid=n_hid, vocab_size=vocab_size)
        finally:
            torch.random.set_rng_state(generator_state)
        tokenizer = cls.__new__(cls)
        tokenizer.encoder = encoder.eval().requires_grad_(False)
        tokenizer.vocab_size = vocab_size
        return tokenizer

    def to(self, device):
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, view):
        """Codes [B, H/8, W/8] (int64) of the `map_pixels`-ed view [B, 3, H, W]."""
        return self.encoder(view.to(next(self.encoder.parameters()).device)).argmax(dim=1)

    __call__ = encode


def main(argv=None):
    """python -m models.simla.visual_tokenizer ENCODER_PKL OUT_PTH: write the encoder weights as a plain state dict
    (loadable with weights_only=True) once, so training never reads the pickle."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(main.__doc__)
        return 2
    torch.save(dalle_state_dict_from_pickle(args[0]), args[1])
    print(f'wrote {args[1]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
