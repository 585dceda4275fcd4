"""scripts/probe_vision.py: a linear per-cell probe of a checkpoint's frozen visual encoder on the synthetic world."""
import os

import pytest
import torch

import engine.config as engine_config
from models.checkpoint import CheckpointError
from models.vit import build_vit
from scripts import probe_vision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(REPO, 'configs', 'Pretrain_synthetic.yaml')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from synthetic.world import generate
    root = tmp_path_factory.mktemp('probe_world') / 'world'
    generate(root, seed=0, scale=0.1)
    return str(root)


def test_a_deit_file_and_a_model_checkpoint_of_the_same_vit_probe_alike(world, tmp_path, capsys):
    config = engine_config.load_config(CONFIG)
    torch.manual_seed(3)
    vit_sd = build_vit(config).state_dict()
    torch.save({'model': vit_sd}, tmp_path / 'deit.pth')
    # a model checkpoint: the ViT under visual_encoder.*, beside weights the probe must ignore
    model_sd = {'visual_encoder.' + k: v.half() for k, v in vit_sd.items()}  # stored as synthetic.pretrained does
    model_sd['text_encoder.embeddings.word_embeddings.weight'] = torch.zeros(4, 2)
    torch.save({'model': model_sd, 'info': {}}, tmp_path / 'model.pth')
    a = probe_vision.main(['--checkpoint', str(tmp_path / 'deit.pth'), '--root', world, '--epochs', '30'])
    b = probe_vision.main(['--checkpoint', str(tmp_path / 'model.pth'), '--root', world, '--epochs', '30'])
    for split in ('train', 'test'):
        for name in ('colour', 'kind', 'size', 'empty'):
            assert abs(a[split][name] - b[split][name]) < 0.02, (split, name, a, b)  # the same weights, half-stored
    assert 'test_*' in capsys.readouterr().out


def test_the_probe_reads_what_the_features_hold(world):
    """Colours are linearly readable from a random ViT's patch tokens; the same features shuffled across pictures
    are not: the probe measures the features, not the labels' frequencies."""
    config = engine_config.load_config(CONFIG)
    torch.manual_seed(0)
    vit = probe_vision.load_visual_encoder(config)
    from synthetic.deit import load_training_pictures
    train_pictures, _, _, train_cells = load_training_pictures(world, config['image_res'], 'train_')
    test_pictures, _, _, test_cells = load_training_pictures(world, config['image_res'], 'test_')
    train_x, test_x = probe_vision.grid_tokens(vit, train_pictures), probe_vision.grid_tokens(vit, test_pictures)
    real = probe_vision.linear_probe(train_x, train_cells, test_x, test_cells, epochs=200)
    shuffled = probe_vision.linear_probe(train_x[torch.randperm(len(train_x))], train_cells, test_x, test_cells,
                                         epochs=200)
    # measured on this world (300 training pictures): colour 0.58 / 0.72 (train / test) against 0.0 / 0.0 for the
    # shuffled features, whose head answers "empty"
    assert real['train']['colour'] > shuffled['train']['colour'] + 0.3, (real, shuffled)
    assert real['test']['colour'] > shuffled['test']['colour'] + 0.3, (real, shuffled)


def test_a_checkpoint_without_vit_weights_is_refused_by_name(tmp_path):
    path = tmp_path / 'text_only.pth'
    torch.save({'model': {'text_encoder.embeddings.word_embeddings.weight': torch.zeros(4, 2)}}, path)
    with pytest.raises(CheckpointError, match=r'text_only\.pth holds no ViT weights'):
        probe_vision.load_visual_encoder(engine_config.load_config(CONFIG), str(path))
