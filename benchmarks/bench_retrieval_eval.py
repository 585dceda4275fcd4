"""Time the reference (official) and the fast ITM re-ranker on the same features and candidates.

    python benchmarks/bench_retrieval_eval.py                                  # tiny synthetic-size model, CPU
    python benchmarks/bench_retrieval_eval.py --config configs/Retrieval_coco.yaml --device cuda \
        --images 200 --captions 5 --k_test 64                                  # ViT-B/16 + BERT-base at 384 px

The model is randomly initialised (the cost does not depend on the weights). Both re-rankers score the same
top-k candidates of the same ITC similarities; the script checks that their score matrices agree, then prints the
seconds of each and the speed-up. Feature extraction (shared by both) is timed separately.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.rerank import RetrievalFeatures, rerank_fast, rerank_reference  # noqa: E402
from models.model_retrieval import ALBEF  # noqa: E402
from utils import load_config  # noqa: E402


def synthetic_features(model, n_images, captions, text_len, device, batch=32):
    """Encode random images and random captions of random lengths (CLS + ids, padded to text_len)."""
    g = torch.Generator().manual_seed(0)
    res = model.visual_encoder.patch_embed.img_size
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
            img = model.visual_encoder(torch.randn(n, 3, res, res, generator=g).to(device))
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
    """(result, seconds) with device synchronisation."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default='configs/Retrieval_synthetic.yaml')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--images', type=int, default=64)
    p.add_argument('--captions', type=int, default=5, help='captions per image')
    p.add_argument('--k_test', type=int, default=16)
    p.add_argument('--text_len', type=int, default=30)
    p.add_argument('--pair_batch', type=int, default=1024)
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
    model = ALBEF(config=config, text_encoder=None, with_momentum=False).to(device).eval()
    dtype = torch.bfloat16 if args.precision == 'bf16' else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    with autocast:
        feats, t_feat = timed(lambda: synthetic_features(model, args.images, args.captions, args.text_len, device),
                              device)
        sims = (feats.image_embeds @ feats.text_embeds.t()).float()
        for warm_up in (rerank_reference, rerank_fast):  # kernels, allocator, autotuning
            warm_up(model, feats, sims[:2], args.k_test)
        (ref_i2t, ref_t2i), t_ref = timed(lambda: rerank_reference(model, feats, sims, args.k_test), device)
        (fast_i2t, fast_t2i), t_fast = timed(
            lambda: rerank_fast(model, feats, sims, args.k_test, pair_batch=args.pair_batch), device)
    diff = max((ref_i2t - fast_i2t).abs().max().item(), (ref_t2i - fast_t2i).abs().max().item())
    scale = max(ref_i2t[ref_i2t > -100].abs().max().item(), 1e-12)
    n_text = args.images * args.captions
    pairs = args.images * min(args.k_test, n_text) + n_text * min(args.k_test, args.images)
    print(f'device {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}), '
          f'{args.precision}, config {args.config}: {args.images} images, {args.images * args.captions} texts, '
          f'k_test {args.k_test}, {pairs} candidate pairs (both directions)')
    print(f'feature extraction {t_feat:.3f} s')
    print(f'reference re-ranker {t_ref:.3f} s, fast re-ranker {t_fast:.3f} s, speed-up x{t_ref / t_fast:.2f}')
    print(f'max |score difference| {diff:.3g} (largest |score| {scale:.3g})')
    if device.type == 'cuda':
        print(f'peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB, '
              f'TF32 {"off" if args.no_tf32 else "on"}')


if __name__ == '__main__':
    main()
