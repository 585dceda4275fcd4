"""SNLI-VE fine-tuning from a pretraining checkpoint, with val and test accuracy every epoch (spec 6.4).

One process:   python VE.py --config configs/VE_synthetic.yaml --text_encoder none \
                   --checkpoint output/pretrain/checkpoint_last.pth --output_dir output/ve
Several GPUs:  torchrun --nproc_per_node=8 VE.py --config configs/VE.yaml --checkpoint ALBEF.pth --output_dir output/VE
Evaluate only: python VE.py --config configs/VE.yaml --checkpoint output/VE/checkpoint_best.pth --evaluate
The checkpoint with the best val accuracy is output_dir/checkpoint_best.pth; its test accuracy is the reported one.
"""
import engine
from evaluation import classification
from models.checkpoint import load_ve_checkpoint
from models.model_ve import ALBEF
from models.tokenization import build_tokenizer

SELECT_KEY = 'val_acc'


def ve_batch(batch):
    """(image, text, label) as the model takes them."""
    return batch


def main(args):
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)
    loaders = classification.build_loaders('ve', config, tokenizer, args.distributed, args.seed,
                                           with_train=not args.evaluate)
    # with an ALBEF checkpoint every text weight comes from it, so BERT is only read without one
    text_weights = None if (args.checkpoint or args.resume) else args.text_encoder
    model = ALBEF(config=config, text_encoder=text_weights)
    if args.checkpoint and args.resume is None:
        load_ve_checkpoint(model, args.checkpoint)
    model = model.to(device)
    evaluate = classification.make_evaluate(ve_batch, {'val': loaders.val, 'test': loaders.test}, device,
                                            lambda: engine.autocast(device, config['precision']))
    if args.evaluate:
        engine.print_json(engine.evaluate_only(args, model, evaluate))
    else:
        # SNLI-VE's official config has warm_up: False, so alpha is 0.4 from the first step (spec 14 #21)
        engine.fit(args, config, model, loaders.train, classification.make_step(ve_batch), evaluate_fn=evaluate,
                   select_key=SELECT_KEY, ramp_alpha=config.get('warm_up', False), train_sampler=loaders.train_sampler)
        classification.report_best(args, SELECT_KEY, 'val', 'test')
    engine.destroy()


def parser():
    """The common arguments plus --evaluate."""
    p = engine.base_parser('ALBEF SNLI-VE fine-tuning', 'configs/VE.yaml', 'output/VE')
    p.add_argument('--evaluate', action='store_true', help='evaluate val and test only (no training)')
    return p


if __name__ == '__main__':
    main(parser().parse_args())
