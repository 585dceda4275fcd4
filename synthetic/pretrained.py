"""A demo-length synthetic pretraining, stored small: the committed start point of the image-blind margin tests.

The tasks of the synthetic benchmark beat their image-blind controls only from a pretraining of `make demo`'s length
(4 x 93 steps of configs/Pretrain_synthetic.yaml, 5-7 minutes of one core; docs/README_synthetic.md), which the CI
budget cannot pay on every run. So the tests fine-tune from one such run stored in the repository
(tests/fixtures/synthetic_pretrained/albef_demo_seed42.pth), and measure each task against its control live.

The stored form is the inference form of the checkpoint (no momentum copies, no queues: every fine-tuning script
copies momentum models from the loaded weights when a file has none, as for a released file) in float16, with tied
tensors stored once: about 12 MB instead of 100. `expand` writes it back as an ordinary float32 checkpoint that the
entry scripts load with `--checkpoint`. The file records the world it was trained on and the run's zero-shot numbers.

    python -m synthetic.pretrained --checkpoint output/demo/pretrain/checkpoint_last.pth --root data/synthetic \\
        --output tests/fixtures/synthetic_pretrained/albef_demo_seed42.pth
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import torch

import utils
from models.checkpoint import drop_training_state
from synthetic.world import check_identity, identity as world_identity

FORMAT = 'albef-synthetic-pretrained-1'


def _half_tied(sd: dict) -> dict:
    """Floating tensors as float16; tensors that shared storage (tied weights) still share it, so they are saved once."""
    out, seen = {}, {}
    for key, value in sd.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if ident not in seen:
            seen[ident] = value.detach().to(torch.float16).contiguous()
        out[key] = seen[ident]
    return out


def compact(checkpoint_path, root, output) -> dict:
    """Stores the model of a Pretrain.py checkpoint in the compact form; returns what it wrote besides the weights."""
    checkpoint = torch.load(checkpoint_path, map_location='cpu', weights_only=False)
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
        raise ValueError(f'{checkpoint_path}: not a Pretrain.py checkpoint (no "model" entry)')
    sd = dict(checkpoint['model'])
    drop_training_state(sd)
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    log = os.path.join(folder, 'log.txt')
    records = []
    if os.path.isfile(log):
        with open(log) as f:
            records = [json.loads(line) for line in f if line.startswith('{')]
    info = {'format': FORMAT, 'world': world_identity(root), 'epoch': checkpoint.get('epoch'),
            'seed': checkpoint.get('seed'), 'config': utils.plain_json(checkpoint.get('config')),
            'log': utils.plain_json(records)}
    utils.atomic_torch_save({'model': _half_tied(sd), 'info': info}, output)
    return info


def _load(path) -> dict:
    stored = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(stored, dict) or stored.get('info', {}).get('format') != FORMAT:
        raise ValueError(f'{path}: not a file of synthetic.pretrained (format {FORMAT}); '
                         'write one with python -m synthetic.pretrained')
    return stored


def load_info(path) -> dict:
    """The stored file's description (world, epoch, seed, config, the run's log records)."""
    return _load(path)['info']


def expand(path, output, root=None) -> str:
    """Writes the stored model as a float32 checkpoint ({'model': state dict}) at `output` and returns `output`.

    root: the synthetic world the checkpoint will be fine-tuned on; it must be the one the file was trained on
    (same generator format, seed and scale), else the held-out splits would not be held out."""
    stored = _load(path)
    if root is not None:
        check_identity(stored['info']['world'], root, path,
                       'regenerate it from a pretraining on this world: python -m synthetic.pretrained --help')
    sd = {key: value.to(torch.float32) if value.is_floating_point() else value
          for key, value in stored['model'].items()}
    utils.atomic_torch_save({'model': sd}, output)
    return str(output)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='a Pretrain.py checkpoint (configs/Pretrain_synthetic.yaml)')
    p.add_argument('--root', required=True, help='the synthetic world it was pretrained on (its manifest.json)')
    p.add_argument('--output', required=True)
    args = p.parse_args(argv)
    info = compact(args.checkpoint, args.root, args.output)
    last = info['log'][-1] if info['log'] else {}
    print(f'wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB): epoch {info["epoch"]}, '
          f'zero-shot ITC TR@1 / IR@1 {last.get("zeroshot_txt_r1")} / {last.get("zeroshot_img_r1")}')


if __name__ == '__main__':
    main()
