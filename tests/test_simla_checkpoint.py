"""SIMLA checkpoint rules (models/simla/checkpoint.py): the release scripts' loading blocks on a toy pretraining
checkpoint and the converted TA checkpoint (tests/fixtures/parity_simla/conversions.pt) give the same missing /
unexpected key sets and the same loaded tensors; ALBEF <-> SIMLA mix-ups are refused with a message naming both."""
import os

import pytest
import torch

from models import checkpoint as ckpt
from models.simla import checkpoint as sck

REF = os.path.join(os.path.dirname(__file__), 'fixtures', 'parity_simla', 'conversions.pt')
SHARED = dict(fusion_layer=0, shared_text_fusion=True, use_token_type_embeddings=False)
PAIR = dict(num_hidden_layers=18, fusion_layer=0, use_token_type_embeddings=True)
RULES = {  # result name: (model module, loader, source checkpoint, bert overrides)
    'pretrain': ('pretrain', sck.load_pretrain, 'pretrain_checkpoint', SHARED),
    'retrieval': ('retrieval', sck.load_retrieval, 'pretrain_checkpoint', SHARED),
    'grounding': ('retrieval', sck.load_retrieval, 'pretrain_checkpoint', SHARED),
    'vqa': ('vqa', sck.load_vqa, 'pretrain_checkpoint', SHARED),
    've': ('ve', sck.load_ve, 'pretrain_checkpoint', SHARED),
    'nlvr_ta': ('pretrain_nlvr', sck.load_ta, 'pretrain_checkpoint', PAIR),
    'nlvr': ('nlvr', sck.load_nlvr, 'ta_checkpoint', PAIR),
}


@pytest.fixture(scope='module')
def ref():
    return torch.load(REF, weights_only=True)


class Tok:
    vocab_size, pad_token_id, unk_token_id, cls_token_id, sep_token_id, mask_token_id = 1000, 0, 100, 101, 102, 103


def build(ref, name):
    module, _, _, bert = RULES[name]
    cfg = dict(ref['config']['configs'][name])
    vit = cfg.pop('vit')
    cfg['vit'] = {k: vit[k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'qkv_bias')}
    cfg['vit_mask_token'] = bool(vit.get('mask_token'))
    cfg['bert_config'] = dict(cfg.pop('bert_json'), **bert)
    cfg.setdefault('mim', {'vocab_size': cfg.get('mim_vocab_size', 8192)})
    cls = __import__(f'models.simla.{module}', fromlist=['SIMLA']).SIMLA
    torch.manual_seed(0)
    return cls(config=cfg, text_encoder=None, tokenizer=Tok())


@pytest.mark.parametrize('name', sorted(RULES))
def test_release_outcomes(ref, name, tmp_path):
    expected = ref['outputs']['results'][name]
    _, loader, source, _ = RULES[name]
    model = build(ref, name)
    path = tmp_path / 'checkpoint.pth'
    torch.save(ref['inputs'][source], path)
    result = loader(model, str(path), {})
    missing, unexpected = result[0], result[1]
    assert set(missing) == set(expected['missing_keys'])
    assert set(unexpected) == set(expected['unexpected_keys'])
    sd = model.state_dict()
    assert list(sd) == list(expected['state_dict_keys'])
    for key, value in expected['state_dict'].items():
        if key.endswith('pos_embed'):
            assert torch.allclose(sd[key], value, atol=1e-6), key
        else:
            assert torch.equal(sd[key], value), key


def test_albef_and_simla_checkpoints_are_refused_by_the_other_family(ref, tmp_path):
    simla_sd = ref['inputs']['pretrain_checkpoint']['model']
    assert sck.checkpoint_family(simla_sd) == 'simla'
    albef_sd = {k.replace('encoder.layer.0.crossattention', 'encoder.layer.0.attention'): v
                for k, v in simla_sd.items() if not k.startswith(('mim_head', 'concept_head'))}
    assert sck.checkpoint_family(albef_sd) == 'albef'
    path = tmp_path / 'albef.pth'
    torch.save({'model': albef_sd}, path)
    load = sck.refusing('simla', sck.load_retrieval)
    with pytest.raises(ckpt.CheckpointError, match=r'ALBEF checkpoint.*model is SIMLA'):
        load(None, str(path), {})
    path = tmp_path / 'simla.pth'
    torch.save({'model': simla_sd}, path)
    with pytest.raises(ckpt.CheckpointError, match=r'SIMLA checkpoint.*model is ALBEF'):
        sck.refusing('albef', lambda *a: None)(None, str(path), {})
