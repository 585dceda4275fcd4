"""SIMLA.md section 17 item 10, the training-signal check: a tiny SIMLA from random init, 200 CPU steps at batch 8.

The spec's tiny configuration (ViT 32 px, patch 8, width 48, depth 2, 4 heads; shared-stream BERT width 48, 3 layers,
4 heads; embed_dim 16; queue 64; `color_quant` visual tokens with 4 levels per channel (64 codes) at tokenizer
resolution 16; 5 of 16 patches masked, at least 2) on the synthetic world's pretraining pairs (coloured shapes with
template captions; the bert-base-uncased vocabulary), through SIMLA's pretraining step (`models.simla.pretrain.
make_pretrain_step`: ITC, ITM, MLM, MIM, PSL) with AdamW (lr 3e-3, weight decay 0.02, 20 warm-up steps, linear decay).
Prints the first-10 / last-10 step means of every loss, the masked-patch accuracy of the last 10 steps against chance
(1/64), how often the concept head ranks the caption's colour and shape words above the median vocabulary logit
(training pictures). tests/test_simla_learning.py asserts the thresholds that hold (docs/README_simla.md, "Training
signal").

    python scripts/simla_signal.py --root data/synthetic [--seed 0] [--steps 200]
"""
import argparse
import json
import math
import os
import random
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import build_transform  # noqa: E402
from dataset.image_io import load_image  # noqa: E402
from dataset.simla_views import SimlaPretrainTransform  # noqa: E402
from dataset.text import pre_caption  # noqa: E402
from models.simla.pretrain import SIMLA, make_pretrain_step  # noqa: E402
from models.tokenization import build_tokenizer  # noqa: E402

BERT = {'vocab_size': 30522, 'hidden_size': 48, 'num_hidden_layers': 3, 'num_attention_heads': 4,
        'intermediate_size': 192, 'max_position_embeddings': 64, 'encoder_width': 48, 'fusion_layer': 0,
        'shared_text_fusion': True, 'use_token_type_embeddings': False, 'hidden_dropout_prob': 0.0,
        'attention_probs_dropout_prob': 0.0, 'layer_norm_eps': 1e-12, 'hidden_act': 'gelu', 'type_vocab_size': 2,
        'initializer_range': 0.02, 'pad_token_id': 0}
CONFIG = {'model': 'simla', 'image_res': 32, 'vision_width': 48, 'embed_dim': 16, 'temp': 0.07, 'queue_size': 64,
          'momentum': 0.995, 'mlm_probability': 0.15, 'alpha': 0.4,
          'vit': {'patch_size': 8, 'embed_dim': 48, 'depth': 2, 'num_heads': 4, 'mlp_ratio': 4, 'qkv_bias': True},
          'vit_mask_token': True, 'bert_config': BERT,
          'mim': {'enabled': True, 'tokenizer': 'color_quant', 'color_levels': 4, 'vocab_size': 64,
                  'tokenizer_res': 16, 'view': 'shared', 'num_masking_patches': 5, 'min_num_patches': 2},
          'psl': {'enabled': True, 'attn_layer': -1, 'selection': 'head_vote', 'topk_per_head': 4, 'num_keywords': 5,
                  'drop_ids': ['cls']}}
BATCH, LOSSES = 8, ('loss_ita', 'loss_itm', 'loss_mlm', 'loss_mim', 'loss_psl')
COLOURS_AND_SHAPES = ('red', 'green', 'blue', 'yellow', 'orange', 'purple', 'white', 'black', 'gray', 'pink', 'brown',
                      'cyan', 'circle', 'square', 'triangle', 'star', 'cross', 'diamond')


def train_signal(root, seed=0, steps=200, lr=3e-3, warmup=20, alpha=None):
    """Train and measure; returns a dict of the measurements (see the module docstring)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer('none')
    model = SIMLA(config=CONFIG, text_encoder=None, tokenizer=tokenizer).train()
    step_fn = make_pretrain_step(CONFIG, 'cpu')
    transform = SimlaPretrainTransform(32, tokenizer_res=16, view='shared', patch_size=8, num_masking_patches=5,
                                       min_num_patches=2, crop_min_scale=0.5, randaugment_fixes=True)
    plain = build_transform('test', 32)  # the concept-head check reads whole pictures
    with open(os.path.join(root, 'pretrain.json')) as f:
        items = json.load(f)
    pictures = {}

    def picture(path):
        if path not in pictures:
            pictures[path] = load_image(os.path.join(root, path))
        return pictures[path]

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.02}, {'params': rest, 'weight_decay': 0.0}],
                                  lr=lr)
    history, started, seen = [], time.time(), []
    for step in range(steps):
        factor = (step + 1) / warmup if step < warmup else max(0.0, (steps - step) / (steps - warmup))
        for group in optimizer.param_groups:
            group['lr'] = lr * factor
        batch = rng.sample(items, BATCH)
        seen += batch
        views = [transform(picture(item['image'])) for item in batch]
        image, tok_view, mask = (torch.stack([v[k] for v in views]) for k in range(3))
        captions = [pre_caption(rng.choice(item['caption']) if isinstance(item['caption'], list) else item['caption'],
                                30) for item in batch]
        t = tokenizer(captions, padding='longest', truncation=True, max_length=25)
        text = types.SimpleNamespace(input_ids=t.input_ids, attention_mask=t.attention_mask)
        out = step_fn(model, ((image, tok_view, mask), text), CONFIG['alpha'] if alpha is None else alpha)
        optimizer.zero_grad()
        sum(out[name] for name in LOSSES).backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in out.items()})
    result = {'seconds': time.time() - started, 'finite': all(math.isfinite(h[k]) for h in history for k in LOSSES)}
    for name in LOSSES:
        first = sum(h[name] for h in history[:10]) / 10
        last = sum(h[name] for h in history[-10:]) / 10
        result[name] = (first, last, 1 - last / first)
    result['mim_accuracy'] = sum(h['mim_accuracy'] for h in history[-10:]) / 10
    result['mim_chance'] = 1 / CONFIG['mim']['vocab_size']
    # the concept head on the training pictures (test view: the plain transform's resize, here the ViT view unmasked)
    model.eval()
    word_ids = {w: tokenizer.backend.convert_tokens_to_ids(w) for w in COLOURS_AND_SHAPES}
    hits = total = word_hits = word_total = 0
    with torch.no_grad():
        for item in list({i['image']: i for i in seen}.values())[:200]:
            image = plain(picture(item['image']))[None]
            embeds = model.visual_encoder(image)
            logits = model.concept_head(F.normalize(model.vision_proj(embeds[:, 0, :]).float(), dim=-1))[0]
            median = logits.median()
            words = {w for c in (item['caption'] if isinstance(item['caption'], list) else [item['caption']])
                     for w in pre_caption(c, 30).split() if w in word_ids}
            if not words:
                continue
            total += 1
            above = [bool(logits[word_ids[w]] > median) for w in words]
            hits += all(above)
            word_hits += sum(above)
            word_total += len(above)
    result['concept_ranked'] = hits / max(1, total)  # every word of the picture's captions above the median
    result['concept_words'] = word_hits / max(1, word_total)  # share of (picture, word) pairs above the median
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--root', default='data/synthetic')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument('--lr', type=float, default=3e-3, help='3e-3, calibrated (docs/README_simla.md)')
    parser.add_argument('--alpha', type=float, default=None, help='distillation weight (default: 0.4)')
    args = parser.parse_args(argv)
    r = train_signal(args.root, args.seed, args.steps, args.lr, alpha=args.alpha)
    print(f"{args.steps} steps in {r['seconds']:.0f} s, seed {args.seed}")
    for name in LOSSES:
        first, last, drop = r[name]
        print(f'{name}: first-10 mean {first:.4f}, last-10 mean {last:.4f}, drop {100 * drop:.1f} %')
    print(f"masked-patch accuracy (last 10 steps) {r['mim_accuracy']:.3f}, chance {r['mim_chance']:.3f}")
    print(f"concept head ranks every colour/shape word of the captions above the median logit for "
          f"{100 * r['concept_ranked']:.1f} % of training pictures ({100 * r['concept_words']:.1f} % of "
          f"picture-word pairs)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
