"""Learning check through Grounding.py on CPU: the tiny pretrained model (tests/conftest.py), fine-tuned on the
synthetic grounding split, picks the right detector proposal by ITM Grad-CAM more often than picking a proposal at
random, on every split, by a margin measured beforehand (docs/README_grounding.md)."""
import json
import os

import pytest

import Grounding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A short fine-tuning at the official learning rate; 64 px as pretrained, the rest is configs/Grounding_synthetic.yaml.
RUN = {'schedular.epochs': 1, 'max_steps_per_epoch': 30, 'optimizer.lr': 1e-5, 'schedular.warmup_lr': 1e-5,
       'num_workers': 0}
# Measured from the test's shared pretraining: val / testA / testB accuracy 0.308 / 0.346 / 0.313 (earlier code) and
# 0.237 / 0.243 / 0.230 (2026-12-02, after the structure change) against 0.179 / 0.189 / 0.181 for a random proposal
# (docs/README_grounding.md): the margin moves with the pretraining's random draws.
MARGIN = 0.03


def opts(**values):
    return [arg for key, value in values.items() for arg in ('--opt', f'{key}={value}')]


@pytest.mark.xfail(strict=False, raises=AssertionError, reason=(
    'issue #13: the shared 2 x 80-step pretraining leaves ITM at chance (loss 0.637 vs 0.64), so ITM Grad-CAM '
    'grounding measures the draws of that pretraining: 0.308/0.346/0.313 once, 0.237/0.243/0.230 and '
    '0.181/0.127/0.166 in two runs of 2026-12-02 against 0.179/0.189/0.181 for a random proposal '
    '(docs/README_synthetic.md). With the grounding recipe of configs/Pretrain_synthetic.yaml the fixture\'s ITM '
    'ranks the right picture first for 86% of held-out texts, and this test still failed once (numbers not '
    'recorded): measure the margin over its image-blind control over several seeds'))
def test_fine_tuned_grad_cam_beats_a_random_proposal(tiny_pretrained, tmp_path):
    root = tiny_pretrained.root
    data = {'train_file': f'[{root}/grounding_train.json]',
            'test_file': f'[{root}/grounding_val.json,{root}/grounding_test.json]', 'image_root': root,
            'refcoco_data': root, 'det_file': f'{root}/refcoco+/dets.json', 'coco_file': f'{root}/refcoco+/cocos.json'}
    argv = ['--config', os.path.join(REPO, 'configs', 'Grounding_synthetic.yaml'), '--text_encoder', 'none',
            '--device', 'cpu', '--seed', '0', '--checkpoint', tiny_pretrained.checkpoint,
            '--output_dir', str(tmp_path), *opts(**data, **RUN)]
    Grounding.main(Grounding.parser().parse_args(argv))
    with open(tmp_path / 'metrics.json') as f:
        metrics = json.load(f)
    for split in ('val_d', 'testA_d', 'testB_d'):
        assert metrics['accuracy'][split] >= metrics['random_proposal'][split] + MARGIN, (split, metrics)
