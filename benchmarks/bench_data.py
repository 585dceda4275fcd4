"""Decoded + augmented pretraining images per second per DataLoader worker, on the synthetic world.

    python benchmarks/bench_data.py                       # 256 px, world generated to a temporary folder
    python benchmarks/bench_data.py --image_res 384 --root data/synthetic

One process reads `--items` pretraining pairs through the real pretraining dataset (file open, JPEG decode, RGB,
RandomResizedCrop bicubic, flip, RandAugment, normalise) exactly as one DataLoader worker does, without
the collate (tokenisation is timed separately, it is cheap). A run needs about this many workers per GPU:
GPU samples/s / images/s per worker. Synthetic pictures are small, so real (larger) JPEGs decode slower; store them
pre-resized.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import create_dataset  # noqa: E402
from dataset.collate import build_collate_fn  # noqa: E402
from models.tokenization import build_tokenizer  # noqa: E402
from synthetic.world import generate  # noqa: E402
from engine.config import load_config  # noqa: E402


def items_per_second(fn, n):
    """Calls of fn(i) per second over i in range(n)."""
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--root', default=None, help='an existing synthetic world (default: generate one to a temp dir)')
    p.add_argument('--image_res', type=int, default=256)
    p.add_argument('--items', type=int, default=200)
    p.add_argument('--scale', type=float, default=0.1, help='world scale when generating')
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, 'synthetic')
            start = time.perf_counter()
            generate(root, seed=0, scale=args.scale)
            print(f'generated the synthetic world (scale {args.scale}) in {time.perf_counter() - start:.1f} s')
        config = load_config('configs/Pretrain_synthetic.yaml')
        config.update(train_file=[os.path.join(root, 'pretrain.json')], image_root=root, image_res=args.image_res,
                      crop_min_scale=None)  # official 0.2-1.0 crop scale
        dataset = create_dataset('pretrain', config).train
        n = min(args.items, len(dataset))
        dataset[0]  # first call pays the imports and file-system caches
        rate = items_per_second(lambda i: dataset[i % len(dataset)], n)
        print(f'{n} items at {args.image_res} px: {rate:.1f} decoded+augmented images/s per worker '
              f'({1000 / rate:.2f} ms each)')
        tokenizer = build_tokenizer('bert-base-uncased')
        collate = build_collate_fn('pretrain', tokenizer, train=True)
        items = [dataset[i % len(dataset)] for i in range(64)]
        tok_rate = items_per_second(lambda i: collate(items), 20) * 64
        print(f'collate (stack images, tokenise captions): {tok_rate:.0f} samples/s per worker')


if __name__ == '__main__':
    main()
