"""Checks on the synthetic world, through the real entry scripts on CPU, from the tiny pretrained checkpoint: SNLI-VE
beats the majority class of its dev and test splits by a margin measured beforehand (MARGIN_VE, docs/README_nlvr_ve.md);
NLVR2 (text-assignment step, then fine-tuning) runs end to end.

What these short runs learn is the text prior: SNLI-VE's 66.7% here is the "neutral is recognisable from its words"
level, which its image-blind control reaches too. NLVR2's statements no longer carry one (world format 2: the text
alone predicts its label at chance, tests/test_synthetic.py), and a 150-step NLVR2 run from this checkpoint stays at
chance (46.3%); NLVR2 and SNLI-VE beat their image-blind controls only with their full synthetic configs from the
demo-length pretraining, minutes each: asserted by tests/test_image_blind_margins.py (`make test-margins`)."""
import collections
import json
import math
import os

import pytest

import NLVR
import Pretrain_nlvr
import VE
from tests.helpers import REPO, make_world, opts, run_main, run_pretrain

PretrainedTiny = collections.namedtuple('PretrainedTiny', 'checkpoint root')

# One epoch each, warm-up off. NLVR2 runs at 32 px, a few steps: the pipeline end to end (text assignment, the
# TA -> NLVR2 conversion, training, evaluation, best checkpoint). SNLI-VE measured on dev + test of the 0.3-scale world
# (180 items), 5 seeds, 1 CPU thread per run (docs/README_nlvr_ve.md): 66.7-67.8% (majority 33.3%, ~19 s).
PRETRAIN_STEPS = 28        # one epoch of the fallback world's 900 captions at batch 32
WORLD_SCALE = 0.3
EVAL_ITEMS = 150           # per held-out split
TA = {'max_steps_per_epoch': 5}
NLVR_RUN = {'max_steps_per_epoch': 20, 'schedular.epochs': 1, 'image_res': 32, 'batch_size': 32,
            'nlvr_momentum_init': 'after_load', 'optimizer.lr': 2e-4, 'schedular.lr': 2e-4,
            'schedular.warmup_lr': 2e-4}
VE_RUN = {'max_steps_per_epoch': 30, 'schedular.epochs': 1, 'image_res': 64, 'batch_size_train': 32,
          'optimizer.lr': 1e-3, 'schedular.lr': 1e-3, 'schedular.warmup_lr': 1e-3}
MARGIN_VE = 0.20


def repeated_file(path, steps, batch_size):
    """The file listed often enough that one epoch holds `steps` batches (a small world has short epochs)."""
    with open(path) as f:
        size = len(json.load(f))
    times = max(1, math.ceil(steps * batch_size / size))
    return '[' + ', '.join([str(path)] * times) + ']'


def majority_fraction(paths):
    """Share of the most frequent label over annotation files."""
    labels = collections.Counter()
    for path in paths:
        with open(path) as f:
            labels.update(str(item['label']) for item in json.load(f))
    return max(labels.values()) / sum(labels.values())


def make_tiny_pretrained(base, steps=PRETRAIN_STEPS, scale=WORLD_SCALE):
    """A synthetic world under `base` and a short Pretrain.py run on it with configs/Pretrain_synthetic.yaml."""
    root = make_world(base / 'synthetic', scale=scale, seed=0)
    # --device left at the script's default, as the fine-tuning runs below; a random ViT (init_deit false)
    checkpoint = run_pretrain(root, base / 'pretrain', seed=0, device=None, steps=steps, epochs=1, num_workers=0)
    return PretrainedTiny(checkpoint, str(root))


def as_pretrained(value):
    """The shared fixture's value (tuple, dict or object with checkpoint and root) as a PretrainedTiny."""
    if isinstance(value, dict):
        return PretrainedTiny(str(value['checkpoint']), str(value['root']))
    if isinstance(value, (tuple, list)):
        return PretrainedTiny(str(value[0]), str(value[1]))
    return PretrainedTiny(str(value.checkpoint), str(value.root))


@pytest.fixture(scope='module')
def pretrained(request, tmp_path_factory):
    """The shared `tiny_pretrained` fixture (tests/conftest.py) when there is one, else a short pretraining here."""
    try:
        return as_pretrained(request.getfixturevalue('tiny_pretrained'))
    except pytest.FixtureLookupError:
        return make_tiny_pretrained(tmp_path_factory.mktemp('tiny_pretrained'))


def held_out(root, task, out, items=EVAL_ITEMS):
    """The first `items` of the dev and test files (bounded evaluation cost at any world scale)."""
    paths = []
    for split in ('dev', 'test'):
        with open(os.path.join(root, f'{task}_{split}.json')) as f:
            subset = json.load(f)[:items]
        paths.append(os.path.join(out, f'{task}_{split}.json'))
        os.makedirs(out, exist_ok=True)
        with open(paths[-1], 'w') as f:
            json.dump(subset, f)
    return paths


def nlvr_pipeline(pretrained, out, seed=0, ta=None, run_opts=None):
    """Pretrain_nlvr.py then NLVR.py; returns NLVR.py's last epoch record (dev and test accuracy)."""
    root = pretrained.root
    run_main(Pretrain_nlvr, ['--config', os.path.join(REPO, 'configs/NLVR_pretrain_synthetic.yaml'),
                             '--text_encoder', 'none', '--checkpoint', pretrained.checkpoint, '--output_dir', out / 'ta',
                             '--seed', seed, *opts(train_file=f'[{root}/pretrain.json]', image_root=root, num_workers=0,
                                                   **(TA if ta is None else ta))])
    run_opts = NLVR_RUN if run_opts is None else run_opts
    train = repeated_file(f'{root}/nlvr_train.json', run_opts['max_steps_per_epoch'], run_opts['batch_size'])
    dev, test = held_out(root, 'nlvr', out / 'data')
    run_main(NLVR, ['--config', os.path.join(REPO, 'configs/NLVR_synthetic.yaml'), '--text_encoder', 'none',
                    '--checkpoint', out / 'ta' / 'checkpoint_last.pth', '--output_dir', out / 'nlvr', '--seed', seed,
                    *opts(train_file=train, val_file=f'[{dev}]', test_file=f'[{test}]', image_root=root,
                          num_workers=0, **run_opts)])
    return last_record(out / 'nlvr')


def ve_pipeline(pretrained, out, seed=0, run_opts=None):
    """VE.py from the pretrained checkpoint; returns its last epoch record (val and test accuracy)."""
    root = pretrained.root
    run_opts = VE_RUN if run_opts is None else run_opts
    train = repeated_file(f'{root}/ve_train.json', run_opts['max_steps_per_epoch'], run_opts['batch_size_train'])
    dev, test = held_out(root, 've', out / 'data')
    run_main(VE, ['--config', os.path.join(REPO, 'configs/VE_synthetic.yaml'), '--text_encoder', 'none',
                  '--checkpoint', pretrained.checkpoint, '--output_dir', out / 've', '--seed', seed,
                  *opts(train_file=train, val_file=dev, test_file=test, image_root=root, num_workers=0, **run_opts)])
    return last_record(out / 've')


def last_record(output_dir):
    """The last epoch record of output_dir/log.txt."""
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f if line.startswith('{')][-1]


def held_out_accuracy(record):
    """Accuracy over val and test together (every sample once)."""
    return (record['val_acc'] * record['val_n'] + record['test_acc'] * record['test_n']) / (
        record['val_n'] + record['test_n'])


def test_nlvr_through_text_assignment_runs_end_to_end(pretrained, tmp_path):
    record = nlvr_pipeline(pretrained, tmp_path)
    assert record['val_n'] == record['test_n'] == EVAL_ITEMS, record
    assert 0.0 <= record['val_acc'] <= 1.0 and 0.0 <= record['test_acc'] <= 1.0, record
    assert math.isfinite(record['train_loss']), record
    assert os.path.isfile(tmp_path / 'nlvr' / 'checkpoint_best.pth')
    # both labels in the held-out slices about equally (each split is exactly balanced; its text alone says nothing of
    # the label since world format 2)
    assert majority_fraction(held_out(pretrained.root, 'nlvr', tmp_path / 'data')) <= 0.55


def test_ve_beats_majority(pretrained, tmp_path):
    record = ve_pipeline(pretrained, tmp_path)
    baseline = majority_fraction(held_out(pretrained.root, 've', tmp_path / 'data'))
    assert held_out_accuracy(record) >= baseline + MARGIN_VE, (record, baseline)
    assert os.path.isfile(tmp_path / 've' / 'checkpoint_best.pth')
