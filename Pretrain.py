"""ALBEF pretraining (ITC + ITM + MLM with momentum distillation); the config key `model` picks the family
(`model: codis`, configs/codis/: the CODIS reconstruction, docs/README_codis.md).

One process:   python Pretrain.py --config configs/Pretrain_synthetic.yaml --output_dir output/pretrain
Several GPUs:  torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
From shards:   add --opt train_shards=data/shards (written by python -m dataset.make_shards); add
               --opt checkpoint_every_steps=2000 --resume auto to survive a killed job (docs/README_robustness.md)
"""
import os

import engine
import utils
from dataset import create_loader
from engine.tasks import pretrain_loader
from evaluation.retrieval import extract_image_features, extract_text_features, itc_retrieval
from models import registry
from models.tokenization import build_tokenizer


def zero_shot_loader(config):
    """Loader over `val_file` (retrieval eval format) for a zero-shot ITC check, or None."""
    if not config.get('val_file'):
        return None
    from dataset import build_transform, re_eval_dataset
    ds = re_eval_dataset(config['val_file'], build_transform('test', config['image_res']), config.get('image_root', ''))
    return create_loader([ds], [None], [config.get('batch_size_test', 64)], [0], [False], [None])[0]


def main(args):
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)

    loader, sampler = pretrain_loader(config, args, tokenizer)

    # pretraining reads BERT (and DeiT) at construction; a --checkpoint then overwrites every weight
    init_deit = config.get('init_deit', True) and not args.checkpoint and args.resume is None
    model = engine.build_task_model(config, 'pretrain', args, text_encoder=args.text_encoder, tokenizer=tokenizer,
                                    init_deit=init_deit)
    model.check_queue_divisible(config['batch_size'] * utils.get_world_size())
    model = model.to(device)

    zs_loader = zero_shot_loader(config)

    def evaluate(m, epoch):
        if zs_loader is None or not utils.is_main_process():
            return {}
        extra = model_metrics(m, zs_loader, tokenizer, device)  # first: it reads the training epoch's statistics
        metrics = itc_retrieval(m, zs_loader, tokenizer, device)
        print(f'zero-shot ITC retrieval after epoch {epoch}: ' + _fmt(metrics))
        return {**{f'zeroshot_{k}': round(v, 3) for k, v in metrics.items()}, **extra}

    before = None
    if zs_loader is not None and utils.is_main_process() and args.resume is None:
        before = itc_retrieval(model, zs_loader, tokenizer, device)
        print('zero-shot ITC retrieval before training: ' + _fmt(before))
        utils.append_jsonl(os.path.join(args.output_dir, 'log.txt'),
                           {'epoch': -1, **{f'zeroshot_{k}': round(v, 3) for k, v in before.items()},
                            **model_metrics(model, zs_loader, tokenizer, device)})

    def step(m, batch, alpha):
        image, text = batch
        return step_outputs(m(image, text, alpha=alpha))

    spec = registry.task_spec(config, 'pretrain')
    if spec.make_step is not None:  # a family whose step needs more than its forward (SIMLA: the MIM targets)
        step = spec.make_step(config, device)

    result = engine.fit(args, config, model, loader, step, evaluate_fn=evaluate, ramp_alpha=True,
                        train_sampler=sampler)
    last = result.reported or {}
    engine.write_metrics(args, config, 'pretrain', last, epoch=last.get('epoch'))
    if utils.is_main_process():
        print_summary(result.records, before)
    engine.destroy()


PRETRAIN_LOSSES = ('loss_mlm', 'loss_ita', 'loss_itm')


def step_outputs(out):
    """A pretraining model's forward output as the step's dict: a model that returns a dict of named losses and
    monitoring values (CODIS) gives it as is; ALBEF's official forward returns (loss_mlm, loss_ita, loss_itm)."""
    return dict(out) if isinstance(out, dict) else dict(zip(PRETRAIN_LOSSES, out))


def model_metrics(model, loader, tokenizer, device):
    """What a model family adds to the evaluation through its `evaluation_metrics(image_embeds, text_embeds,
    txt2img)` method (CODIS: codebook usage and held-out image-text code agreement); {} for a model without one."""
    if not hasattr(model, 'evaluation_metrics'):
        return {}
    was_training = model.training
    model.eval()
    _, _, text_embeds = extract_text_features(model, loader.dataset.text, tokenizer, device)
    _, image_embeds = extract_image_features(model, loader, device)
    metrics = model.evaluation_metrics(image_embeds, text_embeds, loader.dataset.txt2img)
    model.train(was_training)
    print('codebook metrics: ' + ', '.join(f'{k} {v:.4g}' for k, v in metrics.items()))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


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
