"""Helpers shared by the parity tests: load a reference file from tests/fixtures and build our model from it."""
import copy
import importlib
import os
import types

import torch
import torch.nn as nn

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
MODULES = {'pretrain': 'models.model_pretrain', 'retrieval': 'models.model_retrieval', 'vqa': 'models.model_vqa',
           'nlvr': 'models.model_nlvr', 've': 'models.model_ve', 'nlvr_ta': 'models.model_pretrain_nlvr',
           'grounding': 'models.model_retrieval'}


class StubTokenizer:
    """The special ids the official toy models were built with (vocabulary size comes from the BERT config)."""
    pad_token_id, unk_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 100, 101, 102, 103


def load_reference(name):
    """A parity reference dict from tests/fixtures/parity (copied from ../shared/reference/parity)."""
    return torch.load(os.path.join(FIXTURES, 'parity', f'{name}.pt'), weights_only=True)


def text_input(ids, mask):
    """The tokenised-text object the models take (`.input_ids`, `.attention_mask`)."""
    return types.SimpleNamespace(input_ids=ids, attention_mask=mask)


def model_config(ref_config, no_dropout=False):
    """Our config dict (vit section, inline bert_config) for a reference file's config."""
    skip = {'vit', 'bert', 'bert_json', 'shared_parameter_groups', 'share_cross_attention_layer_pairs'}
    cfg = {k: copy.deepcopy(v) for k, v in ref_config.items() if k not in skip}
    vit = ref_config['vit']
    cfg['vit'] = {k: vit[k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'qkv_bias')}
    cfg['bert_config'] = dict(ref_config.get('bert_json') or ref_config['bert'])
    if no_dropout:
        cfg['bert_config']['hidden_dropout_prob'] = 0.0
        cfg['bert_config']['attention_probs_dropout_prob'] = 0.0
    return cfg


def build_model(kind, ref, no_dropout=False, **config_overrides):
    """Build the task model from the reference config and load the reference state dict strictly."""
    cfg = model_config(ref['config'], no_dropout)
    cfg.update(config_overrides)
    extra = {'init_deit': False} if kind == 'pretrain' else {}
    model = importlib.import_module(MODULES[kind]).ALBEF(config=cfg, text_encoder=None, tokenizer=StubTokenizer(),
                                                        **extra)
    model.load_state_dict(ref['state_dict'], strict=True)
    if no_dropout:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    return model


def assert_close(actual, expected, rtol=1e-5, atol=1e-5, name=''):
    """allclose for floats, exact equality for integers, with a useful message."""
    actual = torch.as_tensor(actual).detach().reshape(expected.shape)
    if expected.is_floating_point():
        diff = (actual.to(expected.dtype) - expected).abs().max().item() if expected.numel() else 0.0
        assert torch.allclose(actual.to(expected.dtype), expected, rtol=rtol, atol=atol), f'{name}: max|d|={diff:.3g}'
    else:
        assert torch.equal(actual.to(expected.dtype), expected), f'{name}: {actual} != {expected}'
