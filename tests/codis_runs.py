"""The runs that tests/test_codis_learning.py reads: CODIS pretraining on the synthetic world through Pretrain.py, then
Retrieval.py (zero-shot and fine-tuned) and VQA.py from its checkpoint, as subprocesses in the background.

tests/conftest.py starts them as soon as the synthetic world exists (when a selected test asks for `codis_runs`) and
orders the tests that read them last, so on the two-core CI machine they run beside the rest of the suite instead of
adding their minutes to it. Every setting is here: the margins of the tests were measured with exactly these.
"""
import collections
import os

from tests.helpers import REPO, BackgroundRun, opts, pretrain_argv, slice_file

CONFIG = os.path.join(REPO, 'configs', 'codis', 'Pretrain_synthetic.yaml')
SEED = 42
# the settings of the shared ALBEF fixture (tests/conftest.py, TINY_PRETRAIN_OPTS): 2 epochs x 80 steps, batch 32
PRETRAIN_OPTS = {'num_workers': 1, 'log_every': 10, 'max_steps_per_epoch': 80, 'schedular.epochs': 2,
                 'warmup_step_size': 5}
FINE_TUNE_STEPS = {'retrieval': 93, 'vqa': 40}  # retrieval: one epoch of retrieval_train.json at batch 32
HELD_OUT_IMAGES = 50      # retrieval evaluated on the first 50 pictures of retrieval_test.json (and their captions)
VQA_QUESTIONS = 64        # the first questions of vqa_test.json

CodisRuns = collections.namedtuple('CodisRuns', 'root pretrain zero_shot retrieval vqa log')


def fine_tune_argv(config, checkpoint, out, steps, **keys):
    """An ALBEF fine-tuning script from the CODIS checkpoint (`model: codis`: the codebook is dropped and reported)."""
    return ['--config', os.path.join(REPO, 'configs', config), '--output_dir', str(out), '--text_encoder', 'none',
            '--device', 'cpu', '--seed', '0', '--checkpoint', checkpoint,
            *opts(model='codis', num_workers=0, max_steps_per_epoch=steps, log_every=5, **{'schedular.epochs': 1},
                  **keys)]


def start(root, deit, work, after=()):
    """Start the runs under `work` (a directory), after the BackgroundRuns `after` (none in the suite): the
    pretraining, then the three scripts from its checkpoint; returns (CodisRuns of their output folders,
    BackgroundRun)."""
    work = str(work)
    runs = CodisRuns(str(root), *(os.path.join(work, name) for name in ('pretrain', 'zero_shot', 'retrieval', 'vqa')),
                     os.path.join(work, 'runs.log'))
    checkpoint = os.path.join(runs.pretrain, 'checkpoint_last.pth')
    held_out = slice_file(os.path.join(root, 'retrieval_test.json'), os.path.join(work, 'retrieval_test.json'),
                          n_images=HELD_OUT_IMAGES)
    questions = slice_file(os.path.join(root, 'vqa_test.json'), os.path.join(work, 'vqa_test.json'),
                           n_items=VQA_QUESTIONS)
    retrieval_data = {'train_file': f'[{root}/retrieval_train.json]', 'val_file': held_out, 'test_file': held_out,
                      'image_root': str(root)}
    vqa_data = {'train_file': f'[{root}/vqa_train.json]', 'test_file': f'[{questions}]',
                'answer_list': f'{root}/answer_list.json', 'vqa_root': str(root), 'vg_root': str(root)}
    commands = [
        ('Pretrain.py', pretrain_argv(root, runs.pretrain, deit, seed=SEED, config=CONFIG,
                                      val_file=f'{root}/retrieval_test.json', **PRETRAIN_OPTS)),
        ('Retrieval.py', fine_tune_argv('Retrieval_synthetic.yaml', checkpoint, runs.zero_shot, 1, **retrieval_data)
         + ['--evaluate'], [0]),
        ('Retrieval.py', fine_tune_argv('Retrieval_synthetic.yaml', checkpoint, runs.retrieval,
                                        FINE_TUNE_STEPS['retrieval'], **retrieval_data), [0]),
        ('VQA.py', fine_tune_argv('VQA_synthetic.yaml', checkpoint, runs.vqa, FINE_TUNE_STEPS['vqa'], **vqa_data), [0]),
    ]
    return runs, BackgroundRun(commands, runs.log, after=after)
