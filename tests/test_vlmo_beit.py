"""The BEiT stand-in of the synthetic VLMo recipe (synthetic/beit.py): the official BEiT checkpoint layout, its
conversion into the stage-2 model with the official missing/unexpected sets, the same image tower on both sides, and
VLMo's image normalisation (mean = std = 0.5) in the data pipeline, ALBEF's unchanged."""
import json
import re

import torch

from dataset.transforms import CLIP_MEAN, CLIP_STD, build_transform, normalisation_of
from models.vlmo import VLMo
from models.vlmo_checkpoint import load_pretrained
from synthetic.beit import build_stand_in

CONFIG = {'model': 'vlmo', 'image_res': 16, 'max_text_len': 8, 'max_text_len_of_initckpt': 8,
          'vlmo': {'patch_size': 8, 'embed_dim': 32, 'depth': 2, 'num_heads': 2, 'mlp_ratio': 2,
                   'vlffn_start_layer_index': 1, 'drop_path_rate': 0.0}}


def perturbed_stand_in():
    torch.manual_seed(0)
    stand_in = build_stand_in(CONFIG, cell_weight=1.0)
    with torch.no_grad():
        for p in stand_in.parameters_to_train():
            p.add_(0.1 * torch.randn_like(p))  # trained-looking values: every key is distinguishable
    return stand_in


def test_stand_in_writes_the_official_beit_layout():
    sd = perturbed_stand_in().beit_state_dict()
    block = ['gamma_1', 'gamma_2', 'norm1.weight', 'norm1.bias', 'attn.q_bias', 'attn.v_bias',
             'attn.relative_position_bias_table', 'attn.relative_position_index', 'attn.qkv.weight',
             'attn.proj.weight', 'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
             'mlp.fc2.weight', 'mlp.fc2.bias']
    expected = (['cls_token', 'patch_embed.proj.weight', 'patch_embed.proj.bias']
                + [f'blocks.{i}.{k}' for i in range(2) for k in block]
                + ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias'])
    assert list(sd) == expected
    grid_rows = (2 * 2 - 1) ** 2 + 3  # (2G-1)^2 + 3 rows per layer, one column per head
    assert sd['blocks.0.attn.relative_position_bias_table'].shape == (grid_rows, 2)
    assert sd['blocks.0.attn.relative_position_index'].shape == (5, 5)


def test_stage_two_reads_the_stand_in_with_the_official_sets_and_the_same_image_tower():
    stand_in = perturbed_stand_in()
    stage2 = VLMo(config={**CONFIG, 'task': 'textmlm'}, task='textmlm')
    missing, unexpected = load_pretrained(stage2, {'model': stand_in.beit_state_dict()})
    # BEiT -> stage 2 (VLMo.md §6.1): the text side, the final norm, the pooler and the MLM head start fresh
    assert all(re.search(r'norm2_text|mlp_text|transformer\.norm\.|text_embeddings|token_type_embeddings|pooler|'
                         r'mlm_score', k) for k in missing)
    assert len([k for k in missing if 'text' in k and 'blocks' in k]) == 2 * 6
    assert sorted(unexpected) == sorted(['transformer.fc_norm.weight', 'transformer.fc_norm.bias',
                                         'transformer.head.weight', 'transformer.head.bias']
                                        + [f'transformer.blocks.{i}.attn.relative_position_index' for i in range(2)])
    image = torch.randn(3, 3, 16, 16)
    stand_in.eval()
    reader = build_stand_in(CONFIG, cell_weight=0.0)
    reader.vlmo = stage2
    reader.eval()
    with torch.no_grad():
        assert torch.allclose(stand_in.tokens(image), reader.tokens(image), atol=1e-6)


def test_vlmo_pipelines_normalise_with_one_half_and_albef_keeps_clip():
    assert normalisation_of({'model': 'vlmo'}) == ((0.5,) * 3, (0.5,) * 3)
    assert normalisation_of({}) == (CLIP_MEAN, CLIP_STD) and normalisation_of({'model': 'simla'}) == (CLIP_MEAN,
                                                                                                     CLIP_STD)
    for kind in ('pretrain', 'train', 'grounding_train', 'test'):
        albef = build_transform(kind, 32).transforms[-1]
        vlmo = build_transform(kind, 32, normalisation=normalisation_of({'model': 'vlmo'})).transforms[-1]
        assert tuple(albef.mean) == CLIP_MEAN and tuple(albef.std) == CLIP_STD
        assert tuple(vlmo.mean) == (0.5,) * 3 and tuple(vlmo.std) == (0.5,) * 3


def test_stage_two_starts_from_the_file_its_config_names(tmp_path):
    """vlmo.init.beit_checkpoint: the start file when no --checkpoint is given; a missing one names the key."""
    import types

    import pytest

    from engine.script import build_task_model
    from models.vlmo import init_checkpoint
    beit = tmp_path / 'beit.pth'
    stand_in = perturbed_stand_in()
    torch.save({'model': stand_in.beit_state_dict()}, beit)
    config = {**CONFIG, 'task': 'textmlm', 'vlmo': {**CONFIG['vlmo'], 'init': {'beit_checkpoint': str(beit)}}}
    assert init_checkpoint(config) == str(beit)
    args = types.SimpleNamespace(checkpoint=None, resume=None)
    model = build_task_model(config, 'pretrain', args)
    trained = stand_in.vlmo.transformer.blocks[1].mlp_imag.fc1.weight
    assert torch.equal(model.transformer.blocks[1].mlp_imag.fc1.weight, trained)
    # metrics.json names the file the run started from, not '' (no --checkpoint was given)
    from engine.script import write_metrics
    args.output_dir, args.config = str(tmp_path), 'vlmo.yaml'
    write_metrics(args, config, 'pretrain', {'loss': 1.0}, epoch=0)
    assert json.loads((tmp_path / 'metrics.json').read_text())['checkpoint'] == str(beit)
    assert init_checkpoint({**CONFIG, 'vlmo': {**CONFIG['vlmo'], 'init': {'pretrained': None}}}) is None
    missing = {**CONFIG, 'vlmo': {**CONFIG['vlmo'], 'init': {'stage2_checkpoint': str(tmp_path / 'nope.pth')}}}
    with pytest.raises(FileNotFoundError, match=r'vlmo\.init\.stage2_checkpoint: .*nope\.pth does not exist'):
        build_task_model({**missing, 'task': 'pretrain'}, 'pretrain', args)
