"""SIMLA's pure pieces: the MIM and PSL losses and the keyword rule (models/losses.py, SIMLA section), the block-wise
patch mask generator (dataset/simla_masking.py), the color_quant visual tokenizer
(models/simla/visual_tokenizer.py) and the shared-stream BERT switches (models/xbert.py) on tiny sizes."""
import random

import numpy as np
from PIL import Image
import pytest
import torch
import torch.nn.functional as F

from dataset.simla_masking import BlockMaskGenerator
from models import losses
from models.simla.visual_tokenizer import ColorQuantTokenizer, build_visual_tokenizer, map_pixels
from models.xbert import BertModel

# ---- PSL keyword rule: the worked example of SIMLA.md section 5.7 --------------------------------------------------
ROWS = torch.tensor([[.30, .07, .15, .25, .05, .06, .12, 0],
                     [.35, .05, .20, .18, .04, .10, .08, 0],
                     [.30, .25, .06, .18, .05, .07, .09, 0],
                     [.28, .06, .24, .08, .12, .17, .05, 0]])[None]  # [B=1, H=4, L=8]
CLS, PAD = 101, 0
IDS = torch.tensor([[CLS, 11, 12, 13, 14, 15, 16, PAD]])  # w1..w6 = 11..16
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])


def keywords(targets):
    return set(torch.nonzero(targets[0]).flatten().tolist())


def test_head_vote_and_mean_row_give_the_worked_example():
    hv = losses.psl_targets(ROWS, IDS, 200, [CLS], 'head_vote', 4, 5, MASK)
    assert keywords(hv) == {12, 13, 15, 16} and hv[0, CLS] == 0
    mr = losses.psl_targets(ROWS, IDS, 200, [CLS], 'mean_row', 4, 4, MASK)
    assert keywords(mr) == {11, 12, 13, 15}


def test_a_one_word_caption_selects_pad_unless_dropped():
    ids = torch.tensor([[CLS, 11, PAD, PAD, PAD, PAD]])
    rows = torch.tensor([[.6, .4, 0, 0, 0, 0]]).expand(1, 2, 6)
    assert keywords(losses.psl_targets(rows, ids, 200, [CLS], 'head_vote', 4, 5)) == {11, PAD}
    assert keywords(losses.psl_targets(rows, ids, 200, [CLS, PAD, 102, 103], 'head_vote', 4, 5)) == {11}


def test_ties_are_broken_by_summed_attention_then_position():
    # every head attends uniformly: each head's top-4 is positions 0..3 (smaller positions first)
    rows = torch.full((1, 2, 6), 1 / 6)
    pos = losses.psl_head_vote_positions(rows, topk_per_head=4, num_keywords=5)
    assert pos.tolist() == [[0, 1, 2, 3, 4]]
    # equal votes, larger summed attention wins
    rows = torch.tensor([[[.5, .3, .1, .1], [.5, .1, .35, .05]]])  # votes p1 = p2 = 1; sums .4 < .45
    assert losses.psl_head_vote_positions(rows, 2, 2).tolist() == [[0, 2]]


def test_psl_loss_is_the_mean_bce_over_batch_and_vocabulary():
    z = torch.tensor([[0.5, -1.0, 2.0, 0.0, -0.3, 1.2], [1.0, 0.1, -2.0, 0.4, 0.0, -0.7]])
    y = torch.tensor([[1., 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]])
    soft = torch.sigmoid(torch.randn(2, 6))
    p = torch.sigmoid(z)
    by_hand = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert torch.allclose(losses.psl_loss(z, y), by_hand, atol=1e-6)
    assert torch.allclose(losses.psl_loss(z, y, soft, 0.0), by_hand, atol=1e-6)
    soft_term = -(soft * p.log() + (1 - soft) * (1 - p).log()).mean()
    assert torch.allclose(losses.psl_loss(z, y, soft, 1.0), soft_term, atol=1e-6)


def test_mim_loss_hard_soft_and_empty():
    logits, codes = torch.randn(5, 7), torch.randint(0, 7, (5,))
    soft = F.softmax(torch.randn(5, 7), dim=-1)
    assert torch.allclose(losses.mim_loss(logits, codes, soft, 0.0), F.cross_entropy(logits, codes))
    distill = -(F.log_softmax(logits, -1) * soft).sum(-1).mean()
    assert torch.allclose(losses.mim_loss(logits, codes, soft, 1.0), distill)
    empty = torch.zeros(0, 7, requires_grad=True)
    out = losses.mim_loss(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, 7), 0.4)
    assert out.item() == 0.0 and out.requires_grad


# ---- block-wise mask generator -------------------------------------------------------------------------------------
def test_mask_generator_budget_mean_and_determinism():
    rng = random.Random(0)
    gen = BlockMaskGenerator((16, 16), 75, min_num_patches=16, rng=rng)
    counts = np.array([gen().sum() for _ in range(2000)])
    assert counts.max() <= 75 and counts.mean() >= 73
    small = BlockMaskGenerator((4, 4), 5, min_num_patches=2, rng=random.Random(1))
    assert all(small().sum() <= 5 for _ in range(200))
    a = BlockMaskGenerator((4, 4), 5, min_num_patches=2, rng=random.Random(7))
    b = BlockMaskGenerator((4, 4), 5, min_num_patches=2, rng=random.Random(7))
    assert all(np.array_equal(a(), b()) for _ in range(20))
    assert a().dtype == bool and a().shape == (4, 4)


# ---- color_quant tokenizer -----------------------------------------------------------------------------------------
def test_color_quant_codes_follow_the_cell_mean_colour():
    tok = ColorQuantTokenizer(grid=2, levels=4)
    assert tok.vocab_size == 64
    img = torch.zeros(1, 3, 8, 8)
    img[0, 0, :4, :4] = 1.0            # top-left red
    img[0, 2, 4:, 4:] = 0.5            # bottom-right half blue
    codes = tok.encode(map_pixels(img))
    assert codes.dtype == torch.long and codes.shape == (1, 2, 2)
    assert codes[0, 0, 0] == 3 * 16 and codes[0, 1, 1] == 2 and codes[0, 0, 1] == 0
    cfg = {'image_res': 32, 'vit': {'patch_size': 8}, 'mim': {'tokenizer': 'color_quant', 'vocab_size': 64}}
    assert build_visual_tokenizer(cfg).encode(torch.rand(2, 3, 16, 16)).shape == (2, 4, 4)


def test_dalle_without_a_local_encoder_names_the_config_key():
    cfg = {'image_res': 256, 'mim': {'tokenizer': 'dalle', 'tokenizer_path': None}}
    with pytest.raises(FileNotFoundError, match="mim.tokenizer_path"):
        build_visual_tokenizer(cfg)


# ---- the shared-stream BERT ----------------------------------------------------------------------------------------
TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, intermediate_size=32,
            max_position_embeddings=20, encoder_width=16, fusion_layer=0, shared_text_fusion=True,
            use_token_type_embeddings=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_shared_stream_modes_and_the_image_query_pass():
    torch.manual_seed(0)
    bert = BertModel(TINY).eval()
    assert 'embeddings.token_type_embeddings.weight' not in bert.state_dict()
    calls = []
    for layer in bert.encoder.layer:
        layer.crossattention.register_forward_hook(lambda *a: calls.append(1))
    ids, mask = torch.randint(1, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    image = torch.randn(2, 7, 16)
    bert(ids, attention_mask=mask, mode='text')
    assert not calls
    bert(ids, attention_mask=mask, encoder_hidden_states=image, mode='multimodal')
    assert len(calls) == 3
    with pytest.raises(ValueError, match='fusion'):
        bert(ids, attention_mask=mask, mode='fusion')
    # image query: image tokens as inputs, caption embeddings as keys, the caption padding respected
    caption = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    cmask = (caption != 0).long()
    ctx = bert.embeddings(caption)
    out = bert(inputs_embeds=image, encoder_hidden_states=ctx, encoder_attention_mask=cmask).last_hidden_state
    assert out.shape == (2, 7, 16)
    other = caption.clone()
    other[1, 3] = 30  # a padded position
    out2 = bert(inputs_embeds=image, encoder_hidden_states=bert.embeddings(other),
                encoder_attention_mask=cmask).last_hidden_state
    assert torch.allclose(out, out2, atol=1e-6)
    # BERT position embeddings are added: swapping two tokens is not just swapping their outputs
    swapped = image[:, [1, 0, 2, 3, 4, 5, 6]]
    out3 = bert(inputs_embeds=swapped, encoder_hidden_states=ctx, encoder_attention_mask=cmask).last_hidden_state
    assert not torch.allclose(out3[:, 0], out[:, 1], atol=1e-5)
    with torch.no_grad():
        bert.embeddings.position_embeddings.weight.zero_()  # without them the pass is permutation-equivariant
    out = bert(inputs_embeds=image, encoder_hidden_states=ctx, encoder_attention_mask=cmask).last_hidden_state
    out3 = bert(inputs_embeds=swapped, encoder_hidden_states=ctx, encoder_attention_mask=cmask).last_hidden_state
    assert torch.allclose(out3[:, 0], out[:, 1], atol=1e-5)
    with pytest.raises(ValueError, match='max_position_embeddings'):
        bert(inputs_embeds=torch.randn(1, 21, 16), encoder_hidden_states=ctx[:1], encoder_attention_mask=cmask[:1])
    att = bert(ids, attention_mask=mask, encoder_hidden_states=image, output_attentions=[-1]).attentions
    assert att[0] is None and att[2].shape == (2, 4, 5, 5)
    assert torch.allclose(att[2].sum(-1), torch.ones(2, 4, 5))


# ---- the DALL-E encoder: our module reads the weights of a pickled foreign encoder without running its code --------
FAKE_DALL_E = '''
from collections import OrderedDict
import torch, torch.nn as nn, torch.nn.functional as F

class Conv2d(nn.Module):
    def __init__(self, n_in, n_out, kw):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
        self.b = nn.Parameter(torch.randn(n_out) * 0.1)
    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / (n_layers ** 2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ('relu_1', nn.ReLU()), ('conv_1', Conv2d(n_in, n_hid, 3)), ('relu_2', nn.ReLU()),
            ('conv_2', Conv2d(n_hid, n_hid, 3)), ('relu_3', nn.ReLU()), ('conv_3', Conv2d(n_hid, n_hid, 3)),
            ('relu_4', nn.ReLU()), ('conv_4', Conv2d(n_hid, n_out, 1))]))
    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)

class Encoder(nn.Module):
    def __init__(self, n_hid=8, vocab_size=16):
        super().__init__()
        n = 8
        g = lambda a, b, pool: nn.Sequential(OrderedDict(
            [('block_1', EncoderBlock(a, b, n)), ('block_2', EncoderBlock(b, b, n))] +
            ([('pool', nn.MaxPool2d(kernel_size=2))] if pool else [])))
        self.blocks = nn.Sequential(OrderedDict([
            ('input', Conv2d(3, n_hid, 7)), ('group_1', g(n_hid, n_hid, True)),
            ('group_2', g(n_hid, 2 * n_hid, True)), ('group_3', g(2 * n_hid, 4 * n_hid, True)),
            ('group_4', g(4 * n_hid, 8 * n_hid, False)),
            ('output', nn.Sequential(OrderedDict([('relu', nn.ReLU()), ('conv', Conv2d(8 * n_hid, vocab_size, 1))])))]))
    def forward(self, x):
        return self.blocks(x)
'''


def test_dalle_encoder_reads_a_pickled_foreign_encoder(tmp_path, monkeypatch):
    import importlib
    import sys

    from models.simla import visual_tokenizer as vt
    package = tmp_path / 'dall_e'
    package.mkdir()
    (package / '__init__.py').write_text('')
    (package / 'encoder.py').write_text(FAKE_DALL_E)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    foreign = importlib.import_module('dall_e.encoder').Encoder()
    torch.save(foreign, tmp_path / 'encoder.pkl')
    view = map_pixels(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        expected = foreign(view)
    for name in [m for m in sys.modules if m == 'dall_e' or m.startswith('dall_e.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, 'path', [p for p in sys.path if p != str(tmp_path)])
    tokenizer = build_visual_tokenizer({'image_res': 32, 'mim': {'tokenizer': 'dalle', 'tokenizer_path': str(tmp_path)}})
    assert 'dall_e' not in sys.modules  # the foreign package was never imported
    with torch.no_grad():
        assert torch.allclose(tokenizer.encoder(view), expected, atol=1e-5)
    assert torch.equal(tokenizer.encode(view), expected.argmax(1)) and tokenizer.vocab_size == 16
    assert vt.main([str(tmp_path / 'encoder.pkl'), str(tmp_path / 'encoder.pth')]) == 0
    plain = vt.DalleTokenizer(str(tmp_path / 'encoder.pth'))  # the extracted file: weights_only loading
    assert torch.equal(plain.encode(view), expected.argmax(1))


# ---- the two views (SIMLA.md section 17 item 9) ------------------------------------------------------------------
def _tiles(seed):
    g = np.random.default_rng(seed)
    colours = g.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(colours, np.ones((32, 32, 1), dtype=np.uint8)))


def _agreement(transform, seed):
    from dataset.transforms import CLIP_MEAN, CLIP_STD
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)  # RandomAugment draws from numpy: without this the result depends on earlier tests
    image, tok_view, mask = transform(_tiles(seed))
    pixels = image * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    tok = ColorQuantTokenizer(grid=4, levels=4)
    vit_codes = tok.encode(map_pixels(pixels.clamp(0, 1))[None])
    return float((tok.encode(tok_view[None]) == vit_codes).float().mean()), mask


def test_shared_view_lines_up_with_the_vit_patches_and_independent_does_not():
    from dataset.simla_views import SimlaPretrainTransform
    shared = SimlaPretrainTransform(64, 32, 'shared', num_masking_patches=5, min_num_patches=2)
    independent = SimlaPretrainTransform(64, 32, 'independent', num_masking_patches=5, min_num_patches=2)
    # SIMLA.md 17 item 9 over its 100 draws. Its proposed "every draw >= 90 %" was calibrated here as the spec allows:
    # measured over 300 draws, mean 0.989, 295 draws >= 0.9375 and 5 at 0.875 (14 of 16 patches); the flips are
    # patches that straddle two tiles after the random crop, whose mixed colour lands near a quantisation level and
    # is averaged slightly differently by the two resamplings (Lanczos to the tokenizer view, the ViT view's pooling)
    agreements = [_agreement(shared, s)[0] for s in range(100)]
    assert min(agreements) >= 0.85 and np.mean(agreements) >= 0.95, agreements
    assert np.mean([_agreement(independent, s)[0] for s in range(100)]) < 0.5
    _, mask = _agreement(shared, 0)
    assert mask.dtype == torch.bool and mask.shape == (16,) and 0 < int(mask.sum()) <= 5


def test_random_dvae_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_visual_tokenizer({'image_res': 32, 'mim': {'tokenizer': 'random_dvae', 'vocab_size': 32}})
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_visual_tokenizer({'image_res': 32, 'mim': {'tokenizer': 'random_dvae', 'vocab_size': 32}})
    view = map_pixels(torch.rand(2, 3, 16, 16))
    codes = a.encode(view)
    assert codes.shape == (2, 2, 2) and codes.dtype == torch.long and int(codes.max()) < 32
    assert torch.equal(codes, b.encode(view))


def test_mim_accuracy_and_the_most_frequent_code_baseline():
    from models.losses import mim_accuracy
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    accuracy, majority = mim_accuracy(logits, torch.tensor([0, 1, 1, 1]))
    assert float(accuracy) == 0.5 and float(majority) == 0.75
    empty = mim_accuracy(logits[:0], torch.zeros(0, dtype=torch.long))
    assert all(torch.isnan(v) for v in empty)
