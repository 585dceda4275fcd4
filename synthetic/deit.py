"""A DeiT stand-in for the tiny synthetic ViT: supervised attribute classification on the synthetic training pictures.

ALBEF never trains its image encoder from scratch: the paper starts from DeiT (a ViT trained with ImageNet labels) and
BERT. No DeiT exists for the tiny ViT of `configs/Pretrain_synthetic.yaml`, and from a random initialisation its
ITC features collapse within ~20 steps of ALBEF pretraining (pairwise cosine > 0.99); the momentum queue then holds
near-identical keys and the features never separate again (README, "Synthetic benchmark"). So the synthetic recipe
mirrors the paper's: first a short supervised pretraining of the ViT alone, the analogue of DeiT's ImageNet training,
with the labels the world provides (which colours, kinds and colour-kind pairs a picture contains, from
`scenes.json`), then ALBEF pretraining initialised from it (`init_deit: True`, `deit_checkpoint:`).

Only `train_*` pictures are used, never the val/test pictures of the zero-shot check. The output is a DeiT-format
checkpoint, `{'model': ViT state dict + head.weight/head.bias}`, that `models.checkpoint.load_deit` reads like the
official `deit_base_patch16_224-b5f2ef4d.pth`.

    python -m synthetic.deit --root data/synthetic [--config configs/Pretrain_synthetic.yaml] [--epochs 4]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import engine.config as engine_config
import utils
from synthetic.world import COLOUR_NAMES, KINDS, SIZES, identity
from dataset.transforms import CLIP_MEAN, CLIP_STD
from models.vit import build_vit

DEFAULT_NAME = 'deit_synthetic.pth'
NUM_LABELS = len(COLOUR_NAMES) + len(KINDS) + len(COLOUR_NAMES) * len(KINDS)
# the normalisation of the official pretraining/test transforms
MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def attribute_labels(scene: dict) -> torch.Tensor:
    """Multi-hot labels: colours present, kinds present, colour-kind pairs present."""
    y = torch.zeros(NUM_LABELS)
    n_c, n_k = len(COLOUR_NAMES), len(KINDS)
    for shape in scene['shapes']:
        c, k = COLOUR_NAMES.index(shape['colour']), KINDS.index(shape['kind'])
        y[c] = 1
        y[n_c + k] = 1
        y[n_c + n_k + n_k * c + k] = 1
    return y


GRID = 3  # the world's 3x3 grid of cells (synthetic/world.py)


def cell_labels(scene: dict) -> torch.Tensor:
    """Per grid cell (row-major), the class indices [colour, kind, size] of its shape, 0 for an empty cell and
    1 + the attribute's index otherwise; [GRID * GRID, 3] int64."""
    y = torch.zeros(GRID * GRID, 3, dtype=torch.long)
    for shape in scene['shapes']:
        cell = GRID * shape['row'] + shape['col']
        y[cell, 0] = 1 + COLOUR_NAMES.index(shape['colour'])
        y[cell, 1] = 1 + KINDS.index(shape['kind'])
        y[cell, 2] = 1 + SIZES.index(shape['size'])
    return y


CELL_CLASSES = (1 + len(COLOUR_NAMES), 1 + len(KINDS), 1 + len(SIZES))


def mirror_cells(cells: torch.Tensor) -> torch.Tensor:
    """The cell labels of the horizontally flipped pictures: columns reversed. cells [B, GRID * GRID, 3]."""
    return cells.view(-1, GRID, GRID, 3).flip(2).reshape(cells.shape)


def load_training_pictures(root: str, image_res: int, prefix: str = 'train_'
                           ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """uint8 pictures [N, 3, res, res] (bicubic resize, as the test transform), their attribute labels, names and
    cell labels; the train pool only unless `prefix` names another pool (the held-out check reads test_*)."""
    scenes_path = os.path.join(root, 'scenes.json')
    if not os.path.isfile(scenes_path):
        raise FileNotFoundError(f'{scenes_path} not found: generate the synthetic world first with '
                                f'`python -m synthetic.world --root {root}`')
    with open(scenes_path) as f:
        scenes = json.load(f)
    names = sorted(n for n in scenes if n.startswith(prefix))
    if not names:
        raise ValueError(f'{scenes_path} lists no {prefix}* pictures; regenerate the synthetic world')
    pictures = []
    for name in names:
        path = os.path.join(root, 'images', name + '.jpg')
        try:
            with Image.open(path) as im:
                im = im.convert('RGB').resize((image_res, image_res), Image.BICUBIC)
        except (OSError, ValueError) as e:
            raise OSError(f'cannot read synthetic picture {path} ({e}); regenerate the world with '
                          f'`python -m synthetic.world --root {root}`') from e
        pictures.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    labels = torch.stack([attribute_labels(scenes[n]) for n in names])
    cells = torch.stack([cell_labels(scenes[n]) for n in names])
    return torch.stack(pictures), labels, names, cells


def attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged within each label group (colours, kinds, pairs), then over the groups, so the
    48 mostly-absent colour-kind pairs do not drown the colour and kind labels."""
    n_c, n_k = len(COLOUR_NAMES), len(KINDS)
    per_label = F.binary_cross_entropy_with_logits(logits, labels, reduction='none').mean(0)
    return (per_label[:n_c].mean() + per_label[n_c:n_c + n_k].mean() + per_label[n_c + n_k:].mean()) / 3


def normalise(batch_uint8: torch.Tensor) -> torch.Tensor:
    return (batch_uint8.float() / 255.0 - MEAN) / STD


def cell_features(vit_tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens [B, 1 + side * side, D] average-pooled onto the world's 3x3 grid: [B, GRID * GRID, D]."""
    patches = vit_tokens[:, 1:]
    side = math.isqrt(patches.shape[1])
    grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
    return F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2)


def cell_loss(logits: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each cell's colour, kind and size (0: empty), averaged over the three."""
    parts = logits.split(CELL_CLASSES, dim=-1)
    return sum(F.cross_entropy(part.flatten(0, 1), cells[..., i].flatten()) for i, part in enumerate(parts)) / 3


def cell_accuracy(logits: torch.Tensor, cells: torch.Tensor) -> dict:
    """Per attribute, the share of occupied cells whose class is predicted right, and of all cells whose
    emptiness is."""
    parts = logits.split(CELL_CLASSES, dim=-1)
    occupied = cells[..., 0] > 0
    out = {name: (parts[i].argmax(-1) == cells[..., i])[occupied].float().mean().item()
           for i, name in enumerate(('colour', 'kind', 'size'))}
    out['empty'] = ((parts[0].argmax(-1) == 0) == ~occupied).float().mean().item()
    # the kinds of small and of large shapes apart: a small shape spans about one 8-pixel patch at 64 px
    kind_right = parts[1].argmax(-1) == cells[..., 1]
    for i, size in enumerate(SIZES):
        of_size = cells[..., 2] == 1 + i
        out[f'kind_{size}'] = kind_right[of_size].float().mean().item() if of_size.any() else float('nan')
    return out


def train_vit(config: dict, root: str, epochs: int = 4, batch_size: int = 64, lr: float = 2e-3,
              weight_decay: float = 0.05, warmup_epochs: float = 1.0, seed: int = 0, cell_weight: float = 0.0,
              log=print) -> dict:
    """Train the config's ViT on the attribute labels: a linear head on [CLS] for the colours, kinds and pairs a
    picture contains and, with `cell_weight` > 0, a linear head on the patch tokens pooled per grid cell for each
    cell's colour, kind and size (dense labels that teach the patch tokens the shapes, which the [CLS] labels
    alone do not in a few epochs). Returns the DeiT-format state dict (the cell head is dropped)."""
    torch.manual_seed(seed)
    pictures, labels, _, cells = load_training_pictures(root, config['image_res'])
    vit = build_vit(config)
    heads = nn.ModuleDict({'cls': nn.Linear(vit.embed_dim, NUM_LABELS)})
    if cell_weight > 0:
        heads['cells'] = nn.Linear(vit.embed_dim, sum(CELL_CLASSES))
    for layer in heads.values():
        nn.init.trunc_normal_(layer.weight, std=.02)
        nn.init.zeros_(layer.bias)
    head = heads['cls']
    params = list(vit.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(pictures) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f'{len(pictures)} training pictures are fewer than one batch of {batch_size}')
    total, warmup = epochs * steps_per_epoch, max(1, int(warmup_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(seed)
    vit.train()
    start = time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(pictures), generator=generator)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x, y_cells = normalise(pictures[idx]), cells[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5  # the pretraining transform's horizontal flip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y_cells = torch.where(flip[:, None, None], mirror_cells(y_cells), y_cells)
            tokens = vit(x)
            loss = attribute_loss(head(tokens[:, 0]), labels[idx])
            if 'cells' in heads:
                loss = loss + cell_weight * cell_loss(heads['cells'](cell_features(tokens)), y_cells)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
        log(f'epoch {epoch}: loss {running / steps_per_epoch:.4f} ({time.time() - start:.0f} s)')
    vit.eval()
    n_c, n_k = len(COLOUR_NAMES), len(KINDS)
    groups = {'colours': slice(0, n_c), 'kinds': slice(n_c, n_c + n_k), 'colour-kind pairs': slice(n_c + n_k, None)}
    held_out = load_training_pictures(root, config['image_res'], 'test_')
    for prefix, (held_pictures, held_labels, _, held_cells) in (('train_', (pictures, labels, None, cells)),
                                                               ('test_', held_out)):
        with torch.no_grad():
            tokens = torch.cat([vit(normalise(held_pictures[i:i + 256])) for i in range(0, len(held_pictures), 256)])
        probe = head(tokens[:, 0])
        correct, absent = ((probe > 0) == held_labels.bool()).float(), (held_labels == 0).float()
        log(f'{prefix}* pictures, [CLS] label accuracy (answering "absent" everywhere): ' + ', '.join(
            f'{name} {correct[:, cols].mean():.3f} ({absent[:, cols].mean():.3f})' for name, cols in groups.items()))
        if 'cells' in heads:
            acc = cell_accuracy(heads['cells'](cell_features(tokens)), held_cells)
            log(f'{prefix}* pictures, per-cell accuracy of occupied cells (chance 1/8, 1/6, 1/2): ' + ', '.join(
                f'{name} {value:.3f}' for name, value in acc.items()))
    state = dict(vit.state_dict())
    state['head.weight'] = head.weight.detach().clone()
    state['head.bias'] = head.bias.detach().clone()
    return state


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(prog='python -m synthetic.deit',
                                     description='Pretrain the tiny synthetic ViT on attribute labels (the DeiT '
                                                 'stand-in the synthetic ALBEF recipe starts from).')
    parser.add_argument('--root', default='data/synthetic', help='synthetic world folder (python -m synthetic.world)')
    parser.add_argument('--config', default='configs/Pretrain_synthetic.yaml', help='config whose vit/image_res to use')
    parser.add_argument('--output', default=None, help=f'checkpoint to write (default <root>/{DEFAULT_NAME})')
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--warmup_epochs', type=float, default=1.0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--cell_weight', type=float, default=0.0,
                        help='weight of the per-cell colour/kind/size loss on the pooled patch tokens (0: [CLS] only)')
    args = parser.parse_args(argv)
    config = engine_config.load_config(args.config)
    output = args.output or os.path.join(args.root, DEFAULT_NAME)
    print(f'training the {config.get("vit", {}).get("depth", 12)}-block ViT of {args.config} on the attribute labels '
          f'of {args.root}/images/train_* ({args.epochs} epochs)', flush=True)
    state = train_vit(config, args.root, args.epochs, args.batch_size, args.lr, warmup_epochs=args.warmup_epochs,
                      seed=args.seed, cell_weight=args.cell_weight,
                      log=lambda m: print(m, flush=True))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # the world it was trained on (synthetic.world.check_identity refuses the file on another one)
    world = identity(args.root, required=False)
    utils.atomic_torch_save({'model': state, 'epochs': args.epochs, 'seed': args.seed,
                               'cell_weight': args.cell_weight, 'world': world}, output)
    print(f'wrote {output}', flush=True)
    return output


if __name__ == '__main__':
    main()
