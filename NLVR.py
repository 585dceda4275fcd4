"""NLVR2 fine-tuning from the text-assignment (TA) checkpoint, with dev and test-P accuracy every epoch.

One process:   python NLVR.py --config configs/NLVR_synthetic.yaml --text_encoder none \
                   --checkpoint output/nlvr_ta/checkpoint_last.pth --output_dir output/nlvr
Several GPUs:  torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --checkpoint TA.pth \
                   --output_dir output/NLVR
Evaluate only: python NLVR.py --config configs/NLVR.yaml --checkpoint output/NLVR/checkpoint_best.pth --evaluate
The checkpoint with the best dev accuracy is output_dir/checkpoint_best.pth; its test-P accuracy is the reported one.
"""
import torch

import engine
from engine.tasks import classification_loaders, classification_step, report_classification
from evaluation.classification import make_evaluate
from models.tokenization import build_tokenizer

SELECT_KEY = 'val_acc'


def pair_batch(batch):
    """(image0, image1, text, label) -> (cat([image0, image1]) of 2B, text, label), the model's input."""
    image0, image1, text, label = batch
    return torch.cat([image0, image1], dim=0), text, label


def main(args):
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)
    loaders = classification_loaders('nlvr', config, tokenizer, args, with_train=not args.evaluate)
    # the official momentum models start from the constructor's weights (bert-base-uncased + random layers), so
    # BERT is read whenever that copy survives the checkpoint; otherwise every text weight comes from the checkpoint
    keeps_initial = (bool(args.checkpoint) and args.resume is None and not args.evaluate
                     and config.get('distill', False) and config['nlvr_momentum_init'] == 'before_load')
    model = engine.build_task_model(config, 'nlvr', args, text_encoder=engine.text_weights(args, keeps_initial))
    model = model.to(device)
    evaluate = make_evaluate(pair_batch, {'val': loaders.val, 'test': loaders.test}, device,
                             lambda: engine.autocast(device, config['precision']))
    if args.evaluate:
        metrics = engine.evaluate_only(args, model, evaluate)
        engine.print_json(metrics)
        report_classification(args, config, 'nlvr', metrics, 0, 'dev', 'test-P')
    else:
        result = engine.fit(args, config, model, loaders.train, classification_step(pair_batch), evaluate_fn=evaluate,
                            select_key=SELECT_KEY, ramp_alpha=config.get('warm_up', True),
                            train_sampler=loaders.train_sampler)
        best = result.reported
        report_classification(args, config, 'nlvr', engine.eval_metrics(best), best['epoch'], 'dev', 'test-P',
                              selected_by=SELECT_KEY)
    engine.destroy()


def parser():
    """The common arguments plus --evaluate."""
    p = engine.base_parser('ALBEF NLVR2 fine-tuning', 'configs/NLVR.yaml', 'output/NLVR')
    p.add_argument('--evaluate', action='store_true', help='evaluate dev and test-P only (no training)')
    return p


if __name__ == '__main__':
    main(parser().parse_args())
