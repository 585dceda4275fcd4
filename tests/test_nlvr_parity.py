"""Every output of the official NLVR2 and text-assignment models (tests/fixtures/parity/nlvr.pt, nlvr_ta.pt)
reproduced from their state dicts, and the shared cross-attention K/V really being one tensor per pair."""
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import models.model_pretrain_nlvr as model_ta
from models.model_nlvr import shared_kv_layer_pairs
from models.xbert import set_attention_impl
from tests.parity_utils import assert_close, build_model, load_reference, text_input

NLVR = load_reference('nlvr')
TA = load_reference('nlvr_ta')


def ones_for(embeds):
    return torch.ones(embeds.shape[:-1], dtype=torch.long)


def shared_groups(model):
    """State-dict names that are one Parameter, grouped (the reference's shared_parameter_groups)."""
    by_id = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id[id(param)].append(name)
    return sorted(sorted(names) for names in by_id.values() if len(names) > 1)


# ---- NLVR2 ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('attention', ['sdpa', 'explicit'])
def test_nlvr_deterministic_outputs(attention):
    inp, out = NLVR['inputs'], NLVR['outputs']
    m = build_model('nlvr', NLVR).eval()
    set_attention_impl(m, attention)
    images = torch.cat([inp['image0'], inp['image1']], 0)
    text = text_input(inp['input_ids'], inp['attention_mask'])
    B = inp['targets'].shape[0]
    with torch.no_grad():
        img = m.visual_encoder(images)
        assert_close(img, out['image_embeds'], name='image_embeds')
        te = m.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text').last_hidden_state
        assert_close(te, out['text_embeds'], name='text_embeds')
        mm = m.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                            encoder_hidden_states=[img[:B], img[B:]],
                            encoder_attention_mask=[ones_for(img[:B]), ones_for(img[B:])]).last_hidden_state
        assert_close(mm, out['multimodal'], name='multimodal')
        logits = m(images, text, inp['targets'], train=False)
        assert_close(logits, out['logits'], name='logits')
        assert_close(F.cross_entropy(logits, inp['targets']), out['ce_loss'], name='ce_loss')


def test_nlvr_distillation_loss_and_momentum_update():
    inp, out = NLVR['inputs'], NLVR['outputs']
    m = build_model('nlvr', NLVR).eval()
    images = torch.cat([inp['image0'], inp['image1']], 0)
    loss = m(images, text_input(inp['input_ids'], inp['attention_mask']), inp['targets'], alpha=inp['alpha'])
    assert_close(loss, out['loss_distill'], name='loss_distill')
    loss.backward()
    assert m.cls_head[0].weight.grad is not None and m.cls_head_m[0].weight.grad is None
    sd = NLVR['state_dict']
    expected = sd['visual_encoder_m.cls_token'] * 0.995 + sd['visual_encoder.cls_token'] * (1 - 0.995)
    assert_close(m.visual_encoder_m.cls_token, expected, atol=1e-7, name='ema')


def test_nlvr_wrong_image_batch_is_a_clear_error():
    inp = NLVR['inputs']
    m = build_model('nlvr', NLVR).eval()
    with pytest.raises(ValueError, match='torch.cat'):
        m(inp['image0'], text_input(inp['input_ids'], inp['attention_mask']), inp['targets'], train=False)


def test_nlvr_shared_kv_groups_match_official_and_train_as_one():
    m = build_model('nlvr', NLVR)
    assert shared_groups(m) == sorted(sorted(g) for g in NLVR['outputs']['shared_parameter_groups'])
    official_pairs = NLVR['config']['share_cross_attention_layer_pairs']
    assert shared_kv_layer_pairs(m.text_encoder.config) == [tuple(p) for p in official_pairs]
    for enc in (m.text_encoder, m.text_encoder_m):
        for a, b in shared_kv_layer_pairs(enc.config):
            first, second = enc.encoder.layer[a].crossattention.self, enc.encoder.layer[b].crossattention.self
            for name in ('key', 'value'):
                assert getattr(first, name).weight is getattr(second, name).weight
                assert getattr(first, name).bias is getattr(second, name).bias
            assert first.query.weight is not second.query.weight
    sd = m.state_dict()
    assert 'text_encoder.encoder.layer.6.crossattention.self.key.weight' in sd
    assert 'text_encoder.encoder.layer.7.crossattention.self.key.weight' in sd
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    inp = NLVR['inputs']
    m(torch.cat([inp['image0'], inp['image1']]), text_input(inp['input_ids'], inp['attention_mask']),
      inp['targets'], alpha=0.4).backward()
    opt.step()
    sd = m.state_dict()
    key6 = sd['text_encoder.encoder.layer.6.crossattention.self.value.weight']
    assert not torch.equal(key6, NLVR['state_dict']['text_encoder.encoder.layer.6.crossattention.self.value.weight'])
    assert torch.equal(key6, sd['text_encoder.encoder.layer.7.crossattention.self.value.weight'])


# ---- text-assignment pretraining ------------------------------------------------------------------------------
def test_ta_deterministic_outputs():
    inp, out = TA['inputs'], TA['outputs']
    m = build_model('nlvr_ta', TA).eval()
    pairs = inp['pairs']
    with torch.no_grad():
        img = m.visual_encoder(inp['image'])
        assert_close(img, out['image_embeds'], name='image_embeds')
        text = text_input(inp['input_ids'], inp['attention_mask'])
        mm = m.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                            encoder_hidden_states=[img[pairs[:, 0]], img[pairs[:, 1]]],
                            encoder_attention_mask=[ones_for(img)] * 2)
        assert_close(mm.last_hidden_state, out['multimodal'], name='multimodal')
        logits = m.assign_logits(text, img[pairs[:, 0]], img[pairs[:, 1]])
        assert_close(logits, out['ta_logits'], name='ta_logits')
        assert_close(F.cross_entropy(logits, inp['ta_labels']), out['ta_loss'], name='ta_loss')
    assert shared_groups(m) == sorted(sorted(g) for g in TA['config']['shared_parameter_groups'])


def test_ta_seeded_forward_draws_the_official_pairs(monkeypatch):
    inp, out = TA['inputs'], TA['outputs']
    seen = {}
    sample, weights_fn = model_ta.sample_ta_pairs, model_ta.ta_pair_weights

    def record_weights(feat):
        seen['weights'] = weights_fn(feat)
        return seen['weights']

    def record_pairs(weights):
        seen['pairs'] = sample(weights)
        return seen['pairs']
    monkeypatch.setattr(model_ta, 'ta_pair_weights', record_weights)
    monkeypatch.setattr(model_ta, 'sample_ta_pairs', record_pairs)
    recorded = {}
    m = build_model('nlvr_ta', TA, no_dropout=True).train()
    m.ta_head.register_forward_hook(lambda mod, args, result: recorded.setdefault('logits', result))
    torch.manual_seed(inp['seed_full_forward'])
    loss = m(inp['image'], text_input(inp['input_ids'], inp['attention_mask']))
    assert_close(seen['weights'], out['pair_weights'], name='pair_weights')
    first, second, labels = seen['pairs']
    assert_close(torch.stack([first, second], 1), out['seeded_pairs'], name='pairs')
    assert_close(labels, out['seeded_labels'], name='labels')
    assert_close(recorded['logits'], out['seeded_ta_logits'], name='seeded_ta_logits')
    assert_close(loss, out['seeded_loss'], name='seeded_loss')
    loss.backward()
    # vision_proj, text_proj and temp get no gradient (AdamW skips them; DDP needs find_unused_parameters)
    assert m.vision_proj.weight.grad is None and m.text_proj.weight.grad is None and m.temp.grad is None


def test_ta_sampling_semantics_and_robustness():
    torch.manual_seed(0)
    weights = model_ta.ta_pair_weights(F.normalize(torch.randn(6, 8), dim=-1))
    first, second, labels = model_ta.sample_ta_pairs(weights)
    rows = torch.arange(6)
    assert torch.equal(first[labels == 0], rows[labels == 0])
    assert torch.equal(second[labels == 1], rows[labels == 1])
    neither = labels == 2
    assert bool((first[neither] != rows[neither]).all() and (second[neither] != rows[neither]).all())
    assert bool((first != second).all())
    # NaN features (e.g. a bf16 overflow) must not crash the draw
    bad = model_ta.ta_pair_weights(torch.full((4, 8), float('nan')))
    assert torch.isfinite(bad).all() and bool(((bad > 0).sum(1) >= 2).all())
    model_ta.sample_ta_pairs(bad)
    with pytest.raises(ValueError, match='at least 3'):
        model_ta.ta_pair_weights(torch.randn(2, 8))
