"""Pretraining model contract: official keys/shapes and parameter counts at full size, masking rule, crash-free
hard negatives, queue rules, and the speed paths computing the same function as the reference paths."""
import json
import os
import types

import pytest
import torch

import engine.config as engine_config
import utils
from models import losses
from models.model_pretrain import ALBEF
from models.xbert import set_attention_impl, set_grad_checkpointing
from tests.parity_utils import FIXTURES, StubTokenizer, build_model, load_reference, text_input

REF = load_reference('pretrain')


def full_size_model():
    config = engine_config.load_config('configs/Pretrain.yaml')
    with torch.device('meta'):
        return ALBEF(config=config, text_encoder=None, tokenizer=StubTokenizer(), init_deit=False)


def test_full_size_keys_and_shapes_equal_official():
    model = full_size_model()
    ref = json.load(open(os.path.join(FIXTURES, 'keys', 'pretrain.json')))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == ref['num_keys'] == 844
    assert ours == ref['keys']
    assert list(ours) == list(ref['keys']), 'key order differs from the official state dict'


def test_full_size_parameter_counts_match_spec():
    model = full_size_model()
    online = {id(p): p for n, p in model.named_parameters() if p.requires_grad}
    everything = {id(p): p for p in model.parameters()}
    assert sum(p.numel() for p in online.values()) == 209_937_725
    assert sum(p.numel() for p in everything.values()) == 419_873_911


def test_masking_rule_proportions():
    torch.manual_seed(0)
    ids = torch.randint(1000, 30000, (400, 50))
    ids[:, 0] = 101
    ids[:, 40:] = 0
    masked, labels = losses.mask_tokens(ids.clone(), 30522, 0.15, 0, 101, 103, ids.clone())
    selected = labels != -100
    real = (ids != 0) & (ids != 101)
    assert not selected[:, 0].any() and not selected[:, 40:].any()
    assert abs(selected.sum().item() / real.sum().item() - 0.15) < 0.01
    assert torch.equal(labels[selected], ids[selected])
    mask_share = (masked[selected] == 103).float().mean().item()
    unchanged_share = (masked[selected] == ids[selected]).float().mean().item()
    assert abs(mask_share - 0.8) < 0.02
    assert abs(unchanged_share - 0.1) < 0.02  # the last 10% stay, plus rare random draws of the same id
    assert torch.equal(masked[~selected], ids[~selected])


def test_mlm_loss_is_zero_not_nan_when_nothing_is_masked():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = losses.mlm_loss(logits, labels, torch.softmax(torch.randn(2, 5, 11), -1), 0.4)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def _value_and_grad(fn, logits):
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits)
    loss.sum().backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize('name', ['mlm_vocab', 'mlm_seq', 'lm', 'lm_seq', 'mim', 'psl'])
def test_alpha_zero_skips_only_a_term_that_is_exactly_zero(name):
    """At alpha 0 the soft-label term is not computed; value and gradient are those of (1 - 0) * hard + 0 * soft."""
    F = torch.nn.functional
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 40)
    soft = torch.softmax(torch.randn(3, 6, 40), -1)
    labels = torch.randint(40, (3, 6))
    labels[:, ::2] = -100
    kept = labels != -100
    codes, hard_bits = labels[0].clamp(min=0), (soft[0] > 0.03).float()
    cases = {  # name: (the loss at a given alpha with soft labels, the same loss without them, the soft term)
        'mlm_vocab': (lambda x, a: losses.mlm_loss(x, labels, soft, a), lambda x: losses.mlm_loss(x, labels),
                      lambda x: -torch.sum(F.log_softmax(x, -1) * soft, -1)[kept].mean()),
        'mlm_seq': (lambda x, a: losses.mlm_loss(x, labels, soft, a, 'seq'), lambda x: losses.mlm_loss(x, labels),
                    lambda x: -torch.sum(F.log_softmax(x, 1) * soft, -1)[kept].mean()),
        'lm': (lambda x, a: losses.lm_loss(x, labels, 'none', soft, a), lambda x: losses.lm_loss(x, labels, 'none'),
               lambda x: (-torch.sum(F.log_softmax(x, -1) * soft, -1) * kept).sum(1)),
        'lm_seq': (lambda x, a: losses.lm_loss_seq_distill(x, labels, 'none', soft, a),
                   lambda x: losses.lm_loss(x, labels, 'none'),
                   lambda x: (-torch.sum(F.log_softmax(x, 1) * soft, -1) * kept).sum(1)),
        'mim': (lambda x, a: losses.mim_loss(x[0], codes, soft[0], a), lambda x: losses.mim_loss(x[0], codes),
                lambda x: -torch.sum(F.log_softmax(x[0], -1) * soft[0], -1).mean()),
        'psl': (lambda x, a: losses.psl_loss(x[0], hard_bits, soft[0], a), lambda x: losses.psl_loss(x[0], hard_bits),
                lambda x: F.binary_cross_entropy_with_logits(x[0], soft[0])),
    }
    loss, hard, soft_term = cases[name]
    value, grad = _value_and_grad(lambda x: loss(x, 0.0), logits)
    full_value, full_grad = _value_and_grad(lambda x: (1 - 0.0) * hard(x) + 0.0 * soft_term(x), logits)
    assert torch.equal(value, full_value) and torch.equal(grad, full_grad)
    mixed, _ = _value_and_grad(lambda x: loss(x, 0.1), logits)  # a non-zero alpha still mixes the soft term in
    assert torch.allclose(mixed, 0.9 * hard(logits) + 0.1 * soft_term(logits), atol=1e-6)
    assert not torch.allclose(mixed, value)


@pytest.mark.parametrize('softmax_dim', ['vocab', 'seq'])
def test_alpha_zero_pretraining_step_is_the_full_computation_bit_for_bit(monkeypatch, softmax_dim):
    """The momentum MLM soft labels are skipped at alpha 0; losses, gradients and the random stream (dropout on) are
    those of the full computation."""
    shortcut = losses.distillation_off

    def run(skip):
        monkeypatch.setattr(losses, 'distillation_off', shortcut if skip else (lambda alpha: False))
        torch.manual_seed(3)
        model = build_model('pretrain', REF).train()
        model.mlm_softmax_dim = softmax_dim
        for encoder in (model.text_encoder, model.text_encoder_m):
            encoder.distill_softmax_dim = softmax_dim
        torch.manual_seed(5)
        i = REF['inputs']
        out = model(i['image'], text_input(i['input_ids'], i['attention_mask']), alpha=0.0)
        sum(out).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return [x.detach() for x in out], grads, torch.rand(3)
    (losses_a, grads_a, after_a), (losses_b, grads_b, after_b) = run(True), run(False)
    assert all(torch.equal(x, y) for x, y in zip(losses_a, losses_b))
    assert len(grads_a) == len(grads_b) > 0 and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))
    assert torch.equal(after_a, after_b)  # the same number of random draws


def test_hard_negatives_never_crash():
    with pytest.raises(ValueError, match='at least 2'):
        losses.sanitize_negative_weights(torch.zeros(1, 1))
    w = torch.tensor([[0.0, 0.0, 0.0], [float('nan'), 0.0, 1.0], [0.2, float('inf'), 0.0]])
    clean, bad = losses.sanitize_negative_weights(w)
    assert bad == 1 and torch.isfinite(clean).all()
    assert torch.equal(clean[0], torch.tensor([0.0, 1.0, 1.0]))  # uniform over j != b
    assert torch.equal(clean[1], torch.tensor([0.0, 0.0, 1.0]))  # NaN -> 0, healthy rest kept
    for _ in range(20):
        neg = losses.sample_negatives(clean)
        assert neg[0] != 0
    # all items share one image id except one: the fallback prefers a different id
    idx = torch.tensor([7, 7, 9])
    clean, bad = losses.sanitize_negative_weights(torch.zeros(3, 3), idx)
    assert bad == 3
    assert torch.equal(clean[0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(clean[2], torch.tensor([1.0, 1.0, 0.0]))


def test_forward_survives_identical_batch_items():
    """A batch of one repeated pair makes healthy weights; the model still trains (no multinomial crash)."""
    m = build_model('pretrain', REF, no_dropout=True).train()
    img = REF['inputs']['image'][:1].repeat(4, 1, 1, 1)
    ids = REF['inputs']['input_ids'][:1].repeat(4, 1)
    out = m(img, text_input(ids, torch.ones_like(ids)), alpha=0.4)
    assert all(torch.isfinite(x) for x in out)


def test_queue_divisibility_is_checked_and_wraparound_opt_in():
    m = build_model('pretrain', REF)  # queue 16
    with pytest.raises(ValueError, match='queue_size 16 is not divisible by the global batch 6'):
        m.check_queue_divisible(6)
    m.queue_wraparound = True
    feats = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1)
    for _ in range(3):
        m._dequeue_and_enqueue(feats, feats)
    assert int(m.queue_ptr) == 18 % 16
    assert torch.allclose(m.image_queue[:, 0], feats[4])


def test_foreach_ema_equals_reference_loop():
    a = build_model('pretrain', REF)
    b = build_model('pretrain', REF)
    with torch.no_grad():
        for p in list(a.parameters()) + list(b.parameters()):
            if p.requires_grad:
                p.add_(0.01)
    b.ema_impl = 'foreach'
    a._momentum_update()
    b._momentum_update()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa.float(), pb.float(), rtol=0, atol=1e-7), name
    assert b.text_encoder_m.cls.predictions.decoder.weight is b.text_encoder_m.bert.embeddings.word_embeddings.weight


def _losses(model, seed=5):
    torch.manual_seed(seed)
    i = REF['inputs']
    return model(i['image'], text_input(i['input_ids'], i['attention_mask']), alpha=0.4)


def test_sdpa_and_explicit_attention_compute_the_same_losses_and_grads():
    a = build_model('pretrain', REF, no_dropout=True).train()
    b = build_model('pretrain', REF, no_dropout=True).train()
    set_attention_impl(b, 'explicit')
    la, lb = _losses(a), _losses(b)
    for x, y in zip(la, lb):
        assert torch.allclose(x, y, atol=1e-5)
    sum(la).backward()
    sum(lb).backward()
    assert torch.allclose(a.vision_proj.weight.grad, b.vision_proj.weight.grad, atol=1e-5)


def test_grad_checkpointing_keeps_losses_and_grads():
    a = build_model('pretrain', REF, no_dropout=True).train()
    b = build_model('pretrain', REF, no_dropout=True).train()
    set_grad_checkpointing(b, True)
    la, lb = _losses(a), _losses(b)
    for x, y in zip(la, lb):
        assert torch.allclose(x, y, atol=1e-6)
    sum(la).backward()
    sum(lb).backward()
    g_a = a.text_encoder.bert.encoder.layer[0].attention.self.query.weight.grad
    g_b = b.text_encoder.bert.encoder.layer[0].attention.self.query.weight.grad
    assert torch.allclose(g_a, g_b, atol=1e-6)
    assert torch.allclose(a.visual_encoder.blocks[0].attn.qkv.weight.grad,
                          b.visual_encoder.blocks[0].attn.qkv.weight.grad, atol=1e-6)


def test_constructor_never_downloads_and_names_missing_deit():
    config = engine_config.load_config('configs/Pretrain_synthetic.yaml')
    config['deit_checkpoint'] = '/nonexistent/deit.pth'
    from models.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match='/nonexistent/deit.pth'):
        ALBEF(config=config, text_encoder=None, tokenizer=StubTokenizer(), init_deit=True)


def test_momentum_eval_mode_flag_keeps_teachers_in_eval():
    official = build_model('pretrain', REF).train()
    assert official.text_encoder_m.training  # official: teacher dropout stays on
    flagged = build_model('pretrain', REF)
    flagged.momentum_eval_mode = True
    flagged.train()
    assert flagged.text_encoder.training and not flagged.text_encoder_m.training
    assert not flagged.visual_encoder_m.training
