"""Image-text retrieval: fine-tuning on COCO / Flickr30K and evaluation with ITM re-ranking (spec 6.1, 12.1, 12.2).

Fine-tune:   python Retrieval.py --config configs/Retrieval_flickr.yaml --checkpoint ALBEF.pth --output_dir out/flickr
Evaluate:    python Retrieval.py --config configs/Retrieval_coco.yaml --checkpoint mscoco.pth --evaluate
Zero-shot:   python Retrieval.py --config configs/Retrieval_flickr.yaml --checkpoint mscoco.pth --evaluate
             (the paper's zero-shot Flickr30K: the COCO-fine-tuned model on the Flickr test set, k 128, 384 px)
Several GPUs: torchrun --nproc_per_node=8 Retrieval.py ...
"""
import os

import engine
import utils
from dataset import build_collate_fn, create_dataset, create_loader, create_sampler, static_shape_options
from evaluation.rerank import evaluate_retrieval
from evaluation.retrieval import itm_eval
from models.checkpoint import load_retrieval_checkpoint
from models.model_retrieval import ALBEF
from models.tokenization import build_tokenizer

SELECT_KEY = 'val_r_mean'


def build_loaders(config, tokenizer, args, splits):
    """Training loader (distributed sampler when launched so) and the val/test image loaders (no sampler)."""
    world, rank = utils.get_world_size(), utils.get_rank()
    workers = config.get('num_workers', 4)
    sampler = create_sampler([splits.train], [True], world, rank)[0] if args.distributed else None
    train = None
    if not args.evaluate:
        train = create_loader([splits.train], [sampler], [config['batch_size_train']], [workers], [True],
                              [build_collate_fn('re', tokenizer, train=True, **static_shape_options(config))],
                              seed=args.seed + rank)[0]
    # every rank encodes the whole evaluation set (official); the re-ranking rows are split across ranks
    val, test = create_loader([splits.val, splits.test], [None, None], [config['batch_size_test']] * 2,
                              [workers] * 2, [False, False], [None, None])
    return train, sampler, val, test


def build_model(config, args):
    """Training form to fine-tune; the inference form (no momentum, no queues) for --evaluate (spec 8.6)."""
    with_momentum = not args.evaluate
    # BERT weights only matter without an ALBEF checkpoint (which overwrites them)
    text_weights = None if (args.checkpoint or args.resume) else args.text_encoder
    model = ALBEF(config=config, text_encoder=text_weights, with_momentum=with_momentum)
    if args.checkpoint and args.resume is None:
        load_retrieval_checkpoint(model, args.checkpoint, reset_queues=config['reset_queues_on_finetune'])
    return model


def make_evaluate(config, tokenizer, device, loaders):
    """evaluate_fn(model, epoch) -> {val_*, test_*} metrics of the official protocol on every loader."""
    def evaluate(model, epoch):
        metrics = {}
        for split, loader in loaders.items():
            with engine.autocast(device, config['precision']):
                i2t, t2i = evaluate_retrieval(model, loader, tokenizer, device, config['k_test'],
                                              score=config['rerank_score'],
                                              method=config.get('rerank_method', 'fast'),
                                              pair_batch=config.get('rerank_batch', 1024))
            result = itm_eval(i2t, t2i, loader.dataset.txt2img, loader.dataset.img2txt)
            metrics.update({f'{split}_{k}': round(float(v), 4) for k, v in result.items()})
            print(f'{split} (epoch {epoch}): ' + ', '.join(f'{k} {float(v):.2f}' for k, v in result.items()))
        return metrics
    return evaluate


def write_metrics(args, config, metrics, epoch):
    """output_dir/metrics.json: the reported numbers with everything that defines the protocol (spec 12.2)."""
    if not utils.is_main_process():
        return
    summary = {'checkpoint': args.checkpoint, 'config': args.config, 'evaluate_only': bool(args.evaluate),
               'epoch': epoch, 'image_res': config['image_res'], 'k_test': config['k_test'],
               'rerank_score': config['rerank_score'], 'rerank_method': config.get('rerank_method', 'fast'),
               'val': {k[4:]: v for k, v in metrics.items() if k.startswith('val_')},
               'test': {k[5:]: v for k, v in metrics.items() if k.startswith('test_')}}
    utils.atomic_write_json(summary, os.path.join(args.output_dir, 'metrics.json'))


def main(args):
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)
    splits = create_dataset('re', config)
    train_loader, sampler, val_loader, test_loader = build_loaders(config, tokenizer, args, splits)
    model = build_model(config, args).to(device)
    evaluate = make_evaluate(config, tokenizer, device, {'val': val_loader, 'test': test_loader})

    if args.evaluate:
        write_metrics(args, config, engine.evaluate_only(args, model, evaluate), 0)
        engine.destroy()
        return

    best = fit_retrieval_model(args, config, model, train_loader, sampler, evaluate, SELECT_KEY,
                               config['batch_size_train'])
    if best is not None:
        write_metrics(args, config, best, best['epoch'])
    engine.destroy()


def retrieval_step(model, batch, alpha):
    """One ITC + ITM step of the retrieval model on an (image, text, idx) batch."""
    image, text, idx = batch
    loss_ita, loss_itm = model(image, text, alpha=alpha, idx=idx)
    return {'loss_ita': loss_ita, 'loss_itm': loss_itm}


def fit_retrieval_model(args, config, model, train_loader, sampler, evaluate, select_key, batch_size):
    """Fine-tune the retrieval model (also Grounding.py's) with engine.fit; returns the best logged record or None."""
    model.check_queue_divisible(batch_size * utils.get_world_size())
    engine.fit(args, config, model, train_loader, retrieval_step, evaluate_fn=evaluate, select_key=select_key,
               ramp_alpha=config.get('warm_up', True), train_sampler=sampler)
    return engine.best_logged_record(args.output_dir, select_key)


def parser():
    """The common arguments plus --evaluate."""
    p = engine.base_parser('ALBEF image-text retrieval', 'configs/Retrieval_flickr.yaml', 'output/Retrieval_flickr')
    p.add_argument('--evaluate', action='store_true', help='evaluate val and test only (no training)')
    return p


if __name__ == '__main__':
    main(parser().parse_args())
