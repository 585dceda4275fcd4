"""VLMo parity: our models.vlmo reproduces the official implementation's tensors (tests/fixtures/parity_vlmo, copied
from ../shared/reference/parity_vlmo; how each was computed is in its README) to the README's tolerances."""
import copy
import os

import pytest
import torch

from models.vlmo import VLMo, irtr_recall

FIX = os.path.join(os.path.dirname(__file__), 'fixtures', 'parity_vlmo')
INDEX_KEYS = ('relative_position_index', 'text_relative_position_index', 'text_imag_relative_position_index')
HEADS_CREATED_AFTER_LOAD = ('vqa_classifier.', 'nlvr2_classifier.')


def load(kind):
    return torch.load(os.path.join(FIX, f'{kind}.pt'), weights_only=True)


def our_config(ref_cfg):
    cfg = copy.deepcopy(ref_cfg)
    cfg.pop('official_config', None)
    return cfg


def build(ref, state_dict=True, cfg=None):
    cfg = our_config(cfg if cfg is not None else ref['config'])
    model = VLMo(config=cfg, task=cfg['task'])
    if state_dict:
        model.load_state_dict(ref['state_dict'], strict=True)
    return model


def close(actual, expected, rtol=1e-5, atol=1e-5):
    actual = torch.as_tensor(actual).detach()
    if expected.is_floating_point():
        actual = actual.to(expected.dtype).reshape(expected.shape)
        assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual - expected).abs().max().item()
    else:
        assert torch.equal(actual.long().reshape(expected.shape), expected.long())


def grad_close(actual, expected):
    close(actual, expected, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope='module')
def pre():
    return load('pretrain')


def test_index_maps(pre):
    m = build(pre, state_dict=False)
    for k in INDEX_KEYS:
        close(getattr(m, k), pre['outputs'][k])


def test_pretrain_encoders(pre):
    i, o = pre['inputs'], pre['outputs']
    m = build(pre).eval()
    with torch.no_grad():
        r = m.infer_image(i['image'])
        close(r['image_feats'], o['image_feats']); close(r['cls_feats'], o['image_cls_feats'])
        close(r['cls_vlffn_feats'], o['image_cls_vlffn_feats']); close(r['vlffn_feats'], o['image_vlffn_feats'])
        close(torch.stack(r['hidden_states']), o['image_hidden_states'])
        close(torch.stack(r['vlffn_hidden_states']), o['image_vlffn_hidden_states'])
        r = m.infer_text(i['text_ids'], i['text_masks'])
        close(r['text_feats'], o['text_feats']); close(r['cls_feats'], o['text_cls_feats'])
        close(r['cls_vlffn_feats'], o['text_cls_vlffn_feats']); close(r['vlffn_feats'], o['text_vlffn_feats'])
        close(torch.stack(r['hidden_states']), o['text_hidden_states'])
        r = m.infer(i['text_ids'], i['text_masks'], i['image'])
        close(r['text_feats'], o['fused_text_feats']); close(r['image_feats'], o['fused_image_feats'])
        close(r['cls_feats'], o['fused_cls_feats']); close(torch.stack(r['hidden_states']), o['fused_hidden_states'])
        close(m.itm_score(r['cls_feats']), o['itm_logits_pos'])
        r = m.compute_mlm(i['image'], i['text_ids_mlm'], i['text_masks'], i['text_labels_mlm'])
        close(r['mlm_logits'], o['mlm_logits']); close(r['mlm_loss'], o['mlm_loss'])


def test_pretrain_itc_itm(pre):
    i, o = pre['inputs'], pre['outputs']
    m = build(pre).train()
    r = m.compute_itc(i['image'], i['text_ids'], i['text_masks'])
    for k in ('itc_i2t_logits', 'itc_t2i_logits', 'itc_vl_i2t_logits', 'itc_vl_t2i_logits', 'itc_main_loss',
              'itc_vl_loss', 'itc_loss'):
        close(r[k], o[k])
    s = m.compute_itm(i['image'], i['text_ids'], i['text_masks'], o['itc_i2t_logits'], o['itc_t2i_logits'],
                      neg_image_idx=o['seeded_itm_neg_image_idx'], neg_text_idx=o['seeded_itm_neg_text_idx'])
    close(s['itm_weights_t2i'], o['itm_weights_t2i']); close(s['itm_weights_i2t'], o['itm_weights_i2t'])
    close(s['itm_labels'], o['itm_labels'])
    close(s['itm_logits'], o['seeded_itm_logits']); close(s['itm_loss'], o['seeded_itm_loss'])
    params = dict(m.named_parameters())
    names = [k[len('itc_grad_'):] for k in o if k.startswith('itc_grad_')]
    assert names
    for n, g in zip(names, torch.autograd.grad(r['itc_loss'], [params[n] for n in names])):
        grad_close(g, o[f'itc_grad_{n}'])


def test_pretrain_seeded_forward(pre):
    i, o = pre['inputs'], pre['outputs']
    m = build(pre).train()
    torch.manual_seed(i['seed_full_forward'])
    r = m.pretrain_losses(i['image'], i['text_ids'], i['text_masks'], i['text_ids_mlm'], i['text_labels_mlm'])
    close(r['itm_neg_image_idx'], o['seeded_itm_neg_image_idx']); close(r['itm_neg_text_idx'], o['seeded_itm_neg_text_idx'])
    close(r['itm_loss'], o['seeded_itm_loss']); close(r['mlm_loss'], o['seeded_mlm_loss_in_forward'])
    close(r['itc_loss'], o['itc_loss']); close(r['loss'], o['seeded_total_loss'])
    r['loss'].backward()
    params = dict(m.named_parameters())
    names = [k for k in o if k.startswith('seeded_grad_')]
    assert len(names) >= 5
    for k in names:
        grad_close(params[k[len('seeded_grad_'):]].grad, o[k])


def test_textmlm():
    ref = load('textmlm')
    i, o = ref['inputs'], ref['outputs']
    m = build(ref)
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == sorted(o['trainable_parameter_names'])
    assert m.transformer.vlffn_start_layer_index == o['vlffn_start_layer_index']
    m.eval()
    close(m.text_relative_position_index, o['text_relative_position_index'])
    with torch.no_grad():
        r = m.infer_text(i['text_ids'], i['text_masks'])
        close(r['text_feats'], o['text_feats']); close(torch.stack(r['hidden_states']), o['text_hidden_states'])
        r = m.compute_textmlm(i['text_ids_mlm'], i['text_masks'], i['text_labels_mlm'])
        close(r['mlm_logits'], o['mlm_logits']); close(r['mlm_loss'], o['textmlm_loss'])


def test_retrieval():
    ref = load('retrieval')
    i, o = ref['inputs'], ref['outputs']
    m = build(ref).eval()
    with torch.no_grad():
        r = m.infer_image(i['image']); close(r['image_feats'], o['image_feats']); close(r['cls_feats'], o['image_cls_feats'])
        assert r['cls_vlffn_feats'] is None
        r = m.infer_text(i['text_ids'], i['text_masks']); close(r['text_feats'], o['text_feats'])
        close(r['cls_feats'], o['text_cls_feats'])
        fi = m.infer_image(i['eval_images'])['cls_feats']
        ft = m.infer_text(i['eval_text_ids'], i['eval_text_masks'])['cls_feats']
        close(fi, o['eval_image_cls_feats']); close(ft, o['eval_text_cls_feats']); close(fi @ ft.t(), o['eval_scores'])
    rec = irtr_recall(o['eval_scores'], i['eval_iids'], i['eval_tiids'])
    assert set(rec) == set(o['recall'])
    for k, v in o['recall'].items():
        assert abs(float(rec[k]) - float(v)) <= 1e-6, k
    m.train()
    r = m.compute_irtr(i['image'], i['text_ids'], i['text_masks'])
    close(r['irtr_i2t_logits'], o['irtr_i2t_logits']); close(r['irtr_t2i_logits'], o['irtr_t2i_logits'])
    close(r['irtr_loss'], o['irtr_loss'])
    r['irtr_loss'].backward()
    grad_close(m.logit_scale.grad, o['irtr_grad_logit_scale'])


def test_vqa():
    ref = load('vqa')
    i, o = ref['inputs'], ref['outputs']
    from models.losses import vlmo_vqa_targets
    close(vlmo_vqa_targets(i['vqa_labels'], i['vqa_scores'], o['vqa_targets'].shape[1]), o['vqa_targets'])
    m = build(ref).eval()
    with torch.no_grad():
        r = m.infer(i['text_ids'], i['text_masks'], i['image'])
        close(r['text_feats'], o['fused_text_feats']); close(r['image_feats'], o['fused_image_feats'])
        close(r['cls_feats'], o['cls_feats'])
    m.train()
    r = m.compute_vqa(i['image'], i['text_ids'], i['text_masks'], o['vqa_targets'])
    close(r['vqa_logits'], o['vqa_logits']); close(r['vqa_loss'], o['vqa_loss'])
    close(r['vqa_logits'].argmax(-1), o['vqa_preds'])
    r['vqa_loss'].backward()
    grad_close(m.vqa_classifier[3].bias.grad, o['vqa_grad_classifier_last_bias'])


def test_nlvr():
    ref = load('nlvr')
    i, o = ref['inputs'], ref['outputs']
    m = build(ref).eval()
    with torch.no_grad():
        for k, img in ((1, i['image0']), (2, i['image1'])):
            r = m.infer(i['text_ids'], i['text_masks'], img, image_token_type_idx=k)
            close(r['text_feats'], o[f'pass{k}_text_feats']); close(r['image_feats'], o[f'pass{k}_image_feats'])
            close(r['cls_feats'], o[f'pass{k}_cls_feats'])
    m.train()
    r = m.compute_nlvr2(i['image0'], i['image1'], i['text_ids'], i['text_masks'], i['labels'])
    close(r['nlvr2_logits'], o['nlvr2_logits']); close(r['nlvr2_loss'], o['nlvr2_loss'])


def _with_index(sd, idx):
    out = {}
    for k, v in sd.items():
        out[k] = v
        if k == 'relative_position_bias_table':
            out.update(idx)
    return out


def _conversion_inputs():
    ref = load('conversions')
    i = ref['inputs']
    pre = _with_index(ref['state_dict'], i['pretrain_checkpoint_index_tensors'])
    stage2 = _with_index(load('textmlm')['state_dict'], i['stage2_checkpoint_index_tensors'])
    return ref, {'beit_to_textmlm': (i['beit_checkpoint'], i['beit_checkpoint']['model']),
                 'textmlm_to_pretrain': (stage2, stage2),
                 'pretrain_to_retrieval': (pre, pre), 'pretrain_to_vqa': (pre, pre), 'pretrain_to_nlvr': (pre, pre),
                 'deepspeed_pretrain_to_pretrain': ({'module': {'module.' + k: v for k, v in pre.items()}}, pre),
                 'baseplus_pretrain_to_retrieval': (i['baseplus_pretrain_checkpoint'],
                                                    i['baseplus_pretrain_checkpoint'])}


@pytest.mark.parametrize('name', ['beit_to_textmlm', 'textmlm_to_pretrain', 'pretrain_to_retrieval', 'pretrain_to_vqa',
                                  'pretrain_to_nlvr', 'deepspeed_pretrain_to_pretrain', 'baseplus_pretrain_to_retrieval'])
def test_conversions(name):
    ref, inputs = _conversion_inputs()
    ckpt, flat = inputs[name]
    r = ref['outputs']['results'][name]
    m = build(ref, state_dict=False, cfg=ref['config']['configs'][name])
    missing, unexpected = m.load_pretrained(copy.deepcopy(ckpt))
    strip = lambda ks: sorted(k for k in ks if not k.startswith(HEADS_CREATED_AFTER_LOAD))  # noqa: E731
    assert strip(missing) == strip(r['missing_keys'])
    assert sorted(unexpected) == sorted(r['unexpected_keys'])
    sd = m.state_dict()
    assert sorted(sd) == sorted(r['state_dict_keys'])
    for k, v in r['changed'].items():
        close(sd[k], v, rtol=1e-5, atol=1e-6)
    assert [k for k, s in r['source_key_of'].items() if not torch.equal(sd[k], flat[s])] == []


def test_fine_tuning_from_a_checkpoint_without_index_tensors():
    """The official loader raises KeyError here; ours tolerates the absence (crash fix)."""
    ref = load('conversions')
    m = build(ref, state_dict=False, cfg=ref['config']['configs']['pretrain_to_retrieval'])
    missing, unexpected = m.load_pretrained(dict(ref['state_dict']))
    assert missing == [] and len(unexpected) == 11
