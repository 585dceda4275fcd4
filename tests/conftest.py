"""Shared pytest set-up: one CPU thread (the machine has two cores) and the repo root importable."""
import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

torch.set_num_threads(1)


# ---- the tiny pretrained model shared by the learning tests ------------------------------------------------------
import collections  # noqa: E402

import pytest  # noqa: E402

TinyPretrained = collections.namedtuple('TinyPretrained', 'checkpoint root output_dir')

# The pretraining run of the learning test (tests/test_pretrain_learning.py); the fine-tuning tests start from its
# checkpoint. configs/Pretrain_synthetic.yaml as the demo runs it, with fewer epochs to fit the CI budget.
TINY_PRETRAIN_OPTS = {'num_workers': 1, 'log_every': 10, 'max_steps_per_epoch': 80, 'schedular.epochs': 2,
                      'warmup_step_size': 5}
TINY_PRETRAIN_THREADS = 1
SYNTHETIC_DEIT_EPOCHS = 4  # the recipe's default (python -m synthetic.deit)


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory):
    """The synthetic world at its default size (the one `make demo` uses), generated once per test session."""
    from synthetic.world import generate
    root = tmp_path_factory.mktemp('synthetic')
    generate(root, seed=0, scale=1.0)
    return root


@pytest.fixture(scope='session')
def synthetic_deit(synthetic_root, tmp_path_factory):
    """The DeiT stand-in of the synthetic recipe (python -m synthetic.deit), trained once per session."""
    import synthetic.deit as stand_in
    path = tmp_path_factory.mktemp('synthetic_deit') / stand_in.DEFAULT_NAME
    threads = torch.get_num_threads()
    torch.set_num_threads(TINY_PRETRAIN_THREADS)
    try:
        stand_in.main(['--root', str(synthetic_root), '--output', str(path),
                       '--config', os.path.join(REPO_ROOT, 'configs', 'Pretrain_synthetic.yaml'),
                       '--epochs', str(SYNTHETIC_DEIT_EPOCHS)])
    finally:
        torch.set_num_threads(threads)
    return str(path)


@pytest.fixture(scope='session')
def tiny_pretrained(synthetic_root, synthetic_deit, tmp_path_factory):
    """(checkpoint, root, output_dir) of Pretrain.py run on the synthetic world with configs/Pretrain_synthetic.yaml,
    starting from the synthetic DeiT stand-in as the recipe does."""
    import engine
    import Pretrain
    out = tmp_path_factory.mktemp('tiny_pretrain')
    root = synthetic_root
    argv = ['--config', os.path.join(REPO_ROOT, 'configs', 'Pretrain_synthetic.yaml'), '--output_dir', str(out),
            '--text_encoder', 'none', '--device', 'cpu', '--seed', '42',
            '--opt', f'train_file=[{root}/pretrain.json]', '--opt', f'image_root={root}',
            '--opt', f'val_file={root}/retrieval_test.json', '--opt', f'deit_checkpoint={synthetic_deit}']
    for key, value in TINY_PRETRAIN_OPTS.items():
        argv += ['--opt', f'{key}={value}']
    threads = torch.get_num_threads()
    torch.set_num_threads(TINY_PRETRAIN_THREADS)
    try:
        Pretrain.main(engine.base_parser('tiny pretraining', None, None).parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    return TinyPretrained(str(out / 'checkpoint_last.pth'), str(root), str(out))
