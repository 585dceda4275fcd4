"""Grad-CAM maps of tests/fixtures/parity/grounding.pt (official Grounding.val, both modes) reproduced from its
state dict and inputs; scale-aware comparison as the reference README asks (values range from 1e-8 to 1e-4)."""
import pytest
import torch
import torch.nn.functional as F

from evaluation.grounding import cross_attention_of, gradcam_itc, gradcam_itm
from tests.parity_utils import build_model, load_reference, text_input

REF = load_reference('grounding')
INP, OUT = REF['inputs'], REF['outputs']


def assert_scaled_close(actual, expected, name):
    """Compare after dividing by the reference maximum (rtol 1e-4); exact zeros (clamped) must stay zero."""
    scale = expected.abs().max()
    assert torch.allclose(actual / scale, expected / scale, rtol=1e-4, atol=1e-6), \
        f'{name}: max rel |d| = {((actual - expected).abs().max() / scale):.3g}'
    assert torch.equal(actual == 0, expected == 0), f'{name}: zero pattern differs'


def text():
    return text_input(INP['input_ids'], INP['attention_mask'])


def test_itm_gradcam_block_8_matches_official():
    model = build_model('grounding', REF).eval()
    attn = cross_attention_of(model, INP['block_num_itm'])
    captured = {}
    original = attn.save_attn_gradients

    def keep(grad):  # also keep the raw map and gradient to compare them
        captured['map'], captured['grad'] = attn.attention_map.detach(), grad.detach()
        original(grad)
    attn.save_attn_gradients = keep
    token_maps = gradcam_itm(model, INP['image'], text(), INP['block_num_itm'])
    assert token_maps.shape == (4, INP['input_ids'].shape[1], INP['grid'], INP['grid'])
    assert_scaled_close(token_maps.mean(1), OUT['gradcam_itm'], 'gradcam_itm')
    assert_scaled_close(captured['map'], OUT['itm_attention_map'], 'itm_attention_map')
    assert_scaled_close(captured['grad'], OUT['itm_attention_grad'], 'itm_attention_grad')
    assert not attn.save_attention  # switched off again
    assert all(p.grad is None for p in model.parameters())


def test_itm_logits_of_the_gradcam_forward():
    model = build_model('grounding', REF).eval()
    with torch.no_grad():
        img = model.visual_encoder(INP['image'])
        out = model.text_encoder(INP['input_ids'], attention_mask=INP['attention_mask'], encoder_hidden_states=img,
                                 encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long))
        assert torch.allclose(model.itm_head(out.last_hidden_state[:, 0]), OUT['itm_logits'], atol=1e-5)


def test_itc_gradcam_last_vit_block_matches_official():
    model = build_model('grounding', REF).eval()
    block = INP['block_num_itc']
    attn = model.visual_encoder.blocks[block].attn
    captured = {}
    original = attn.save_attn_gradients

    def keep(grad):
        captured['map'], captured['grad'] = attn.attention_map.detach(), grad.detach()
        original(grad)
    attn.save_attn_gradients = keep
    cam = gradcam_itc(model, INP['image'], text(), block)
    assert_scaled_close(cam, OUT['gradcam_itc'], 'gradcam_itc')
    assert_scaled_close(captured['map'], OUT['itc_attention_map'], 'itc_attention_map')
    assert_scaled_close(captured['grad'], OUT['itc_attention_grad'], 'itc_attention_grad')
    with torch.no_grad():
        img = F.normalize(model.vision_proj(model.visual_encoder(INP['image'])[:, 0]), dim=-1)
        txt = model.text_encoder(INP['input_ids'], attention_mask=INP['attention_mask'], mode='text').last_hidden_state
        sim = img @ F.normalize(model.text_proj(txt[:, 0]), dim=-1).t() / model.temp
    assert torch.allclose(sim, OUT['itc_sim'], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('mode,block', [('itm', 5), ('itm', 12), ('itc', 2)])
def test_invalid_blocks_are_refused_with_a_hint(mode, block):
    model = build_model('grounding', REF).eval()
    with pytest.raises(ValueError, match='block_num'):
        (gradcam_itm if mode == 'itm' else gradcam_itc)(model, INP['image'], text(), block)
