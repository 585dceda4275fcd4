"""Time the reference (official) and the fast ITM re-ranker on the same features and candidates, at several sizes.

    python benchmarks/bench_retrieval_eval.py                                  # tiny model, CPU, 32-256 images
    python benchmarks/bench_retrieval_eval.py --contrast 1024                  # also fixed 1,024-pair chunks
    python benchmarks/bench_retrieval_eval.py --config configs/Retrieval_coco.yaml --device cuda \
        --images 200 --captions 5 --k_test 64                                  # ViT-B/16 + BERT-base at 384 px

The model is randomly initialised (the cost does not depend on the weights). For each size both re-rankers score
the same top-k candidates of the same ITC similarities; the script checks that the score matrices agree and that
R@1/5/10 of both directions are identical, and prints one table row per size: seconds of the reference loop, of the
fast path with its default (automatic) chunks and, with --contrast N, with fixed N-pair chunks; each as wall-clock
and as CPU time of this process, the best of --repeats interleaved runs (a shared machine's busy spells inflate
single runs, most of all the reference loop's many small operator calls when other processes hold the cores).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.rerank import (RetrievalFeatures, candidate_pairs, chunk_size, pair_chunks,  # noqa: E402
                               rerank_fast, rerank_reference)
from evaluation.retrieval import itm_eval  # noqa: E402
from models.model_retrieval import ALBEF  # noqa: E402

try:  # the config loader moved from utils.py to engine/config.py
    from engine.config import load_config  # noqa: E402
except ImportError:
    from utils import load_config  # noqa: E402


def synthetic_features(model, n_images, captions, text_len, device, batch=32):
    """Encode random images and random captions of random lengths (CLS + ids, padded to text_len)."""
    g = torch.Generator().manual_seed(0)
    res = model.visual_encoder.patch_embed.img_size  # timm's PatchEmbed: (height, width)
    res = tuple(res) if isinstance(res, (tuple, list)) else (res, res)
    n_text = n_images * captions
    lengths = torch.randint(5, text_len + 1, (n_text,), generator=g)
    ids = torch.randint(1000, 2000, (n_text, text_len), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(text_len).view(1, -1) < lengths.view(-1, 1)).long()
    ids = ids * mask
    image_feats, image_embeds, text_feats, text_embeds = [], [], [], []
    with torch.no_grad():
        for s in range(0, n_images, batch):
            n = min(batch, n_images - s)
            img = model.visual_encoder(torch.randn(n, 3, *res, generator=g).to(device))
            image_feats.append(img)
            image_embeds.append(torch.nn.functional.normalize(model.vision_proj(img[:, 0]).float(), dim=-1))
        for s in range(0, n_text, 256):
            t = model.text_encoder(ids[s:s + 256].to(device), attention_mask=mask[s:s + 256].to(device),
                                   mode='text').last_hidden_state
            text_feats.append(t)
            text_embeds.append(torch.nn.functional.normalize(model.text_proj(t[:, 0]).float(), dim=-1))
    return RetrievalFeatures(torch.cat(image_feats), torch.cat(image_embeds), torch.cat(text_feats),
                             mask.to(device), torch.cat(text_embeds))


def timed(fn, device):
    """(result, wall seconds, CPU seconds of this process) with device synchronisation."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.process_time() - cpu


def recalls(i2t, t2i, captions):
    """R@1/5/10 of both directions, text t belonging to image t // captions."""
    n_img, n_txt = i2t.shape
    img2txt = {i: list(range(i * captions, (i + 1) * captions)) for i in range(n_img)}
    txt2img = {t: t // captions for t in range(n_txt)}
    m = itm_eval(i2t.cpu().numpy(), t2i.cpu().numpy(), txt2img, img2txt)
    return tuple(m[k] for k in ('txt_r1', 'txt_r5', 'txt_r10', 'img_r1', 'img_r5', 'img_r10'))


def max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def run_size(model, args, n_images, device, autocast):
    """One table row: best-of-`repeats` timings (interleaved) of the reference, automatic and fixed chunking."""
    with autocast:
        feats = synthetic_features(model, n_images, args.captions, args.text_len, device)
        sims = (feats.image_embeds @ feats.text_embeds.t()).float()
        pair_image = candidate_pairs(sims, args.k_test)[0]
        for warm_up in (rerank_reference, rerank_fast):  # kernels, allocator, autotuning
            warm_up(model, feats, sims[:2, :2 * args.captions], args.k_test)
        methods = {'ref': lambda: rerank_reference(model, feats, sims, args.k_test),
                   'fast': lambda: rerank_fast(model, feats, sims, args.k_test, pair_batch=args.pair_batch)}
        if args.contrast:  # fixed chunks of `contrast` pairs without the activation budget (same packing)
            methods['fixed'] = lambda: rerank_fast(model, feats, sims, args.k_test, pair_batch=args.contrast,
                                                   chunk_bytes=float('inf'))
        times, out = {name: [] for name in methods}, {}
        for _ in range(args.repeats):  # interleaved, so a busy spell of the machine hits every method alike
            for name, fn in methods.items():
                out[name], wall, cpu = timed(fn, device)
                times[name].append((wall, cpu))
    row = {name: (min(w for w, _ in t), min(c for _, c in t)) for name, t in times.items()}
    size = chunk_size(model, feats, args.pair_batch)
    row.update(images=n_images, pairs=pair_image.numel(), size=size, chunks=len(pair_chunks(pair_image, size)),
               diff=max(max_difference(out['ref'], scores) for scores in out.values()),
               same=all(recalls(*scores, args.captions) == recalls(*out['ref'], args.captions)
                        for scores in out.values()))
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default='configs/Retrieval_synthetic.yaml')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--images', type=int, nargs='+', default=[32, 64, 128, 256], help='one table row per size')
    p.add_argument('--captions', type=int, default=5, help='captions per image')
    p.add_argument('--k_test', type=int, default=16)
    p.add_argument('--text_len', type=int, default=30)
    p.add_argument('--pair_batch', type=int, default=None,
                   help='cap on pairs per chunk of the fast path (rerank_batch); default: automatic only')
    p.add_argument('--contrast', type=int, default=0,
                   help='also time the fast path with fixed chunks of this many pairs (e.g. 1024); 0: skip')
    p.add_argument('--repeats', type=int, default=1, help='interleaved repeats per size; the table shows the best')
    p.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave the default)')
    p.add_argument('--no_tf32', action='store_true', help='strict fp32 matmuls on CUDA (default: TF32, as training)')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    torch.backends.cudnn.allow_tf32 = not args.no_tf32
    config = load_config(args.config)
    torch.manual_seed(0)  # the same random model, hence the same candidates, in every run
    model = ALBEF(config=config, text_encoder=None, with_momentum=False).to(device).eval()
    dtype = torch.bfloat16 if args.precision == 'bf16' else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu, {torch.get_num_threads()} threads'
    print(f'device {device} ({name}), {args.precision}, config {args.config}, {args.captions} captions per image, '
          f'k_test {args.k_test}; seconds as wall / CPU time of this process, best of {args.repeats}')
    fixed = f' | fixed {args.contrast} s | speed-up' if args.contrast else ''
    print(f'| images | pairs | chunk (pairs) | reference s | fast s | speed-up{fixed} | max diff | same R@1/5/10 |')
    print('|---' * (8 + 2 * bool(args.contrast)) + '|')
    for n_images in args.images:
        r = run_size(model, args, n_images, device, autocast)
        cells = [str(r['images']), str(r['pairs']), f"{r['size']} ({r['chunks']} chunks)",
                 '{:.2f} / {:.2f}'.format(*r['ref']), '{:.2f} / {:.2f}'.format(*r['fast']),
                 'x{:.2f} / x{:.2f}'.format(r['ref'][0] / r['fast'][0], r['ref'][1] / r['fast'][1])]
        if args.contrast:
            cells += ['{:.2f} / {:.2f}'.format(*r['fixed']),
                      'x{:.2f} / x{:.2f}'.format(r['ref'][0] / r['fixed'][0], r['ref'][1] / r['fixed'][1])]
        cells += [f"{r['diff']:.2g}", 'yes' if r['same'] else 'NO']
        print('| ' + ' | '.join(cells) + ' |', flush=True)
    if device.type == 'cuda':
        print(f'peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB, '
              f'TF32 {"off" if args.no_tf32 else "on"}')


if __name__ == '__main__':
    main()
