"""Weakly-supervised visual grounding on RefCOCO+.

Training is the retrieval model and loss (ITC + ITM) on (image, expression) pairs, no boxes; evaluation turns each
expression into a Grad-CAM map and picks the detector proposal it covers best (IoU >= 0.5 counts as correct).

Fine-tune:  python Grounding.py --config configs/Grounding.yaml --checkpoint ALBEF.pth --output_dir out/grounding
Evaluate:   python Grounding.py --config configs/Grounding.yaml --checkpoint refcoco.pth --evaluate
            [--gradcam_mode itm|itc] [--block_num 8]
Several GPUs: torchrun --nproc_per_node=8 Grounding.py ...
"""
import engine
import utils
from dataset import build_collate_fn, create_dataset, create_loader, create_sampler, static_shape_options
from engine.tasks import fit_retrieval_model, train_or_evaluate
from evaluation.grounding import compute_gradcams, grounding_accuracy, random_proposal_accuracy
from evaluation.refer import RefCOCO, load_detections
from models.tokenization import build_tokenizer

SELECT_KEY = 'val_d'


def build_loaders(config, tokenizer, args, splits):
    """Seeded training loader and sampler, and the val+test loader split across ranks without padding."""
    static = static_shape_options(config)  # text bucketed to multiples of 8 under compile: true
    train, sampler = None, None
    if not args.evaluate:
        collate = build_collate_fn('grounding', tokenizer, train=True, **static)
        train, sampler = engine.train_loader(splits.train, config, args, collate, config['batch_size'])
    world, rank = utils.get_world_size(), utils.get_rank()
    test_sampler = create_sampler([splits.test], [False], world, rank)[0] if args.distributed else None
    test = create_loader([splits.test], [test_sampler], [config['batch_size']], [config.get('num_workers', 4)],
                         [False], [build_collate_fn('grounding', tokenizer, train=False, **static)])[0]
    return train, sampler, test


def make_evaluate(config, device, loader, refer, dets):
    """evaluate_fn(model, epoch) -> {val_d, testA_d, testB_d, no_positive_score, n_*} over the test loader."""
    def evaluate(model, epoch):
        results = utils.gather_objects(compute_gradcams(model, loader, device, config['gradcam_mode'],
                                                        config['gradcam_block']))
        metrics = grounding_accuracy(results, refer, dets)
        print(f'grounding (epoch {epoch}, {config["gradcam_mode"]} Grad-CAM, block {config["gradcam_block"]}): '
              + ', '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in metrics.items()))
        return metrics
    return evaluate


def write_metrics(args, config, metrics, epoch, chance, selected_by=None):
    """metrics.json: accuracies with the Grad-CAM settings and the random-proposal chance level."""
    engine.write_metrics(args, config, 'grounding', metrics, epoch=epoch, selected_by=selected_by,
                         image_res=config['image_res'], gradcam_mode=config['gradcam_mode'],
                         gradcam_block=config['gradcam_block'], accuracy=metrics, random_proposal=chance)


def main(args):
    engine.require_task(args, 'grounding')
    # the command-line Grad-CAM settings become config keys, so the saved config records them
    args.opt += [f'gradcam_mode={args.gradcam_mode}'] if args.gradcam_mode else []
    args.opt += [f'gradcam_block={args.block_num}'] if args.block_num is not None else []
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)
    splits = create_dataset('grounding', config)
    refer = RefCOCO(config['refcoco_data'], 'refcoco+', 'unc')
    dets = load_detections(config['det_file'])
    train_loader, sampler, test_loader = build_loaders(config, tokenizer, args, splits)
    chance = random_proposal_accuracy([ann['ref_id'] for ann in splits.test.ann], refer, dets)
    print('random-proposal accuracy: ' + ', '.join(f'{k} {v:.4f}' for k, v in chance.items()))

    model = engine.build_task_model(config, 'grounding', args, text_encoder=engine.text_weights(args),
                                    with_momentum=not args.evaluate).to(device)
    evaluate = make_evaluate(config, device, test_loader, refer, dets)
    train_or_evaluate(args, model, evaluate,
                      lambda: fit_retrieval_model(args, config, model, train_loader, sampler, evaluate, SELECT_KEY,
                                                  config['batch_size']),
                      lambda metrics, epoch, selected_by: write_metrics(args, config, metrics, epoch, chance,
                                                                        selected_by),
                      select_key=SELECT_KEY)
    engine.destroy()


def parser():
    """The common arguments plus --evaluate, --gradcam_mode and --block_num."""
    p = engine.base_parser('ALBEF weakly-supervised grounding', 'configs/Grounding.yaml', 'output/Grounding')
    p.add_argument('--evaluate', action='store_true', help='evaluate only (no training)')
    p.add_argument('--gradcam_mode', choices=['itm', 'itc'], default=None,
                   help='itm: cross-attention Grad-CAM (official default); itc: ViT self-attention Grad-CAM '
                        '(default: the config key gradcam_mode, itm)')
    p.add_argument('--block_num', type=int, default=None,
                   help='itm: BERT layer index of a cross-attention layer; itc: ViT block index '
                        '(default: the config key gradcam_block, 8)')
    return p


if __name__ == '__main__':
    main(parser().parse_args())
