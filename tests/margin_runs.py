"""The runs that tests/test_image_blind_margins.py reads: every task of the synthetic benchmark fine-tuned, through its
entry script, from a demo-length ALBEF pretraining, and each fine-tuned model evaluated again with `image_blind=fixed`
(one fixed picture for every item), its image-blind control.

The pretraining is the committed tests/fixtures/synthetic_pretrained/albef_demo_seed42.pth (synthetic/pretrained.py:
`make demo`'s pretraining, 4 x 93 steps of configs/Pretrain_synthetic.yaml, seed 42, stored in float16 without its
momentum copies), because the tasks beat their controls only from a pretraining of that length, which the CI budget
cannot pay (docs/README_synthetic.md). Every fine-tuning runs live:
- zero-shot retrieval, retrieval fine-tuning (20 steps), VQA (3 x 112 steps of 16), each with its control, and the VQA
  checkpoint evaluated again on a few questions (tests/test_vqa_learning.py);
- zero-shot retrieval from a second committed pretraining (FIXTURE_SHAPES), with ITM re-ranking and with ITC alone;
- SNLI-VE (2 epochs of the config at 96 px) and NLVR2 (text assignment, then 2 epochs at 64 px, the pretraining's and
  text assignment's resolution: the same margins as at the config's 96 px for half the cost), each with its control;
  tests/test_nlvr_ve_learning.py reads them too.
About 8 minutes of one core (2026-12-04), in the background beside the rest of the suite; tests/conftest.py starts them
as soon as the synthetic world exists. Every setting is here: the margins of the tests were measured with exactly these.
"""
import collections
import os

from tests.helpers import REPO, BackgroundRun, opts, slice_file

FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'synthetic_pretrained', 'albef_demo_seed42.pth')
# A second committed pretraining, for zero-shot ITM re-ranking against ITC alone only: 24 x 93 steps of the same
# config, seed 2, from the 60-epoch per-cell stand-in with the ViT frozen (lr_mult_visual 0), whose fusion encoder
# learns to match more than colours (docs/README_synthetic.md, ninth round; its recipe:
# tests/fixtures/synthetic_pretrained/README.md).
FIXTURE_SHAPES = os.path.join(REPO, 'tests', 'fixtures', 'synthetic_pretrained', 'albef_frozen_vit_seed2.pth')
SEED = 42
RETRIEVAL_STEPS = 20
VAL_IMAGES = 20           # retrieval's val split cut to 20 pictures (the margins are asserted on the full test split)
VQA = {'batch_size_train': 16, 'max_steps_per_epoch': 112}   # 3 epochs (the config's), the demo's 337 steps at 16
RELOAD_QUESTIONS = 32     # the fine-tuned VQA checkpoint evaluated again on the first 32 test questions
VE = {'schedular.epochs': 2}
NLVR = {'schedular.epochs': 2, 'image_res': 64}

MarginRuns = collections.namedtuple('MarginRuns', 'root checkpoint runs log')


def expand_fixture(root, work, fixture=FIXTURE, name='pretrained.pth'):
    """A committed pretraining as an ordinary checkpoint under `work` (it must be of the world under `root`)."""
    from synthetic.pretrained import expand
    return expand(fixture, os.path.join(work, name), root=root)


def argv(config, checkpoint, out, data, *extra, **keys):
    return ['--config', os.path.join(REPO, 'configs', config), '--output_dir', out, '--checkpoint', checkpoint,
            '--text_encoder', 'none', '--device', 'cpu', '--seed', str(SEED),
            *opts(num_workers=0, **data, **keys), *extra]


def _data(root, work):
    val = slice_file(os.path.join(root, 'retrieval_val.json'), os.path.join(work, 'retrieval_val.json'),
                     n_images=VAL_IMAGES)
    return {
        'retrieval': {'train_file': f'[{root}/retrieval_train.json]', 'val_file': val,
                      'test_file': f'{root}/retrieval_test.json', 'image_root': root},
        'vqa': {'train_file': f'[{root}/vqa_train.json]', 'test_file': f'[{root}/vqa_test.json]',
                'answer_list': f'{root}/answer_list.json', 'vqa_root': root, 'vg_root': root},
        'vqa_reload': {'train_file': f'[{root}/vqa_train.json]', 'answer_list': f'{root}/answer_list.json',
                       'vqa_root': root, 'vg_root': root,
                       'test_file': '[' + slice_file(os.path.join(root, 'vqa_test.json'),
                                                     os.path.join(work, 'vqa_test_few.json'),
                                                     n_items=RELOAD_QUESTIONS) + ']'},
        've': {'train_file': f'{root}/ve_train.json', 'val_file': f'{root}/ve_dev.json',
               'test_file': f'{root}/ve_test.json', 'image_root': root},
        'nlvr_ta': {'train_file': f'[{root}/pretrain.json]', 'image_root': root},
        'nlvr': {'train_file': f'[{root}/nlvr_train.json]', 'val_file': f'[{root}/nlvr_dev.json]',
                 'test_file': f'[{root}/nlvr_test.json]', 'image_root': root},
    }


def _commands(root, work, checkpoint, shapes_checkpoint):
    """({run name: output folder}, BackgroundRun commands)."""
    data = _data(root, work)
    out = lambda name: os.path.join(work, name)  # noqa: E731
    blind = {'image_blind': 'fixed'}
    vqa = os.path.join(out('vqa'), 'checkpoint_last.pth')
    nlvr_blind = {**blind, 'image_res': NLVR['image_res']}
    # (run name, script, config, checkpoint, data, indices of the runs it needs, extra arguments, config keys); the
    # longest first, so that the two background workers end together
    runs = [
        ('ve', 'VE.py', 'VE_synthetic.yaml', checkpoint, 've', [], [], VE),
        ('nlvr_ta', 'Pretrain_nlvr.py', 'NLVR_pretrain_synthetic.yaml', checkpoint, 'nlvr_ta', [], [], {}),
        ('nlvr', 'NLVR.py', 'NLVR_synthetic.yaml', os.path.join(out('nlvr_ta'), 'checkpoint_last.pth'), 'nlvr',
         [1], [], NLVR),
        ('vqa', 'VQA.py', 'VQA_synthetic.yaml', checkpoint, 'vqa', [], [], VQA),
        ('ve_blind', 'VE.py', 'VE_synthetic.yaml', os.path.join(out('ve'), 'checkpoint_best.pth'), 've', [0],
         ['--evaluate'], blind),
        ('nlvr_blind', 'NLVR.py', 'NLVR_synthetic.yaml', os.path.join(out('nlvr'), 'checkpoint_best.pth'), 'nlvr',
         [2], ['--evaluate'], nlvr_blind),
        ('vqa_blind', 'VQA.py', 'VQA_synthetic.yaml', vqa, 'vqa', [3], ['--evaluate'], blind),
        # the fine-tuned checkpoint evaluated again with the pictures, on a few questions (tests/test_vqa_learning.py)
        ('vqa_reload', 'VQA.py', 'VQA_synthetic.yaml', vqa, 'vqa_reload', [3], ['--evaluate'], {}),
        ('retrieval', 'Retrieval.py', 'Retrieval_synthetic.yaml', checkpoint, 'retrieval', [], [],
         {'max_steps_per_epoch': RETRIEVAL_STEPS, 'schedular.epochs': 1}),
        ('retrieval_blind', 'Retrieval.py', 'Retrieval_synthetic.yaml',
         os.path.join(out('retrieval'), 'checkpoint_best.pth'), 'retrieval', [8], ['--evaluate'], blind),
        ('retrieval_zero_shot', 'Retrieval.py', 'Retrieval_synthetic.yaml', checkpoint, 'retrieval', [],
         ['--evaluate'], {}),
        ('retrieval_zero_shot_blind', 'Retrieval.py', 'Retrieval_synthetic.yaml', checkpoint, 'retrieval', [],
         ['--evaluate'], blind),
        # the second pretraining zero-shot: ITM re-ranking of ITC's top 16 (the config's k_test) and ITC alone (k 1)
        ('retrieval_zero_shot_shapes', 'Retrieval.py', 'Retrieval_synthetic.yaml', shapes_checkpoint, 'retrieval',
         [], ['--evaluate'], {}),
        ('retrieval_zero_shot_shapes_itc', 'Retrieval.py', 'Retrieval_synthetic.yaml', shapes_checkpoint,
         'retrieval', [], ['--evaluate'], {'k_test': 1}),
    ]
    commands = [(script, argv(config, start, out(name), data[files], *extra, **keys), needs)
                for name, script, config, start, files, needs, extra, keys in runs]
    return {run[0]: out(run[0]) for run in runs}, commands


def start(root, deit, work, after=()):
    """Start the runs under `work` (`deit` and `after` are not used: they start from the committed pretraining);
    returns (MarginRuns, BackgroundRun)."""
    root, work = str(root), str(work)
    checkpoint = expand_fixture(root, work)
    shapes_checkpoint = expand_fixture(root, work, FIXTURE_SHAPES, 'pretrained_shapes.pth')
    runs, commands = _commands(root, work, checkpoint, shapes_checkpoint)
    log = os.path.join(work, 'runs.log')
    return MarginRuns(root, checkpoint, runs, log), BackgroundRun(commands, log)
