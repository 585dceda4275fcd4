"""Every output of the official pretraining model in tests/fixtures/parity/pretrain.pt, reproduced from its
state dict and inputs (official toy sizes, fp32, CPU)."""
import pytest
import torch
import torch.nn.functional as F

from models import losses
from models.xbert import set_attention_impl
from tests.parity_utils import assert_close, build_model, load_reference, text_input

REF = load_reference('pretrain')
INP, OUT = REF['inputs'], REF['outputs']


def ones_for(embeds):
    return torch.ones(embeds.shape[:-1], dtype=torch.long)


@pytest.mark.parametrize('attention', ['sdpa', 'explicit'])
def test_deterministic_encoders_and_heads(attention):
    m = build_model('pretrain', REF).eval()
    set_attention_impl(m, attention)
    ids, mask = INP['input_ids'], INP['attention_mask']
    with torch.no_grad():
        img = m.visual_encoder(INP['image'])
        assert_close(img, OUT['image_embeds'], name='image_embeds')
        assert_close(F.normalize(m.vision_proj(img[:, 0]), dim=-1), OUT['image_feat'], name='image_feat')
        te = m.text_encoder.bert(ids, attention_mask=mask, return_dict=True, mode='text').last_hidden_state
        assert_close(te, OUT['text_embeds'], name='text_embeds')
        assert_close(F.normalize(m.text_proj(te[:, 0]), dim=-1), OUT['text_feat'], name='text_feat')
        fu = m.text_encoder.bert(encoder_embeds=te, attention_mask=mask, encoder_hidden_states=img,
                                 encoder_attention_mask=ones_for(img), return_dict=True, mode='fusion').last_hidden_state
        assert_close(fu, OUT['fusion'], name='fusion')
        mm = m.text_encoder.bert(ids, attention_mask=mask, encoder_hidden_states=img,
                                 encoder_attention_mask=ones_for(img), return_dict=True, mode='multi_modal')
        assert_close(mm.last_hidden_state, OUT['multimodal'], name='multimodal')
        assert_close(m.itm_head(fu[:, 0]), OUT['itm_logits'], name='itm_logits')
        kw = dict(attention_mask=mask, encoder_hidden_states=img, encoder_attention_mask=ones_for(img), return_dict=True)
        assert_close(m.text_encoder(INP['mlm_input_ids'], return_logits=True, **kw), OUT['mlm_logits'], name='mlm_logits')
        assert_close(m.text_encoder(INP['mlm_input_ids'], labels=INP['mlm_labels'], **kw).loss, OUT['mlm_loss'])
        soft = F.softmax(INP['mlm_soft_logits'], dim=-1)
        loss = m.text_encoder(INP['mlm_input_ids'], labels=INP['mlm_labels'], soft_labels=soft, alpha=INP['alpha'], **kw).loss
        assert_close(loss, OUT['mlm_loss_distill'], name='mlm_loss_distill')


class Recorder:
    """Wraps loss functions used inside the forward to capture their inputs/outputs."""

    def __init__(self, monkeypatch):
        self.calls = {}
        for name in ('itc_loss', 'negative_weights', 'sample_negatives', 'itm_loss', 'mask_tokens', 'distill_targets'):
            self._wrap(monkeypatch, name)

    def _wrap(self, monkeypatch, name):
        fn = getattr(losses, name)

        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls.setdefault(name, []).append((args, out))
            return out
        monkeypatch.setattr(losses, name, wrapper)


def seeded_forward(model, seed):
    torch.manual_seed(seed)
    return model(INP['image'], text_input(INP['input_ids'], INP['attention_mask']), alpha=INP['alpha'])


def test_full_forward_matches_official(monkeypatch):
    rec = Recorder(monkeypatch)
    m = build_model('pretrain', REF, no_dropout=True).train()
    loss_mlm, loss_ita, loss_itm = seeded_forward(m, INP['seed_full_forward'])

    (sim_i2t, sim_t2i, t_i2t, t_t2i), _ = rec.calls['itc_loss'][0]
    assert_close(sim_i2t, OUT['itc_sim_i2t'], name='sim_i2t')
    assert_close(sim_t2i, OUT['itc_sim_t2i'], name='sim_t2i')
    assert_close(t_i2t, OUT['itc_sim_i2t_targets'], name='targets_i2t')
    assert_close(t_t2i, OUT['itc_sim_t2i_targets'], name='targets_t2i')
    (sim_i2t_m, *_), _ = rec.calls['distill_targets'][0]
    (sim_t2i_m, *_), _ = rec.calls['distill_targets'][1]
    assert_close(sim_i2t_m, OUT['itc_sim_i2t_m'], name='sim_i2t_m')
    assert_close(sim_t2i_m, OUT['itc_sim_t2i_m'], name='sim_t2i_m')
    assert_close(loss_ita, OUT['loss_ita'], name='loss_ita')
    assert_close(rec.calls['negative_weights'][0][1], OUT['itm_neg_weights_i2t'], name='w_i2t')
    assert_close(rec.calls['negative_weights'][1][1], OUT['itm_neg_weights_t2i'], name='w_t2i')

    # torch CPU RNG draws in the official order give the official samples bit for bit
    assert_close(rec.calls['sample_negatives'][0][1], OUT['seeded_itm_neg_image_idx'], name='neg_image')
    assert_close(rec.calls['sample_negatives'][1][1], OUT['seeded_itm_neg_text_idx'], name='neg_text')
    (itm_logits, _), _ = rec.calls['itm_loss'][0]
    assert_close(itm_logits, OUT['seeded_itm_logits'], name='itm_logits')
    assert_close(loss_itm, OUT['seeded_loss_itm'], name='loss_itm')
    mlm_ids, mlm_labels = rec.calls['mask_tokens'][0][1]
    assert_close(mlm_ids, OUT['seeded_mlm_input_ids'], name='mlm_ids')
    assert_close(mlm_labels, OUT['seeded_mlm_labels'], name='mlm_labels')
    assert_close(loss_mlm, OUT['seeded_loss_mlm'], name='loss_mlm')

    itc_grads = torch.autograd.grad(loss_ita, [m.temp, m.vision_proj.weight], retain_graph=True)
    assert_close(itc_grads[0], OUT['itc_grad_temp'], name='itc_grad_temp')
    assert_close(itc_grads[1], OUT['itc_grad_vision_proj_weight'], name='itc_grad_vision_proj')
    (loss_mlm + loss_ita + loss_itm).backward()
    assert_close(m.temp.grad, OUT['seeded_grad_temp'], name='grad_temp')
    assert_close(m.vision_proj.weight.grad, OUT['seeded_grad_vision_proj_weight'], name='grad_vision_proj')

    assert_close(m.image_queue, OUT['post_image_queue'], name='image_queue')
    assert_close(m.text_queue, OUT['post_text_queue'], name='text_queue')
    assert_close(m.queue_ptr, OUT['post_queue_ptr'], name='queue_ptr')
    assert_close(m.temp, OUT['post_temp'], name='temp')
    sd = m.state_dict()
    for key in [k for k in OUT if k.startswith('post_') and '.' in k]:
        name = key[len('post_'):]
        if name.endswith('[:5]'):
            assert_close(sd[name[:-4]][:5], OUT[key], name=key)
        else:
            assert_close(sd[name], OUT[key], name=key)


def test_second_step_after_sgd_matches_official():
    m = build_model('pretrain', REF, no_dropout=True).train()
    _, loss_ita, _ = seeded_forward(m, INP['seed_full_forward'])
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_ita, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.add_(g, alpha=-INP['step2_sgd_lr'])
    rows = OUT['step2_word_rows']
    assert_close(m.visual_encoder.cls_token, OUT['step2_online_visual_encoder.cls_token'], atol=1e-4)
    assert_close(m.vision_proj.weight, OUT['step2_online_vision_proj.weight'], atol=1e-4)
    assert_close(m.temp, OUT['step2_online_temp'], atol=1e-4)
    assert_close(m.text_encoder.bert.embeddings.word_embeddings.weight[rows],
                 OUT['step2_online_text_encoder.bert.embeddings.word_embeddings.weight[rows]'], atol=1e-4)

    loss_mlm, loss_ita2, loss_itm = seeded_forward(m, INP['seed_step2_forward'])
    assert_close(loss_ita2, OUT['step2_loss_ita'], atol=1e-4, name='step2_loss_ita')
    assert_close(loss_mlm, OUT['step2_seeded_loss_mlm'], atol=1e-4, name='step2_loss_mlm')
    assert_close(loss_itm, OUT['step2_seeded_loss_itm'], atol=1e-4, name='step2_loss_itm')
    assert_close(m.temp, OUT['step2_temp'], atol=1e-4)
    assert_close(m.queue_ptr, OUT['step2_post_queue_ptr'])
    assert_close(m.image_queue, OUT['step2_post_image_queue'], atol=1e-4)
    assert_close(m.text_queue, OUT['step2_post_text_queue'], atol=1e-4)
    sd = m.state_dict()
    for key in [k for k in OUT if k.startswith('step2_post_') and '.' in k]:
        name = key[len('step2_post_'):]
        if name.endswith('[:5]'):
            assert_close(sd[name[:-4]][:5], OUT[key], atol=1e-4, name=key)
        elif name.endswith('[rows]'):
            assert_close(sd[name[:-6]][rows], OUT[key], atol=1e-4, name=key)
        else:
            assert_close(sd[name], OUT[key], atol=1e-4, name=key)


def test_decoder_is_tied_to_word_embeddings():
    m = build_model('pretrain', REF)
    for enc in (m.text_encoder, m.text_encoder_m):
        assert enc.cls.predictions.decoder.weight is enc.bert.embeddings.word_embeddings.weight
        assert enc.cls.predictions.decoder.bias is enc.cls.predictions.bias
    sd = m.state_dict()
    assert 'text_encoder.cls.predictions.decoder.weight' in sd and 'text_encoder.cls.predictions.decoder.bias' in sd
    before = m.text_encoder.bert.embeddings.word_embeddings.weight.detach().clone()
    opt = torch.optim.SGD(m.text_encoder.parameters(), lr=0.1)
    m.text_encoder.cls.predictions.decoder.weight.sum().backward()
    opt.step()
    after = m.text_encoder.bert.embeddings.word_embeddings.weight
    assert not torch.equal(before, after)
    assert torch.equal(after, m.text_encoder.cls.predictions.decoder.weight)
