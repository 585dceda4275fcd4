"""The DeiT stand-in of the synthetic recipe (synthetic/deit.py): labels, errors, the DeiT file format that
the pretraining model loads, and the property it exists for ([CLS] features that tell pictures apart)."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import synthetic.deit as stand_in
import engine.config as engine_config
import utils
from dataset.transforms import build_transform
from models.checkpoint import CheckpointError, load_deit
from models.vit import build_vit
from synthetic.world import COLOUR_NAMES, KINDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'Pretrain_synthetic.yaml')


def test_attribute_labels_mark_colours_kinds_and_pairs():
    scene = {'shapes': [{'colour': 'blue', 'kind': 'star'}, {'colour': 'red', 'kind': 'star'}]}
    y = stand_in.attribute_labels(scene)
    n_c, n_k = len(COLOUR_NAMES), len(KINDS)
    assert y.shape == (stand_in.NUM_LABELS,) and y.sum() == 2 + 1 + 2
    assert y[COLOUR_NAMES.index('blue')] == 1 and y[COLOUR_NAMES.index('red')] == 1
    assert y[n_c + KINDS.index('star')] == 1
    assert y[n_c + n_k + n_k * COLOUR_NAMES.index('red') + KINDS.index('star')] == 1


def test_missing_world_names_the_file_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'scenes\.json.*python -m synthetic\.world'):
        stand_in.main(['--root', str(tmp_path), '--config', CONFIG, '--epochs', '1'])
    assert not os.path.exists(tmp_path / stand_in.DEFAULT_NAME)


def test_missing_stand_in_names_the_command(tmp_path):
    from models.model_pretrain import ALBEF
    from tests.parity_utils import StubTokenizer
    config = engine_config.load_config(CONFIG, [f'deit_checkpoint={tmp_path}/absent.pth'])
    with pytest.raises(CheckpointError, match=r'python -m synthetic\.deit'):
        ALBEF(config=config, text_encoder=None, tokenizer=StubTokenizer(), init_deit=True)


@pytest.mark.learning
def test_stand_in_loads_as_deit_and_separates_pictures(synthetic_deit, synthetic_root):
    """The file is a DeiT checkpoint (head included, as the official one) that load_deit takes whole, and its [CLS]
    features tell the held-out test pictures' colours apart, which a randomly initialised ViT's do not."""
    config = engine_config.load_config(CONFIG)
    sd = torch.load(synthetic_deit, map_location='cpu', weights_only=True)['model']
    assert sd['head.weight'].shape == (stand_in.NUM_LABELS, config['vit']['embed_dim'])
    trained = build_vit(config)
    assert load_deit(trained, synthetic_deit) == []  # nothing missing, nothing unused but the classifier head
    for key, value in trained.state_dict().items():
        assert torch.equal(value, sd[key]), key
    torch.manual_seed(0)
    random = build_vit(config)
    with open(os.path.join(synthetic_root, 'scenes.json')) as f:
        scenes = json.load(f)
    names = sorted(n for n in scenes if n.startswith('test_'))
    colours = [{shape['colour'] for shape in scenes[n]['shapes']} for n in names]
    tf = build_transform('test', config['image_res'])
    images = torch.stack([tf(Image.open(os.path.join(synthetic_root, 'images', n + '.jpg')).convert('RGB'))
                          for n in names])

    def neighbour_has_same_colours(vit):
        """Share of held-out pictures whose nearest [CLS] neighbour has exactly the same set of colours."""
        with torch.no_grad():
            f = F.normalize(vit.eval()(images)[:, 0], dim=-1)
        sim = f @ f.T
        sim.fill_diagonal_(-2.0)
        return sum(colours[i] == colours[j] for i, j in enumerate(sim.argmax(1).tolist())) / len(names)

    # measured on the 150 test pictures: random ViTs 0.09-0.12 (seeds 0-2), stand-in 0.83
    assert neighbour_has_same_colours(random) < 0.3
    assert neighbour_has_same_colours(trained) > 0.6


def test_cell_labels_place_each_shape_in_its_grid_cell_and_mirror_with_the_flip():
    scene = {'shapes': [{'colour': 'blue', 'kind': 'star', 'size': 'small', 'row': 0, 'col': 0},
                        {'colour': 'red', 'kind': 'cross', 'size': 'large', 'row': 2, 'col': 1}]}
    y = stand_in.cell_labels(scene)
    assert y.shape == (9, 3)
    assert y[0].tolist() == [1 + COLOUR_NAMES.index('blue'), 1 + KINDS.index('star'), 1]
    assert y[7].tolist() == [1 + COLOUR_NAMES.index('red'), 1 + KINDS.index('cross'), 2]
    assert (y[[1, 2, 3, 4, 5, 6, 8]] == 0).all()  # empty cells are class 0 of every attribute
    mirrored = stand_in.mirror_cells(y[None])[0]
    assert mirrored[2].tolist() == y[0].tolist() and mirrored[7].tolist() == y[7].tolist()
    assert (mirrored[0] == 0).all()
    assert torch.equal(stand_in.mirror_cells(mirrored[None])[0], y)


def test_cell_features_pool_patch_tokens_onto_the_grid():
    """Token t of an 8x8 patch grid carries its column index: cell (r, c) averages the columns of its window."""
    side, dim = 8, 2
    tokens = torch.zeros(1, 1 + side * side, dim)
    tokens[0, 1:, 0] = torch.arange(side).repeat(side).float()      # column of each patch
    tokens[0, 1:, 1] = torch.arange(side).repeat_interleave(side).float()  # row of each patch
    cells = stand_in.cell_features(tokens)[0]
    assert cells.shape == (9, dim)
    # columns increase left to right within a row of cells and rows top to bottom
    assert cells[0, 0] < cells[1, 0] < cells[2, 0] and cells[0, 1] < cells[3, 1] < cells[6, 1]
    assert torch.allclose(cells[4], torch.tensor([3.5, 3.5]))  # the centre cell is centred


def test_cell_loss_is_low_only_for_the_right_cells():
    y = stand_in.cell_labels({'shapes': [{'colour': 'green', 'kind': 'circle', 'size': 'small', 'row': 1,
                                          'col': 1}]})[None]
    right = torch.full((1, 9, sum(stand_in.CELL_CLASSES)), -20.0)
    offsets = [0, stand_in.CELL_CLASSES[0], stand_in.CELL_CLASSES[0] + stand_in.CELL_CLASSES[1]]
    for cell in range(9):
        for attr in range(3):
            right[0, cell, offsets[attr] + y[0, cell, attr]] = 20.0
    assert stand_in.cell_loss(right, y) < 1e-6
    acc = stand_in.cell_accuracy(right, y)
    assert {k: v for k, v in acc.items() if k != 'kind_large'} == {'colour': 1.0, 'kind': 1.0, 'size': 1.0,
                                                                    'empty': 1.0, 'kind_small': 1.0}
    assert math.isnan(acc['kind_large'])  # no large shape to score
    two = stand_in.cell_labels({'shapes': [{'colour': 'red', 'kind': 'star', 'size': 'small', 'row': 0, 'col': 0},
                                           {'colour': 'red', 'kind': 'cross', 'size': 'large', 'row': 2, 'col': 2}]})
    logits = torch.full((1, 9, sum(stand_in.CELL_CLASSES)), -20.0)
    for cell in range(9):
        for attr in range(3):
            logits[0, cell, offsets[attr] + two[cell, attr]] = 20.0
    logits[0, 8, offsets[1] + 1] = 40.0  # the large shape's kind read as a circle
    split = stand_in.cell_accuracy(logits, two[None])
    assert (split['kind'], split['kind_small'], split['kind_large']) == (0.5, 1.0, 0.0)
    wrong = right.roll(1, dims=1)  # every cell's logits moved to the next cell
    assert stand_in.cell_loss(wrong, y) > 5  # two of nine cells wrong by a margin of 40
    assert stand_in.cell_accuracy(wrong, y)['kind'] == 0.0


@pytest.mark.e2e
def test_a_short_run_lowers_the_loss_and_writes_a_deit_file_of_its_world(tmp_path, capsys):
    """The command that made the committed stand-in (tests/fixtures/synthetic_pretrained/README.md), on a small world
    for a few epochs: it trains (the loss falls), and writes a DeiT file that records its world and that load_deit
    takes whole."""
    from synthetic.world import generate, identity
    root = tmp_path / 'world'
    generate(root, seed=0, scale=0.1)
    output = stand_in.main(['--root', str(root), '--config', CONFIG, '--epochs', '2',
                            '--output', str(tmp_path / 'deit.pth')])
    losses = [float(x) for x in re.findall(r'^epoch \d+: loss ([0-9.]+)', capsys.readouterr().out, flags=re.M)]
    # measured: 0.626 -> 0.529 (300 pictures, 4 steps an epoch)
    assert len(losses) == 2 and losses[1] < losses[0] - 0.05, losses
    saved = torch.load(output, map_location='cpu', weights_only=True)
    assert saved['world'] == identity(root) and saved['epochs'] == 2
    assert load_deit(build_vit(engine_config.load_config(CONFIG)), output) == []


@pytest.mark.unit
def test_the_committed_stand_in_is_the_recipe_s():
    from tests.helpers import SYNTHETIC_DEIT
    saved = torch.load(SYNTHETIC_DEIT, map_location='cpu', weights_only=True)
    assert (saved['epochs'], saved['seed'], saved['cell_weight']) == (4, 0, 0.0)
    from synthetic.world import FORMAT_VERSION
    assert saved['world'] == {'generator': 'synthetic.world', 'format_version': FORMAT_VERSION, 'seed': 0, 'scale': 1.0}
