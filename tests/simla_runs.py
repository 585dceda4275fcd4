"""The runs that tests/test_simla_learning.py reads: SIMLA pretraining on the synthetic world through Pretrain.py
(configs/simla/Pretrain_synthetic.yaml: shared stream, color_quant MIM, PSL), then every downstream script from its
checkpoint with the SIMLA synthetic configs: Retrieval.py, VQA.py, VE.py, Grounding.py,
and Pretrain_nlvr.py (text assignment) followed by NLVR.py from the TA checkpoint.

Started in the background by tests/conftest.py (like tests/codis_runs.py) as soon as the synthetic world exists; every
setting is here, and the margins of the tests were measured with exactly these.
"""
import collections
import os

from tests.helpers import REPO, BackgroundRun, opts, pretrain_argv, slice_file

CONFIGS = os.path.join(REPO, 'configs', 'simla')
SEED = 42
# batch 16 (the config's 32 halved): the step costs half (2.2 s instead of 4.4 on one thread, two runs side by side on
# the 2-core machine) and every margin of tests/test_simla_learning.py holds at both measured seeds (42 and 1)
PRETRAIN_OPTS = {'num_workers': 1, 'log_every': 5, 'max_steps_per_epoch': 30, 'schedular.epochs': 2,
                 'warmup_step_size': 5, 'batch_size': 16}
# steps of each task: enough for the losses of VQA, text assignment and retrieval to fall and for SNLI-VE to beat the
# majority class; grounding and NLVR2 (whose learning needs more than the CI budget from a 60-step checkpoint: their
# full-recipe numbers are in docs/README_simla.md) run end to end through SIMLA's loading, training and evaluation
STEPS = {'retrieval': 30, 'vqa': 30, 've': 30, 'grounding': 5, 'ta': 10, 'nlvr': 10}
# retrieval and SNLI-VE leave the warm-up lr (1e-5) after 2 steps instead of the config's 10, every step logged;
# retrieval trains at 1e-3 (the pretraining lr: at the config's 1e-4 its ITC loss does not move in 30 steps)
FAST_START = {'warmup_step_size': 2, 'log_every': 1}
RETRIEVAL_LR = {'optimizer.lr': 1e-3, 'schedular.lr': 1e-3}
HELD_OUT_IMAGES = 30   # retrieval: the first pictures of retrieval_test.json
HELD_OUT_ITEMS = 96    # VQA questions, SNLI-VE and NLVR2 items of each held-out split

SimlaRuns = collections.namedtuple('SimlaRuns', 'root pretrain retrieval vqa ve grounding ta nlvr log')


def task_argv(config, checkpoint, out, steps, **keys):
    """A downstream script on the SIMLA synthetic config `config`, from `checkpoint`, for `steps` steps."""
    settings = {'num_workers': 0, 'max_steps_per_epoch': steps, 'log_every': 5, 'schedular.epochs': 1, **keys}
    return ['--config', os.path.join(CONFIGS, config), '--output_dir', str(out), '--text_encoder', 'none',
            '--device', 'cpu', '--seed', '0', '--checkpoint', checkpoint, *opts(**settings)]


def start(root, deit, work, after=()):
    """Start the runs under `work`, after the BackgroundRuns `after` (none in the suite): the pretraining, then
    every downstream script from its checkpoint (NLVR.py from the text-assignment checkpoint); returns (SimlaRuns
    of their output folders, BackgroundRun)."""
    root, work = str(root), str(work)
    runs = SimlaRuns(root, *(os.path.join(work, name) for name in SimlaRuns._fields[1:-1]),
                     os.path.join(work, 'runs.log'))
    checkpoint = os.path.join(runs.pretrain, 'checkpoint_last.pth')
    held = lambda name, **n: slice_file(os.path.join(root, f'{name}.json'), os.path.join(work, f'{name}.json'), **n)
    retrieval_test = held('retrieval_test', n_images=HELD_OUT_IMAGES)
    # k 8: SIMLA re-ranks each candidate with a full shared-stream pass
    retrieval = {'train_file': f'[{root}/retrieval_train.json]', 'val_file': retrieval_test,
                 'test_file': retrieval_test, 'image_root': root, 'k_test': 8}
    vqa = {'train_file': f'[{root}/vqa_train.json]', 'test_file': f"[{held('vqa_test', n_items=HELD_OUT_ITEMS)}]",
           'answer_list': f'{root}/answer_list.json', 'vqa_root': root, 'vg_root': root}
    ve = {'train_file': f'{root}/ve_train.json', 'val_file': held('ve_dev', n_items=HELD_OUT_ITEMS),
          'test_file': held('ve_test', n_items=HELD_OUT_ITEMS), 'image_root': root}
    grounding = {'train_file': f'[{root}/grounding_train.json]',
                 'test_file': f'[{root}/grounding_val.json,{root}/grounding_test.json]', 'image_root': root,
                 'refcoco_data': root, 'det_file': f'{root}/refcoco+/dets.json',
                 'coco_file': f'{root}/refcoco+/cocos.json'}
    ta = {'train_file': f'[{root}/pretrain.json]', 'image_root': root}
    nlvr = {'train_file': f'[{root}/nlvr_train.json]', 'val_file': f"[{held('nlvr_dev', n_items=HELD_OUT_ITEMS)}]",
            'test_file': f"[{held('nlvr_test', n_items=HELD_OUT_ITEMS)}]", 'image_root': root}
    commands = [
        ('Pretrain.py', pretrain_argv(root, runs.pretrain, deit, seed=SEED,
                                      config=os.path.join(CONFIGS, 'Pretrain_synthetic.yaml'), **PRETRAIN_OPTS)),
        ('Retrieval.py', task_argv('Retrieval_synthetic.yaml', checkpoint, runs.retrieval, STEPS['retrieval'],
                                   **retrieval, **FAST_START, **RETRIEVAL_LR), [0]),
        ('VQA.py', task_argv('VQA_synthetic.yaml', checkpoint, runs.vqa, STEPS['vqa'], **vqa), [0]),
        ('VE.py', task_argv('VE_synthetic.yaml', checkpoint, runs.ve, STEPS['ve'], **ve, **FAST_START), [0]),
        ('Grounding.py', task_argv('Grounding_synthetic.yaml', checkpoint, runs.grounding, STEPS['grounding'],
                                   **grounding), [0]),
        ('Pretrain_nlvr.py', task_argv('NLVR_pretrain_synthetic.yaml', checkpoint, runs.ta, STEPS['ta'], **ta), [0]),
        ('NLVR.py', task_argv('NLVR_synthetic.yaml', os.path.join(runs.ta, 'checkpoint_last.pth'), runs.nlvr,
                              STEPS['nlvr'], **nlvr), [5]),
    ]
    return runs, BackgroundRun(commands, runs.log, after=after)
