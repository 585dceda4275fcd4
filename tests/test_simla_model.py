"""SIMLA pretraining model on tiny sizes (SIMLA.md section 17 items 3, 7, 8, 11 and 16.9): the mask token, gradient
routing, the EMA over the six pairs, the switches and loss weights, ALBEF's 6/6 encoder ablation and the fast
speed preset."""
import copy
import types

import pytest
import torch

from models.simla.pretrain import SIMLA

TOK = types.SimpleNamespace(vocab_size=60, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, encoder_width=32, fusion_layer=0, shared_text_fusion=True,
            use_token_type_embeddings=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CONFIG = dict(image_res=16, vision_width=32, embed_dim=16, temp=0.07, queue_size=8, momentum=0.995,
              mlm_probability=0.5, vit={'patch_size': 8, 'embed_dim': 32, 'depth': 1, 'num_heads': 4},
              vit_mask_token=True, bert_config=BERT, mim={'vocab_size': 8}, psl={'attn_layer': -1})


def make(**changes):
    cfg = copy.deepcopy(CONFIG)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    torch.manual_seed(0)
    return SIMLA(config=cfg, text_encoder=None, tokenizer=TOK)


def batch(B=4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 60, (B, 6), generator=g)
    ids[:, 0] = 1
    ids[1, 4:] = 0
    text = types.SimpleNamespace(input_ids=ids, attention_mask=(ids != 0).long())
    mask = torch.zeros(B, 4, dtype=torch.bool)
    mask[:, 1] = True
    mask[0, 3] = True
    codes = torch.randint(0, 8, (B, 4), generator=g)
    return torch.randn(B, 3, 16, 16, generator=g), text, mask, codes


def run(model, alpha=0.4, seed=5):
    image, text, mask, codes = batch()
    torch.manual_seed(seed)
    return model(image, text, codes, mask, codes[mask], alpha=alpha)


def test_mask_token_zero_init_and_all_masked_images_look_alike():
    model = make().eval()
    assert torch.equal(model.visual_encoder.mask_token, torch.zeros_like(model.visual_encoder.mask_token))
    with torch.no_grad():
        model.visual_encoder.mask_token.normal_()
        images = torch.randn(2, 3, 16, 16)
        out = model.visual_encoder(images, torch.ones(2, 4, dtype=torch.bool))
        assert torch.allclose(out[0], out[1], atol=1e-6)
        assert torch.allclose(model.visual_encoder(images, torch.zeros(2, 4, dtype=torch.bool)),
                              model.visual_encoder(images), atol=1e-6)


def test_gradient_routing_and_ema():
    model = make().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    l_mlm, l_ita, l_itm, l_mim, l_psl = run(model)
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(l_mim, [named['visual_encoder.mask_token'], named['mim_head.weight'],
                                        named['text_encoder.bert.embeddings.word_embeddings.weight'],
                                        named['text_encoder.bert.encoder.layer.0.crossattention.self.key.weight']],
                                retain_graph=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    concept = torch.autograd.grad(l_mlm + l_ita + l_itm + l_mim, named['concept_head.weight'], allow_unused=True,
                                  retain_graph=True)[0]
    assert concept is None  # the concept head learns from PSL only
    assert torch.autograd.grad(l_psl, named['concept_head.weight'], retain_graph=True)[0].abs().sum() > 0
    (l_mlm + l_ita + l_itm + l_mim + l_psl).backward()
    assert all(p.grad is None for k, p in model.named_parameters() if k.split('.')[0].endswith('_m'))
    sd = model.state_dict()
    for online, momentum in model.model_pairs:  # one EMA step over the six pairs
        for name, p in getattr(model, online).named_parameters():
            key = f'{momentum}.{name}'
            expected = 0.995 * before[key] + 0.005 * before[f'{online}.{name}']
            assert torch.allclose(sd[key], expected, atol=1e-6), key


def test_switches_and_loss_weights():
    l_mlm, l_ita, l_itm, l_mim, l_psl = run(make().train())
    off = run(make(mim={'enabled': False}, psl={'enabled': False}).train())
    assert off[3] is None and off[4] is None
    assert torch.allclose(off[1], l_ita) and torch.allclose(off[2], l_itm) and torch.allclose(off[0], l_mlm)
    weighted = run(make(loss_weights={'mim': 2.0, 'psl': 0.5}).train())
    assert torch.allclose(weighted[3], 2.0 * l_mim) and torch.allclose(weighted[4], 0.5 * l_psl)
    assert torch.allclose(weighted[1], l_ita)
    with pytest.raises(ValueError, match='masked_visual_token_pos'):
        make().train()(batch()[0], batch()[1], alpha=0.4)


def test_albef_encoder_ablation_and_fast_mode():
    # SIMLA's objectives on ALBEF's split encoder (text layers, then fusion layers with cross-attention)
    ablation = make(bert_config=dict(BERT, fusion_layer=2, shared_text_fusion=False)).train()
    assert not hasattr(ablation.text_encoder.bert.encoder.layer[0], 'crossattention')
    assert all(torch.isfinite(loss) for loss in run(ablation))
    reference = run(make().train())
    fast = run(make(mode='fast').train())
    # the fast preset draws hard negatives in one call (other ITM/MLM draws); ITC, MIM and PSL are deterministic
    assert torch.allclose(reference[1], fast[1], atol=1e-5)  # ITC
    assert torch.allclose(reference[3], fast[3], atol=1e-5)  # MIM
    assert torch.allclose(reference[4], fast[4], atol=1e-5)  # PSL
    assert all(torch.isfinite(loss) for loss in fast)


def test_mim_targets_from_the_tokenizer_view():
    from models.simla.visual_tokenizer import ColorQuantTokenizer
    tokenizer = ColorQuantTokenizer(grid=2, levels=2)  # 8 codes = the tiny mim_head width
    image, text, _, _ = batch()
    view = torch.rand(4, 3, 8, 8)
    patch_mask = torch.zeros(4, 2, 2, dtype=torch.bool)
    patch_mask[:, 0, 1] = True
    codes, mask, labels = SIMLA.mim_targets(tokenizer, view, patch_mask)
    assert codes.shape == (4, 4) and mask.dtype == torch.bool and torch.equal(labels, codes[:, 1])
    losses = make().train()(image, text, codes, mask, labels, alpha=0.4)
    assert torch.isfinite(losses[3])
    with pytest.raises(ValueError, match='tokenizer grid'):
        SIMLA.mim_targets(tokenizer, view, torch.zeros(4, 9, dtype=torch.bool))


def test_pretraining_step_makes_the_mim_targets_and_names_the_five_losses():
    """Pretrain.py's SIMLA step (the TaskSpec's make_step): the tokenizer view and patch mask of the batch become the
    MIM inputs of the forward; the losses are named as train_steps.jsonl logs them; with mim.enabled false the batch
    is ALBEF's (image, text) and loss_mim is left out."""
    from models import registry
    from models.simla.pretrain import make_pretrain_step
    from models.simla.visual_tokenizer import ColorQuantTokenizer
    config = {**copy.deepcopy(CONFIG), 'model': 'simla',
              'mim': {'vocab_size': 8, 'tokenizer': 'color_quant', 'color_levels': 2}}
    spec = registry.task_spec(config, 'pretrain')
    assert spec.make_step is make_pretrain_step
    assert registry.task_spec({'model': 'albef'}, 'pretrain').make_step is None
    image, text, patch_mask, _ = batch()
    view = torch.rand(4, 3, 8, 8)
    model = make(mim={'tokenizer': 'color_quant', 'color_levels': 2}).train()
    twin = copy.deepcopy(model)  # a forward moves the queues and the momentum encoders
    step = spec.make_step(config, 'cpu')
    torch.manual_seed(5)
    out = step(model, ((image, view, patch_mask), text), 0.4)
    assert list(out) == ['loss_mlm', 'loss_ita', 'loss_itm', 'loss_mim', 'loss_psl', 'mim_accuracy', 'mim_majority']
    assert 0 <= float(out['mim_accuracy']) <= 1 and 1 / 5 <= float(out['mim_majority']) <= 1  # 5 masked patches
    codes, mask, labels = SIMLA.mim_targets(ColorQuantTokenizer(grid=2, levels=2), view, patch_mask)
    torch.manual_seed(5)
    expected = twin(image, text, codes, mask, labels, alpha=0.4)
    assert all(torch.equal(out[name], loss) for name, loss in zip(out, expected))  # the five losses
    off = {**config, 'mim': {**config['mim'], 'enabled': False}}
    out = make_pretrain_step(off, 'cpu')(make(mim={'enabled': False}).train(), (image, text), 0.4)
    assert list(out) == ['loss_mlm', 'loss_ita', 'loss_itm', 'loss_psl']


def test_deit_initialisation_leaves_the_mask_token_at_zero_and_still_names_other_missing_keys(tmp_path):
    """SIMLA's pretraining ViT loads a DeiT file (which has no mask token): the token stays zero; any other missing
    key is still an error naming the file."""
    from models.checkpoint import CheckpointError, load_deit
    model = make()
    vit = model.visual_encoder
    deit = {k: v for k, v in vit.state_dict().items() if k != 'mask_token'}
    torch.save({'model': deit}, tmp_path / 'deit.pth')
    with torch.no_grad():
        vit.pos_embed.zero_()
    load_deit(vit, str(tmp_path / 'deit.pth'))
    assert torch.equal(vit.pos_embed, deit['pos_embed']) and not vit.mask_token.any()
    del deit['cls_token']
    torch.save({'model': deit}, tmp_path / 'short.pth')
    with pytest.raises(CheckpointError, match=r'short\.pth does not fit the ViT: missing \[.cls_token.\]'):
        load_deit(vit, str(tmp_path / 'short.pth'))
