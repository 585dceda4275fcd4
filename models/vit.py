"""ViT image encoder of ALBEF (ViT-B/16, paper section 3.1) with the official parameter names.

Everything timm provides comes from timm: the patch embedding (`PatchEmbed`), the MLP (`Mlp`), stochastic depth
(`DropPath`), the weight initialisation (`trunc_normal_`, `init_weights_vit_timm`) and the position-embedding resampling
(`resample_abs_pos_embed`). What timm lacks stays here: the self-attention, which runs fused scaled-dot-product attention
by default and an explicit matmul -> softmax path that keeps the probabilities (and their gradient) for Grad-CAM when a
block is registered (`register_blk`: Grad-CAM for weakly-supervised visual grounding, paper; docs/QUIRKS.md
`gradcam_mode: itc`) or when the explicit path is chosen, and the `Block` that passes that switch to it.

State-dict layout (keys, order, shapes) equals the official one: `cls_token`, `pos_embed`, `patch_embed.proj.*`,
`blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*`, `norm.*`.
"""
import inspect
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import init_weights_vit_timm

from .attention_capture import AttentionCapture

VIT_DEFAULTS = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True)

# The official ViT initialises every Linear with a truncated normal (std .02) and a zero bias, and leaves the other
# modules as constructed (LayerNorm ones / zeros, the patch convolution at its default). timm's ViT init function is that
# rule; timm >= 1.0 also re-initialises modules with reset_parameters() unless told not to, which would draw the patch
# convolution again and shift every later draw away from the official initialisation.
if 'needs_reset' in inspect.signature(init_weights_vit_timm).parameters:
    _init_weights = partial(init_weights_vit_timm, needs_reset=False)
else:
    _init_weights = init_weights_vit_timm


class Attention(AttentionCapture, nn.Module):
    """Multi-head self-attention with a fused qkv projection ([q | k | v] rows, heads as consecutive slices).

    `use_sdpa` (set per module, e.g. by `models.xbert.set_attention_impl`) picks the fused kernel; a call with
    `register_hook=True` always takes the explicit path and keeps the attention map and its gradient.
    """

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = True
        self.init_capture()

    def forward(self, x, register_hook=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.use_sdpa and not register_hook:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            if register_hook:
                self.attention_map = attn
                attn.register_hook(self.save_attn_gradients)
            out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block (timm's Mlp and DropPath around our Attention, which needs the capture switch)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0., norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        # one stochastic-depth module for both residual branches, as in the official ViT
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x, register_hook=False):
        x = x + self.drop_path(self.attn(self.norm1(x), register_hook=register_hook))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT returning all tokens after the final LayerNorm: [B, 1 + num_patches, embed_dim].

    `mask_token=True` adds a learnable [1, 1, embed_dim] token that `forward(..., mask=...)` puts in place of the
    masked patch embeddings (before the position embedding is added); off by default, so the state dict is the
    official one.
    """

    def __init__(self, img_size=256, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, eps=1e-6, drop_path_rate=0., mask_token=False):
        super().__init__()
        self.embed_dim = embed_dim
        norm_layer = partial(nn.LayerNorm, eps=eps)
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        # stochastic depth rate rising linearly over the blocks (official decay rule; 0 everywhere by default)
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_layer)
                                     for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.grad_checkpointing = False
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=.02)
        # same order of draws as the official ViT: with the same seed the weights equal the official ones
        self.apply(_init_weights)

    def no_weight_decay(self):
        """Names the official ViT exempts (never consulted by the official optimiser, docs/QUIRKS.md
        "Weight-decay exemptions")."""
        return {'pos_embed', 'cls_token', 'mask_token'} if self.mask_token is not None else {'pos_embed', 'cls_token'}

    def set_grad_checkpointing(self, enable=True):
        """Recompute block activations in backward to save memory."""
        self.grad_checkpointing = enable

    def forward(self, x, register_blk=-1, mask=None):
        """Image [B, C, H, W] -> tokens. `register_blk`: index of the block whose attention map and gradient are kept
        (Grad-CAM); `mask`: optional bool [B, num_patches], True where the patch embedding is replaced by
        `mask_token`. A tensor in the second place is the mask (SIMLA's release calls `visual_encoder(image, mask)`)."""
        if isinstance(register_blk, torch.Tensor):
            if mask is not None:
                raise TypeError('register_blk must be an int when mask=... is given')
            register_blk, mask = -1, register_blk
        if tuple(x.shape[-2:]) != tuple(self.patch_embed.img_size):
            raise ValueError(f'input image size {tuple(x.shape[-2:])} does not match the model image_res '
                             f'{tuple(self.patch_embed.img_size)}; resize images to image_res in the transform')
        x = self.patch_embed(x)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError('a patch mask needs a ViT built with mask_token=True')
            if mask.shape != x.shape[:2]:
                raise ValueError(f'mask shape {tuple(mask.shape)} must be [batch, num_patches] = {tuple(x.shape[:2])}')
            x = torch.where(mask.unsqueeze(-1).bool(), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, :x.size(1), :]
        for i, blk in enumerate(self.blocks):
            capture = i == register_blk
            if self.grad_checkpointing and self.training and not capture:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x, capture)
        return self.norm(x)


def build_vit(config):
    """ViT from the optional `vit:` config section (default ViT-B/16) at `image_res`."""
    args = dict(VIT_DEFAULTS)
    args.update(config.get('vit') or {})
    return VisionTransformer(img_size=config['image_res'], **args)


def interpolate_pos_embed(pos_embed_checkpoint, visual_encoder):
    """Resize a [1, 1+S^2, D] position embedding to the encoder's grid, keeping the cls token.

    The official resize (fine-tuning at a higher resolution interpolates the patch position encoding, paper,
    implementation details) is bicubic with align_corners=False and
    no antialiasing; timm's resampler antialiases by default, so antialias=False is passed (tests/test_vit.py checks
    the equality with plain bicubic interpolation).
    """
    num_patches = visual_encoder.patch_embed.num_patches
    num_extra_tokens = visual_encoder.pos_embed.shape[-2] - num_patches
    orig_size = int(round(math.sqrt(pos_embed_checkpoint.shape[-2] - num_extra_tokens)))
    new_size = int(round(math.sqrt(num_patches)))
    if orig_size == new_size:
        return pos_embed_checkpoint
    out = resample_abs_pos_embed(pos_embed_checkpoint, new_size=[new_size, new_size], old_size=[orig_size, orig_size],
                                 num_prefix_tokens=num_extra_tokens, interpolation='bicubic', antialias=False)
    print(f'reshape position embedding from {orig_size ** 2} to {new_size ** 2}')
    return out
