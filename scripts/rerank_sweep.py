"""Where does ITM re-ranking gain or lose against ITC alone? (docs/README_synthetic.md, seventh round)

Scores a retrieval evaluation split once (the official two-stage protocol of evaluation/rerank.py: ITC top-k
candidates, each re-scored by the ITM head) for the largest k asked, then reads every smaller k off the same pair
scores, so the rows differ only in how many ITC candidates ITM may re-order (k = 1 is ITC alone). Also prints, for
the texts whose picture ITM does not put first at the config's k_test (else the largest k), where its pick was in
ITC's order (a pick far down
ITC's list is a candidate ITC rightly ranked low), and the same sweep scored by the ITM log-odds (match minus mismatch
logit) instead of the official match logit.

With `--world ROOT` (a synthetic world, synthetic/world.py), it also says what the picks read from the pictures: for
ITC alone and for ITM re-ranking at that k, the share of texts whose first picture shows the right colours (and the
right colours with their sizes), beside the IR@1 of a picker that knows only those and draws among the pictures that
match (the most a model reading only colours, or colours and sizes, can reach; docs/README_synthetic.md, eighth round).

    python scripts/rerank_sweep.py --checkpoint output/demo/pretrain/checkpoint_last.pth --k 1 2 4 8 16 32 \
        [--world data/synthetic]
"""
import argparse
import collections
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
from dataset import create_dataset, create_loader  # noqa: E402
from engine.config import load_config  # noqa: E402
from evaluation.rerank import extract_features, rerank_fast  # noqa: E402
from evaluation.retrieval import itm_eval  # noqa: E402
from models.tokenization import build_tokenizer  # noqa: E402

NO_CANDIDATE = -100.0
RANK_BINS = ((0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, None))


def restrict(scores, sims, k):
    """`scores` ([queries, items], re-ranked for some larger k) kept only on each row's ITC top-k (NO_CANDIDATE
    elsewhere): the matrix a re-ranking of k candidates gives, since a pair's ITM score does not depend on k."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, sims.topk(min(k, sims.shape[1]), dim=1).indices, True)
    return torch.where(keep, scores, torch.full_like(scores, NO_CANDIDATE))


def sweep(scores_i2t, scores_t2i, sims, ks, txt2img, img2txt):
    """{k: (TR@1, IR@1)} for re-ranked matrices of the largest k."""
    out = {}
    for k in ks:
        m = itm_eval(restrict(scores_i2t, sims, k).numpy(), restrict(scores_t2i, sims.t(), k).numpy(), txt2img, img2txt)
        out[k] = (float(m['txt_r1']), float(m['img_r1']))
    return out


def wrong_pick_ranks(scores, sims, truth):
    """For each query whose top-scored item is not a right one: that item's position in the query's ITC order."""
    order = torch.argsort(sims, dim=1, descending=True)
    positions = []
    for query in range(scores.shape[0]):
        pick = int(scores[query].argmax())
        right = truth[query] if isinstance(truth[query], (list, tuple)) else [truth[query]]
        if pick not in right:
            positions.append(int((order[query] == pick).nonzero()[0, 0]))
    return positions


def histogram(positions):
    """'1st: n, 2nd: n, 3rd-4th: n, ...' over RANK_BINS (empty bins left out)."""
    parts = []
    for low, high in RANK_BINS:
        n = sum(1 for p in positions if p >= low and (high is None or p < high))
        if n:
            name = f'{low + 1}' if high == low + 1 else (f'{low + 1}-{high}' if high else f'{low + 1}+')
            parts.append(f'{name}: {n}')
    return ', '.join(parts) or 'none'


# what a picture shows, from the world's scenes.json: its colours, and its colours with their sizes (sorted, so that
# the order the shapes were drawn in does not matter)
ATTRIBUTES = {
    'colours': lambda shapes: tuple(sorted(s['colour'] for s in shapes)),
    'colours_sizes': lambda shapes: tuple(sorted((s['colour'], s['size']) for s in shapes)),
}


def picture_attributes(images, root):
    """{attribute: [value per picture]} for the split's picture paths, from `root`/scenes.json."""
    path = os.path.join(root, 'scenes.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: --world must be a synthetic world (python -m synthetic.world)')
    with open(path) as f:
        scenes = json.load(f)
    names = [os.path.splitext(os.path.basename(image))[0] for image in images]
    missing = [name for name in names if name not in scenes]
    if missing:
        raise ValueError(f'{path} does not describe {len(missing)} pictures of the split (e.g. {missing[0]}): '
                         'give --world the world the split was made from')
    return {attr: [key(scenes[name]['shapes']) for name in names] for attr, key in ATTRIBUTES.items()}


def attribute_report(picks, txt2img, attributes):
    """For one text-to-image ranking (`picks`: the first picture of each text): per attribute, the share of texts
    (%) whose pick has the right value, and the IR@1 (%) of a picker that knows only that attribute and draws
    uniformly among the pictures that have the right value."""
    out = {}
    for attr, values in attributes.items():
        count = collections.Counter(values)
        right = [values[pick] == values[txt2img[text]] for text, pick in enumerate(picks)]
        out[attr] = {'right': 100 * sum(right) / len(picks),
                     'ceiling': 100 * sum(1 / count[values[txt2img[t]]] for t in range(len(picks))) / len(picks)}
    return out


class LogOdds:
    """While active, the ITM head's match column is the log-odds (match minus mismatch logit)."""

    def __init__(self, model):
        self.model, self.handle = model, None

    def __enter__(self):
        self.handle = self.model.itm_head.register_forward_hook(
            lambda module, inputs, out: torch.stack([out[:, 0], out[:, 1] - out[:, 0]], dim=1))

    def __exit__(self, *exc):
        self.handle.remove()


def build(args):
    config = load_config(args.config, args.opt)
    run = SimpleNamespace(checkpoint=args.checkpoint, resume=None, text_encoder='none', evaluate=True)
    tokenizer = build_tokenizer(config.get('text_encoder') or 'none')
    model = engine.build_task_model(config, 'retrieval', run, text_encoder=None, with_momentum=False)
    return config, tokenizer, model.to(args.device).eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--checkpoint', required=True, help='a pretraining or retrieval checkpoint (as Retrieval.py takes)')
    p.add_argument('--config', default='configs/Retrieval_synthetic.yaml')
    p.add_argument('--split', default='test', choices=['val', 'test'])
    p.add_argument('--k', type=int, nargs='+', default=[1, 2, 4, 8, 16, 32], help='numbers of ITC candidates')
    p.add_argument('--device', default='cpu')
    p.add_argument('--opt', action='append', default=[], metavar='KEY=VALUE', help='config override (repeatable)')
    p.add_argument('--json', help='also write the results to this file')
    p.add_argument('--world', help='the synthetic world of the split: also report the colours (and sizes) of the picks')
    args = p.parse_args(argv)
    ks = sorted(set(args.k))
    config, tokenizer, model = build(args)
    dataset = getattr(create_dataset('re', config), args.split)
    loader = create_loader([dataset], [None], [config['batch_size_test']], [0], [False], [None])[0]
    # read before the scoring, so that a wrong --world fails at once
    attributes = picture_attributes(dataset.image, args.world) if args.world else None
    with torch.no_grad():
        feats = extract_features(model, loader, dataset.text, tokenizer, args.device)
        sims = (feats.image_embeds @ feats.text_embeds.t()).float().cpu()
        i2t, t2i = (s.cpu() for s in rerank_fast(model, feats, sims.to(args.device), ks[-1]))
        with LogOdds(model):
            odds_i2t, odds_t2i = (s.cpu() for s in rerank_fast(model, feats, sims.to(args.device), ks[-1]))
    at = config['k_test'] if config['k_test'] in ks else ks[-1]
    result = {
        'pictures': len(dataset.img2txt), 'texts': len(dataset.txt2img), 'picks_at_k': at,
        'itm': sweep(i2t, t2i, sims, ks, dataset.txt2img, dataset.img2txt),
        'itm_log_odds': sweep(odds_i2t, odds_t2i, sims, ks, dataset.txt2img, dataset.img2txt),
        'ir_wrong_pick_itc_positions': wrong_pick_ranks(restrict(t2i, sims.t(), at), sims.t(), dataset.txt2img),
        'tr_wrong_pick_itc_positions': wrong_pick_ranks(restrict(i2t, sims, at), sims, dataset.img2txt),
    }
    print(f"{args.split} split: {result['pictures']} pictures, {result['texts']} texts; TR@1 / IR@1 after ITM "
          f"re-ranking of the top k ITC candidates (k = 1: ITC alone)")
    if args.world:
        result['attributes'] = {
            name: attribute_report(scores.argmax(1).tolist(), dataset.txt2img, attributes)
            for name, scores in (('itc', sims.t()), (f'itm_k{at}', restrict(t2i, sims.t(), at)))}
    print(f'{"k":<13}' + ''.join(f'{k:>14d}' for k in ks))
    for name in ('itm', 'itm_log_odds'):
        print(f'{name:<13}' + ''.join(f'{tr:>7.1f} /{ir:>5.1f}' for tr, ir in (result[name][k] for k in ks)))
    print(f'k = {at}, texts whose picture ITM does not put first ({len(result["ir_wrong_pick_itc_positions"])}): '
          f'its pick\'s place in ITC\'s order: {histogram(result["ir_wrong_pick_itc_positions"])}')
    print(f'k = {at}, pictures whose text ITM does not put first ({len(result["tr_wrong_pick_itc_positions"])}): '
          f'its pick\'s place in ITC\'s order: {histogram(result["tr_wrong_pick_itc_positions"])}')
    for name, report in result.get('attributes', {}).items():
        print(f'{name}: the first picture has the right ' + '; '.join(
            f'{attr.replace("_", " and ")} for {r["right"]:.1f}% of texts' for attr, r in report.items()))
    if result.get('attributes'):
        ceilings = next(iter(result['attributes'].values()))
        print('IR@1 of a picker that knows only them and draws among the pictures that have them: ' + '; '.join(
            f'{attr.replace("_", " and ")} {r["ceiling"]:.1f}' for attr, r in ceilings.items()))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({**result, 'itm': {str(k): v for k, v in result['itm'].items()},
                       'itm_log_odds': {str(k): v for k, v in result['itm_log_odds'].items()}}, f, indent=1)
    return result


if __name__ == '__main__':
    main()
