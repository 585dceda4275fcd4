"""VLMo retrieval through Retrieval.py: the dual-encoder step and scores (models/vlmo_retrieval.py), the official
recall read by the script's itm_eval and the supplement's re-rank mode (the CLI: tests/test_vlmo_scripts.py)."""
import os
import types

import numpy as np
import pytest
import torch

from evaluation.retrieval import itm_eval
from models import registry
from models import vlmo_retrieval as vr
from models.tokenization import build_tokenizer
from models.vlmo import VLMo, irtr_recall

ARCH = {'patch_size': 8, 'embed_dim': 32, 'depth': 2, 'num_heads': 2, 'mlp_ratio': 2, 'vlffn_start_layer_index': 1,
        'drop_path_rate': 0.0}


def tiny(task='retrieval', **extra):
    torch.manual_seed(0)
    cfg = {'model': 'vlmo', 'task': task, 'image_res': 16, 'max_text_len': 8, 'max_text_len_of_initckpt': 8,
           'vlmo': ARCH, **extra}
    return VLMo(config=cfg, task=task), cfg


class FakeLoader(list):
    """(image, index) batches with a dataset carrying the caption list, like a re_eval loader."""

    def __init__(self, images, texts, batch=3):
        super().__init__((images[i:i + batch], torch.arange(i, min(i + batch, len(images))))
                         for i in range(0, len(images), batch))
        self.dataset = types.SimpleNamespace(text=texts)


def test_dual_encoder_scores_are_the_dot_products_of_the_unimodal_features():
    model, cfg = tiny()
    tokenizer = build_tokenizer('none')
    images = torch.randn(5, 3, 16, 16)
    texts = ['a red circle', 'two blue squares left of a green star', 'x', 'a big yellow triangle', 'red', 'blue']
    i2t, t2i = vr.dual_encoder_scores(model, FakeLoader(images, texts), tokenizer, 'cpu', {'batch_size_test': 4})
    assert i2t.shape == (5, 6) and np.array_equal(t2i, i2t.T)
    tok = tokenizer(texts, padding='longest', truncation=True, max_length=8, return_tensors='pt')
    ids, mask = model.fixed_length(tok)
    assert (ids == model.sep_id).sum(1).eq(1).all()  # [CLS] ... [SEP] padded to max_text_len
    with torch.no_grad():
        expected = model.infer_image(images)['cls_feats'] @ model.infer_text(ids, mask)['cls_feats'].t()
    assert np.allclose(i2t, expected.numpy(), atol=1e-6)
    assert model.training  # restored


def test_recall_of_the_script_equals_the_official_dual_encoder_recall():
    """itm_eval over the dual scores (what Retrieval.py reports) = the official compute_irtr_recall, ×100."""
    g = torch.Generator().manual_seed(1)
    n_img, per = 7, 3
    scores = torch.randn(n_img, n_img * per, generator=g)
    scores[:, 4] = scores[:, 5]  # a tie does not change either
    txt2img = {t: t // per for t in range(n_img * per)}
    img2txt = {i: list(range(i * per, (i + 1) * per)) for i in range(n_img)}
    ours = itm_eval(scores.numpy(), scores.t().numpy(), txt2img, img2txt)
    official = irtr_recall(scores, torch.arange(n_img), torch.tensor([txt2img[t] for t in range(n_img * per)]))
    for k in (1, 5, 10):
        assert ours[f'txt_r{k}'] == pytest.approx(100 * official[f'tr_r{k}'])
        assert ours[f'img_r{k}'] == pytest.approx(100 * official[f'ir_r{k}'])


def test_retrieval_step_is_the_itc_loss_of_compute_irtr_and_trains_the_towers():
    model, _ = tiny()
    tokenizer = build_tokenizer('none')
    image = torch.randn(4, 3, 16, 16)
    text = tokenizer(['a red circle', 'a blue star', 'green', 'two squares'], padding='longest', return_tensors='pt')
    out = vr.make_retrieval_step({}, 'cpu')(model, (image, text, torch.tensor([0, 0, 1, 2])), 0.0)
    ids, mask = model.fixed_length(text)
    assert torch.allclose(out['loss_itc'], model.compute_irtr(image, ids, mask)['irtr_loss'])
    out['loss_itc'].backward()
    for name in ('transformer.patch_embed.proj.weight', 'text_embeddings.word_embeddings.weight',
                 'itc_image_proj.fc.weight', 'logit_scale'):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_an_unknown_retrieval_mode_is_refused_naming_the_modes():
    with pytest.raises(ValueError, match='dual, dual_rerank'):
        vr.make_retrieval_step({'retrieval': {'mode': 'rerank'}}, 'cpu')
    with pytest.raises(ValueError, match='dual, dual_rerank'):
        tiny(retrieval={'mode': 'rerank'})


class PictureSet(types.SimpleNamespace):
    """A re_eval dataset: captions in `text`, dataset[i] = (image i, i)."""

    def __getitem__(self, i):
        return self.images[i], i


def rerank_loader(images, texts, batch=3):
    loader = FakeLoader(images, texts, batch)
    loader.dataset = PictureSet(text=texts, images=images)
    return loader


def test_the_rerank_mode_keeps_the_itm_head_and_only_then():
    dual, _ = tiny()
    rerank, _ = tiny(retrieval={'mode': 'dual_rerank'})
    extra = set(rerank.state_dict()) - set(dual.state_dict())
    assert extra == {'itm_score.fc.weight', 'itm_score.fc.bias'}
    assert not set(dual.state_dict()) - set(rerank.state_dict())
    # a stage-3 (pretraining) state dict gives the re-ranking model its ITM head; the dual model drops it as before
    pre, _ = tiny('pretrain')
    missing, unexpected = rerank.load_pretrained({'model': pre.state_dict()})
    assert not any(k.startswith('itm_score') for k in missing + unexpected), (missing, unexpected)
    assert torch.equal(rerank.itm_score.fc.weight, pre.itm_score.fc.weight)
    missing, unexpected = dual.load_pretrained({'model': pre.state_dict()})
    assert {'itm_score.fc.weight', 'itm_score.fc.bias'} <= set(unexpected)


def test_rerank_scores_follow_the_supplement_protocol():
    """Top-k_test of every row and column by dual score; candidates get itm_score[:, 1] + dual score, the rest
    -100 + dual score (VLMo.md 14.1 item 5), the ITM logit of a fused pass over that pair."""
    model, _ = tiny(retrieval={'mode': 'dual_rerank'})
    tokenizer = build_tokenizer('none')
    g = torch.Generator().manual_seed(2)
    images = torch.randn(5, 3, 16, 16, generator=g)
    texts = ['a red circle', 'two blue squares left of a green star', 'x', 'a big yellow triangle', 'red', 'blue']
    config = {'batch_size_test': 4, 'k_test': 2, 'retrieval': {'mode': 'dual_rerank'}}
    i2t, t2i = vr.dual_encoder_scores(model, rerank_loader(images, texts), tokenizer, 'cpu', config)
    dual_i2t, _ = vr.dual_encoder_scores(model, FakeLoader(images, texts), tokenizer, 'cpu', {'batch_size_test': 4})
    dual = torch.from_numpy(dual_i2t)
    tok = tokenizer(texts, padding='longest', truncation=True, max_length=8, return_tensors='pt')
    ids, mask = model.fixed_length(tok)
    model.eval()
    with torch.no_grad():
        itm = torch.stack([model.itm_score(model.infer(ids, mask, images[i:i + 1].expand(len(texts), -1, -1, -1))
                                           ['cls_feats'])[:, 1] for i in range(len(images))])
    model.train()
    top_t, top_i = dual.topk(2, dim=1).indices, dual.t().topk(2, dim=1).indices
    for i in range(5):
        for t in range(6):
            assert i2t[i, t] == pytest.approx(float(dual[i, t] + (itm[i, t] if t in top_t[i] else -100)), abs=1e-5)
            assert t2i[t, i] == pytest.approx(float(dual[i, t] + (itm[i, t] if i in top_i[t] else -100)), abs=1e-5)
    # every row's and column's best candidates stay above every non-candidate
    assert (np.sort(i2t, axis=1)[:, -2:] > -50).all() and (np.sort(i2t, axis=1)[:, :-2] < -50).all()
    assert (np.sort(t2i, axis=1)[:, -2:] > -50).all() and (np.sort(t2i, axis=1)[:, :-2] < -50).all()


def test_the_rerank_step_adds_itm_with_hard_negatives_and_trains_its_head():
    model, _ = tiny(retrieval={'mode': 'dual_rerank'}, loss_weights={'itm': 0.5})
    tokenizer = build_tokenizer('none')
    image = torch.randn(4, 3, 16, 16)
    text = tokenizer(['a red circle', 'a blue star', 'green', 'two squares'], padding='longest', return_tensors='pt')
    out = vr.make_retrieval_step({'retrieval': {'mode': 'dual_rerank'}}, 'cpu')(
        model, (image, text, torch.tensor([0, 0, 1, 2])), 0.0)
    assert set(out) == {'loss_itc', 'loss_itm'}
    ids, mask = model.fixed_length(text)
    irtr = model.compute_irtr(image, ids, mask)
    assert torch.allclose(out['loss_itc'], irtr['irtr_loss'])
    # one positive and two hard negatives per pair, weighted by loss_weights.itm; CE of a random head is near ln 2
    assert 0.5 * 0.3 < out['loss_itm'].item() < 0.5 * 1.5
    (out['loss_itc'] + out['loss_itm']).backward()
    for name in ('itm_score.fc.weight', 'transformer.blocks.1.mlp_vl.fc1.weight', 'itc_text_proj.fc.weight'):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_registry_gives_retrieval_scripts_the_vlmo_step_and_scores():
    spec = registry.task_spec({'model': 'vlmo'}, 'retrieval')
    assert spec.make_step is vr.make_retrieval_step and spec.evaluate is vr.dual_encoder_scores
    albef = registry.task_spec({}, 'retrieval')
    assert albef.make_step is None and albef.evaluate is None
