"""SNLI-VE fine-tuning from a pretraining checkpoint, with val and test accuracy every epoch.

One process:   python VE.py --config configs/VE_synthetic.yaml --text_encoder none \
                   --checkpoint output/pretrain/checkpoint_last.pth --output_dir output/ve
Several GPUs:  torchrun --nproc_per_node=8 VE.py --config configs/VE.yaml --checkpoint ALBEF.pth --output_dir output/VE
Evaluate only: python VE.py --config configs/VE.yaml --checkpoint output/VE/checkpoint_best.pth --evaluate
The checkpoint with the best val accuracy is output_dir/checkpoint_best.pth; its test accuracy is the reported one.
"""
import engine
from engine.tasks import classification_loaders, classification_step, report_classification
from evaluation.classification import make_evaluate
from models.tokenization import build_tokenizer

SELECT_KEY = 'val_acc'


def ve_batch(batch):
    """(image, text, label) as the model takes them."""
    return batch


def main(args):
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)
    loaders = classification_loaders('ve', config, tokenizer, args, with_train=not args.evaluate)
    model = engine.build_task_model(config, 've', args, text_encoder=engine.text_weights(args)).to(device)
    evaluate = make_evaluate(ve_batch, {'val': loaders.val, 'test': loaders.test}, device,
                             lambda: engine.autocast(device, config['precision']))
    if args.evaluate:
        metrics = engine.evaluate_only(args, model, evaluate)
        engine.print_json(metrics)
        report_classification(args, config, 've', metrics, 0, 'val', 'test')
    else:
        # SNLI-VE's official config has warm_up: False, so alpha is 0.4 from the first step (docs/QUIRKS.md)
        result = engine.fit(args, config, model, loaders.train, classification_step(ve_batch), evaluate_fn=evaluate,
                            select_key=SELECT_KEY, ramp_alpha=config.get('warm_up', False),
                            train_sampler=loaders.train_sampler)
        best = result.reported
        report_classification(args, config, 've', engine.eval_metrics(best), best['epoch'], 'val', 'test',
                              selected_by=SELECT_KEY)
    engine.destroy()


def parser():
    """The common arguments plus --evaluate."""
    p = engine.base_parser('ALBEF SNLI-VE fine-tuning', 'configs/VE.yaml', 'output/VE')
    p.add_argument('--evaluate', action='store_true', help='evaluate val and test only (no training)')
    return p


if __name__ == '__main__':
    main(parser().parse_args())
