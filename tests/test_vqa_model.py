"""Full-size VQA model structure on the meta device: official state-dict keys, order, shapes and parameter counts."""
import json
import os

import pytest
import torch

import engine.config as engine_config
import utils
from models.model_vqa import ALBEF, repeat_rows
from tests.parity_utils import FIXTURES, StubTokenizer


def full_size(distill=True):
    config = engine_config.load_config(os.path.join(utils.REPO_ROOT, 'configs', 'VQA.yaml'), [f'distill={distill}'])
    with torch.device('meta'):
        return ALBEF(config=config, text_encoder=None, text_decoder=None, tokenizer=StubTokenizer())


@pytest.fixture(scope='module')
def model():
    return full_size()


def unique_trainable(module):
    return sum(p.numel() for p in {id(p): p for p in module.parameters() if p.requires_grad}.values())


def test_keys_equal_official(model):
    with open(os.path.join(FIXTURES, 'keys', 'vqa.json')) as f:
        ref = json.load(f)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(ref['keys']) and len(ours) == ref['num_keys'] == 1154
    assert ours == ref['keys']


def test_parameter_counts(model):
    assert unique_trainable(model) == 290_336_058
    assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == 580_672_116
    assert unique_trainable(model.text_decoder) == 81_170_490


def test_no_distill_form_has_577_keys():
    assert len(full_size(distill=False).state_dict()) == 577


def test_repeat_rows_is_consecutive():
    x = torch.arange(3).view(3, 1)
    assert repeat_rows(x, [2, 0, 3]).view(-1).tolist() == [0, 0, 2, 2, 2]
