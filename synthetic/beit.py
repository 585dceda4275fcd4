"""A BEiT stand-in for the tiny synthetic VLMo: stage 1 of VLMo's stagewise pretraining on the synthetic world.

VLMo starts from a trained BEiT (`beit_base_patch16_224_pt22k_ft22kto1k.pth`, docs/README_vlmo.md "Stages"); its
image expert, attention and image rows of the relative-position table come from it, and stage 2 freezes them. No BEiT
exists for the tiny Multiway Transformer of `configs/vlmo/*_synthetic.yaml`, and started from random weights the
synthetic stage 3 never lowers ITC or ITM (docs/README_vlmo.md, "Commands"): the random tower's [CLS] features barely
depend on the picture. As `synthetic/deit.py` does for ALBEF, this trains the image tower alone on the labels the
world provides (which colours, kinds and colour-kind pairs a picture contains; optionally each grid cell's shape), with
BEiT's fine-tuning head (mean pooling of the patch tokens, `fc_norm`, linear `head`), and writes the file in the layout
of the official BEiT checkpoint, `{'model': state_dict}`: `cls_token`, `patch_embed.*`, per block `gamma_1/2`,
`norm1`, `attn.{q_bias, v_bias, relative_position_bias_table, relative_position_index, qkv, proj}`, `norm2`, `mlp.*`,
then `fc_norm.*` and `head.*` (no final `norm`). Stage 2 reads it through the official BEiT conversion
(`--checkpoint`; models/vlmo_checkpoint.convert_beit).

The tower trained here is the Multiway Transformer's own image path (attention, V-FFN, LayerScale, the image rows of
the shared table, one column block per layer, exactly BEiT's per-layer tables), with no token-type embedding (BEiT
has none). Only `train_*` pictures are used.

    python -m synthetic.beit --root data/synthetic [--config configs/vlmo/Pretrain_stage2_synthetic.yaml]
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Optional, Sequence

import torch
import torch.nn as nn

import engine.config as engine_config
import utils
from synthetic.deit import (CELL_CLASSES, COLOUR_NAMES, KINDS, NUM_LABELS, attribute_loss, cell_accuracy,
                            cell_features, cell_loss, load_training_pictures, mirror_cells)
from synthetic.world import identity

DEFAULT_NAME = 'beit_synthetic.pth'


def image_normalisation(config: dict) -> tuple[tuple, tuple]:
    """(mean, std) of the pipeline's image normalisation for `config` (dataset/transforms.py)."""
    from dataset.transforms import normalisation_of
    return normalisation_of(config)


class BEiTStandIn(nn.Module):
    """The image path of a VLMo model (`vlmo_model`'s transformer and the image rows of its table) with BEiT's
    fine-tuning head: mean of the patch tokens -> fc_norm -> head."""

    def __init__(self, vlmo_model, num_labels: int, cell_classes: int = 0):
        super().__init__()
        self.vlmo = vlmo_model
        D = vlmo_model.transformer.cls_token.shape[-1]
        self.fc_norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, num_labels)
        self.cells = nn.Linear(D, cell_classes) if cell_classes else None
        for layer in (self.head, self.cells):
            if layer is not None:
                nn.init.trunc_normal_(layer.weight, std=.02)
                nn.init.zeros_(layer.bias)

    def tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The blocks' output tokens [B, 1 + P, D] of the image-only pass without token types (BEiT's forward)."""
        m = self.vlmo
        x, mask = m.transformer.visual_embed(image)
        biases = m._rel_pos_bias(m.relative_position_index)
        for i, blk in enumerate(m.transformer.blocks):
            x = blk(x, mask=mask, modality_type='image', relative_position_bias=biases[i])
        return x

    def forward(self, image: torch.Tensor):
        x = self.tokens(image)
        logits = self.head(self.fc_norm(x[:, 1:].mean(1)))
        return logits, (self.cells(cell_features(x)) if self.cells is not None else None)

    def parameters_to_train(self):
        """The image path only: patch embedding, cls token, attention, LayerScale, norm1, V-FFN and its norm, the
        relative table (only its image rows are read), and the heads."""
        keep = ('patch_embed', 'cls_token', 'attn.', 'gamma_', 'norm1', 'mlp_imag', 'norm2_imag')
        own = [p for n, p in self.vlmo.transformer.named_parameters() if any(s in n for s in keep)]
        table = [self.vlmo.relative_position_bias_table] if self.vlmo.relative_position_bias_table is not None else []
        params = own + table + [p for n, p in self.named_parameters() if not n.startswith('vlmo.')]
        for p in params:  # the stage-2 model the tower is built as freezes attention and V-FFN
            p.requires_grad_(True)
        return params

    def beit_state_dict(self) -> dict:
        """The official BEiT fine-tuning checkpoint's layout (key order included) of the trained tower."""
        m = self.vlmo
        H, T_img = m.num_heads, m.num_image_rows
        sd = {'cls_token': m.transformer.cls_token, 'patch_embed.proj.weight': m.transformer.patch_embed.proj.weight,
              'patch_embed.proj.bias': m.transformer.patch_embed.proj.bias}
        for i, blk in enumerate(m.transformer.blocks):
            p = f'blocks.{i}.'
            sd[p + 'gamma_1'], sd[p + 'gamma_2'] = blk.gamma_1, blk.gamma_2
            sd[p + 'norm1.weight'], sd[p + 'norm1.bias'] = blk.norm1.weight, blk.norm1.bias
            sd[p + 'attn.q_bias'], sd[p + 'attn.v_bias'] = blk.attn.q_bias, blk.attn.v_bias
            sd[p + 'attn.relative_position_bias_table'] = m.relative_position_bias_table[:T_img, i * H:(i + 1) * H]
            sd[p + 'attn.relative_position_index'] = m.relative_position_index
            sd[p + 'attn.qkv.weight'] = blk.attn.qkv.weight
            sd[p + 'attn.proj.weight'], sd[p + 'attn.proj.bias'] = blk.attn.proj.weight, blk.attn.proj.bias
            sd[p + 'norm2.weight'], sd[p + 'norm2.bias'] = blk.norm2_imag.weight, blk.norm2_imag.bias
            for fc in ('fc1', 'fc2'):
                layer = getattr(blk.mlp_imag, fc)
                sd[p + f'mlp.{fc}.weight'], sd[p + f'mlp.{fc}.bias'] = layer.weight, layer.bias
        sd.update({'fc_norm.weight': self.fc_norm.weight, 'fc_norm.bias': self.fc_norm.bias,
                   'head.weight': self.head.weight, 'head.bias': self.head.bias})
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def build_stand_in(config: dict, cell_weight: float) -> BEiTStandIn:
    from models.vlmo import VLMo
    vlmo = VLMo(config={**config, 'task': 'textmlm'}, task='textmlm')
    if vlmo.transformer.blocks[0].gamma_1 is None or vlmo.relative_position_bias_table is None:
        raise ValueError('the BEiT stand-in needs LayerScale (vlmo.layer_scale_init_values) and the relative '
                         'position bias (vlmo.use_rel_pos_bias: true), as BEiT-base has')
    return BEiTStandIn(vlmo, NUM_LABELS, sum(CELL_CLASSES) if cell_weight > 0 else 0)


def train_beit(config: dict, root: str, epochs: int = 4, batch_size: int = 64, lr: float = 2e-3,
               weight_decay: float = 0.05, warmup_epochs: float = 1.0, seed: int = 0, cell_weight: float = 1.0,
               log=print, metrics: Optional[dict] = None) -> dict:
    """Train the config's VLMo image tower on the attribute labels (and, with `cell_weight` > 0, the per-cell
    labels); returns the BEiT-format state dict. `metrics`, when given, receives the label accuracies of the train
    and held-out pictures and those of answering "absent" everywhere (`test_colours`, `test_colours_absent`, ...)."""
    torch.manual_seed(seed)
    pictures, labels, _, cells = load_training_pictures(root, config['image_res'])
    model = build_stand_in(config, cell_weight)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in image_normalisation(config))

    def normalise(batch_uint8):
        return (batch_uint8.float() / 255.0 - mean) / std

    optimizer = torch.optim.AdamW(model.parameters_to_train(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(pictures) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f'{len(pictures)} training pictures are fewer than one batch of {batch_size}')
    total, warmup = epochs * steps_per_epoch, max(1, int(warmup_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(pictures), generator=generator)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x, y_cells = normalise(pictures[idx]), cells[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5  # the training transform's horizontal flip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y_cells = torch.where(flip[:, None, None], mirror_cells(y_cells), y_cells)
            logits, cell_logits = model(x)
            loss = attribute_loss(logits, labels[idx])
            if cell_logits is not None:
                loss = loss + cell_weight * cell_loss(cell_logits, y_cells)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
        log(f'epoch {epoch}: loss {running / steps_per_epoch:.4f} ({time.time() - start:.0f} s)')
    model.eval()
    n_c, n_k = len(COLOUR_NAMES), len(KINDS)
    groups = {'colours': slice(0, n_c), 'kinds': slice(n_c, n_c + n_k), 'colour-kind pairs': slice(n_c + n_k, None)}
    held_out = load_training_pictures(root, config['image_res'], 'test_')
    for prefix, (held_pictures, held_labels, _, held_cells) in (('train_', (pictures, labels, None, cells)),
                                                               ('test_', held_out)):
        with torch.no_grad():
            outs = [model(normalise(held_pictures[i:i + 256])) for i in range(0, len(held_pictures), 256)]
        probe = torch.cat([o[0] for o in outs])
        correct, absent = ((probe > 0) == held_labels.bool()).float(), (held_labels == 0).float()
        if metrics is not None:
            for name, cols in groups.items():
                key = f"{prefix.rstrip('_')}_{name.replace(' ', '_').replace('-', '_')}"
                metrics[key], metrics[key + '_absent'] = correct[:, cols].mean().item(), absent[:, cols].mean().item()
        log(f'{prefix}* pictures, label accuracy (answering "absent" everywhere): ' + ', '.join(
            f'{name} {correct[:, cols].mean():.3f} ({absent[:, cols].mean():.3f})' for name, cols in groups.items()))
        if model.cells is not None:
            acc = cell_accuracy(torch.cat([o[1] for o in outs]), held_cells)
            log(f'{prefix}* pictures, per-cell accuracy of occupied cells (chance 1/8, 1/6, 1/2): ' + ', '.join(
                f'{name} {value:.3f}' for name, value in acc.items()))
    return model.beit_state_dict()


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(prog='python -m synthetic.beit',
                                     description='Train the tiny synthetic VLMo image tower on attribute labels and '
                                                 'write it as a BEiT checkpoint (stage 1 of the synthetic VLMo recipe).')
    parser.add_argument('--root', default='data/synthetic', help='synthetic world folder (python -m synthetic.world)')
    parser.add_argument('--config', default='configs/vlmo/Pretrain_stage2_synthetic.yaml',
                        help='VLMo config whose vlmo/image_res to use')
    parser.add_argument('--output', default=None, help=f'checkpoint to write (default <root>/{DEFAULT_NAME})')
    # the recipe of docs/README_vlmo.md ("Synthetic world"): 12 epochs at lr 5e-3 with the per-cell head
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=5e-3)
    parser.add_argument('--warmup_epochs', type=float, default=1.0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--cell_weight', type=float, default=1.0,
                        help='weight of the per-cell colour/kind/size loss on the pooled patch tokens (0: labels only)')
    args = parser.parse_args(argv)
    config = engine_config.load_config(args.config)
    if config.get('model') != 'vlmo':
        raise SystemExit(f'{args.config}: model: {config.get("model")}; the BEiT stand-in is for model: vlmo configs '
                         f'(the ALBEF stand-in is python -m synthetic.deit)')
    output = args.output or os.path.join(args.root, DEFAULT_NAME)
    print(f'training the image tower of {args.config} on the attribute labels of {args.root}/images/train_* '
          f'({args.epochs} epochs)', flush=True)
    metrics = {}
    state = train_beit(config, args.root, args.epochs, args.batch_size, args.lr, warmup_epochs=args.warmup_epochs,
                       seed=args.seed, cell_weight=args.cell_weight, log=lambda m: print(m, flush=True),
                       metrics=metrics)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # the world it was trained on (synthetic.world.check_identity refuses the file on another one)
    world = identity(args.root, required=False)
    utils.atomic_torch_save({'model': state, 'epochs': args.epochs, 'seed': args.seed,
                             'cell_weight': args.cell_weight, 'metrics': metrics, 'world': world}, output)
    print(f'wrote {output}', flush=True)
    return output


if __name__ == '__main__':
    main()
