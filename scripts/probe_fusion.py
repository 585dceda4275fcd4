"""Does a pretrained checkpoint's multimodal (fusion) encoder look at the picture? (docs/README_synthetic.md)

On the first N pictures of a retrieval evaluation file (first caption each, test transform):
- ITM: how often the match logit of (text, its picture) is above that of (text, the next item's picture);
- MLM: loss and masked-word accuracy with 30% of the words masked (seeded), given the right picture, another
  picture and all-zero image tokens. Equal numbers mean the fusion layers ignore the picture.

    python scripts/probe_fusion.py --checkpoint output/demo/pretrain/checkpoint_last.pth --root data/synthetic
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import build_transform  # noqa: E402
from dataset.image_io import load_image  # noqa: E402
from dataset.text import pre_caption  # noqa: E402
from engine.config import load_config  # noqa: E402
from evaluation.rerank import fuses_from_ids  # noqa: E402
from models import registry  # noqa: E402
from models.checkpoint import load_checkpoint_file, trust_checkpoint_file  # noqa: E402
from models.tokenization import build_tokenizer  # noqa: E402


def probe(model, tokenizer, images, captions, mask_fraction=0.3, seed=0):
    """{'itm_match_above_mismatch': %, 'mlm': {setting: (loss, accuracy %)}} for image tensors and caption strings."""
    text = tokenizer(captions, padding='longest', return_tensors='pt')
    other = torch.roll(torch.arange(len(captions)), 1)
    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
        text_embeds = model.text_bert(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                      mode='text').last_hidden_state
        # a shared stream (SIMLA) fuses from the token ids, ALBEF's fusion layers from the text-mode states
        text_in = text.input_ids if fuses_from_ids(model) else text_embeds
        match = model.itm_score(text_in, text.attention_mask, image_embeds)
        mismatch = model.itm_score(text_in, text.attention_mask, image_embeds[other])
        ids = text.input_ids.clone()
        special = (ids == tokenizer.pad_token_id) | (ids == tokenizer.cls_token_id)
        masked = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < mask_fraction) & ~special
        labels = ids.masked_fill(~masked, -100)
        ids = ids.masked_fill(masked, tokenizer.mask_token_id)
        mlm = {}
        for name, states in (('right picture', image_embeds), ('another picture', image_embeds[other]),
                             ('zero image tokens', torch.zeros_like(image_embeds))):
            logits = model.text_encoder.cls(model.encode_multimodal(model.text_encoder, ids, text.attention_mask,
                                                                    states))
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
            accuracy = (logits.argmax(-1)[masked] == text.input_ids[masked]).float().mean()
            mlm[name] = (float(loss), 100.0 * float(accuracy))
    return {'itm_match_above_mismatch': 100.0 * float((match > mismatch).float().mean()), 'mlm': mlm}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--checkpoint', required=True, help='a Pretrain.py checkpoint (or a plain state dict)')
    p.add_argument('--root', default='data/synthetic', help='the synthetic world (pictures and retrieval_test.json)')
    p.add_argument('--config', default='configs/Pretrain_synthetic.yaml')
    p.add_argument('--file', default='retrieval_test.json', help='retrieval evaluation file under --root')
    p.add_argument('-n', type=int, default=128, help='pictures probed')
    p.add_argument('--trust_checkpoint', action='store_true', help='allow full unpickling of --checkpoint')
    args = p.parse_args(argv)
    config = load_config(args.config, ['init_deit=false'])  # every weight comes from --checkpoint
    tokenizer = build_tokenizer('none')
    model = registry.task_spec(config, 'pretrain').build(config, text_encoder=None, tokenizer=tokenizer,
                                                         init_deit=False)
    if args.trust_checkpoint:
        trust_checkpoint_file(args.checkpoint)
    state = load_checkpoint_file(args.checkpoint)
    missing, _ = model.load_state_dict(state.get('model', state), strict=False)
    if missing:
        raise SystemExit(f'{args.checkpoint} lacks {len(missing)} weights of the pretraining model, e.g. {missing[:3]}')
    model.eval()
    with open(os.path.join(args.root, args.file)) as f:
        items = json.load(f)[:args.n]
    transform = build_transform('test', config['image_res'])
    images = torch.stack([transform(load_image(os.path.join(args.root, item['image']))) for item in items])
    captions = [pre_caption(item['caption'][0] if isinstance(item['caption'], list) else item['caption'], 30)
                for item in items]
    result = probe(model, tokenizer, images, captions)
    print(f"ITM: match logit above the mismatched pair's for {result['itm_match_above_mismatch']:.1f}% of "
          f"{len(items)} texts (chance 50)")
    for name, (loss, accuracy) in result['mlm'].items():
        print(f'MLM with {name}: loss {loss:.3f}, masked-word accuracy {accuracy:.1f}%')
    return result


if __name__ == '__main__':
    main()
