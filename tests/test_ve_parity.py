"""The official SNLI-VE model outputs (tests/fixtures/parity/ve.pt) and its pretrain -> VE conversion
(conversions.pt['ve']), reproduced from the reference state dicts."""
import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import convert_pretrain_to_ve, load_ve_checkpoint
from models.xbert import set_attention_impl
from tests.parity_utils import assert_close, build_model, load_reference, text_input
from tests.test_nlvr_conversions import CONV, build_fresh, check_conversion

VE = load_reference('ve')


@pytest.mark.parametrize('attention', ['sdpa', 'explicit'])
def test_ve_deterministic_outputs(attention):
    inp, out = VE['inputs'], VE['outputs']
    m = build_model('ve', VE).eval()
    set_attention_impl(m, attention)
    text = text_input(inp['input_ids'], inp['attention_mask'])
    with torch.no_grad():
        img = m.visual_encoder(inp['image'])
        assert_close(img, out['image_embeds'], name='image_embeds')
        mm = m.text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=img,
                            encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long)).last_hidden_state
        assert_close(mm, out['multimodal'], name='multimodal')
        logits = m(inp['image'], text, inp['targets'], train=False)
        assert_close(logits, out['logits'], name='logits')
        assert_close(F.cross_entropy(logits, inp['targets']), out['ce_loss'], name='ce_loss')


def test_ve_distillation_loss():
    inp, out = VE['inputs'], VE['outputs']
    m = build_model('ve', VE).eval()
    loss = m(inp['image'], text_input(inp['input_ids'], inp['attention_mask']), inp['targets'], alpha=inp['alpha'])
    assert_close(loss, out['loss_distill'], name='loss_distill')


def test_ve_without_distill_has_no_momentum_and_plain_ce():
    inp, out = VE['inputs'], VE['outputs']
    m = build_model('ve', VE)  # reference weights, then a no-distill model loading the online half
    plain = build_fresh('ve', dict(VE['config'], distill=False))
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    assert not missing and unexpected and all('_m.' in k for k in unexpected)
    plain.eval()
    loss = plain(inp['image'], text_input(inp['input_ids'], inp['attention_mask']), inp['targets'], alpha=0.4)
    assert_close(loss, out['ce_loss'], name='ce_loss')


def test_pretrain_to_ve_conversion_matches_official(capsys):
    ref = CONV['outputs']['results']['ve']
    model = build_fresh('ve', CONV['config']['configs']['ve'])
    sd = convert_pretrain_to_ve(CONV['inputs']['pretrain_checkpoint']['model'], model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    check_conversion(model, missing, unexpected, ref)
    assert capsys.readouterr().out.count('reshape position embedding from 4 to 9') == 2
    # cls_head_m starts equal to the random cls_head (copy_params ran at construction)
    assert torch.equal(model.cls_head_m[0].weight, model.cls_head[0].weight)


def test_ve_loader_detects_pretrain_and_fine_tuned_files(tmp_path):
    src = tmp_path / 'pretrain.pth'
    torch.save(CONV['inputs']['pretrain_checkpoint'], src)
    model = build_fresh('ve', CONV['config']['configs']['ve'])
    missing, unexpected = load_ve_checkpoint(model, str(src))
    assert len(missing) == 8 and len(unexpected) == 28
    # a fine-tuned file (raw, online weights only) loads with nothing unexpected; momentum copied from it
    online = {k: v for k, v in model.state_dict().items() if '_m.' not in k}
    raw = tmp_path / 've_raw.pth'
    torch.save(online, raw)
    again = build_fresh('ve', CONV['config']['configs']['ve'])
    missing, unexpected = load_ve_checkpoint(again, str(raw))
    assert not unexpected and all('_m.' in k for k in missing)
    assert torch.equal(again.text_encoder_m.embeddings.word_embeddings.weight,
                       model.text_encoder.embeddings.word_embeddings.weight)
