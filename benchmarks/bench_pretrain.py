"""Time pretraining steps in `mode: reference` and `mode: fast` on the same inputs, in one process.

    python benchmarks/bench_pretrain.py                                         # tiny synthetic-size model, CPU
    python benchmarks/bench_pretrain.py --config configs/Pretrain.yaml --batch 64 --device cuda [--precision bf16]

The model is randomly initialised (the cost does not depend on the weights); images are random tensors at the
config's image_res and texts random ids of length 25 with random real lengths (the pretraining truncation). Each
mode runs `--warmup` untimed and `--steps` timed optimiser steps (forward, backward, AdamW, EMA, enqueue) and the
table reports samples/s, peak memory and model FLOPs utilisation. With `--compile` the fast mode also compiles
its encoder layers (texts are already a fixed 25 long); the warm-up steps pay the compilation.

FLOP count (per sample, multiply-add = 2 FLOPs; `step_flops`): a transformer layer over n tokens of width d with
an MLP of width r*d costs 2*n*d*d*(4 + 2r) for the projections and MLP plus 4*n*n*d for scores and values.
  vit   = depth layers over N = (res/patch)^2 + 1 image tokens
  text  = text layers over L = 25 tokens
  fuse  = fusion layers over L tokens + their cross-attention: 4*L*H*H (query, output) + 4*N*Dv*H (image K/V)
          + 4*L*N*H (scores, values)
  mlm   = 2*L*H*H (transform) + 2*L*H*V (decoder)
A training step per sample: online ViT and text 3x (forward + backward = 2x forward), momentum ViT and text 1x;
fusion 3x for each of 4 online passes (positive, 2 negatives, MLM) plus 1x momentum MLM pass; MLM head 3x online +
1x momentum. At ViT-B/16 256 px + BERT-base (6 text + 6 fusion layers) this gives ~280 GFLOPs, within 4% of the
~290 GFLOPs estimated from the layer shapes. MFU = achieved FLOP/s / `--peak_tflops` (default: the dense bf16 or TF32
peak of a recognised GPU, else n/a).
"""
import argparse
import gc
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import autocast  # noqa: E402
from models.model_pretrain import ALBEF  # noqa: E402
from models.speed import resolve_speed_mode  # noqa: E402
from optim import create_optimizer  # noqa: E402
from engine.config import load_bert_config, load_config  # noqa: E402

TEXT_LEN = 25
# Dense peak TFLOP/s (bf16, tf32) from the vendors' data sheets (SXM parts).
PEAKS = {'H200': (989.0, 494.7), 'H100': (989.0, 494.7), 'A100': (312.0, 156.0)}


class BenchTokenizer:
    """The special ids of bert-base-uncased (what the model reads from its tokenizer)."""

    pad_token_id, unk_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 100, 101, 102, 103


def layer_flops(n, d, mlp_ratio=4.0):
    """Forward FLOPs of one transformer layer over n tokens of width d."""
    return 2 * n * d * d * (4 + 2 * mlp_ratio) + 4 * n * n * d


def step_flops(config, text_len=TEXT_LEN):
    """Training FLOPs per sample of one pretraining step (derivation in the module docstring)."""
    vit, bert = config.get('vit', {}), load_bert_config(config['bert_config'])
    patch, dv = vit.get('patch_size', 16), vit.get('embed_dim', 768)
    n = (config['image_res'] // patch) ** 2 + 1
    h, fusion_at, layers = bert['hidden_size'], bert['fusion_layer'], bert['num_hidden_layers']
    ratio = bert['intermediate_size'] / h
    vit_f = vit.get('depth', 12) * layer_flops(n, dv, vit.get('mlp_ratio', 4.0))
    text_f = fusion_at * layer_flops(text_len, h, ratio)
    cross = 4 * text_len * h * h + 4 * n * dv * h + 4 * text_len * n * h
    fuse_f = (layers - fusion_at) * (layer_flops(text_len, h, ratio) + cross)
    mlm_f = 2 * text_len * h * h + 2 * text_len * h * bert['vocab_size']
    return 4 * vit_f + 4 * text_f + (4 * 3 + 1) * fuse_f + 4 * mlm_f


def random_batch(batch, res, generator):
    """Random images and random texts (CLS + ids, lengths 5..25, PAD after)."""
    image = torch.randn(batch, 3, res, res, generator=generator)
    lengths = torch.randint(5, TEXT_LEN + 1, (batch,), generator=generator)
    mask = (torch.arange(TEXT_LEN).view(1, -1) < lengths.view(-1, 1)).long()
    ids = torch.randint(1000, 29000, (batch, TEXT_LEN), generator=generator) * mask
    ids[:, 0] = 101
    return image, ids, mask


class Text:
    """The tokenised-text object the model takes."""

    def __init__(self, ids, mask):
        self.input_ids, self.attention_mask = ids, mask


def peak_memory(device):
    """Peak memory in GiB: CUDA max_memory_allocated, else the process's peak RSS (monotone over the run)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def run_mode(mode, config, batches, device, args):
    """(samples/s, peak GiB) of `args.steps` timed steps in one mode."""
    cfg = dict(config, mode=mode, batch_size=args.batch, compile=args.compile and mode == 'fast')
    cfg['queue_size'] = max(args.batch, cfg['queue_size'] // args.batch * args.batch)
    torch.manual_seed(0)
    model = ALBEF(config=cfg, text_encoder=None, tokenizer=BenchTokenizer(), init_deit=False).to(device).train()
    optimizer = create_optimizer(cfg['optimizer'], model, fused=resolve_speed_mode(cfg)['fused'])
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step(image, ids, mask):
        with autocast(device, args.precision):
            loss_mlm, loss_ita, loss_itm = model(image, Text(ids, mask), alpha=0.4)
        optimizer.zero_grad(set_to_none=True)
        (loss_mlm + loss_ita + loss_itm).backward()
        optimizer.step()

    for i in range(args.warmup):
        step(*batches[i % len(batches)])
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.steps):
        step(*batches[i % len(batches)])
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_memory(device)
    del model, optimizer
    gc.collect()
    return args.steps * args.batch / seconds, peak


def default_peak(device, precision):
    """The dense peak TFLOP/s of a recognised GPU for the precision, else None."""
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAKS.items():
        if key in name:
            return bf16 if precision == 'bf16' else tf32
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default='configs/Pretrain_synthetic.yaml')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32')
    p.add_argument('--image_res', type=int, default=None, help='override the config (e.g. 256 for Pretrain.yaml)')
    p.add_argument('--modes', default='reference,fast')
    p.add_argument('--compile', action='store_true', help='fast mode also compiles the encoder layers')
    p.add_argument('--peak_tflops', type=float, default=None, help='device peak for MFU (default: known GPUs)')
    args = p.parse_args()

    config = load_config(args.config)
    if args.image_res:
        config['image_res'] = args.image_res
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for fp32 baselines, as the official A100 runs
        torch.backends.cudnn.allow_tf32 = True
    g = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(device) for t in random_batch(args.batch, config['image_res'], g)) for _ in range(2)]
    flops = step_flops(config)
    peak = args.peak_tflops or default_peak(device, args.precision)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'{args.config} at {config["image_res"]} px, batch {args.batch}, {args.precision}, {where}; '
          f'{flops / 1e9:.2f} GFLOPs per training sample; peak {peak or "n/a"} TFLOP/s')
    memory = 'peak CUDA GiB' if device.type == 'cuda' else 'peak RSS GiB'
    print(f'| mode | samples/s | {memory} | MFU |')
    print('|---|---|---|---|')
    for mode in args.modes.split(','):
        try:
            rate, mem = run_mode(mode, config, batches, device, args)
        except torch.cuda.OutOfMemoryError:  # report the mode that does not fit and still time the other
            gc.collect()
            torch.cuda.empty_cache()
            print(f'| {mode} | out of memory | - | - |', flush=True)
            continue
        mfu = f'{100 * rate * flops / (peak * 1e12):.1f}%' if peak else 'n/a'
        print(f'| {mode} | {rate:.2f} | {mem:.2f} | {mfu} |', flush=True)


if __name__ == '__main__':
    main()
