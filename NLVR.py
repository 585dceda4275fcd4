"""NLVR2 fine-tuning from the text-assignment (TA) checkpoint, with dev and test-P accuracy every epoch.

One process:   python NLVR.py --config configs/NLVR_synthetic.yaml --text_encoder none \
                   --checkpoint output/nlvr_ta/checkpoint_last.pth --output_dir output/nlvr
Several GPUs:  torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --checkpoint TA.pth \
                   --output_dir output/NLVR
Evaluate only: python NLVR.py --config configs/NLVR.yaml --checkpoint output/NLVR/checkpoint_best.pth --evaluate
The checkpoint with the best dev accuracy is output_dir/checkpoint_best.pth; its test-P accuracy is the reported one.
VLMo (configs/vlmo/NLVR_synthetic.yaml): the registry's NLVR2 model takes the same call (models/vlmo_tasks.py).
"""
import torch

import engine
from engine.tasks import run_classification


def pair_batch(batch):
    """(image0, image1, text, label) -> (cat([image0, image1]) of 2B, text, label), the model's input."""
    image0, image1, text, label = batch
    return torch.cat([image0, image1], dim=0), text, label


def keeps_initial_bert(config, args):
    """The official momentum models start from the constructor's weights (bert-base-uncased + random layers) and,
    with nlvr_momentum_init: before_load, keep them past the TA checkpoint, so BERT is read then."""
    return (bool(args.checkpoint) and args.resume is None and not args.evaluate and config.get('distill', False)
            and config['nlvr_momentum_init'] == 'before_load')


def main(args):
    run_classification(args, 'nlvr', pair_batch, ramp_default=True, names=('dev', 'test-P'),
                       keeps_initial_bert=keeps_initial_bert)
    engine.destroy()


def parser():
    """The common arguments plus --evaluate."""
    p = engine.base_parser('ALBEF NLVR2 fine-tuning', 'configs/NLVR.yaml', 'output/NLVR')
    p.add_argument('--evaluate', action='store_true', help='evaluate dev and test-P only (no training)')
    return p


if __name__ == '__main__':
    main(parser().parse_args())
