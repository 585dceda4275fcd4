"""configs/simla/*.yaml: each validates (engine/config.py) and builds, at full size on the meta device, the
release's state-dict layout (tests/fixtures/keys/simla_*.json) with SIMLA.md section 1.2's parameter counts."""
import glob
import importlib
import json
import os

import pytest
import torch

from engine import config as engine_config
from models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = os.path.join(ROOT, 'tests', 'fixtures', 'keys')
BUILDS = {  # config: (task, keys file, online trainable, with momentum)
    'Pretrain': ('pretrain', 'pretrain', 238_264_183, 476_526_827),
    'Retrieval_coco': ('retrieval', 'retrieval', 223_742_723, 447_483_907),
    'Grounding': ('grounding', 'retrieval', 223_742_723, 447_483_907),
    'VQA': ('vqa', 'vqa', 304_516_410, 609_032_820),
    'NLVR': ('nlvr', 'nlvr', 273_564_674, 547_129_348),
    'NLVR_pretrain': ('pretrain_nlvr', 'pretrain_nlvr', 273_122_820, 273_122_820),
    'VE': ('ve', 've', 223_940_355, 447_880_710),
}


class Tok:
    vocab_size, pad_token_id, unk_token_id, cls_token_id, sep_token_id, mask_token_id = 30522, 0, 100, 101, 102, 103


def load(name):
    return engine_config.load_config(os.path.join(ROOT, 'configs', 'simla', f'{name}.yaml'))


def test_every_simla_config_validates_and_selects_simla():
    paths = sorted(glob.glob(os.path.join(ROOT, 'configs', 'simla', '*.yaml')))
    assert {os.path.basename(p)[:-5] for p in paths} >= set(BUILDS) | {'Retrieval_flickr'}
    for path in paths:
        config = engine_config.load_config(path)
        assert registry.model_family(config) == 'simla', path
        # only the pretraining model has the mask token (MIM)
        assert config.get('vit_mask_token', False) == os.path.basename(path).startswith('Pretrain'), path


@pytest.mark.parametrize('name', sorted(BUILDS))
def test_full_size_layout_from_the_config(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # bert_config paths are relative to the project root
    task, keys, trainable, total = BUILDS[name]
    config = load(name)
    extra = {'init_deit': False} if task == 'pretrain' else {}
    with torch.device('meta'):
        model = registry.task_spec(config, task).build(config, text_encoder=None, tokenizer=Tok(), **extra)
    with open(os.path.join(KEYS, f'simla_{keys}.json')) as f:
        official = json.load(f)['keys']
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official
    assert list(model.state_dict()) == list(official)
    params = list(model.parameters())
    assert sum(p.numel() for p in params if p.requires_grad) == trainable
    assert sum(p.numel() for p in params) == total


def test_release_behaviour_flags():
    assert load('Pretrain')['mlm_distill_softmax_dim'] == 'seq'
    assert load('Pretrain')['psl']['selection'] == 'head_vote'
    vqa = load('VQA')
    assert vqa['vqa_decoder_distill'] == 'off' and vqa['mlm_distill_softmax_dim'] == 'seq'
    assert load('NLVR')['batch_size'] == 8 and load('NLVR')['bert'] == {'num_hidden_layers': 18, 'fusion_layer': 0}
    assert importlib.import_module('models.simla.retrieval').SIMLA.negative_eps == 0.0


def test_retrieval_reads_select_on_and_records_coco_split(tmp_path):
    """`select_on: test` (the release's Flickr selection) picks the reported epoch by test R-mean; `coco_split` is
    written beside every COCO number in metrics.json (SIMLA.md section 12)."""
    import argparse
    import json
    import Retrieval
    assert Retrieval.select_key_of({}) == 'val_r_mean' == Retrieval.select_key_of(load('Retrieval_flickr'))
    assert Retrieval.select_key_of({'select_on': 'test'}) == 'test_r_mean'
    args = argparse.Namespace(config='c.yaml', checkpoint='', evaluate=True, resume=None, output_dir=str(tmp_path))
    config = load('Retrieval_coco')
    Retrieval.write_metrics(args, config, {'test_r_mean': 1.0}, 0)
    with open(tmp_path / 'metrics.json') as f:
        assert json.load(f)['coco_split'] == 'karpathy'
