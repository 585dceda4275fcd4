"""The runs that tests/test_vlmo_learning.py reads: VLMo's stages on the synthetic world through the CLI, as a
researcher runs them (docs/README_vlmo.md, "Synthetic world"): the BEiT stand-in (python -m synthetic.beit, stage 1),
stage 2 (text MLM, attention and V-FFN frozen) and stage 3 (ITC + ITM + MLM) through Pretrain.py, then zero-shot
dual-encoder retrieval through Retrieval.py --evaluate on the held-out test split.

Started in the background by tests/conftest.py as soon as the synthetic world exists (it does not use the DeiT
stand-in), before the CODIS and SIMLA runs. Every setting is here: the margins of the tests were measured with
exactly these.
"""
import collections
import json
import os

from tests.helpers import REPO, BackgroundRun, opts

CONFIGS = os.path.join(REPO, 'configs', 'vlmo')
SEED = 42
STAND_IN = {'epochs': 12, 'seed': 0}    # the recipe's stand-in (python -m synthetic.beit defaults)
STAGE2_EPOCHS = 1                       # of 60 steps (half the recipe's)
STAGE3_EPOCHS = 6                       # of 60 steps of 16 pairs (the recipe: 8)

VlmoRuns = collections.namedtuple('VlmoRuns', 'root beit lines stage2 stage3 zero_shot log')


def write_caption_lines(root, target):
    """The world's pretraining captions one per line, as the stage-2 text files are (dataset/text_lines.py)."""
    with open(os.path.join(root, 'pretrain.json')) as f:
        items = json.load(f)
    with open(target, 'w') as f:
        for item in items:
            for caption in item['caption'] if isinstance(item['caption'], list) else [item['caption']]:
                f.write(f'{caption}\n')
    return target


def start(root, deit, work, after=()):
    """Start the runs under `work`, one after another, after the BackgroundRuns `after` (`deit` is not used: VLMo
    starts from its own stand-in); returns (VlmoRuns of their paths, BackgroundRun)."""
    root, work = str(root), str(work)
    runs = VlmoRuns(root, os.path.join(work, 'beit.pth'), os.path.join(work, 'captions.txt'),
                    *(os.path.join(work, name) for name in ('stage2', 'stage3', 'zero_shot')),
                    os.path.join(work, 'runs.log'))
    write_caption_lines(root, runs.lines)
    common = ['--device', 'cpu', '--seed', str(SEED)]
    stage2 = ['--config', os.path.join(CONFIGS, 'Pretrain_stage2_synthetic.yaml'), '--output_dir', runs.stage2,
              '--checkpoint', runs.beit, *common,
              *opts(text_files=f"['{runs.lines}']", log_every=5, **{'schedule.epochs': STAGE2_EPOCHS})]
    stage3 = ['--config', os.path.join(CONFIGS, 'Pretrain_synthetic.yaml'), '--output_dir', runs.stage3,
              '--checkpoint', os.path.join(runs.stage2, 'checkpoint_last.pth'), *common,
              *opts(train_file=f"['{root}/pretrain.json']", image_root=root, log_every=10,
                    **{'schedule.epochs': STAGE3_EPOCHS})]
    zero_shot = ['--config', os.path.join(CONFIGS, 'Retrieval_synthetic.yaml'), '--output_dir', runs.zero_shot,
                 '--checkpoint', os.path.join(runs.stage3, 'checkpoint_last.pth'), '--evaluate', *common,
                 *opts(train_file=f"['{root}/retrieval_train.json']", val_file=f'{root}/retrieval_val.json',
                       test_file=f'{root}/retrieval_test.json', image_root=root)]
    commands = [
        ('synthetic.beit', ['--root', root, '--output', runs.beit, '--epochs', STAND_IN['epochs'],
                            '--seed', STAND_IN['seed']]),
        ('Pretrain.py', stage2),
        ('Pretrain.py', stage3),
        ('Retrieval.py', zero_shot),
    ]
    return runs, BackgroundRun(commands, runs.log, after=after)
