"""End to end through VQA.py on the synthetic world: the fine-tuning of tests/margin_runs.py (3 x 112 steps from the
committed demo-length pretraining, in the background) writes a result file with every test question once, and its
checkpoint, evaluated again with --evaluate, gives the same answers.

Its accuracy against its image-blind control and the question-kind prior is asserted in
tests/test_image_blind_margins.py (from the CI-length 2 x 80-step pretraining VQA stays below the prior: 24.3 after
3 x 60 steps, prior 45.1; docs/README_synthetic.md, fourth round).
"""
import json
import os

import pytest
import torch

import engine.config as engine_config
import utils
from evaluation.vqa_eval import check_results
from tests import margin_runs as settings

EPOCHS = 3  # configs/VQA_synthetic.yaml's, which tests/margin_runs.py keeps


@pytest.mark.unit
def test_synthetic_config_matches_the_pretraining_model():
    """The tiny pretrained checkpoint converts only if both configs build the same ViT and BERT."""
    configs = [engine_config.load_config(os.path.join(utils.REPO_ROOT, 'configs', name))
               for name in ('Pretrain_synthetic.yaml', 'VQA_synthetic.yaml')]
    for key in ('vit', 'bert_config', 'image_res'):
        assert configs[0][key] == configs[1][key], key
    assert configs[1]['schedular']['epochs'] == EPOCHS


def load(path):
    with open(path) as f:
        return json.load(f)


def test_result_file_has_every_question_once(margin_runs):
    root, out = margin_runs.root, margin_runs.runs['vqa']
    questions = load(os.path.join(root, 'vqa_test.json'))
    result = load(os.path.join(out, 'result', f'vqa_result_epoch{EPOCHS - 1}.json'))
    answer_list = set(load(os.path.join(root, 'answer_list.json')))
    assert all(set(r) == {'question_id', 'answer'} and type(r['question_id']) is int and r['answer'] in answer_list
               for r in result)
    check_results(result, [q['question_id'] for q in questions])


def test_evaluate_reloads_the_finetuned_checkpoint(margin_runs):
    out, reload = margin_runs.runs['vqa'], margin_runs.runs['vqa_reload']
    ckpt = os.path.join(out, 'checkpoint_last.pth')
    assert set(torch.load(ckpt, map_location='cpu', weights_only=False)) >= {'model', 'optimizer', 'epoch'}
    evaluated = {r['question_id']: r['answer'] for r in load(os.path.join(reload, 'result', 'vqa_result_epoch0.json'))}
    trained = {r['question_id']: r['answer']
               for r in load(os.path.join(out, 'result', f'vqa_result_epoch{EPOCHS - 1}.json'))}
    assert len(evaluated) == settings.RELOAD_QUESTIONS and evaluated == {q: trained[q] for q in evaluated}
