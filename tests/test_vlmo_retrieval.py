"""VLMo retrieval through Retrieval.py: the dual-encoder step and scores (models/vlmo_retrieval.py), the official
recall read by the script's itm_eval and the refused re-rank mode (the CLI: tests/test_vlmo_scripts.py)."""
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


def test_the_rerank_mode_is_refused_with_the_reason():
    with pytest.raises(ValueError, match='no ITM head'):
        vr.make_retrieval_step({'retrieval': {'mode': 'dual_rerank'}}, 'cpu')


def test_registry_gives_retrieval_scripts_the_vlmo_step_and_scores():
    spec = registry.task_spec({'model': 'vlmo'}, 'retrieval')
    assert spec.make_step is vr.make_retrieval_step and spec.evaluate is vr.dual_encoder_scores
    albef = registry.task_spec({}, 'retrieval')
    assert albef.make_step is None and albef.evaluate is None
