"""What does a checkpoint's visual encoder know of each shape? A linear probe on its frozen patch tokens.

The synthetic world draws 1-3 shapes on a 3x3 grid. For every picture of the world's training pool the ViT's patch
tokens are average-pooled onto that grid (as the DeiT stand-in's per-cell head sees them, synthetic/deit.py); a
linear head is trained on these frozen features to name each cell's colour, kind and size (or "empty"), and scored
on the held-out test pictures. The stand-in, a pretraining checkpoint (its `visual_encoder.*`) and a randomly
initialised ViT (`--random`, the floor) are probed alike, so the numbers say what pretraining kept or erased of
what the stand-in knew (docs/README_synthetic.md, ninth round).

    python scripts/probe_vision.py --checkpoint output/demo/pretrain/checkpoint_last.pth --root data/synthetic
    python scripts/probe_vision.py --checkpoint data/synthetic/deit_synthetic.pth
    python scripts/probe_vision.py --random
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import load_config  # noqa: E402
from models.checkpoint import CheckpointError, load_checkpoint_file, load_vit_weights, unwrap_state_dict  # noqa: E402
from models.vit import build_vit  # noqa: E402
from synthetic.deit import (CELL_CLASSES, cell_accuracy, cell_features, cell_loss, load_training_pictures,  # noqa: E402
                            normalise)

PREFIX = 'visual_encoder.'


def load_visual_encoder(config: dict, checkpoint=None):
    """The config's ViT with the weights of `checkpoint`: a DeiT-format file (the stand-in) or a model checkpoint
    whose `visual_encoder.*` keys hold them (Pretrain.py's, a fine-tuned one, a synthetic.pretrained file);
    randomly initialised when `checkpoint` is None."""
    vit = build_vit(config)
    if checkpoint is None:
        return vit.eval()
    sd = dict(unwrap_state_dict(load_checkpoint_file(checkpoint), checkpoint))
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    if 'pos_embed' not in sd:
        raise CheckpointError(f'{checkpoint} holds no ViT weights (neither visual_encoder.* keys nor a DeiT state '
                              f'dict); pass a DeiT stand-in or a model checkpoint')
    unexpected = load_vit_weights(vit, sd, checkpoint)
    if unexpected:
        raise CheckpointError(f'{checkpoint} does not fit the ViT of the config (unexpected {unexpected[:5]}); pass '
                              f'the config the checkpoint was trained with (--config)')
    return vit.eval()


@torch.no_grad()
def grid_tokens(vit, pictures: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Frozen patch tokens pooled onto the 3x3 grid: [N, 9, D] for uint8 pictures [N, 3, res, res]."""
    return torch.cat([cell_features(vit(normalise(pictures[i:i + batch]))) for i in range(0, len(pictures), batch)])


def linear_probe(train_x, train_y, test_x, test_y, epochs: int = 300, lr: float = 3e-3, seed: int = 0) -> dict:
    """Trains a linear per-cell head on frozen features; {'train': accuracies, 'test': accuracies} as
    synthetic.deit.cell_accuracy gives them (occupied cells' colour, kind, size, the kinds of small and of large
    shapes apart, and every cell's emptiness)."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_x.shape[-1], sum(CELL_CLASSES))
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(train_x), 256):
            idx = order[i:i + 256]
            loss = cell_loss(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return {'train': cell_accuracy(head(train_x), train_y), 'test': cell_accuracy(head(test_x), test_y)}


def probe(config: dict, root: str, checkpoint=None, epochs: int = 300, seed: int = 0) -> dict:
    vit = load_visual_encoder(config, checkpoint)
    train_pictures, _, _, train_cells = load_training_pictures(root, config['image_res'], 'train_')
    test_pictures, _, _, test_cells = load_training_pictures(root, config['image_res'], 'test_')
    return linear_probe(grid_tokens(vit, train_pictures), train_cells, grid_tokens(vit, test_pictures), test_cells,
                        epochs=epochs, seed=seed)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', help='a DeiT stand-in or a model checkpoint with visual_encoder.* keys')
    source.add_argument('--random', action='store_true', help='probe a randomly initialised ViT (the floor)')
    p.add_argument('--config', default='configs/Pretrain_synthetic.yaml', help='config whose vit/image_res to use')
    p.add_argument('--root', default='data/synthetic', help='the synthetic world (python -m synthetic.world)')
    p.add_argument('--epochs', type=int, default=300, help='epochs of the linear head over the frozen features')
    p.add_argument('--seed', type=int, default=0, help='seed of the head and of a --random ViT')
    p.add_argument('--json', help='also write the accuracies to this file')
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    result = probe(load_config(args.config), args.root, None if args.random else args.checkpoint, args.epochs,
                   args.seed)
    print(f"visual encoder of {'a random ViT' if args.random else args.checkpoint}, linear probe per grid cell "
          f"(chance: colour 1/8, kind 1/6, size 1/2):")
    for split, acc in result.items():
        print(f'  {split + "_*":8s} ' + ', '.join(f'{name} {value:.3f}' for name, value in acc.items()))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
