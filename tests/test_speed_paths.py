"""The `mode: reference | fast` switch and the speed paths that are not covered in test_model_pretrain.py.

Already covered there (not repeated here): SDPA vs explicit attention losses/grads, foreach vs loop EMA update,
gradient checkpointing. Tolerances are fp32 rounding of the tiny parity model (values of order 1-10).
"""
import pytest
import torch

import engine.config as engine_config
import utils
from dataset.collate import TextBatch, pad_to_multiple, static_shape_options
from models.speed import SPEED_MODES, resolve_speed_mode
from optim import param_groups
from tests.parity_utils import build_model, load_reference, text_input

REF = load_reference('pretrain')


def test_mode_presets_and_individual_keys_override():
    assert set(SPEED_MODES) == {'reference', 'fast'}
    assert resolve_speed_mode({}) == resolve_speed_mode({'mode': None}) == SPEED_MODES['reference']
    assert resolve_speed_mode({'mode': 'reference'}) == {'attention': 'explicit', 'ema': 'reference',
                                                         'vectorized_negatives': False, 'fused': False,
                                                         'kv_reuse': False}
    assert resolve_speed_mode({'attention': 'sdpa'})['attention'] == 'sdpa'
    fast = resolve_speed_mode({'mode': 'fast', 'vectorized_negatives': False, 'attention': 'explicit'})
    assert fast == {'attention': 'explicit', 'ema': 'foreach', 'vectorized_negatives': False, 'fused': None,
                    'kv_reuse': True}
    with pytest.raises(ValueError):
        resolve_speed_mode({'mode': 'turbo'})


def test_mode_key_is_registered_and_sets_the_model_switches():
    assert engine_config.load_config('configs/Pretrain_synthetic.yaml', ['mode=fast'])['mode'] == 'fast'
    with pytest.raises(ValueError):
        engine_config.validate_config({'mode': 'turbo'}, 'test')
    fast = build_model('pretrain', REF, mode='fast')
    ref = build_model('pretrain', REF, mode='reference')
    assert (fast.ema_impl, fast.vectorized_negatives) == ('foreach', True)
    assert (ref.ema_impl, ref.vectorized_negatives) == ('reference', False)
    assert fast.text_encoder.bert.encoder.layer[0].attention.self.use_sdpa
    assert not ref.text_encoder.bert.encoder.layer[0].attention.self.use_sdpa


def _forward(model, seed=7):
    torch.manual_seed(seed)
    i = REF['inputs']
    return model(i['image'], text_input(i['input_ids'], i['attention_mask']), alpha=0.4)


def test_fast_and_reference_mode_losses_and_grads_agree():
    # Same row-by-row sampler in both so the RNG streams (and so the ITM negatives and MLM masks) are identical.
    ref = build_model('pretrain', REF, no_dropout=True, mode='reference').train()
    fast = build_model('pretrain', REF, no_dropout=True, mode='fast', vectorized_negatives=False).train()
    for _ in range(2):  # the second step also runs the momentum update on different online/momentum weights
        lr, lf = _forward(ref), _forward(fast)
        for a, b in zip(lr, lf):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)
        sum(lr).backward()
        sum(lf).backward()
        for (name, pa), pb in zip(ref.named_parameters(), fast.parameters()):
            if pa.grad is not None:
                assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-5), name
        with torch.no_grad():
            for pa, pb in zip(ref.parameters(), fast.parameters()):
                if pa.grad is not None:
                    pa.sub_(0.01 * pa.grad)
                    pb.sub_(0.01 * pb.grad)
                    pa.grad = pb.grad = None


def _count_cross_kv_projections(model):
    """Forward-hook counter of the cross-attention key projections of the online text encoder."""
    calls = []
    bert = getattr(model.text_encoder, 'bert', model.text_encoder)
    for layer in bert.encoder.layer:
        if layer.has_cross_attention:
            layer.crossattention.self.key.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize('kind', ['pretrain', 'retrieval'])
def test_kv_reuse_projects_image_keys_once_and_computes_the_same_step(kind):
    """With kv_reuse each fusion layer projects the image K/V once per step (pretraining: instead of for
    the positive, negative and MLM passes; retrieval: positive and negative) with the same losses and gradients."""
    ref = load_reference(kind)
    plain = build_model(kind, ref, no_dropout=True, kv_reuse=False).train()
    shared = build_model(kind, ref, no_dropout=True, kv_reuse=True).train()
    assert (plain.kv_reuse, shared.kv_reuse) == (False, True)
    calls_plain, calls_shared = _count_cross_kv_projections(plain), _count_cross_kv_projections(shared)
    i = ref['inputs']
    n_fusion = sum(layer.has_cross_attention for layer in getattr(plain.text_encoder, 'bert',
                                                                  plain.text_encoder).encoder.layer)
    for _ in range(2):
        outs = []
        for model in (plain, shared):
            torch.manual_seed(7)
            text = text_input(i['input_ids'], i['attention_mask'])
            if kind == 'pretrain':
                outs.append(model(i['image'], text, alpha=0.4))
            else:
                outs.append(model(i['image'], text, alpha=0.4, idx=i['idx']))
        for a, b in zip(*outs):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)
        for out in outs:
            sum(out).backward()
        for (name, pa), pb in zip(plain.named_parameters(), shared.parameters()):
            assert (pa.grad is None) == (pb.grad is None), name
            if pa.grad is not None:
                assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), name
        plain.zero_grad()
        shared.zero_grad()
    passes = 3 if kind == 'pretrain' else 2
    assert len(calls_plain) == 2 * passes * n_fusion and len(calls_shared) == 2 * n_fusion


def test_kv_reuse_is_off_under_compile_and_by_default():
    assert not build_model('pretrain', REF).kv_reuse
    assert not build_model('pretrain', REF, mode='reference').kv_reuse
    assert build_model('pretrain', REF, mode='fast').kv_reuse


def test_fast_mode_with_vectorized_draws_keeps_itc():
    # The vectorized multinomial is only guaranteed to be distributionally equal (on CUDA it uses another RNG
    # stream; on CPU, torch 2.14 happens to draw the same indices), so only ITC (computed before any draw) is held
    # equal here; ITM and MLM are compared in the test above with the row-by-row sampler.
    ref = build_model('pretrain', REF, no_dropout=True, mode='reference').train()
    fast = build_model('pretrain', REF, no_dropout=True, mode='fast').train()
    _, ita_r, itm_r = _forward(ref)
    _, ita_f, itm_f = _forward(fast)
    assert torch.allclose(ita_r, ita_f, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(itm_f)


def test_foreach_adamw_step_equals_for_loop():
    # Fused AdamW runs only on CUDA; on CPU the multi-tensor (foreach) kernel is checked against the per-parameter
    # loop, over the official two weight-decay groups.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin.load_state_dict(net.state_dict())
    opts = [torch.optim.AdamW(param_groups(m, 0.02), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=f)
            for m, f in ((net, False), (twin, True))]
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, opt in zip((net, twin), opts):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_fixed_length_padding_keeps_text_and_fusion_outputs_on_real_tokens():
    # Longest padding (12) vs fixed length 25: the extra PAD keys are masked, so the text encoder, the ITC features
    # and the multimodal CLS must not change (MLM masks are drawn per shape and are not compared).
    model = build_model('pretrain', REF, no_dropout=True).eval()
    i = REF['inputs']
    short = TextBatch(i['input_ids'], i['attention_mask'])
    long = pad_to_multiple(short, 25)
    assert long.input_ids.shape[1] == 25
    with torch.no_grad():
        image_embeds, _ = model.encode_image(i['image'], model.visual_encoder, model.vision_proj)
        outs = []
        for batch in (short, long):
            embeds, feat = model.encode_text(batch, model.text_encoder, model.text_proj)
            cls = model.fuse(embeds, batch.attention_mask, image_embeds)
            outs.append((embeds[:, :12] * batch.attention_mask[:, :12, None], feat, cls))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_compile_wraps_only_the_encoder_layers_and_keeps_state_dict_keys():
    plain = build_model('pretrain', REF)
    compiled = build_model('pretrain', REF, compile=True)
    layers = [m for m in compiled.modules() if getattr(m, '_compiled_call_impl', None) is not None]
    per_copy = len(plain.visual_encoder.blocks) + len(plain.text_encoder.bert.encoder.layer)
    assert len(layers) == 2 * per_copy  # every ViT block and BERT layer of the online and momentum copies
    assert compiled._compiled_call_impl is None  # EMA, queues and sampling stay eager
    assert list(compiled.state_dict()) == list(plain.state_dict())


def test_static_shape_options_only_under_compile():
    assert static_shape_options({}) == {}
    assert static_shape_options({'compile': True}) == {'fixed_length': True, 'pad_to_multiple_of': 8}
