"""End to end through VQA.py on the synthetic world: fine-tune from the shared tiny pretrained checkpoint
(tests/conftest.py), write the result file with every test question once, then --evaluate the fine-tuned checkpoint
and give the same answers.

No accuracy margin is asserted here: from the 2 x 80-step fixture VQA stays below the question-kind prior (24.3 after
3 x 60 steps, prior 45.1; docs/README_synthetic.md, fourth round); VQA beats its image-blind control and the prior only
from the demo-length pretraining, which tests/test_image_blind_margins.py fine-tunes from (48.65 against 40.6 and 45.1).
"""
import json
import os

import pytest
import torch

import engine.config as engine_config
import utils
import VQA
from evaluation.vqa_eval import check_results

TEST_QUESTIONS = 160       # a slice of the synthetic test split keeps prediction cheap
EPOCHS, STEPS = 1, 20      # enough to write a fine-tuned checkpoint and a result file


@pytest.fixture(scope='module')
def pretrained(tiny_pretrained):
    """(checkpoint, synthetic root) of the shared tiny pretraining."""
    return str(tiny_pretrained.checkpoint), str(tiny_pretrained.root)


@pytest.mark.unit
def test_synthetic_config_matches_the_pretraining_model():
    """The tiny pretrained checkpoint converts only if both configs build the same ViT and BERT."""
    configs = [engine_config.load_config(os.path.join(utils.REPO_ROOT, 'configs', name))
               for name in ('Pretrain_synthetic.yaml', 'VQA_synthetic.yaml')]
    for key in ('vit', 'bert_config', 'image_res'):
        assert configs[0][key] == configs[1][key], key


def vqa_args(root, out, test_file, *extra):
    return VQA.parser().parse_args([
        '--config', os.path.join(utils.REPO_ROOT, 'configs', 'VQA_synthetic.yaml'), '--output_dir', out,
        '--device', 'cpu', '--opt', f'train_file=[{root}/vqa_train.json]', '--opt', f'test_file=[{test_file}]',
        '--opt', f'answer_list={root}/answer_list.json', '--opt', f'vqa_root={root}', '--opt', f'vg_root={root}',
        '--opt', 'num_workers=0', '--opt', f'schedular.epochs={EPOCHS}', '--opt', f'max_steps_per_epoch={STEPS}',
        *extra])


@pytest.fixture(scope='module')
def finetuned(pretrained, tmp_path_factory):
    checkpoint, root = pretrained
    work = tmp_path_factory.mktemp('vqa')
    test_file = str(work / 'vqa_test.json')
    with open(os.path.join(root, 'vqa_test.json')) as f:
        questions = json.load(f)[:TEST_QUESTIONS]
    with open(test_file, 'w') as f:
        json.dump(questions, f)
    out = str(work / 'out')
    VQA.main(vqa_args(root, out, test_file, '--checkpoint', checkpoint))
    return root, out, test_file, questions


def test_result_file_has_every_question_once(finetuned):
    root, out, _, questions = finetuned
    with open(os.path.join(out, 'result', f'vqa_result_epoch{EPOCHS - 1}.json')) as f:
        result = json.load(f)
    with open(os.path.join(root, 'answer_list.json')) as f:
        answer_list = set(json.load(f))
    assert all(set(r) == {'question_id', 'answer'} and type(r['question_id']) is int and r['answer'] in answer_list
               for r in result)
    check_results(result, [q['question_id'] for q in questions])


def test_evaluate_reloads_the_finetuned_checkpoint(finetuned, tmp_path):
    root, out, test_file, questions = finetuned
    few = str(tmp_path / 'few.json')
    with open(few, 'w') as f:
        json.dump(questions[:32], f)
    ckpt = os.path.join(out, 'checkpoint_last.pth')
    assert set(torch.load(ckpt, map_location='cpu', weights_only=False)) >= {'model', 'optimizer', 'epoch'}
    VQA.main(vqa_args(root, str(tmp_path / 'eval'), few, '--checkpoint', ckpt, '--evaluate'))
    with open(tmp_path / 'eval' / 'result' / 'vqa_result_epoch0.json') as f:
        evaluated = {r['question_id']: r['answer'] for r in json.load(f)}
    with open(os.path.join(out, 'result', f'vqa_result_epoch{EPOCHS - 1}.json')) as f:
        trained = {r['question_id']: r['answer'] for r in json.load(f)}
    assert evaluated == {q: trained[q] for q in evaluated} and len(evaluated) == 32
