"""VLMo unit checks: full-size key layouts and parameter counts on the meta device (tests/fixtures/keys/vlmo_*.json),
the three index maps, routing, masks, the pure losses of models/losses.py (VLMo section) and the checkpoint rules."""
import json
import os

import pytest
import torch

from models import losses
from models import vlmo_checkpoint as vc
from models.vlmo import (VLMo, fused_relative_position_index, image_relative_position_index,
                         text_relative_position_index)

KEYS = os.path.join(os.path.dirname(__file__), 'fixtures', 'keys')


def full_config(task, res, L=40):
    return {'model': 'vlmo', 'task': task, 'image_res': res, 'max_text_len': L, 'max_text_len_of_initckpt': 196,
            'vocab_size': 30522, 'vqa_num_labels': 3129}


def meta_model(task, res, **arch):
    cfg = full_config(task, res)
    if arch:
        cfg['vlmo'] = arch
    with torch.device('meta'):
        return VLMo(config=cfg, task=task)


def backbone_count(model):
    prefixes = ('transformer.', 'relative_position_bias_table', 'text_embeddings.', 'token_type_embeddings.')
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


@pytest.mark.parametrize('task,res,params,nkeys', [('pretrain', 224, 202445470, 293), ('retrieval', 384, 177413857, 282),
                                                   ('vqa', 480, 182410905, 285), ('nlvr', 384, 178601954, 285)])
def test_full_size_layout_and_counts(task, res, params, nkeys):
    m = meta_model(task, res)
    sd = m.state_dict()
    ref = json.load(open(os.path.join(KEYS, f'vlmo_{task}.json')))['keys']
    assert list(sd) == list(ref)
    assert {k: list(v.shape) for k, v in sd.items()} == ref
    assert len(sd) == nkeys
    assert sum(p.numel() for p in m.parameters()) == params


def test_full_size_backbone_and_stage2():
    assert backbone_count(meta_model('pretrain', 224)) == 175430496
    m = meta_model('textmlm', 224)
    sd = m.state_dict()
    assert len(sd) == 273 and sum(p.numel() for p in m.parameters()) == 190756506
    assert not any('mlp_vl' in k or 'norm2_vl' in k for k in sd)
    assert list(sd['text_embeddings.position_embeddings.weight'].shape) == [196, 768]


def test_base_plus_and_large_build():
    bp = meta_model('pretrain', 224, embed_dim=544, depth=24, num_heads=16, vlffn_start_layer_index=21,
                    layer_scale_init_values=None, use_abs_pos_emb=True, use_rel_pos_bias=False)
    sd = bp.state_dict()
    assert 'transformer.pos_embed' in sd and 'relative_position_bias_table' not in sd
    assert not any('gamma_' in k for k in sd)
    lg = meta_model('pretrain', 224, embed_dim=1024, depth=24, num_heads=16, vlffn_start_layer_index=21)
    assert list(lg.state_dict()['relative_position_bias_table'].shape) == [1126, 16 * 24]


@pytest.mark.parametrize('G,L,L0', [(2, 4, 6), (14, 40, 196), (24, 40, 196), (30, 40, 196)])
def test_index_maps(G, L, L0):
    t_img = (2 * G - 1) ** 2 + 3
    T = t_img + 2 * L0 + 2
    img = image_relative_position_index(G)
    assert img.shape == (G * G + 1,) * 2
    assert img[0, 0] == t_img - 1 and (img[0, 1:] == t_img - 3).all() and (img[1:, 0] == t_img - 2).all()
    assert set(img[1:, 1:].unique().tolist()) == set(range((2 * G - 1) ** 2))
    txt = text_relative_position_index(L, L0, t_img)
    assert txt[0, 0] == T - 1 and (txt[0, 1:] == T - 3).all() and (txt[1:, 0] == T - 2).all()
    for i in range(1, L):
        for j in range(1, L):
            assert txt[i, j] == t_img + L0 + (j - i)
    fused = fused_relative_position_index(txt, img, t_img)
    assert (fused[:L, L:] == t_img).all() and (fused[L:, :L] == t_img + 1).all()
    assert int(fused.max()) < T
    with pytest.raises(ValueError):
        text_relative_position_index(L0 + 1, L0, t_img)


def tiny(task='pretrain', **over):
    cfg = {'model': 'vlmo', 'task': task, 'image_res': 16, 'max_text_len': 6, 'max_text_len_of_initckpt': 8,
           'vocab_size': 120, 'vqa_num_labels': 5,
           'vlmo': {'patch_size': 8, 'embed_dim': 16, 'depth': 3, 'num_heads': 2, 'vlffn_start_layer_index': 2,
                    'drop_path_rate': 0.0, **over}}
    torch.manual_seed(0)
    m = VLMo(config=cfg, task=task)
    with torch.no_grad():
        m.relative_position_bias_table.normal_(0, 0.5)
    return m.eval()


def batch(B=3, L=6, V=50):
    torch.manual_seed(1)
    ids = torch.randint(5, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    return torch.randn(B, 3, 16, 16), ids, mask


def test_routing():
    m = tiny()
    calls = []
    for i, blk in enumerate(m.transformer.blocks):
        for name in ('mlp_text', 'mlp_imag', 'mlp_vl'):
            mod = getattr(blk, name)
            if mod is not None:
                mod.register_forward_hook(lambda mod, inp, out, i=i, name=name: calls.append((i, name, inp[0].shape[1])))
    image, ids, mask = batch()
    with torch.no_grad():
        m.infer_image(image)
        img_calls = [c for c in calls[:3]]
        assert [c[1] for c in img_calls] == ['mlp_imag'] * 3
        assert [c[:2] for c in calls[3:]] == [(2, 'mlp_vl')]  # the VL branch
        calls.clear()
        m.infer(ids, mask, image)
        assert calls == [(0, 'mlp_text', 6), (0, 'mlp_imag', 5), (1, 'mlp_text', 6), (1, 'mlp_imag', 5), (2, 'mlp_vl', 11)]
        with pytest.raises(ValueError):
            m.infer(ids[:, :5], mask[:, :5], image)


def test_padding_and_positions():
    m = tiny()
    image, ids, mask = batch()
    with torch.no_grad():
        a = m.infer(ids, mask, image)
        ids2 = ids.clone(); ids2[1, 4:] = 7
        b = m.infer(ids2, mask, image)
        assert torch.allclose(a['text_feats'][1, :4], b['text_feats'][1, :4], atol=1e-6)
        assert torch.allclose(a['image_feats'], b['image_feats'], atol=1e-6)
        perm = image.view(3, 3, 2, 8, 2, 8).flip(2).reshape(3, 3, 16, 16)
        assert not torch.allclose(m.infer_image(perm)['image_feats'][:, 0], m.infer_image(image)['image_feats'][:, 0])
    m.train()
    m.compute_mlm(image, ids, mask, torch.where(mask.bool(), ids, -100))['mlm_loss'].backward()
    assert m.text_embeddings.position_embeddings.weight.grad is None or \
        m.text_embeddings.position_embeddings.weight.grad.abs().sum() == 0


def test_contrastive_and_negatives():
    fi = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    ft = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(2.0)
    i2t, t2i, loss = losses.vlmo_contrastive(fi, ft, scale)
    assert torch.allclose(i2t, scale.exp() * fi @ ft.t()) and torch.equal(t2i, i2t.t())
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(loss, (ce(i2t, torch.arange(4)) + ce(t2i, torch.arange(4))) / 2)
    w = losses.vlmo_negative_weights(torch.randn(2, 6))
    assert w[0, 0] == 0 and w[1, 1] == 0 and (w[:, 2:] > 0).all()
    bad = torch.tensor([[float('nan')] * 3, [0.0, 1.0, 2.0]])
    w = losses.vlmo_negative_weights(bad)
    assert torch.equal(w[0], torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError):
        losses.vlmo_negative_weights(torch.zeros(1, 1))
    assert losses.vlmo_itm_labels(2).tolist() == [1, 1, 0, 0, 0, 0]


def test_mlm_vqa_losses():
    logits = torch.randn(2, 3, 7)
    labels = torch.full((2, 3), -100)
    assert losses.vlmo_mlm_loss(logits, labels).item() == 0.0
    labels[0, 1] = 3
    assert torch.allclose(losses.vlmo_mlm_loss(logits, labels), -logits[0, 1].log_softmax(-1)[3])
    t = losses.vlmo_vqa_targets([[1], [0, 2]], [[0.3], [1.0, 0.6]], 3)
    assert torch.equal(t, torch.tensor([[0.0, 0.3, 0.0], [1.0, 0.0, 0.6]]))
    z = torch.zeros(2, 3)
    assert torch.allclose(losses.vlmo_vqa_loss(z, t), torch.nn.functional.binary_cross_entropy_with_logits(z, t) * 3)


def test_lr_factor():
    f = lambda s: 2e-4 * losses.vlmo_lr_factor(s, 200000, 2500)  # noqa: E731
    assert f(0) == 0 and abs(f(1) - 8e-8) < 1e-15 and abs(f(2500) - 2e-4) < 1e-15
    assert abs(f(100000) - 1.01266e-4) < 1e-9 and f(200000) == 0


def test_resampling_ratio_and_spline():
    assert abs(vc.geometric_ratio(27, 47) - 1.090307) < 1e-6
    assert abs(vc.geometric_ratio(27, 59) - 1.125056) < 1e-6
    x = vc.source_grid(7, 1.3)
    E = vc.not_a_knot_matrix(x, x)
    assert torch.allclose(E, torch.eye(7, dtype=torch.float64), atol=1e-12)  # interpolates
    xs = torch.tensor(x, dtype=torch.float64)
    cubic = xs ** 3 - 2 * xs
    u = torch.linspace(-10, 10, 21, dtype=torch.float64)
    uc = u.clamp(xs[0], xs[-1])
    assert torch.allclose(vc.not_a_knot_matrix(x, u) @ cubic, uc ** 3 - 2 * uc, atol=1e-9)  # exact on cubics, clamped


def test_checkpoint_rules():
    m = tiny('nlvr')
    src = tiny('pretrain').state_dict()
    src['token_type_embeddings.weight'] = torch.arange(2 * 16.).view(2, 16)
    missing, unexpected = m.load_pretrained({'state_dict': src})
    assert missing == [] or all(k.startswith('nlvr2_classifier') for k in missing)
    tt = m.token_type_embeddings.weight
    assert torch.equal(tt[2], tt[1]) and torch.equal(tt[0], src['token_type_embeddings.weight'][0])
    with pytest.raises(ValueError, match='ALBEF'):
        m.load_pretrained({'model': {'visual_encoder.blocks.0.mlp.fc1.weight': torch.zeros(1)}})


def test_stage2_freezing_one_step():
    m = tiny('textmlm')
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all('mlp_imag' in n or 'attn' in n or 'norm1' in n or 'gamma' in n or 'patch_embed' in n
                          or 'cls_token' in n or 'pooler' in n or 'norm2_imag' in n for n in frozen)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    _, ids, mask = batch(L=8)
    m.train()
    m.compute_textmlm(ids, torch.ones_like(ids), torch.where(ids > 20, ids, -100))['mlm_loss'].backward()
    opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ---- text pipeline of the training forward ------------------------------------------------------------------------
def test_fixed_length_text_keeps_sep_when_truncating():
    ids = torch.tensor([[101, 7, 8, 0, 0], [101, 5, 6, 7, 9]])
    mask = (ids != 0).long()
    out, m = losses.vlmo_fixed_length_text(ids, mask, 4, 102)
    assert out.tolist() == [[101, 7, 8, 102], [101, 5, 6, 102]] and m.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    out, m = losses.vlmo_fixed_length_text(ids[:, :3], mask[:, :3], 6, 102)
    assert out.tolist() == [[101, 7, 8, 102, 0, 0], [101, 5, 6, 102, 0, 0]] and m.sum(1).tolist() == [4, 4]


def test_whole_word_masking():
    import random
    subword = torch.zeros(50, dtype=torch.bool)
    subword[[20, 21]] = True                      # ids 20, 21 are '##' pieces
    ids = torch.tensor([[101, 10, 20, 21, 11, 12, 102, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    for seed in range(20):
        random.seed(seed)
        torch.manual_seed(seed)
        masked, labels = losses.vlmo_whole_word_mask(ids, subword, (101, 102, 0, 100, 103), 103, 50)
        sel = (labels != -100)[0]
        assert int(sel.sum()) <= 3                 # k = round(0.15 * 20) = 3, padding positions count as candidates
        assert not sel[[0, 6]].any() and not sel[7:].any()
        assert bool(sel[1]) == bool(sel[1]) and (bool(sel[2]) == bool(sel[3]))  # a word's pieces go together
        if sel[2]:
            assert sel[1]
        assert torch.equal(labels[0][sel], ids[0][sel])


def test_training_forward_from_shared_batches():
    import types
    for task in ('pretrain', 'textmlm'):
        m = tiny(task).train()
        image, ids, mask = batch(L=4)
        text = types.SimpleNamespace(input_ids=ids, attention_mask=mask)
        loss_mlm, loss_ita, loss_itm = m(image, text, alpha=0.4)
        assert torch.isfinite(loss_mlm + loss_ita + loss_itm)
        (loss_mlm + loss_ita + loss_itm).backward()


# ---- registration, configs, refusals ------------------------------------------------------------------------------
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'vlmo')


@pytest.mark.parametrize('name,task,res,lr,drop', [('Pretrain_stage2', 'pretrain', 224, 2e-4, 0.1),
                                                   ('Pretrain', 'pretrain', 224, 2e-4, 0.1),
                                                   ('Retrieval_coco', 'retrieval', 384, 3e-5, 0.2),
                                                   ('Retrieval_flickr', 'retrieval', 384, 3e-5, 0.15),
                                                   ('VQA', 'vqa', 480, 3e-5, 0.15), ('NLVR', 'nlvr', 384, 5e-5, 0.1)])
def test_official_configs_build_through_the_registry(name, task, res, lr, drop):
    from engine.config import load_config
    from models import registry
    config = load_config(os.path.join(CONFIGS, f'{name}.yaml'))
    assert (config['image_res'], config['optimizer']['lr'], config['vlmo']['drop_path_rate']) == (res, lr, drop)
    assert config['optimizer']['weight_decay'] == 0.01
    with torch.device('meta'):
        model = registry.task_spec(config, task).build(config, text_encoder=None, tokenizer=None, init_deit=False)
    assert model.task == config['task'] and model.max_text_len == (196 if config['task'] == 'textmlm' else 40)
    if name == 'VQA':
        assert config['lr_mult_heads'] == 20 and config['schedule']['epochs'] == 10
    if name.startswith('Pretrain'):
        assert config['schedule'] == {'sched': 'linear', 'max_steps': 200000, 'warmup_steps': 2500, 'end_lr': 0,
                                      'power': 1}
        assert config['batch_size_global'] == 1024


@pytest.mark.parametrize('task', ['ve', 'grounding', 'pretrain_nlvr'])
def test_scripts_without_a_vlmo_recipe_refuse_it(task):
    import types
    import engine
    args = types.SimpleNamespace(config=os.path.join(CONFIGS, 'NLVR.yaml'), opt=[])
    with pytest.raises(SystemExit, match=f"model: vlmo has no '{task}' task"):
        engine.require_task(args, task)
    engine.require_task(types.SimpleNamespace(config=os.path.join(CONFIGS, 'NLVR.yaml'), opt=[]), 'nlvr')


def test_meta_build_with_the_project_tokenizer_marks_word_pieces():
    from models.tokenization import build_tokenizer
    tok = build_tokenizer('none')
    with torch.device('meta'):
        m = VLMo(config=full_config('pretrain', 224), task='pretrain', tokenizer=tok)
    assert m.subword.device.type == 'cpu' and int(m.subword.sum()) > 1000
    assert not bool(m.subword[tok.convert_tokens_to_ids('the')]) and bool(m.subword[tok.convert_tokens_to_ids('##s')])


def test_whole_word_masking_over_100_seeded_batches_follows_the_collator_rule():
    """VLMo.md §3.2 on 100 seeded batches of fixed-length (L = 40) captions, the form of §17.2 item 8 available without
    transformers 4.8.1 (no golden file can be made here: transformers 5 has no DataCollatorForWholeWordMask): k = 6
    positions are drawn whatever the caption length, padding included; special tokens and padding are then unselected,
    so a row masks 0-6 real word-pieces, never [CLS]/[SEP]/[PAD], whole words only; of the selected positions about
    80 % become [MASK], 10 % a random id, 10 % stay; labels hold the original ids there and -100 elsewhere."""
    import random
    L, vocab = 40, 60
    subword = torch.zeros(vocab, dtype=torch.bool)
    subword[50:] = True                                    # ids 50..59 are '##' pieces
    g = torch.Generator().manual_seed(7)
    counts = {'mask': 0, 'random': 0, 'kept': 0}
    real_total, selected_total, rows_without = 0, 0, 0
    for seed in range(100):
        ids = torch.zeros(8, L, dtype=torch.long)
        for b in range(8):
            n = int(torch.randint(3, L - 1, (1,), generator=g))  # real word-pieces of this caption
            pieces = torch.randint(10, 50, (n,), generator=g)
            cont = torch.rand(n, generator=g) < 0.3             # about 30 % of the pieces continue a word
            pieces[cont] = 50 + pieces[cont] % 10
            pieces[0] = pieces[0] % 40 + 10                     # a caption starts a word
            ids[b, :n + 2] = torch.cat([torch.tensor([101]), pieces, torch.tensor([102])])
        random.seed(seed)
        torch.manual_seed(seed)
        masked, labels = losses.vlmo_whole_word_mask(ids, subword, (101, 102, 0, 100, 103), 103, vocab)
        sel = labels != -100
        real = (ids != 0) & (ids != 101) & (ids != 102)
        assert not (sel & ~real).any()                      # never [CLS], [SEP] or [PAD]
        assert int(sel.sum(1).max()) <= 6                   # k = round(0.15 * 40) = 6 per caption
        assert torch.equal(labels[sel], ids[sel]) and (labels[~sel] == -100).all()
        assert torch.equal(masked[~sel], ids[~sel])         # unselected positions are untouched
        for b in range(8):                                  # a word's pieces are selected together
            for i in range(2, L):
                if real[b, i] and bool(subword[ids[b, i]]):
                    assert bool(sel[b, i]) == bool(sel[b, i - 1]), (seed, b, i)
        counts['mask'] += int((masked[sel] == 103).sum())
        counts['kept'] += int((masked[sel] == ids[sel]).sum())
        counts['random'] += int(((masked[sel] != 103) & (masked[sel] != ids[sel])).sum())
        real_total, selected_total = real_total + int(real.sum()), selected_total + int(sel.sum())
        rows_without += int((sel.sum(1) == 0).sum())
    total = sum(counts.values())
    assert total == selected_total and total > 1500
    assert abs(counts['mask'] / total - 0.8) < 0.04
    # a random id equal to the original counts as kept: expected 0.1 * (1 - 1/vocab) and 0.1 * (1 + ...)
    assert abs(counts['random'] / total - 0.1) < 0.03 and abs(counts['kept'] / total - 0.1) < 0.03
    # k = 6 drawn among all 38 non-[CLS]/[SEP] positions: about 6 / 38 of the real pieces end up selected
    assert abs(selected_total / real_total - 6 / 38) < 0.03
    assert rows_without > 0  # short captions can draw only padding (k comes from the padded length, not the caption)


def test_whole_word_masking_equals_the_transformers_4_8_1_collator_on_100_seeded_batches():
    """VLMo.md 17.2 item 8: the golden file of tests/fixtures/vlmo_wwm (made with transformers 4.8.1's
    DataCollatorForWholeWordMask, the official masking) is reproduced element for element, ids and labels."""
    import random

    from models.tokenization import build_tokenizer
    golden = torch.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'vlmo_wwm', 'golden.pt'), weights_only=True)
    tok = build_tokenizer('none')
    subword = torch.tensor([t.startswith('##') for t in tok.backend.convert_ids_to_tokens(list(range(len(tok))))])
    special = (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.unk_token_id, tok.mask_token_id)
    assert golden['vocab_size'] == len(tok) and golden['input_ids'].shape == (100, 8, 40)
    for b, seed in enumerate(golden['seeds'].tolist()):
        random.seed(seed)
        torch.manual_seed(seed)
        ids, labels = losses.vlmo_whole_word_mask(golden['input_ids'][b].long(), subword, special, tok.mask_token_id,
                                                  golden['vocab_size'], golden['mlm_probability'])
        assert torch.equal(ids, golden['masked_ids'][b].long()), b
        assert torch.equal(labels, golden['labels'][b].long()), b


def test_init_std_scales_the_multiway_transformer_only():
    """`vlmo.init_std` (default 0.02, the official trunc-normal std) sets the Transformer's Linear weights, cls_token
    and pos_embed; the text embeddings and the heads keep normal(0, 0.02) (the synthetic configs use 0.07)."""
    arch = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, vlffn_start_layer_index=2, use_abs_pos_emb=True)
    cfg = {'model': 'vlmo', 'task': 'pretrain', 'image_res': 48, 'max_text_len': 16, 'max_text_len_of_initckpt': 16,
           'vocab_size': 30522, 'vqa_num_labels': 46}

    def stds(init_std):
        torch.manual_seed(0)
        m = VLMo(config={**cfg, 'vlmo': {**arch, **({} if init_std is None else {'init_std': init_std})}},
                 task='pretrain')
        body = torch.cat([p.flatten() for n, p in m.transformer.named_parameters()
                          if n.endswith('.weight') and p.dim() == 2 and 'blocks' in n])
        return (body.std().item(), m.transformer.cls_token.std().item(), m.transformer.pos_embed.std().item(),
                m.text_embeddings.word_embeddings.weight.std().item(), m.itm_score.fc.weight.std().item())

    official, scaled = stds(None), stds(0.07)
    # the 4x64x64 body weights: their sample std is the requested one (trunc_normal_ cuts at +-2, far outside)
    assert official[0] == pytest.approx(0.02, rel=0.05) and scaled[0] == pytest.approx(0.07, rel=0.05)
    # same seed, same draws: the Transformer's tensors scale by 0.07 / 0.02, the embeddings and heads do not move
    assert [s / o for s, o in zip(scaled[:3], official[:3])] == pytest.approx([3.5] * 3, rel=0.01), (scaled, official)
    assert scaled[3:] == official[3:] and official[3] == pytest.approx(0.02, rel=0.05), (scaled, official)
