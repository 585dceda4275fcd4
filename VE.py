"""SNLI-VE fine-tuning from a pretraining checkpoint, with val and test accuracy every epoch.

One process:   python VE.py --config configs/VE_synthetic.yaml --text_encoder none \
                   --checkpoint output/pretrain/checkpoint_last.pth --output_dir output/ve
Several GPUs:  torchrun --nproc_per_node=8 VE.py --config configs/VE.yaml --checkpoint ALBEF.pth --output_dir output/VE
Evaluate only: python VE.py --config configs/VE.yaml --checkpoint output/VE/checkpoint_best.pth --evaluate
The checkpoint with the best val accuracy is output_dir/checkpoint_best.pth; its test accuracy is the reported one.
"""
import engine
from engine.tasks import run_classification


def ve_batch(batch):
    """(image, text, label) as the model takes them."""
    return batch


def main(args):
    engine.require_task(args, 've')
    # SNLI-VE's official config has warm_up: False, so alpha is 0.4 from the first step (docs/QUIRKS.md)
    run_classification(args, 've', ve_batch, ramp_default=False, names=('val', 'test'))
    engine.destroy()


def parser():
    """The common arguments plus --evaluate."""
    p = engine.base_parser('ALBEF SNLI-VE fine-tuning', 'configs/VE.yaml', 'output/VE')
    p.add_argument('--evaluate', action='store_true', help='evaluate val and test only (no training)')
    return p


if __name__ == '__main__':
    main(parser().parse_args())
