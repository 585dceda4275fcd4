"""ViT image encoder with the official ALBEF parameter names (spec section 2).

One attention implementation per block: fused scaled-dot-product attention by default, and an explicit
matmul -> softmax path that keeps the probabilities (and their gradient) for Grad-CAM when a block is
registered (`register_blk`) or when the reference path is requested.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

VIT_DEFAULTS = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True)


class Mlp(nn.Module):
    """Two-layer MLP with exact (erf) GELU."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection ([q | k | v] rows, heads as consecutive slices)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = True
        self.attention_map = None
        self.attn_gradients = None

    def save_attn_gradients(self, grad):
        self.attn_gradients = grad

    def get_attn_gradients(self):
        """Gradient of the saved attention probabilities (set on backward)."""
        return self.attn_gradients

    def get_attention_map(self):
        """Attention probabilities saved by the last forward with capture on, [B, heads, N, N]."""
        return self.attention_map

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
    """Pre-norm transformer block."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, register_hook=False):
        x = x + self.attn(self.norm1(x), register_hook=register_hook)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided convolution."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f'input image size {tuple(x.shape[-2:])} does not match the model image_res '
                             f'{self.img_size}; resize images to image_res in the transform')
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT returning all tokens after the final LayerNorm: [B, 1 + num_patches, embed_dim]."""

    def __init__(self, img_size=256, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, eps=1e-6):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        """Names the official ViT exempts (never consulted by the official optimiser, see spec 2.5)."""
        return {'pos_embed', 'cls_token'}

    def set_grad_checkpointing(self, enable=True):
        """Recompute block activations in backward to save memory."""
        self.grad_checkpointing = enable

    def forward(self, x, register_blk=-1):
        x = self.patch_embed(x)
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
    """Resize a [1, 1+S^2, D] position embedding to the encoder's grid (bicubic, align_corners=False)."""
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = visual_encoder.patch_embed.num_patches
    num_extra_tokens = visual_encoder.pos_embed.shape[-2] - num_patches
    orig_size = int(round(math.sqrt(pos_embed_checkpoint.shape[-2] - num_extra_tokens)))
    new_size = int(round(math.sqrt(num_patches)))
    if orig_size == new_size:
        return pos_embed_checkpoint
    extra = pos_embed_checkpoint[:, :num_extra_tokens]
    grid = pos_embed_checkpoint[:, num_extra_tokens:].reshape(-1, orig_size, orig_size, embedding_size)
    grid = F.interpolate(grid.permute(0, 3, 1, 2).float(), size=(new_size, new_size), mode='bicubic',
                         align_corners=False).to(pos_embed_checkpoint.dtype)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    print(f'reshape position embedding from {orig_size ** 2} to {new_size ** 2}')
    return torch.cat((extra, grid), dim=1)
