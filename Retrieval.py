"""Image-text retrieval: fine-tuning on COCO / Flickr30K and evaluation with ITM re-ranking.

Fine-tune:   python Retrieval.py --config configs/Retrieval_flickr.yaml --checkpoint ALBEF.pth --output_dir out/flickr
Evaluate:    python Retrieval.py --config configs/Retrieval_coco.yaml --checkpoint mscoco.pth --evaluate
Zero-shot:   python Retrieval.py --config configs/Retrieval_flickr.yaml --checkpoint mscoco.pth --evaluate
             (the paper's zero-shot Flickr30K: the COCO-fine-tuned model on the Flickr test set, k 128, 384 px)
Several GPUs: torchrun --nproc_per_node=8 Retrieval.py ...
"""
import engine
from dataset import build_collate_fn, create_dataset, create_loader, static_shape_options
from engine.tasks import fit_retrieval_model, train_or_evaluate
from evaluation.rerank import evaluate_retrieval
from evaluation.retrieval import itm_eval
from models.registry import task_spec
from models.tokenization import build_tokenizer


def build_loaders(config, tokenizer, args, splits):
    """Seeded training loader and sampler, and the val/test image loaders (no sampler: every rank encodes all)."""
    train, sampler = None, None
    if not args.evaluate:
        collate = build_collate_fn('re', tokenizer, train=True, **static_shape_options(config))
        train, sampler = engine.train_loader(splits.train, config, args, collate, config['batch_size_train'])
    # every rank encodes the whole evaluation set (official); the re-ranking rows are split across ranks
    val, test = create_loader([splits.val, splits.test], [None, None], [config['batch_size_test']] * 2,
                              [config.get('num_workers', 4)] * 2, [False, False], [None, None])
    return train, sampler, val, test


def make_evaluate(config, tokenizer, device, loaders, scores=None):
    """evaluate_fn(model, epoch) -> {val_*, test_*} metrics of the official protocol on every loader. `scores`: the
    family's score matrices (TaskSpec.evaluate, e.g. VLMo's dual encoder) in place of ALBEF's ITM re-ranking."""
    def evaluate(model, epoch):
        metrics = {}
        for split, loader in loaders.items():
            with engine.autocast(device, config['precision']):
                if scores is not None:
                    i2t, t2i = scores(model, loader, tokenizer, device, config)
                else:
                    i2t, t2i = evaluate_retrieval(model, loader, tokenizer, device, config['k_test'],
                                                  score=config['rerank_score'],
                                                  method=config.get('rerank_method', 'fast'),
                                                  pair_batch=config.get('rerank_batch'))
            result = itm_eval(i2t, t2i, loader.dataset.txt2img, loader.dataset.img2txt)
            metrics.update({f'{split}_{k}': round(float(v), 4) for k, v in result.items()})
            print(f'{split} (epoch {epoch}): ' + ', '.join(f'{k} {float(v):.2f}' for k, v in result.items()))
        return metrics
    return evaluate


def protocol_of(config, family_scores):
    """What defines the scores: ALBEF's ITC top-k_test then ITM re-ranking, or the family's own (VLMo: dual, or
    dual_rerank with its k_test)."""
    if family_scores:
        mode = (config.get('retrieval') or {}).get('mode', 'dual')
        return {'scores': mode, **({'k_test': int(config.get('k_test') or 32)} if mode == 'dual_rerank' else {})}
    return {'k_test': config['k_test'], 'rerank_score': config['rerank_score'],
            'rerank_method': config.get('rerank_method', 'fast')}


def write_metrics(args, config, metrics, epoch, selected_by=None, family_scores=False):
    """metrics.json: the reported numbers with everything that defines the protocol."""
    engine.write_metrics(args, config, 'retrieval', metrics, epoch=epoch, selected_by=selected_by,
                         image_res=config['image_res'], **protocol_of(config, family_scores),
                         **({'coco_split': config['coco_split']} if config.get('coco_split') else {}),
                         val={k[4:]: v for k, v in metrics.items() if k.startswith('val_')},
                         test={k[5:]: v for k, v in metrics.items() if k.startswith('test_')})


def select_key_of(config):
    """The metric whose best epoch is reported: `val_r_mean` (default), or `test_r_mean` with `select_on: test` (the
    SIMLA release's Flickr selection)."""
    return f"{config.get('select_on') or 'val'}_r_mean"


def main(args):
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)
    splits = create_dataset('re', config)
    train_loader, sampler, val_loader, test_loader = build_loaders(config, tokenizer, args, splits)
    # the inference form (no momentum encoders, no queues) for --evaluate: the layout of the released files
    model = engine.build_task_model(config, 'retrieval', args, text_encoder=engine.text_weights(args),
                                    with_momentum=not args.evaluate).to(device)
    spec = task_spec(config, 'retrieval')  # a family's own step and scores (VLMo: dual encoder), else ALBEF's
    evaluate = make_evaluate(config, tokenizer, device, {'val': val_loader, 'test': test_loader}, spec.evaluate)
    step = spec.make_step(config, device) if spec.make_step else None

    select_key = select_key_of(config)
    train_or_evaluate(args, model, evaluate,
                      lambda: fit_retrieval_model(args, config, model, train_loader, sampler, evaluate, select_key,
                                                  config['batch_size_train'], step),
                      lambda metrics, epoch, selected_by: write_metrics(args, config, metrics, epoch, selected_by,
                                                                        spec.evaluate is not None),
                      select_key=select_key)
    engine.destroy()


def parser():
    """The common arguments plus --evaluate."""
    p = engine.base_parser('ALBEF image-text retrieval', 'configs/Retrieval_flickr.yaml', 'output/Retrieval_flickr')
    p.add_argument('--evaluate', action='store_true', help='evaluate val and test only (no training)')
    return p


if __name__ == '__main__':
    main(parser().parse_args())
