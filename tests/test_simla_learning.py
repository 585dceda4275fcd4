"""SIMLA learns on the synthetic world through the entry scripts (docs/README_simla.md): Pretrain.py with
configs/simla/Pretrain_synthetic.yaml lowers each of its five losses and predicts the colour codes of masked patches
far better than always answering the most frequent code, and every downstream script starts from its checkpoint with
the SIMLA synthetic configs and the release's conversion outcome: VQA, text assignment and retrieval lower their
training losses within 10-30 steps, SNLI-VE beats the majority class on held-out items; every script, grounding
(Grad-CAM) and NLVR2 included, runs end to end through loading, training and evaluation (retrieval re-ranked by full
shared-stream passes from token ids). The held-out learning of grounding and NLVR2 needs more than the CI budget
from this short pretraining: docs/README_simla.md has every task's full-recipe numbers.

The runs are tests/simla_runs.py's (the shared synthetic world and DeiT stand-in, 2 epochs x 30 steps of SIMLA
pretraining at batch 16 and seed 42, then a few steps of each task), made in the background beside the rest of the
suite (tests/conftest.py). The numbers quoted beside each assertion were measured with exactly those settings
(2026-12-03, one CPU thread; "seed 1": the pretraining seed 1, the rest unchanged).
"""
import json
import math
import os

from tests import simla_runs as settings
from tests.helpers import read_log, read_steps


def metrics(output_dir):
    with open(os.path.join(output_dir, 'metrics.json')) as f:
        return json.load(f)['metrics']


def test_pretraining_lowers_every_loss(simla_runs):
    epochs = [r for r in read_log(simla_runs.pretrain) if r['epoch'] >= 0]
    first, last = epochs[0], epochs[-1]
    assert last['epoch'] == settings.PRETRAIN_OPTS['schedular.epochs'] - 1
    # measured (epoch means 0 -> 1): MLM 8.40 -> 4.10, ITC 5.79 -> 4.94, ITM 0.729 -> 0.640, MIM 2.30 -> 1.43,
    # PSL 0.668 -> 0.618 (seed 1: 8.62 -> 4.30, 5.46 -> 5.05, 0.776 -> 0.642, 2.42 -> 1.31, 0.668 -> 0.617)
    for name, drop in (('mlm', 1.5), ('ita', 0.15), ('itm', 0.03), ('mim', 0.3), ('psl', 0.03)):
        assert last[f'train_loss_{name}'] < first[f'train_loss_{name}'] - drop, (name, first, last)


def test_masked_patches_are_predicted_far_above_the_most_frequent_code(simla_runs):
    steps = read_steps(simla_runs.pretrain)
    late = steps[-4:]  # 4 of the last 20 steps (logged every 5)
    accuracy = sum(s['mim_accuracy'] for s in late) / len(late)
    majority = sum(s['mim_majority'] for s in late) / len(late)
    # measured: 0.765 against 0.413 for always answering the batch's most frequent colour code (1/64 uniform); the
    # first logged step 0.016 (seed 1: 0.834 against 0.455; 0.0)
    assert accuracy >= majority + 0.12, (accuracy, majority)
    assert steps[0]['mim_accuracy'] < accuracy - 0.2, (steps[0], late)


def test_every_downstream_script_starts_from_the_checkpoint_with_the_release_conversion(simla_runs):
    with open(simla_runs.log, errors='replace') as f:
        log = f.read()
    assert 'Traceback' not in log and log.count('exited with 0') == 7, log[-3000:]
    # the release's outcomes (SIMLA.md section 9), here at the tiny size: pretrain -> retrieval / grounding 1 missing
    # (idx_queue), 24 unexpected (mask tokens, MLM heads, MIM and concept heads); pretrain -> SNLI-VE 8 / 38
    assert log.count('missing keys: 1 [idx_queue]; unexpected keys: 24 [mim_head.weight') == 2
    assert log.count('missing keys: 8 [cls_head.0.weight') == 1 and 'unexpected keys: 38 [' in log


def test_vqa_and_text_assignment_learn_from_the_simla_checkpoint(simla_runs):
    vqa = [s['loss'] for s in read_steps(simla_runs.vqa)]
    assert vqa[-1] < vqa[0] - 3.0, vqa  # measured 18.8 -> 11.8 in 30 steps (logged every 5; seed 1: 17.9 -> 12.2)
    ta = [s['loss_ta'] for s in read_steps(simla_runs.ta)]
    assert ta[-1] < ta[0], ta  # text-assignment pretraining: measured 1.228 -> 1.121 (seed 1: 1.188 -> 1.086)


def test_retrieval_fine_tuning_lowers_its_contrastive_loss(simla_runs):
    # training ITC (queue of 256 + batch 32: ln 288 = 5.66 at chance) over 30 steps at lr 1e-3; measured first-5 /
    # last-5 step means 5.385 -> 5.260 (seed 1: 5.405 -> 5.286). The loss first rises while the queue of the
    # pretraining's features is replaced (8 steps: 5.18 at step 0, 5.59 at step 5), then falls to ~5.25; from the
    # checkpoint of pretraining at batch 32 (twice the pretraining time) the drop was 5.498 -> 5.250. Held-out R@1 on
    # 30 pictures moves by less than its noise in 30 steps: the full recipe's rise is in docs/README_simla.md
    ita = [s['loss_ita'] for s in read_steps(simla_runs.retrieval)]
    assert len(ita) == settings.STEPS['retrieval'], len(ita)
    first, last = sum(ita[:5]) / 5, sum(ita[-5:]) / 5
    assert last < first - 0.06, (first, last, ita)


def test_snli_ve_fine_tuning_beats_the_majority_class(simla_runs):
    result = metrics(simla_runs.ve)
    # 30 steps at the config's lr 1e-4 from the 60-step checkpoint; the held-out splits have a third of each label.
    # measured val / test accuracy 0.521 / 0.552 (seed 1: 0.521 / 0.563)
    for split in ('val', 'test'):
        assert result[f'{split}_acc'] >= 1 / 3 + 0.1, result


def test_retrieval_ve_grounding_and_nlvr_run_end_to_end_from_the_simla_checkpoint(simla_runs):
    result = metrics(simla_runs.retrieval)  # evaluated with every top-k candidate re-ranked from its token ids
    assert all(0.0 <= result[f'{split}_{k}'] <= 100.0 for split in ('val', 'test')
               for k in ('txt_r1', 'img_r1', 'r_mean')), result
    grounding = metrics(simla_runs.grounding)
    assert all(0.0 <= grounding[k] <= 1.0 for k in ('val_d', 'testA_d', 'testB_d')), grounding
    for run in (simla_runs.ve, simla_runs.nlvr):
        result = metrics(run)
        assert result['val_n'] == result['test_n'] == settings.HELD_OUT_ITEMS, result
        assert 0.0 <= result['val_acc'] <= 1.0 and 0.0 <= result['test_acc'] <= 1.0, result
    for run in (simla_runs.retrieval, simla_runs.ve, simla_runs.grounding, simla_runs.nlvr):
        assert all(math.isfinite(v) for s in read_steps(run) for k, v in s.items() if k.startswith('loss')), run


def test_training_signal_of_a_tiny_simla_from_random_init(synthetic_root):
    """SIMLA.md 17 item 10 (scripts/simla_signal.py): the spec's tiny SIMLA, 200 CPU steps at batch 8 from random init
    on the synthetic pairs. Measured at lr 3e-3 (the calibration; seeds 0 / 1 / 2): MLM -37.1/35.4/36.5 %, MIM
    -47.6/48.4/47.8 %, PSL -32.9/31.3/32.9 %, masked-patch accuracy 0.775/0.765/0.757 (chance 1/64), concept head
    above the median logit for 91.9/97.9/81.2 % of (picture, colour/shape word) pairs. ITC and ITM end at their chance
    levels (ln 72 = 4.28 for queue 64 + batch 8; the 1:2 label prior 0.6365) in this budget, as VLMo's do
    (docs/README_vlmo.md): the spec's 20 % for them is not met from random init; ITC learning is asserted from the
    DeiT stand-in by the pretraining test above."""
    from scripts.simla_signal import train_signal
    r = train_signal(str(synthetic_root), seed=0)
    assert r['finite']
    for name in ('loss_mlm', 'loss_mim', 'loss_psl'):
        assert r[name][2] >= 0.2, (name, r[name])
    assert r['mim_accuracy'] >= 3 * r['mim_chance'], r['mim_accuracy']
    assert r['concept_words'] >= 0.8, r['concept_words']

