"""NLVR2 fine-tuning from the text-assignment (TA) checkpoint, with dev and test-P accuracy every epoch (spec 6.3).

One process:   python NLVR.py --config configs/NLVR_synthetic.yaml --text_encoder none \
                   --checkpoint output/nlvr_ta/checkpoint_last.pth --output_dir output/nlvr
Several GPUs:  torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --checkpoint TA.pth \
                   --output_dir output/NLVR
Evaluate only: python NLVR.py --config configs/NLVR.yaml --checkpoint output/NLVR/checkpoint_best.pth --evaluate
The checkpoint with the best dev accuracy is output_dir/checkpoint_best.pth; its test-P accuracy is the reported one.
"""
import torch

import engine
from evaluation import classification
from models.checkpoint import load_nlvr_checkpoint
from models.model_nlvr import ALBEF
from models.tokenization import build_tokenizer

SELECT_KEY = 'val_acc'


def pair_batch(batch):
    """(image0, image1, text, label) -> (cat([image0, image1]) of 2B, text, label), the model's input."""
    image0, image1, text, label = batch
    return torch.cat([image0, image1], dim=0), text, label


def build_model(config, args):
    """The NLVR2 model, started from --checkpoint (TA, NLVR2 or, via the TA rule, pretraining weights)."""
    momentum_init = config['nlvr_momentum_init']
    # the official momentum models start from the constructor's weights (bert-base-uncased + random layers), so
    # BERT is loaded whenever that copy survives; otherwise every text weight comes from the checkpoint
    starts_from_file = bool(args.checkpoint) and args.resume is None and not args.evaluate
    keeps_initial = starts_from_file and config.get('distill', False) and momentum_init == 'before_load'
    needs_bert = keeps_initial or not (args.checkpoint or args.resume)
    model = ALBEF(config=config, text_encoder=args.text_encoder if needs_bert else None)
    if args.checkpoint and args.resume is None:
        load_nlvr_checkpoint(model, args.checkpoint, momentum_init)
    return model


def main(args):
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)
    loaders = classification.build_loaders('nlvr', config, tokenizer, args.distributed, args.seed,
                                           with_train=not args.evaluate)
    model = build_model(config, args).to(device)
    evaluate = classification.make_evaluate(pair_batch, {'val': loaders.val, 'test': loaders.test}, device,
                                            lambda: engine.autocast(device, config['precision']))
    if args.evaluate:
        engine.print_json(engine.evaluate_only(args, model, evaluate))
    else:
        engine.fit(args, config, model, loaders.train, classification.make_step(pair_batch), evaluate_fn=evaluate,
                   select_key=SELECT_KEY, ramp_alpha=config.get('warm_up', True), train_sampler=loaders.train_sampler)
        classification.report_best(args, SELECT_KEY, 'dev', 'test-P')
    engine.destroy()


def parser():
    """The common arguments plus --evaluate."""
    p = engine.base_parser('ALBEF NLVR2 fine-tuning', 'configs/NLVR.yaml', 'output/NLVR')
    p.add_argument('--evaluate', action='store_true', help='evaluate dev and test-P only (no training)')
    return p


if __name__ == '__main__':
    main(parser().parse_args())
