"""evaluation/gradcam_picture.py turns a checkpoint, an image and a sentence into a sensible PNG."""
import os

import numpy as np
import torch
from PIL import Image

from evaluation.gradcam_picture import COLUMNS, LABEL_HEIGHT, PANEL, gradcam_picture, main, overlay
from models.model_retrieval import ALBEF
from engine.config import load_config, save_config

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'Grounding_synthetic.yaml')


def test_overlay_puts_the_heat_where_the_map_is_high():
    image = Image.new('RGB', (80, 40), (128, 128, 128))  # wide image: rows and columns must not swap
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[0, 3] = 1.0  # top-right
    out = np.asarray(overlay(image, cam), dtype=np.float32)
    assert out.shape == (40, 80, 3)
    red_minus_blue = out[..., 0] - out[..., 2]
    assert red_minus_blue[:8, -16:].mean() > 50 and red_minus_blue[-8:, :16].mean() < -20


def test_picture_layout_one_panel_per_word():
    image = Image.new('RGB', (64, 32), (10, 200, 10))
    words = [(w, np.random.rand(3, 3)) for w in ('the', 'green', 'box', 'on', 'the', 'left')]
    picture = gradcam_picture(image, 'the green box on the left', np.random.rand(3, 3), words)
    panels = 2 + len(words)
    rows = (panels + COLUMNS - 1) // COLUMNS
    assert picture.size == (COLUMNS * PANEL, rows * (PANEL // 2 + LABEL_HEIGHT))


def test_command_writes_a_png_from_a_checkpoint(tmp_path):
    config = load_config(CONFIG)
    config['vit'] = dict(config['vit'], depth=1)
    config['bert_config'] = dict(config['bert_config'], num_hidden_layers=2, fusion_layer=1)
    config.update(image_res=32, gradcam_block=1)
    save_config(config, str(tmp_path / 'config.yaml'))
    torch.manual_seed(0)
    torch.save(ALBEF(config=config, with_momentum=False).state_dict(), tmp_path / 'model.pth')
    picture = Image.new('RGB', (60, 40), (120, 120, 120))
    picture.paste((220, 30, 30), (5, 5, 25, 25))
    picture.save(tmp_path / 'scene.jpg')
    out = tmp_path / 'sub' / 'gradcam.png'
    main(['--checkpoint', str(tmp_path / 'model.pth'), '--config', str(tmp_path / 'config.yaml'),
          '--image', str(tmp_path / 'scene.jpg'), '--text', 'The red square!', '--out', str(out),
          '--text_encoder', 'none'])
    png = Image.open(out)
    assert png.format == 'PNG' and png.mode == 'RGB'
    # image + sentence + 3 word panels ("the red square") -> one row of 4 and one of 1
    height = round(40 * PANEL / 60)
    assert png.size == (COLUMNS * PANEL, 2 * (height + LABEL_HEIGHT))
    pixels = np.asarray(png, dtype=np.float32)
    assert pixels[:height, :PANEL].std() > 10  # the plain image panel
    assert np.abs(pixels[:height, PANEL:2 * PANEL] - pixels[:height, :PANEL]).mean() > 5  # heat drawn on top
    itc = tmp_path / 'itc.png'
    main(['--checkpoint', str(tmp_path / 'model.pth'), '--config', str(tmp_path / 'config.yaml'),
          '--image', str(tmp_path / 'scene.jpg'), '--text', 'red square', '--out', str(itc), '--mode', 'itc',
          '--block_num', '0', '--text_encoder', 'none'])
    assert Image.open(itc).size == (2 * PANEL, height + LABEL_HEIGHT)
