"""ALBEF pretraining (ITC + ITM + MLM with momentum distillation).

One process:   python Pretrain.py --config configs/Pretrain_synthetic.yaml --output_dir output/pretrain
Several GPUs:  torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
From shards:   add --opt train_shards=data/shards (written by python -m dataset.make_shards); add
               --opt checkpoint_every_steps=2000 --resume auto to survive a killed job (docs/README_robustness.md)
"""
import os

import torch

import engine
import utils
from dataset import build_collate_fn, create_dataset, create_loader, create_sampler, static_shape_options
from evaluation.retrieval import itc_retrieval
from models.checkpoint import load_state_dict_file
from models.model_pretrain import ALBEF
from models.tokenization import build_tokenizer
from models.vit import interpolate_pos_embed


def load_pretrained(model, path):
    """Start from a pretraining checkpoint (strict, pos_embed resized to this resolution)."""
    sd = dict(load_state_dict_file(path))
    for key, vit in (('visual_encoder.pos_embed', model.visual_encoder), ('visual_encoder_m.pos_embed', model.visual_encoder_m)):
        sd[key] = interpolate_pos_embed(sd[key], vit)
    model.load_state_dict(sd, strict=True)
    print(f'load checkpoint from {path}')


def zero_shot_loader(config, args):
    """Loader over `val_file` (retrieval eval format) for a zero-shot ITC check, or None."""
    if not config.get('val_file'):
        return None
    from dataset import re_eval_dataset, build_transform
    ds = re_eval_dataset(config['val_file'], build_transform('test', config['image_res']), config.get('image_root', ''))
    return create_loader([ds], [None], [config.get('batch_size_test', 64)], [0], [False], [None])[0]


def main(args):
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)

    train_set = create_dataset('pretrain', config).train
    world, rank = utils.get_world_size(), utils.get_rank()
    # a sampler even in one process: the data order is then a function of (seed, epoch), so resume is exact
    sampler = create_sampler([train_set], [True], world, rank, seed=args.seed)[0]
    collate = build_collate_fn('pretrain', tokenizer, train=True, **static_shape_options(config))
    loader = create_loader([train_set], [sampler], [config['batch_size']], [config.get('num_workers', 4)], [True],
                           [collate], seed=args.seed + rank)[0]

    init_deit = config.get('init_deit', True) and not args.checkpoint and args.resume is None
    model = ALBEF(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer, init_deit=init_deit)
    model.check_queue_divisible(config['batch_size'] * world)
    if args.checkpoint and args.resume is None:
        load_pretrained(model, args.checkpoint)
    model = model.to(device)

    zs_loader = zero_shot_loader(config, args)

    def evaluate(m, epoch):
        if zs_loader is None or not utils.is_main_process():
            return {}
        metrics = itc_retrieval(m, zs_loader, tokenizer, device)
        print(f'zero-shot ITC retrieval after epoch {epoch}: ' + _fmt(metrics))
        return {f'zeroshot_{k}': round(v, 3) for k, v in metrics.items()}

    before = None
    if zs_loader is not None and utils.is_main_process() and args.resume is None:
        before = itc_retrieval(model, zs_loader, tokenizer, device)
        print('zero-shot ITC retrieval before training: ' + _fmt(before))
        utils.append_jsonl(os.path.join(args.output_dir, 'log.txt'),
                           {'epoch': -1, **{f'zeroshot_{k}': round(v, 3) for k, v in before.items()}})

    def step(m, batch, alpha):
        image, text = batch
        loss_mlm, loss_ita, loss_itm = m(image, text, alpha=alpha)
        return {'loss_mlm': loss_mlm, 'loss_ita': loss_ita, 'loss_itm': loss_itm}

    records = engine.fit(args, config, model, loader, step, evaluate_fn=evaluate, ramp_alpha=True,
                         train_sampler=sampler)
    if utils.is_main_process():
        print_summary(records, before)
    engine.destroy()


def print_summary(records, before):
    """A per-epoch table of the losses and the zero-shot R@1, for the demo and quick checks."""
    print('epoch  loss_ita  loss_itm  loss_mlm  zero-shot TR@1  IR@1')
    if before is not None:
        print(f'{"init":>5}  {"":>8}  {"":>8}  {"":>8}  {before["txt_r1"]:>14.1f}  {before["img_r1"]:>4.1f}')
    for r in records:
        tr, ir = r.get('zeroshot_txt_r1', float('nan')), r.get('zeroshot_img_r1', float('nan'))
        print(f'{r["epoch"]:>5}  {r["train_loss_ita"]:>8.3f}  {r["train_loss_itm"]:>8.3f}  {r["train_loss_mlm"]:>8.3f}  '
              f'{tr:>14.1f}  {ir:>4.1f}')


def _fmt(metrics):
    return ', '.join(f'{k} {metrics[k]:.1f}' for k in ('txt_r1', 'txt_r5', 'img_r1', 'img_r5', 'r_mean'))


def parser():
    """The common arguments (engine.base_parser) with this script's defaults."""
    return engine.base_parser('ALBEF pretraining', 'configs/Pretrain.yaml', 'output/Pretrain')


if __name__ == '__main__':
    main(parser().parse_args())
