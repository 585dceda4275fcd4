"""Checkpoint conversions pretrain -> TA and TA -> NLVR2 against conversions.pt, both momentum-init orders, and
the full-size state-dict keys / parameter counts of the TA, NLVR2 and SNLI-VE models (built on the meta device)."""
import importlib
import json
import os

import pytest
import torch
from ruamel.yaml import YAML

from models.checkpoint import convert_pretrain_to_ta, convert_ta_to_nlvr, load_nlvr_checkpoint, load_ta_checkpoint
from tests.parity_utils import FIXTURES, MODULES, StubTokenizer, load_reference, model_config

CONV = load_reference('conversions')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_fresh(kind, ref_config, seed=0):
    """A task model built from a reference config (random init, nothing loaded)."""
    torch.manual_seed(seed)
    module = importlib.import_module(MODULES[kind])
    return module.ALBEF(config=model_config(ref_config), text_encoder=None, tokenizer=StubTokenizer())


def check_conversion(model, missing, unexpected, ref):
    """Missing/unexpected sets, resulting key order and shapes, and every converted tensor equal the official."""
    assert sorted(missing) == sorted(ref['missing_keys'])
    assert sorted(unexpected) == sorted(ref['unexpected_keys'])
    sd = model.state_dict()
    assert list(sd) == list(ref['state_dict_keys'])
    assert {k: list(v.shape) for k, v in sd.items()} == {k: list(v) for k, v in ref['state_dict_shapes'].items()}
    for key, expected in ref['state_dict'].items():
        if key.endswith('pos_embed'):
            assert torch.allclose(sd[key], expected, atol=1e-6), key
        else:
            assert torch.equal(sd[key], expected), key


def test_pretrain_to_ta_conversion_matches_official(capsys):
    ref = CONV['outputs']['results']['nlvr_ta']
    model = build_fresh('nlvr_ta', CONV['config']['configs']['nlvr_ta'])
    sd = convert_pretrain_to_ta(CONV['inputs']['pretrain_checkpoint']['model'], model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    check_conversion(model, missing, unexpected, ref)
    assert 'reshape position embedding' not in capsys.readouterr().out  # same resolution: no resize
    # layer N >= 6 of the pretrained encoder feeds both layers of its pair
    src = CONV['inputs']['pretrain_checkpoint']['model']
    for n in range(6, 12):
        expected = src[f'text_encoder.bert.encoder.layer.{n}.crossattention.self.query.weight']
        for target in (2 * (n - 6) + 6, 2 * (n - 6) + 7):
            assert torch.equal(model.text_encoder.encoder.layer[target].crossattention.self.query.weight, expected)


def test_ta_to_nlvr_conversion_matches_official_with_momentum_copied_before_load(capsys):
    ref = CONV['outputs']['results']['nlvr']
    # seed 1: with seed 0 the toy ViT init equals the pretrained one the TA file carries
    model = build_fresh('nlvr', CONV['config']['configs']['nlvr'], seed=1)
    initial_vit = model.visual_encoder.patch_embed.proj.weight.detach().clone()
    sd = convert_ta_to_nlvr(CONV['inputs']['ta_checkpoint']['model'], model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    check_conversion(model, missing, unexpected, ref)
    assert capsys.readouterr().out.count('reshape position embedding from 4 to 9') == 1
    # official quirk: the momentum ViT is still the random construction-time ViT
    assert torch.equal(model.visual_encoder_m.patch_embed.proj.weight, initial_vit)
    assert not torch.equal(model.visual_encoder.patch_embed.proj.weight, initial_vit)


@pytest.mark.parametrize('momentum_init', ['before_load', 'after_load'])
def test_nlvr_loader_momentum_init_flag(tmp_path, momentum_init):
    path = tmp_path / 'ta.pth'
    torch.save(CONV['inputs']['ta_checkpoint'], path)
    model = build_fresh('nlvr', CONV['config']['configs']['nlvr'])
    initial = model.text_encoder_m.encoder.layer[0].attention.self.query.weight.detach().clone()
    missing, unexpected = load_nlvr_checkpoint(model, str(path), momentum_init)
    assert len(missing) == 452 and len(unexpected) == 7
    online = model.text_encoder.encoder.layer[0].attention.self.query.weight
    momentum = model.text_encoder_m.encoder.layer[0].attention.self.query.weight
    if momentum_init == 'before_load':
        assert torch.equal(momentum, initial) and not torch.equal(momentum, online)
    else:
        assert torch.equal(momentum, online)
        assert all(torch.equal(p, p_m) for p, p_m in model._pair_params())


def test_nlvr_loader_accepts_a_pretraining_file_via_the_ta_rule(tmp_path):
    path = tmp_path / 'pretrain.pth'
    torch.save(CONV['inputs']['pretrain_checkpoint'], path)
    model = build_fresh('nlvr', CONV['config']['configs']['nlvr'])
    missing, _ = load_nlvr_checkpoint(model, str(path))
    assert not [k for k in missing if not (k.startswith('cls_head') or '_m.' in k)]
    ta = build_fresh('nlvr_ta', CONV['config']['configs']['nlvr_ta'])
    missing, unexpected = load_ta_checkpoint(ta, str(path))
    assert sorted(missing) == ['ta_head.bias', 'ta_head.weight'] and len(unexpected) == 467


# ---- full-size layouts -----------------------------------------------------------------------------------------
FULL = [('pretrain_nlvr', 'configs/NLVR_pretrain.yaml', 'models.model_pretrain_nlvr', 571, 258_939_396, None),
        ('nlvr', 'configs/NLVR.yaml', 'models.model_nlvr', 1136, 259_381_250, 518_762_500),
        ('ve', 'configs/VE.yaml', 'models.model_ve', 824, 209_758_467, 419_516_934)]


@pytest.mark.parametrize('name,config_path,module,num_keys,trainable,total', FULL)
def test_full_size_keys_shapes_and_parameter_counts(name, config_path, module, num_keys, trainable, total):
    with open(os.path.join(REPO, config_path)) as f:
        config = YAML(typ='safe').load(f)
    config['bert_config'] = os.path.join(REPO, config['bert_config'])
    with torch.device('meta'):
        model = importlib.import_module(module).ALBEF(config=config, text_encoder=None, tokenizer=None)
    with open(os.path.join(FIXTURES, 'keys', f'{name}.json')) as f:
        official = json.load(f)['keys']
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(official) and ours == {k: list(v) for k, v in official.items()}
    assert len(ours) == num_keys
    params = list(model.parameters())  # shared K/V counted once
    assert sum(p.numel() for p in params if p.requires_grad) == trainable
    if total:
        assert sum(p.numel() for p in params) == total
