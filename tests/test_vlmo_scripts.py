"""VLMo through the entry scripts on the synthetic world (one process, a few steps): the checkpoint of one stage
loads into the next task's model and each script writes its outputs."""
import json
import os

import numpy as np
import torch

from engine.config import load_config
from models.vlmo import VLMoPretrain
from tests.helpers import opts, run_main, slice_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETRIEVAL = os.path.join(ROOT, 'configs', 'vlmo', 'Retrieval_synthetic.yaml')


def test_retrieval_script_fine_tunes_and_evaluates_a_vlmo_checkpoint(synthetic_root, tmp_path):
    """Retrieval.py with model: vlmo from a stage-3 layout checkpoint: loads (heads of the pretraining model
    dropped), trains a few steps and writes dual-encoder metrics; --evaluate reads its own checkpoint back."""
    root = str(synthetic_root)
    paths = opts(train_file=f"['{root}/retrieval_train.json']", val_file=f'{root}/retrieval_val.json',
                 test_file=f'{root}/retrieval_test.json', image_root=root)
    pre = VLMoPretrain(config={**load_config(RETRIEVAL), 'task': 'pretrain'})
    start = tmp_path / 'stage3.pth'
    torch.save({'model': pre.state_dict()}, start)
    out = tmp_path / 'ft'
    run_main('Retrieval', ['--config', RETRIEVAL, '--output_dir', str(out), '--checkpoint', str(start), *paths,
                           *opts(max_steps_per_epoch=3, **{'schedule.epochs': 1})])
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['model'] == 'vlmo' and metrics['scores'] == 'dual' and 'k_test' not in metrics
    assert 0 <= metrics['test']['r_mean'] <= 100 and set(metrics['val']) >= {'txt_r1', 'img_r1', 'r_mean'}
    steps = [json.loads(line) for line in (out / 'train_steps.jsonl').read_text().splitlines()]
    assert steps and all(np.isfinite(s['loss_itc']) for s in steps if 'loss_itc' in s)
    again = tmp_path / 'eval'
    run_main('Retrieval', ['--config', RETRIEVAL, '--output_dir', str(again), '--evaluate',
                           '--checkpoint', str(out / 'checkpoint_best.pth'), *paths])
    evaluated = json.loads((again / 'metrics.json').read_text())
    assert evaluated['evaluate_only'] and evaluated['test'] == metrics['test']


def test_retrieval_script_runs_the_rerank_variant(synthetic_root, tmp_path, capsys):
    """retrieval.mode: dual_rerank through Retrieval.py: the stage-3 ITM head loads, ITC + ITM train, and the
    metrics name the protocol with its k_test."""
    root = str(synthetic_root)
    held_out = slice_file(os.path.join(root, 'retrieval_test.json'), str(tmp_path / 'held_out.json'), n_images=12)
    paths = opts(train_file=f"['{root}/retrieval_train.json']", val_file=held_out, test_file=held_out, image_root=root)
    config = {**load_config(RETRIEVAL, ['retrieval.mode=dual_rerank']), 'task': 'pretrain'}
    start = tmp_path / 'stage3.pth'
    torch.save({'model': VLMoPretrain(config=config).state_dict()}, start)
    out = tmp_path / 'ft'
    run_main('Retrieval', ['--config', RETRIEVAL, '--output_dir', str(out), '--checkpoint', str(start), *paths,
                           *opts(max_steps_per_epoch=3, k_test=4, log_every=1, **{'schedule.epochs': 1,
                                                                                   'retrieval.mode': 'dual_rerank'})])
    loaded = [line for line in capsys.readouterr().out.splitlines() if line.startswith('VLMo retrieval from')]
    assert loaded and 'itm_score' not in loaded[0], loaded
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['scores'] == 'dual_rerank' and metrics['k_test'] == 4
    assert 0 <= metrics['test']['r_mean'] <= 100
    steps = [json.loads(line) for line in (out / 'train_steps.jsonl').read_text().splitlines()]
    assert len(steps) == 3 and all(np.isfinite(s['loss_itm']) and s['loss_itm'] > 0 for s in steps), steps
