"""The retrieval model and evaluation reproduce tests/fixtures/parity/retrieval.pt and the retrieval/grounding
entries of conversions.pt (official toy sizes, fp32, CPU); full-size keys equal tests/fixtures/keys/retrieval.json."""
import contextlib
import io
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

from evaluation.rerank import extract_features, rerank_fast, rerank_reference
from evaluation.retrieval import itm_eval
from models import losses
from models.checkpoint import load_retrieval_checkpoint
from models.model_retrieval import ALBEF
from models.xbert import set_attention_impl
from tests.parity_utils import FIXTURES, StubTokenizer, assert_close, build_model, load_reference, model_config, \
    text_input

REF = load_reference('retrieval')
INP, OUT = REF['inputs'], REF['outputs']


def ones_for(embeds):
    return torch.ones(embeds.shape[:-1], dtype=torch.long)


@pytest.mark.parametrize('attention', ['sdpa', 'explicit'])
def test_encoders_fusion_and_itm_head(attention):
    m = build_model('retrieval', REF).eval()
    set_attention_impl(m, attention)
    ids, mask = INP['input_ids'], INP['attention_mask']
    with torch.no_grad():
        img = m.visual_encoder(INP['image'])
        assert_close(img, OUT['image_embeds'], name='image_embeds')
        assert_close(F.normalize(m.vision_proj(img[:, 0]), dim=-1), OUT['image_feat'], name='image_feat')
        te = m.text_encoder(ids, attention_mask=mask, return_dict=True, mode='text').last_hidden_state
        assert_close(te, OUT['text_embeds'], name='text_embeds')
        assert_close(F.normalize(m.text_proj(te[:, 0]), dim=-1), OUT['text_feat'], name='text_feat')
        fu = m.text_encoder(encoder_embeds=te, attention_mask=mask, encoder_hidden_states=img,
                            encoder_attention_mask=ones_for(img), return_dict=True, mode='fusion').last_hidden_state
        assert_close(fu, OUT['fusion'], name='fusion')
        assert_close(m.itm_head(fu[:, 0]), OUT['itm_logits'], name='itm_logits')


class Recorder:
    """Wraps loss functions used inside the forward to capture their inputs/outputs."""

    def __init__(self, monkeypatch):
        self.calls = {}
        for name in ('itc_loss', 'idx_targets', 'distill_targets', 'negative_weights', 'sample_negatives', 'itm_loss'):
            self._wrap(monkeypatch, name)

    def _wrap(self, monkeypatch, name):
        fn = getattr(losses, name)

        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls.setdefault(name, []).append((args, out))
            return out
        monkeypatch.setattr(losses, name, wrapper)


def test_full_forward_with_duplicate_ids_matches_official(monkeypatch):
    rec = Recorder(monkeypatch)
    m = build_model('retrieval', REF, no_dropout=True).train()
    torch.manual_seed(INP['seed_full_forward'])
    loss_ita, loss_itm = m(INP['image'], text_input(INP['input_ids'], INP['attention_mask']), alpha=INP['alpha'],
                           idx=INP['idx'])

    (sim_i2t, sim_t2i, t_i2t, t_t2i), _ = rec.calls['itc_loss'][0]
    assert_close(sim_i2t, OUT['itc_sim_i2t'], name='sim_i2t')
    assert_close(sim_t2i, OUT['itc_sim_t2i'], name='sim_t2i')
    assert_close(rec.calls['idx_targets'][0][1], OUT['itc_sim_targets'], name='sim_targets')
    assert_close(rec.calls['distill_targets'][0][0][0], OUT['itc_sim_i2t_m'], name='sim_i2t_m')
    assert_close(rec.calls['distill_targets'][1][0][0], OUT['itc_sim_t2i_m'], name='sim_t2i_m')
    assert_close(t_i2t, OUT['itc_sim_i2t_targets'], name='targets_i2t')
    assert_close(t_t2i, OUT['itc_sim_t2i_targets'], name='targets_t2i')
    assert_close(loss_ita, OUT['loss_ita'], name='loss_ita')
    assert_close(rec.calls['negative_weights'][0][1], OUT['itm_neg_weights_i2t'], name='w_i2t')
    assert_close(rec.calls['negative_weights'][1][1], OUT['itm_neg_weights_t2i'], name='w_t2i')
    # same torch CPU RNG draws in the official order -> the official negatives bit for bit
    assert_close(rec.calls['sample_negatives'][0][1], OUT['seeded_itm_neg_image_idx'], name='neg_image')
    assert_close(rec.calls['sample_negatives'][1][1], OUT['seeded_itm_neg_text_idx'], name='neg_text')
    assert_close(rec.calls['itm_loss'][0][0][0], OUT['seeded_itm_logits'], name='itm_logits')
    assert_close(loss_itm, OUT['seeded_loss_itm'], name='loss_itm')
    for name in ('image_queue', 'text_queue', 'idx_queue', 'queue_ptr'):
        assert_close(getattr(m, name), OUT[f'post_{name}'], name=name)


def test_without_distill_targets_are_the_idx_targets(monkeypatch):
    rec = Recorder(monkeypatch)
    m = build_model('retrieval', REF, no_dropout=True, distill=False).train()
    with torch.no_grad():
        m.temp.fill_(0.7)  # outside the pretraining clamp range [0.001, 0.5]: fine-tuning never clamps
    m(INP['image'], text_input(INP['input_ids'], INP['attention_mask']), alpha=INP['alpha'], idx=INP['idx'])
    (_, _, t_i2t, t_t2i), _ = rec.calls['itc_loss'][0]
    assert_close(t_i2t, OUT['itc_sim_targets'])
    assert_close(t_t2i, OUT['itc_sim_targets'])
    assert 'distill_targets' not in rec.calls
    assert m.temp.item() == pytest.approx(0.7)


class EvalTokenizer(StubTokenizer):
    """Returns the stored evaluation ids for captions named '0'..'9' (what the official stub tokenizer gave)."""

    def __call__(self, texts, **kwargs):
        assert kwargs['padding'] == 'max_length' and kwargs['max_length'] == 30 and kwargs['truncation']
        rows = [int(t) for t in texts]
        return types.SimpleNamespace(input_ids=INP['eval_input_ids'][rows],
                                     attention_mask=INP['eval_attention_mask'][rows])


def eval_features(model):
    images, bs = INP['eval_images'], INP['eval_image_batch_size']
    loader = [(images[i:i + bs], torch.arange(i, min(i + bs, len(images)))) for i in range(0, len(images), bs)]
    texts = [str(i) for i in range(INP['eval_input_ids'].shape[0])]
    return extract_features(model, loader, texts, EvalTokenizer(), 'cpu')


@pytest.mark.parametrize('reranker', ['reference', 'fast'])
def test_evaluation_score_matrices_and_metrics(reranker):
    m = build_model('retrieval', REF).eval()
    feats = eval_features(m)
    sims = feats.image_embeds @ feats.text_embeds.t()
    assert_close(sims, OUT['eval_sims_matrix'], name='sims')
    if reranker == 'reference':
        i2t, t2i = rerank_reference(m, feats, sims, INP['k_test'])
    else:
        i2t, t2i = rerank_fast(m, feats, sims, INP['k_test'], pair_batch=4)  # several chunks on 5 images
    assert_close(i2t, OUT['score_matrix_i2t'], name='score_matrix_i2t')
    assert_close(t2i, OUT['score_matrix_t2i'], name='score_matrix_t2i')
    metrics = itm_eval(i2t.numpy(), t2i.numpy(), INP['eval_txt2img'], INP['eval_img2txt'])
    assert metrics == OUT['itm_eval']


def test_itm_plus_itc_rule_adds_the_similarity_on_candidates_only():
    m = build_model('retrieval', REF).eval()
    feats = eval_features(m)
    sims = feats.image_embeds @ feats.text_embeds.t()
    for rerank in (rerank_reference, rerank_fast):
        i2t, t2i = rerank(m, feats, sims, INP['k_test'], score='itm+itc')
        cand = OUT['score_matrix_i2t'] != -100
        assert_close(i2t[cand], OUT['score_matrix_i2t'][cand] + sims[cand])
        assert torch.all(i2t[~cand] == -100)
        cand = OUT['score_matrix_t2i'] != -100
        assert_close(t2i[cand], OUT['score_matrix_t2i'][cand] + sims.t()[cand])


@pytest.mark.parametrize('kind', ['retrieval', 'grounding'])
def test_conversion_from_pretrain_checkpoint_matches_official(kind, tmp_path):
    conv = load_reference('conversions')
    result = conv['outputs']['results'][kind]
    cfg = model_config(conv['config']['configs'][kind])
    model = ALBEF(config=cfg, text_encoder=None, tokenizer=StubTokenizer())
    path = str(tmp_path / 'pretrain.pth')
    torch.save(conv['inputs']['pretrain_checkpoint'], path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        missing, unexpected, dropped = load_retrieval_checkpoint(model, path)
    assert set(missing) == set(result['missing_keys'])
    assert set(unexpected) == set(result['unexpected_keys'])
    assert dropped == []
    printed = out.getvalue().replace(path, '<checkpoint>').splitlines()
    assert printed[:3] == result['printed'].splitlines()
    sd = model.state_dict()
    assert list(sd) == result['state_dict_keys']
    assert {k: list(v.shape) for k, v in sd.items()} == {k: list(v) for k, v in result['state_dict_shapes'].items()}
    for key, expected in result['state_dict'].items():
        if key.endswith('pos_embed'):
            assert torch.allclose(sd[key], expected, atol=1e-6), key
        else:
            assert torch.equal(sd[key], expected), key


def full_size_config():
    from engine.config import load_config
    return load_config(os.path.join(os.path.dirname(os.path.dirname(FIXTURES)), 'configs', 'Retrieval_coco.yaml'))


def test_full_size_keys_equal_official_on_meta_device():
    expected = json.load(open(os.path.join(FIXTURES, 'keys', 'retrieval.json')))
    with torch.device('meta'):
        model = ALBEF(config=full_size_config(), text_encoder=None, tokenizer=StubTokenizer())
        inference = ALBEF(config=full_size_config(), text_encoder=None, tokenizer=StubTokenizer(), with_momentum=False)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(expected['keys'])
    assert ours == expected['keys']
    online = {k: v for k, v in expected['keys'].items() if not k.split('.')[0].endswith('_m')
              and k not in ('image_queue', 'text_queue', 'idx_queue', 'queue_ptr')}
    assert len(online) == 415
    assert {k: list(v.shape) for k, v in inference.state_dict().items()} == online
    unique = {id(p): p.numel() for p in model.parameters()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 209_560_835 and sum(unique.values()) == 419_120_131  # the official parameter counts
