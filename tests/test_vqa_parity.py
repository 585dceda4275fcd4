"""Every output of the official VQA model in tests/fixtures/parity/vqa.pt, reproduced from its state dict and
inputs (official toy sizes, fp32, CPU), plus the model's structure (decoder config, tying, momentum pairs)."""
import pytest
import torch

from models import losses
from models.model_vqa import repeat_rows
from models.xbert import set_attention_impl
from tests.parity_utils import assert_close, build_model, load_reference, text_input

REF = load_reference('vqa')
INP, OUT = REF['inputs'], REF['outputs']


def ones_for(embeds):
    return torch.ones(embeds.shape[:-1], dtype=torch.long)


def question():
    return text_input(INP['question_input_ids'], INP['question_attention_mask'])


def answers():
    return text_input(INP['answer_input_ids'], INP['answer_attention_mask'])


def answer_list():
    return text_input(INP['answer_list_ids'], INP['answer_list_attention_mask'])


@pytest.fixture(scope='module', params=['sdpa', 'explicit'])
def eval_model(request):
    m = build_model('vqa', REF).eval()
    set_attention_impl(m, request.param)
    return m


def test_structure_matches_reference():
    m = build_model('vqa', REF)
    dec = m.text_decoder.config
    assert (dec.num_hidden_layers, dec.fusion_layer) == (6, 0)
    assert all(layer.has_cross_attention for layer in m.text_decoder.bert.encoder.layer)
    for prefix in ('text_decoder', 'text_decoder_m'):
        wrapper = getattr(m, prefix)
        assert wrapper.cls.predictions.decoder.weight is wrapper.bert.embeddings.word_embeddings.weight
        assert wrapper.cls.predictions.decoder.bias is wrapper.cls.predictions.bias
    assert list(m.state_dict()) == list(REF['state_dict'])
    assert all(not p.requires_grad for n, p in m.named_parameters() if n.split('.')[0].endswith('_m'))


def test_encoders_and_decoder_outputs(eval_model):
    m, k = eval_model, INP['k']
    with torch.no_grad():
        img = m.visual_encoder(INP['image'])
        assert_close(img, OUT['image_embeds'], name='image_embeds')
        qs = m.text_encoder(INP['question_input_ids'], attention_mask=INP['question_attention_mask'],
                            encoder_hidden_states=img, encoder_attention_mask=ones_for(img),
                            return_dict=True).last_hidden_state
        assert_close(qs, OUT['question_states'], name='question_states')
        assert_close(m.encode_question(INP['image'], question(), m.visual_encoder, m.text_encoder),
                     OUT['question_states'], name='encode_question')
        kw = dict(attention_mask=INP['answer_attention_mask'], encoder_hidden_states=repeat_rows(qs, k),
                  encoder_attention_mask=repeat_rows(INP['question_attention_mask'], k))
        logits = m.text_decoder(INP['answer_input_ids'], return_logits=True, **kw)
        assert_close(logits, OUT['answer_logits'], name='answer_logits')
        labels = m.answer_targets(INP['answer_input_ids'])
        loss = m.text_decoder(INP['answer_input_ids'], labels=labels, return_dict=True, reduction='none', **kw).loss
        assert_close(loss, OUT['answer_loss_per_answer'], name='answer_loss_per_answer')
        start = INP['answer_list_ids'][0, 0].repeat(qs.size(0), 1)
        start_logits = m.text_decoder(start, encoder_hidden_states=qs,
                                      encoder_attention_mask=INP['question_attention_mask'],
                                      return_dict=True, reduction='none').logits[:, 0, :]
        assert_close(start_logits, OUT['rank_start_logits'], name='rank_start_logits')


def test_rank_answer(eval_model):
    m = eval_model
    with torch.no_grad():
        ids, probs = m.rank_answer(OUT['question_states'], INP['question_attention_mask'], INP['answer_list_ids'],
                                   INP['answer_list_attention_mask'], k=INP['k_test'])
        assert_close(ids, OUT['rank_topk_ids'], name='rank_topk_ids')
        assert_close(probs, OUT['rank_topk_probs'], name='rank_topk_probs')
        ids2, probs2 = m(INP['image'], question(), answer_list(), train=False, k=INP['k_test'])
        assert_close(ids2, OUT['rank_topk_ids'], name='forward ids')
        assert_close(probs2, OUT['rank_topk_probs'], name='forward probs')
        assert torch.all(probs[:, :-1] >= probs[:, 1:])


def test_rank_answer_first_token_once_flag():
    """The opt-in flag drops the duplicated first-token term: scores equal the sequence log-probabilities."""
    m = build_model('vqa', REF, vqa_first_token_once=True).eval()
    with torch.no_grad():
        ids, probs = m.rank_answer(OUT['question_states'], INP['question_attention_mask'], INP['answer_list_ids'],
                                   INP['answer_list_attention_mask'], k=8)
        qs = OUT['question_states']
        nll = m.text_decoder(INP['answer_list_ids'].repeat(4, 1),
                             attention_mask=INP['answer_list_attention_mask'].repeat(4, 1),
                             encoder_hidden_states=repeat_rows(qs, [8] * 4),
                             encoder_attention_mask=repeat_rows(INP['question_attention_mask'], [8] * 4),
                             labels=m.answer_targets(INP['answer_list_ids'].repeat(4, 1)), reduction='none').loss
    expected = torch.softmax(-nll.view(4, 8), dim=1)
    assert_close(probs, expected.gather(1, ids), rtol=1e-5, atol=1e-6, name='first-token-once probs')


def test_train_loss_with_distillation():
    m = build_model('vqa', REF).eval()
    loss = m(INP['image'], question(), answers(), alpha=INP['alpha'], k=INP['k'], weights=INP['weights'], train=True)
    assert_close(loss, OUT['train_loss'], name='train_loss')
    loss.backward()
    assert m.text_decoder.cls.predictions.bias.grad is not None
    assert m.visual_encoder.cls_token.grad is not None


def test_train_loss_without_alpha_is_plain_weighted_nll():
    """vqa_decoder_distill off (pre-2022-07 official): soft labels get weight 0, so the loss is the weighted NLL."""
    m = build_model('vqa', REF, vqa_decoder_distill='off').eval()
    loss = m(INP['image'], question(), answers(), alpha=INP['alpha'], k=INP['k'], weights=INP['weights'], train=True)
    expected = losses.vqa_loss(OUT['answer_loss_per_answer'], INP['weights'], 4)
    assert_close(loss.detach(), expected, name='loss without decoder distillation')


def test_train_without_distill_has_no_momentum_modules():
    m = build_model_no_distill()
    assert not any(name.endswith('_m') for name, _ in m.named_children())
    loss = m(INP['image'], question(), answers(), alpha=INP['alpha'], k=INP['k'], weights=INP['weights'], train=True)
    expected = losses.vqa_loss(OUT['answer_loss_per_answer'], INP['weights'], 4)
    assert_close(loss.detach(), expected, name='loss without distill')


def build_model_no_distill():
    from tests.parity_utils import model_config, StubTokenizer
    from models.model_vqa import ALBEF
    cfg = model_config(REF['config'])
    cfg['distill'] = False
    m = ALBEF(config=cfg, tokenizer=StubTokenizer())
    online = {k: v for k, v in REF['state_dict'].items() if '_m.' not in k}
    m.load_state_dict(online, strict=True)
    return m.eval()
